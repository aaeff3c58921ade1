"""Loss and top-1/top-5 accuracy over batches, optionally summed across the ranks of a process group.

The forward passes run under a `laasp_dist.precision.Numerics` (autocast and memory format of the
model's device); the sums are float64 from float32 logits, and stay on the device until the end.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..precision import Numerics


def metric_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                *, numerics: Numerics | None = None) -> torch.Tensor:
    """[loss sum, top-1 correct, top-5 correct, count] in float64 over `batches`, model in eval mode.

    `numerics` defaults to fp32 in the default memory format; the model is expected in its memory format.
    """
    numerics = (numerics or Numerics()).on(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for x, y in batches:
                x, y = numerics.inputs(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
                with numerics.autocast():
                    logits = model(x)
                sums += accuracy_sums(logits.float(), y)
    finally:
        model.train(was_training)
    return sums


def accuracy_sums(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 correct, top-5 correct, count] of one batch (float64)."""
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top == labels.view(-1, 1)
    return torch.stack([
        F.cross_entropy(logits.double(), labels, reduction="sum"),
        hit[:, 0].sum().double(), hit.any(1).sum().double(),
        torch.full((), float(len(labels)), dtype=torch.float64, device=logits.device),  # a fill: no host copy
    ])


def summarise(sums: torch.Tensor, distributed: bool = False) -> dict[str, Any]:
    """Sums (reduced over the process group when `distributed`) → {loss, top1, top5, images}."""
    if distributed and dist.is_initialized():
        sums = sums.clone()
        dist.all_reduce(sums)
    loss, c1, c5, n = (float(v) for v in sums.cpu())
    n_ = max(n, 1.0)
    return {"loss": loss / n_, "top1": c1 / n_, "top5": c5 / n_, "images": int(n)}


def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device | str = "cpu", *, distributed: bool = False, numerics: Numerics | None = None
             ) -> dict[str, Any]:
    """Mean loss, top-1 and top-5 accuracy (fractions) of `model` over `batches`."""
    return summarise(metric_sums(model, batches, torch.device(device), numerics=numerics), distributed)
