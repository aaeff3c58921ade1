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
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from .figures import width_figure


class RunMonitor:
    """A SummaryWriter with the run's vocabulary."""

    def __init__(self, log_dir: str | Path, criteria: Sequence[str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))
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
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
