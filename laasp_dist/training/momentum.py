"""SGD momentum across a prune: buffers keyed by parameter name, sliced to the kept channels.

Pruning replaces the pruned layers' parameters with smaller ones, so the
optimizer is rebuilt on the new model after every prune. Its momentum survives:
each buffer is sliced along the dimensions the prune shrank, with the indices
the channel group's members record (a conv/linear weight loses rows on dim 0 for
the group's output members and columns on dim 1 for its input members; BN
weight/bias and conv/linear bias lose entries on dim 0). A buffer whose sliced
shape does not match the new parameter (should not happen) is dropped, and that
parameter starts with fresh momentum.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

from ..pruning.groups import ChannelGroup


def momentum_by_name(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, torch.Tensor]:
    """The momentum buffers of `optimizer`, keyed by the parameter names of `model` (CPU copies)."""
    out = {}
    for name, p in model.named_parameters():
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf.detach().to("cpu", copy=True)
    return out


def load_momentum(optimizer: torch.optim.Optimizer, model: nn.Module, buffers: dict[str, torch.Tensor]) -> int:
    """Install momentum buffers by parameter name; returns how many were installed.

    Each buffer takes its parameter's device, dtype and memory format (channels_last parameters get
    channels_last buffers, as SGD itself would create them), whatever layout it travelled in.
    """
    n = 0
    for name, p in model.named_parameters():
        buf = buffers.get(name)
        if buf is not None and buf.shape == p.shape:
            optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)
            n += 1
    return n


def removed_indices(group: ChannelGroup, channels: Sequence[int]) -> dict[tuple[str, int], list[int]]:
    """{(module name, dim): removed indices} for a prune of `channels` of `group` (taken before the prune)."""
    out: dict[tuple[str, int], set[int]] = {}
    for m in group.members:
        depthwise = isinstance(m.module, nn.Conv2d) and m.module.groups > 1
        dim = 0 if m.dim == "out" or depthwise else 1
        if isinstance(m.module, nn.BatchNorm2d) and m.dim == "in":
            continue
        out.setdefault((m.name, dim), set()).update(m.indices_for(channels))
    return {k: sorted(v) for k, v in out.items()}


def slice_momentum(
    buffers: dict[str, torch.Tensor],
    removed: dict[tuple[str, int], list[int]],
    new_shapes: dict[str, torch.Size],
) -> dict[str, torch.Tensor]:
    """Buffers of the pruned model: every buffer with its removed indices dropped; mismatches dropped."""
    out = {}
    for name, buf in buffers.items():
        if name not in new_shapes:
            continue
        module, _, kind = name.rpartition(".")
        sliced = buf
        for (mod, dim), idx in removed.items():
            if mod != module or not idx:
                continue
            d = 0 if kind == "bias" else dim
            if d >= sliced.ndim or (kind == "bias" and dim != 0):
                continue
            keep = torch.ones(sliced.shape[d], dtype=torch.bool)
            keep[idx] = False
            sliced = sliced[(slice(None),) * d + (keep,)]
        if sliced.shape == new_shapes[name]:
            out[name] = sliced.contiguous()
        else:
            warnings.warn(f"momentum of {name} could not be sliced ({tuple(buf.shape)} -> {tuple(sliced.shape)}, "
                          f"parameter is {tuple(new_shapes[name])}): reset", stacklevel=2)
    return out
