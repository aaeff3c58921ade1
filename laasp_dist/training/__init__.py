"""Pruning while training: the LAASP schedule on Ray Train (DDP), checkpoints and resume.

Entry points: `run_job(config, out_dir, resume)` (driver) and `train_worker(loop_config)`
(every Ray Train worker); `measure_slim_model(dir, config)` re-measures a final model.
"""

from .checkpoint import CheckpointError, latest_state
from .job import RunDirError, TrainingError, run_job
from .measure import measure_slim_model
from .worker import train_worker

__all__ = ["CheckpointError", "RunDirError", "TrainingError", "latest_state", "measure_slim_model", "run_job",
           "train_worker"]
