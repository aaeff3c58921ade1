"""Criterion-only pruning to a FLOPs target: the classic baseline that loss-aware selection must beat.

It takes the same steps as LAASP (same candidates, same step sizes and caps),
but picks the candidate whose removed channels have the lowest normalised
importance instead of the lowest subset loss.
"""

from __future__ import annotations

from ..errors import PruningError
from .criteria import get_criterion
from .importance import Aggregation
from .network import PrunableNetwork, PruneRecord


def prune_by_criterion(
    net: PrunableNetwork,
    criterion: str,
    target_reduction: float,
    *,
    step_fraction: float = 0.01,
    max_prune_ratio: float = 0.75,
    aggregation: Aggregation = "group",
    seed: int = 0,
    round_to: int = 1,
) -> list[PruneRecord]:
    """Prune `net` in place until its MACs are down by `target_reduction`; returns the prunes made.

    With `round_to` N every group's kept width is a multiple of N (see `steps.kept_widths`).
    """
    if not 0.0 < target_reduction < 1.0:
        raise PruningError(f"FLOPs reduction must be in (0, 1), got {target_reduction}")
    get_criterion(criterion)
    made = []
    step = 0
    while net.macs_reduction < target_reduction - 1e-12:
        # the one candidate generator of every pruning loop; seeded per step as a search round is per round
        candidates = net.candidates([criterion], step_fraction, max_prune_ratio, target_reduction=target_reduction,
                                    aggregation=aggregation, seed=seed + step, round_to=round_to)
        if not candidates:
            raise PruningError(
                f"FLOPs target {target_reduction:.1%} is unreachable with max_prune_ratio={max_prune_ratio}"
                f"{f' and round_to={round_to}' if round_to > 1 else ''}: "
                f"stopped at {net.macs_reduction:.1%}")
        made.append(net.apply(min(candidates, key=lambda c: c.importance / len(c.channels))))  # mean importance
        step += 1
    return made
