"""A network being pruned: model + dependency graph + groups + costs + the record of prunes."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import PruningError
from ..models import create_model, model_entry
from .criteria import get_criterion
from .flops import CostReport, count_cost
from .groups import ChannelGroup, build_dependency_graph, describe_group, masked, remove_channels, trace_groups
from .importance import Aggregation, group_importance, least_important
from .steps import FLOPS, StepCost, choose_k, kept_widths


@dataclass(frozen=True)
class Arch:
    """Which registered model, for how many classes and input channels, at what input size."""

    model: str
    num_classes: int
    in_channels: int = 3
    input_size: int | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.input_size or model_entry(self.model).input_size
        return (self.in_channels, size, size)


@dataclass(frozen=True)
class PruneRecord:
    """One applied prune: root channels (indices at that time) removed from a group."""

    group: str
    channels: tuple[int, ...]
    criterion: str | None = None


@dataclass(frozen=True)
class Candidate:
    """Remove `channels` of `group`, chosen by `criterion`.

    `importance`: the sum of the removed channels' group-normalised criterion scores (what
    `prune.selection: importance` ranks by); not part of a candidate's identity.
    """

    group: str
    criterion: str
    channels: tuple[int, ...]
    importance: float = field(default=math.nan, compare=False)

    @property
    def k(self) -> int:
        return len(self.channels)


class PrunableNetwork:
    """A model that can list its channel groups, mask them, and be physically slimmed."""

    def __init__(
        self,
        model: nn.Module,
        arch: Arch,
        *,
        base_macs: int | None = None,
        original_widths: dict[str, int] | None = None,
        prunes: Sequence[PruneRecord] = (),
    ) -> None:
        self.model = model
        self.arch = arch
        self.classifier = model_entry(arch.model).classifier
        self.dg = build_dependency_graph(model, arch.input_shape)
        self._groups = trace_groups(model, self.dg, self.classifier)
        self._cost = count_cost(model, arch.input_shape)
        self.base_macs = base_macs if base_macs is not None else self._cost.macs
        self.original_widths = dict(original_widths or {g.name: g.width for g in self._groups})
        self.prunes: list[PruneRecord] = list(prunes)

    @classmethod
    def create(cls, arch: Arch) -> "PrunableNetwork":
        """A freshly initialised, unpruned network."""
        return cls(create_model(arch.model, arch.num_classes, arch.in_channels), arch)

    @property
    def groups(self) -> list[ChannelGroup]:
        return list(self._groups)

    def group(self, name: str) -> ChannelGroup:
        for g in self._groups:
            if g.name == name:
                return g
        raise PruningError(f"no prunable group named {name!r} in {self.arch.model}")

    @property
    def cost(self) -> CostReport:
        return self._cost

    @property
    def macs_reduction(self) -> float:
        """Fraction of the original MACs removed so far."""
        return 1.0 - self._cost.macs / self.base_macs

    def widths(self) -> dict[str, int]:
        """Current width of every group."""
        return {g.name: g.width for g in self._groups}

    @contextmanager
    def masked(self, group: str, channels: Sequence[int]) -> Iterator[None]:
        """Score-time stand-in for `prune`: the channels are zeroed, the model is unchanged."""
        with masked(self.group(group), channels):
            yield

    def prune(self, group: str, channels: Sequence[int], criterion: str | None = None) -> PruneRecord:
        """Physically remove root channels of a group; record and return the prune."""
        g = self.group(group)
        channels = tuple(sorted({int(c) for c in channels}))
        if not channels or channels[0] < 0 or channels[-1] >= g.width or len(channels) >= g.width:
            raise PruningError(f"cannot remove channels {list(channels)} from group {group!r} of width {g.width}")
        remove_channels(self.dg, g.members[0].module, channels)
        modules = dict(self.model.named_modules())
        self._groups = [describe_group(self.model, self.dg, modules[x.name]) for x in self._groups]
        self._cost = count_cost(self.model, self.arch.input_shape)
        record = PruneRecord(group, channels, criterion)
        self.prunes.append(record)
        return record

    def step_size(self, group: ChannelGroup, step_fraction: float, max_prune_ratio: float,
                  target_reduction: float | None = None, *, round_to: int = 1, cost: StepCost = FLOPS) -> int:
        """Channels a candidate of `group` removes this round (SPEC 2b, last step trimmed to the target).

        `step_fraction` and `target_reduction` are fractions of the original network's `cost`
        (MACs by default, or table-estimated latency); the kept width stays a multiple of
        `round_to` and within `max_prune_ratio`. 0: the group may not lose anything now.
        """
        ks = group.width - kept_widths(group.width, self.original_widths[group.name], max_prune_ratio, round_to)
        if not len(ks):
            return 0
        remaining = None if target_reduction is None else target_reduction - cost.reduction(self)
        return choose_k(ks, cost.removed(self, group, ks), step_fraction, remaining)

    def candidates(
        self,
        criteria: Sequence[str],
        step_fraction: float,
        max_prune_ratio: float,
        *,
        target_reduction: float | None = None,
        aggregation: Aggregation = "group",
        seed: int = 0,
        statistics: Mapping[str, torch.Tensor] | None = None,
        round_to: int = 1,
        cost: StepCost = FLOPS,
    ) -> list[Candidate]:
        """Every (group × criterion) candidate of this round, in group order then criterion order.

        `statistics` feeds the `activation` criteria (`taylor`): see `importance.taylor_statistics`.
        """
        pool = [get_criterion(c) for c in criteria]
        out = []
        for index, group in enumerate(self._groups):
            k = self.step_size(group, step_fraction, max_prune_ratio, target_reduction, round_to=round_to, cost=cost)
            if k < 1:
                continue
            for criterion in pool:
                scores = group_importance(group, criterion, aggregation, seed=seed * 100_003 + index,
                                          statistics=statistics)
                channels = least_important(scores, k)
                out.append(Candidate(group.name, criterion.name, channels, float(scores[list(channels)].sum())))
        return out

    def apply(self, candidate: Candidate) -> PruneRecord:
        """Physically apply a candidate."""
        return self.prune(candidate.group, candidate.channels, candidate.criterion)

    def parameters_device(self) -> torch.device:
        return next(self.model.parameters()).device
