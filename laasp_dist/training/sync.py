"""Keeping the ranks identical: broadcast from the coordinator, and a checked (not assumed) identity test."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import LaaspError


class SyncError(LaaspError):
    """The ranks of a run disagree (different weights after a broadcast)."""


def _active() -> bool:
    """Whether a process group is up. A one-worker run has one too (Ray Train always makes it), and its
    collectives run like a bigger run's, so a one-GPU run exercises the NCCL code paths of a multi-GPU one."""
    return dist.is_available() and dist.is_initialized()


def broadcast(obj: Any, src: int = 0, device: torch.device | None = None) -> Any:
    """`obj` of rank `src` on every rank (pickled; tensors travel as CPU tensors)."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=device if device is not None and device.type == "cuda" else None)
    return box[0]


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Rank `src`'s buffers (BN running statistics) on every rank, in place.

    DDP syncs buffers at the start of every training forward, so after an epoch the
    other ranks' statistics have absorbed one more local batch; this makes the ranks
    identical at epoch boundaries, where they are evaluated and checkpointed.
    """
    if _active():
        for b in model.buffers():
            dist.broadcast(b.data, src)


def max_over_ranks(value: float, device: torch.device) -> float:
    """The largest of every rank's `value`."""
    if not _active():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier() -> None:
    if _active():
        dist.barrier()


def digest(model: nn.Module, momentum: dict[str, torch.Tensor] | None = None) -> str:
    """SHA-256 over every parameter and buffer (name, shape, dtype, bytes), then the momentum buffers."""
    h = hashlib.sha256()
    items = list(model.state_dict().items()) + sorted((momentum or {}).items())
    for name, t in items:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_identical(model: nn.Module, momentum: dict[str, torch.Tensor] | None, what: str) -> list[str]:
    """All-gather every rank's digest; SyncError if any differs. Returns the digests (rank order)."""
    digests = all_gather(digest(model, momentum))
    if len(set(digests)) != 1:
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        raise SyncError(f"ranks {bad} hold different weights from rank 0 after {what}")
    return digests
