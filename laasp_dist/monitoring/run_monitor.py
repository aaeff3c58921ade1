"""TensorBoard logging of a run (coordinator only).

Epoch scalars (step = epoch): ``train/loss``, ``train/top1``, ``val/loss``,
``val/top1``, ``val/top5``, ``lr``, ``model/macs``, ``model/params``,
``prune/flops_reduction``. Round scalars (step = round index, from 1):
``prune/winner_loss``, ``prune/winner_criterion`` (index of the winner in the
criteria pool) and ``prune/round_flops_reduction``; the winner's name and group as text
(``prune/winner``). The per-layer width figure (``model/widths``) after every
recovery and at the end. A resumed run appends to the same folder (a new event
file); an epoch that was interrupted mid-way can appear twice, the later value
being the one that counts.

On a local run folder the logs are written in place (``tensorboard --logdir`` follows
the run live). A run folder on an object store cannot be appended to: the logs are
staged in a local temporary folder and uploaded to ``<run>/tensorboard`` with every
checkpoint (`sync`), so they are at most one epoch or round behind there.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from ..storage import Storage
from .figures import width_figure

LOG_DIR = "tensorboard"


class RunMonitor:
    """A SummaryWriter with the run's vocabulary."""

    def __init__(self, run: Storage, criteria: Sequence[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.run = run
        self.staging = None if run.is_local else tempfile.mkdtemp(prefix="laasp-tensorboard-")
        self.writer = SummaryWriter(str(run.local_path(LOG_DIR)) if self.staging is None else self.staging)
        self.criteria = list(criteria)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            if value is not None:
                self.writer.add_scalar(tag, float(value), step)

    def round(self, index: int, group: str, criterion: str, loss: float, flops_reduction: float) -> None:
        crit = self.criteria.index(criterion) if criterion in self.criteria else -1
        self.scalars(index, {"prune/winner_loss": loss, "prune/winner_criterion": crit,
                             "prune/round_flops_reduction": flops_reduction})
        self.writer.add_text("prune/winner", f"round {index}: {criterion} on {group} (loss {loss:.4f})", index)

    def widths(self, step: int, original: dict[str, int], current: dict[str, int], title: str = "") -> None:
        fig = width_figure(original, current, title)
        self.writer.add_figure("model/widths", fig, step, close=True)
        plt.close(fig)

    def flush(self) -> None:
        """Write out pending events (and upload them when the run folder is remote)."""
        self.writer.flush()
        if self.staging is not None:
            self.run.upload(Path(self.staging), LOG_DIR)

    def close(self) -> None:
        self.flush()
        self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
