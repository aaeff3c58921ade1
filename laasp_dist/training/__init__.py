"""Pruning while training: the LAASP schedule on Ray Train (DDP), checkpoints and resume.

Entry points: `run_job(config, out_dir, resume)` (driver) and `train_worker(loop_config)`
(every Ray Train worker); `measure_slim_model(dir, config)` re-measures a final model.
"""

from .checkpoint import CheckpointError, load_checkpoint
from .job import RunDirError, TrainingError, run_job
from .worker import measure_slim_model, train_worker

__all__ = ["CheckpointError", "RunDirError", "TrainingError", "load_checkpoint", "measure_slim_model", "run_job",
           "train_worker"]
