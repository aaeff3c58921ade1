"""Step sizing: how many channels of a group to remove for a given MACs cut, within caps."""

from __future__ import annotations

import math

from torch import nn

from .groups import ChannelGroup


def macs_removed(group: ChannelGroup, k: int, layer_macs: dict[str, int]) -> float:
    """MACs the network loses when `k` root channels of `group` are removed."""
    fractions: dict[str, dict[str, float]] = {}
    for member in group.members:
        module = member.module
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        size = _dim_size(module, member.dim)
        fractions.setdefault(member.name, {})[member.dim] = k * len(member.idxs) / group.width / size
    total = 0.0
    for name, frac in fractions.items():
        module = _module_of(group, name)
        out, inp = frac.get("out", 0.0), frac.get("in", 0.0)
        if isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels:
            kept = 1.0 - max(out, inp)  # depthwise: in and out channels are the same channels
        else:
            kept = (1.0 - out) * (1.0 - inp)
        total += layer_macs[name] * (1.0 - kept)
    return total


def min_width(original_width: int, max_prune_ratio: float) -> int:
    """Fewest channels a group may keep: at most `max_prune_ratio` of the original go, ≥ 1 stays."""
    return max(1, original_width - math.floor(original_width * max_prune_ratio + 1e-9))


def removable(group: ChannelGroup, original_width: int, max_prune_ratio: float) -> int:
    """How many more channels the caps allow this group to lose."""
    return max(0, group.width - min_width(original_width, max_prune_ratio))


def step_channels(group: ChannelGroup, step_macs: float, layer_macs: dict[str, int], limit: int) -> int:
    """k ≥ 1 whose removal cuts closest to `step_macs`, at most `limit` (0 if nothing may go)."""
    if limit < 1:
        return 0
    per_channel = macs_removed(group, 1, layer_macs)
    k = min(limit, max(1, round(step_macs / per_channel))) if per_channel > 0 else 1
    while k < limit and abs(macs_removed(group, k + 1, layer_macs) - step_macs) < abs(
            macs_removed(group, k, layer_macs) - step_macs):
        k += 1
    while k > 1 and abs(macs_removed(group, k - 1, layer_macs) - step_macs) <= abs(
            macs_removed(group, k, layer_macs) - step_macs):
        k -= 1
    return k


def channels_to_reach(group: ChannelGroup, remaining_macs: float, layer_macs: dict[str, int], limit: int) -> int:
    """Smallest k whose removal cuts at least `remaining_macs` (or `limit` if none does)."""
    for k in range(1, limit + 1):
        if macs_removed(group, k, layer_macs) >= remaining_macs:
            return k
    return limit


def _dim_size(module: nn.Module, dim: str) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels if dim == "out" else module.in_channels
    return module.out_features if dim == "out" else module.in_features


def _module_of(group: ChannelGroup, name: str) -> nn.Module:
    return next(m.module for m in group.members if m.name == name)
