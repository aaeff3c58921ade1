"""Group importance from a criterion, and the channels a candidate removes."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .criteria import Criterion
from .groups import ChannelGroup, Member

Aggregation = Literal["group", "root"]


def _member_rows(member: Member) -> Tensor:
    module = member.module
    if isinstance(module, nn.BatchNorm2d):
        return module.weight.detach().unsqueeze(1)
    return module.weight.detach().flatten(1)


def _score_members(group: ChannelGroup, criterion: Criterion, aggregation: Aggregation) -> list[Member]:
    kind = nn.BatchNorm2d if criterion.source == "bn" else nn.Conv2d
    members = group.outputs(kind)
    if aggregation == "root":
        root = group.root_bn if criterion.source == "bn" else group.name
        members = [m for m in members if m.name == root] or members[:1]
    return members


def group_importance(
    group: ChannelGroup, criterion: Criterion, aggregation: Aggregation = "group", seed: int = 0
) -> Tensor:
    """One float64 score per root channel.

    `group`: each member layer's scores are divided by their mean (so layers of
    different scale weigh alike), mapped to root channels and averaged.
    `root`: the root conv (or its BN) alone, as the reference code ranks.
    """
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(group.width, dtype=torch.float64)
    members = _score_members(group, criterion, aggregation)
    for member in members:
        rows = _member_rows(member).to("cpu", torch.float64)
        scores = criterion.fn(rows, generator)[list(member.idxs)]
        scores = scores / scores.mean().clamp_min(1e-12)
        per_root = torch.zeros(group.width, dtype=torch.float64).index_add_(0, torch.tensor(member.root_idxs), scores)
        counts = torch.zeros(group.width, dtype=torch.float64).index_add_(
            0, torch.tensor(member.root_idxs), torch.ones(len(member.root_idxs), dtype=torch.float64))
        total += per_root / counts.clamp_min(1)
    return total / max(len(members), 1)


def least_important(scores: Tensor, k: int) -> tuple[int, ...]:
    """The k lowest-scoring channels (ties: lower index first), sorted ascending."""
    order = torch.sort(scores, stable=True).indices[:k]
    return tuple(sorted(int(i) for i in order))
