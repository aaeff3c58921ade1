"""Loss and top-1/top-5 accuracy over batches, optionally summed across the ranks of a process group."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast("cuda", dtype=torch.bfloat16) if bf16 and device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def metric_sums(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                *, bf16: bool = False) -> torch.Tensor:
    """[loss sum, top-1 correct, top-5 correct, count] in float64 over `batches`, model in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for x, y in batches:
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with _autocast(device, bf16):
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
        hit[:, 0].sum().double(), hit.any(1).sum().double(), torch.tensor(float(len(labels)), device=logits.device,
                                                                          dtype=torch.float64),
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
             device: torch.device | str = "cpu", *, distributed: bool = False, bf16: bool = False) -> dict[str, Any]:
    """Mean loss, top-1 and top-5 accuracy (fractions) of `model` over `batches`."""
    return summarise(metric_sums(model, batches, torch.device(device), bf16=bf16), distributed)
