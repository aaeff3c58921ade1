"""Step sizing: how many channels of a group to remove for a given cut, within caps and rounding.

A step is measured in a *cost* — the fraction of the original network's MACs (`FLOPS`, the
default) or of its table-estimated latency (`laasp_dist.latency_table.LatencyModel`). The
rules are the same for both: the k ≥ 1 whose cut is closest to one step (the smaller k on a
tie); on the last step, the smallest k that reaches the target; only k that remove
something count. `round_to` N keeps a group's width a multiple of N (a group originally
narrower than N is exempt and keeps at least one channel); `max_prune_ratio` always holds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import numpy as np
from torch import nn

from .groups import ChannelGroup

if TYPE_CHECKING:
    from .network import PrunableNetwork


def _layer_fractions(group: ChannelGroup) -> dict[str, tuple[float, float, bool]]:
    """Per conv/linear layer of the group: (out, in) fraction of that dimension lost per root channel, depthwise."""
    fractions: dict[str, dict[str, float]] = {}
    modules: dict[str, nn.Module] = {}
    for member in group.members:
        module = member.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        modules[member.name] = module
        fractions.setdefault(member.name, {})[member.dim] = len(member.idxs) / group.width / _dim_size(module, member.dim)
    return {name: (frac.get("out", 0.0), frac.get("in", 0.0), is_depthwise(modules[name]))
            for name, frac in fractions.items()}


def kept_share(out_lost: Any, in_lost: Any, depthwise: bool) -> Any:
    """Share of a conv/linear layer's MACs kept when it loses these fractions of its output and input
    channels (floats or arrays); a depthwise convolution's input and output channels are one."""
    return 1.0 - np.maximum(out_lost, in_lost) if depthwise else (1.0 - out_lost) * (1.0 - in_lost)


def macs_removed_many(group: ChannelGroup, ks: Sequence[int] | np.ndarray, layer_macs: dict[str, int]) -> np.ndarray:
    """MACs the network loses when k root channels of `group` are removed, for every k in `ks` (float64)."""
    ks = np.asarray(ks, dtype=np.float64)
    total = np.zeros_like(ks)
    for name, (out, inp, depthwise) in _layer_fractions(group).items():
        total += layer_macs[name] * (1.0 - kept_share(out * ks, inp * ks, depthwise))
    return total


def macs_removed(group: ChannelGroup, k: int, layer_macs: dict[str, int]) -> float:
    """MACs the network loses when `k` root channels of `group` are removed."""
    return float(macs_removed_many(group, [k], layer_macs)[0])


def min_width(original_width: int, max_prune_ratio: float) -> int:
    """Fewest channels a group may keep: at most `max_prune_ratio` of the original go, ≥ 1 stays."""
    return max(1, original_width - math.floor(original_width * max_prune_ratio + 1e-9))


def kept_widths(width: int, original_width: int, max_prune_ratio: float, round_to: int = 1) -> np.ndarray:
    """Widths a group of `width` channels may be cut to now, descending (empty: it may lose nothing more).

    At least `min_width` stay; with `round_to` N > 1 the kept width is a multiple of N, unless the
    group was narrower than N to begin with (then any width ≥ the cap, at least one channel).
    """
    kept = np.arange(width - 1, min_width(original_width, max_prune_ratio) - 1, -1, dtype=np.int64)
    if round_to > 1 and original_width >= round_to:
        kept = kept[kept % round_to == 0]
    return kept


def narrowest_width(width: int, original_width: int, max_prune_ratio: float, round_to: int = 1) -> int:
    """The narrowest width the caps and rounding let this group reach (its current width if none)."""
    kept = kept_widths(width, original_width, max_prune_ratio, round_to)
    return int(kept[-1]) if len(kept) else width


class StepCost(Protocol):
    """What steps and targets are measured in, as fractions of the original network's cost."""

    def reduction(self, net: "PrunableNetwork") -> float:
        """Fraction of the original cost removed so far."""

    def removed(self, net: "PrunableNetwork", group: ChannelGroup, ks: np.ndarray) -> np.ndarray:
        """Fraction of the original cost that removing k channels of `group` takes away, per k."""


class FlopsCost:
    """Steps and targets in MACs (FLOPs = 2 × MACs), exact from the per-layer counts."""

    name = "flops"

    def reduction(self, net: "PrunableNetwork") -> float:
        return net.macs_reduction

    def removed(self, net: "PrunableNetwork", group: ChannelGroup, ks: np.ndarray) -> np.ndarray:
        return macs_removed_many(group, ks, net.cost.layer_macs) / net.base_macs


FLOPS = FlopsCost()


def choose_k(ks: np.ndarray, removed: np.ndarray, step: float, remaining: float | None = None) -> int:
    """The k (from ascending `ks`, each removing `removed[i]`) that makes one step; 0 if none removes anything.

    Normally the k whose cut is closest to `step`, the smaller on a tie. When `remaining`
    (what is left to the target) is at most one step, or that k would reach it anyway, the
    step is the last and is trimmed: the smallest k whose cut reaches `remaining`, or the k
    that cuts most if none does. With FLOPs (cuts grow with k, by less per channel the more
    go) the last step passes the target by less than what `round_to` channels of the group cut.
    """
    useful = removed > 0
    if not useful.any():
        return 0
    ks, removed = ks[useful], removed[useful]
    nearest = int(np.argmin(np.abs(removed - step)))  # argmin takes the first (smallest k) of equal distances
    if remaining is not None and (remaining <= step or removed[nearest] >= remaining):
        reaching = np.flatnonzero(removed >= remaining)
        return int(ks[reaching[0]] if len(reaching) else ks[np.argmax(removed)])
    return int(ks[nearest])


def _dim_size(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == "out" else module.in_channels
    return module.out_features if dim == "out" else module.in_features


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
