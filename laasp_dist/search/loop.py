"""The pruning loop without training: rounds until the FLOPs or latency goal, and the history table.

Training interleaves recovery epochs itself and calls `search_round` directly; this
loop is what the benchmark and the tests use, and what a `recover_epochs: 0` run is.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from ..config import PruneConfig
from ..errors import DataError, PruningError
from ..storage import Storage, as_storage
from ..pruning import PrunableNetwork, get_criterion
from ..pruning.steps import is_depthwise, kept_share, narrowest_width
from .executors import Executor
from .round import RoundResult, get_evaluator, round_to_of, search_round, step_cost
from .scoring import ScoreOptions
from .subset import SearchSubset

if TYPE_CHECKING:
    from ..latency_table import LatencyModel

HISTORY_COLUMNS = ("round", "group", "criterion", "k", "loss", "importance", "shards_seen", "images_seen", "chosen",
                   "macs_before", "macs_after", "latency_ms_before", "latency_ms_after")


def max_reduction(net: PrunableNetwork, max_prune_ratio: float, round_to: int = 1) -> float:
    """Fraction of the original MACs gone if every group were cut to its narrowest allowed width at once."""
    keep: dict[str, dict[str, float]] = {}
    for g in net.groups:
        narrow = narrowest_width(g.width, net.original_widths[g.name], max_prune_ratio, round_to)
        frac = min(1.0, narrow / g.width)
        for m in g.members:
            if isinstance(m.module, (nn.Conv2d, nn.Linear)):
                keep.setdefault(m.name, {})[m.dim] = frac
    modules = dict(net.model.named_modules())
    total = 0.0
    for name, macs in net.cost.layer_macs.items():
        out, inp = keep.get(name, {}).get("out", 1.0), keep.get(name, {}).get("in", 1.0)
        total += macs * kept_share(1.0 - out, 1.0 - inp, is_depthwise(modules[name]))
    return 1.0 - total / net.base_macs


def check_search_inputs(net: PrunableNetwork, subset: SearchSubset, cfg: PruneConfig,
                        latency: LatencyModel | None = None) -> None:
    """Every cheap check, before any work: evaluator, criteria, subset, reachability of the target."""
    get_evaluator(cfg.search)
    for name in cfg.criteria:
        get_criterion(name)
    if len(subset) == 0:
        raise DataError("the scoring subset is empty")
    if cfg.bn_recalibration > len(subset):
        raise DataError(f"bn_recalibration asks for {cfg.bn_recalibration} images, "
                        f"the scoring subset has only {len(subset)}")
    check_target(net, cfg, latency)


def check_target(net: PrunableNetwork, cfg: PruneConfig, latency: LatencyModel | None = None) -> None:
    """The target can be reached within max_prune_ratio and round_to (a latency target: by the table's estimate,
    once there is a table)."""
    round_to = round_to_of(cfg)
    caps = f"max_prune_ratio {cfg.max_prune_ratio}" + (f" and round_to {round_to}" if round_to > 1 else "")
    if cfg.target == "latency":
        if latency is None:  # a run without a table measures one first and checks then
            return
        reachable = step_cost(cfg, latency).max_reduction(net, cfg.max_prune_ratio, round_to)
        if reachable + 1e-9 < cfg.target_latency_reduction:
            raise PruningError(
                f"target latency reduction {cfg.target_latency_reduction:.1%} is unreachable for {net.arch.model}: "
                f"with {caps} the latency table estimates at most {reachable:.1%}")
        return
    reachable = max_reduction(net, cfg.max_prune_ratio, round_to)
    if reachable + 1e-9 < cfg.target_flops_reduction:
        raise PruningError(
            f"target FLOPs reduction {cfg.target_flops_reduction:.1%} is unreachable for {net.arch.model}: with "
            f"{caps} at most {reachable:.1%} of the original FLOPs can be removed")


def prune_to_target(net: PrunableNetwork, subset: SearchSubset, cfg: PruneConfig, executor: Executor | None = None,
                    *, seed: int = 0, options: ScoreOptions | None = None, history_path: str | Path | None = None,
                    on_round: Callable[[RoundResult], None] | None = None, max_rounds: int | None = None,
                    latency: LatencyModel | None = None) -> list[RoundResult]:
    """Repeat rounds (search, apply the winner) until the target is reached: the MACs down by
    `cfg.target_flops_reduction`, or with `cfg.target == "latency"` the `latency` model's estimate
    down by `cfg.target_latency_reduction` (the estimate alone: the measured checks of a latency target,
    `prune.latency_checks`, belong to the training schedule).

    Writes the full candidate table of every round to `history_path` (Parquet) after each round.
    """
    check_search_inputs(net, subset, cfg, latency)
    cost = step_cost(cfg, latency)
    target = cfg.goal()[0]
    results: list[RoundResult] = []
    while cost.reduction(net) < target - 1e-12:
        if max_rounds is not None and len(results) >= max_rounds:
            break
        result = search_round(net, subset, cfg, len(net.prunes), executor, seed=seed, options=options,
                              latency=latency)
        net.apply(result.winner)
        result.extra["macs_after"] = net.cost.macs
        results.append(result)
        if history_path is not None:
            write_history(results, history_path)
        if on_round is not None:
            on_round(result)
    return results


def history_rows(results: Sequence[RoundResult]) -> list[dict[str, Any]]:
    return [{k: row.get(k) for k in HISTORY_COLUMNS} | {"channels": list(row["channels"])}
            for r in results for row in r.table]


def write_history(results: Sequence[RoundResult], location: str | Path | Storage) -> None:
    """Every round's candidate table as one Parquet file (`history.parquet`), at a local path or URI."""
    rows = history_rows(results)
    schema = pa.schema([("round", pa.int32()), ("group", pa.string()), ("criterion", pa.string()),
                        ("k", pa.int32()), ("loss", pa.float64()), ("importance", pa.float64()),
                        ("shards_seen", pa.int32()),
                        ("images_seen", pa.int64()), ("chosen", pa.bool_()), ("macs_before", pa.int64()),
                        ("macs_after", pa.int64()), ("latency_ms_before", pa.float64()),
                        ("latency_ms_after", pa.float64()), ("channels", pa.list_(pa.int32()))])
    table = pa.Table.from_pylist(rows, schema=schema)
    as_storage(location).write_with("", lambda p: pq.write_table(table, p))


def read_history(location: str | Path | Storage) -> list[dict[str, Any]]:
    try:
        return pq.read_table(pa.BufferReader(as_storage(location).read_bytes(""))).to_pylist()
    except FileNotFoundError:
        raise DataError(f"no pruning history at {location}") from None
