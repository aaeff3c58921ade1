"""One LAASP round: score every (group × criterion) candidate on the subset and pick the best.

Evaluators (`reference`, `exact`, `adaptive`) are a small registry: which scorer
runs a shard task, and whether candidates are dropped shard by shard. The round
logic, the coordinator reduction (sample-weighted float64 means over shards) and
the deterministic argmin exist once here; the executor only decides where shard
tasks run (this process, or Ray actors).

Adaptive rounds: every candidate is scored on shard 0; after each shard, a
candidate whose mean paired per-image loss difference to the current leader has a
one-sided lower confidence bound above zero (`adaptive_confidence`, normal
approximation over all images seen so far) is dropped. Survivors see every shard;
the winner is the survivor with the lowest mean over the whole subset.

`prune.selection: importance` is the non-loss-aware control in the same round: the same
candidates, no subset forwards, the lowest normalised criterion importance removed per
% of the original FLOPs removed wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np
import torch

from ..config import PruneConfig
from ..errors import ConfigError, DataError, PruningError
from ..pruning import Candidate, PrunableNetwork, get_criterion
from ..latency import resolve_round_to
from ..pruning.importance import scored_members, taylor_statistics
from ..pruning.steps import FLOPS, StepCost, macs_removed
from .executors import Executor, LocalExecutor, Task
from .scoring import ScoreOptions, first_blocks
from .subset import SearchSubset, Shard, calibration_shard

if TYPE_CHECKING:
    from ..latency_table import LatencyModel


@dataclass(frozen=True)
class Evaluator:
    name: str
    scorer: str
    adaptive: bool
    description: str


EVALUATORS: dict[str, Evaluator] = {
    "reference": Evaluator("reference", "reference", False, "copy, trace, physically prune, forward (the paper's code)"),
    "exact": Evaluator("exact", "fast", False, "masks, cached prefix activations, duplicates scored once"),
    "adaptive": Evaluator("adaptive", "fast", True, "exact scorer; clearly worse candidates dropped shard by shard"),
}


def get_evaluator(name: str) -> Evaluator:
    try:
        return EVALUATORS[name]
    except KeyError:
        raise ConfigError(f"unknown search evaluator {name!r}; known: {', '.join(EVALUATORS)}") from None


@dataclass
class RoundResult:
    """A round's winner and its full candidate table (one dict per candidate, in candidate order)."""

    round: int
    winner: Candidate
    loss: float
    table: list[dict[str, Any]]
    seconds: float
    macs_before: int
    evaluator: str
    image_evaluations: int = 0  # Σ over candidates of images scored (work done, duplicates included)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates(self) -> list[Candidate]:
        return [Candidate(r["group"], r["criterion"], tuple(r["channels"])) for r in self.table]

    @property
    def losses(self) -> np.ndarray:
        return np.array([r["loss"] for r in self.table], dtype=np.float64)


# ------------------------------------------------------------------------------------------- reduction


def reduce_losses(per_candidate: Sequence[Sequence[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, the list of per-image loss arrays of the shards it saw → (mean, images), float64.

    The mean is sample-weighted: Σ losses / Σ images over all shards seen, summed in shard order.
    """
    sums = np.array([math.fsum(float(a.sum(dtype=np.float64)) for a in parts) for parts in per_candidate])
    counts = np.array([sum(len(a) for a in parts) for parts in per_candidate], dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan), counts


def select_winner(means: np.ndarray, eligible: np.ndarray | None = None) -> int:
    """Index of the lowest mean among the eligible; ties go to the earliest (group order, then criterion order)."""
    values = np.where(np.isnan(means), np.inf, means)
    if eligible is not None:
        values = np.where(eligible, values, np.inf)
    if not np.isfinite(values).any():
        raise PruningError("no candidate has a finite subset loss (the network diverged?)")
    return int(np.argmin(values))  # argmin returns the first of equal minima


def eliminate(alive: Sequence[int], seen: dict[int, np.ndarray], confidence: float) -> list[int]:
    """Keep the leader and every candidate not clearly worse than it (paired per-image differences)."""
    means = {c: float(seen[c].mean()) for c in alive}
    leader = min(alive, key=lambda c: (means[c], c))
    z = NormalDist().inv_cdf(confidence)
    keep = []
    for c in alive:
        if c == leader:
            keep.append(c)
            continue
        d = seen[c] - seen[leader]
        if len(d) < 2:
            keep.append(c)
            continue
        lower = float(d.mean()) - z * float(d.std(ddof=1)) / math.sqrt(len(d))
        if not lower > 0.0:
            keep.append(c)
    return keep


# ------------------------------------------------------------------------------------------- planning


def candidate_costs(net: PrunableNetwork, candidates: Sequence[Candidate]) -> list[float]:
    """Relative forward cost of scoring each candidate with the fast scorer (MACs from its first block on)."""
    blocks, first = first_blocks(net)
    names = {m: n for n, m in net.model.named_modules()}
    block_macs = [0.0] * len(blocks)
    for i, block in enumerate(blocks):
        block_macs[i] = float(sum(net.cost.layer_macs.get(names.get(m, ""), 0) for m in block.modules()))
    suffix = np.cumsum(block_macs[::-1])[::-1]
    return [float(suffix[first[c.group]]) + 1.0 for c in candidates]


def plan_tasks(candidates: Sequence[Candidate], indices: Sequence[int], shards: Sequence[int], parallelism: int,
               costs: Sequence[float], scorer: str) -> list[Task]:
    """Split (candidates × shards) into tasks: whole groups per task, enough tasks to keep every worker busy.

    One worker: one task. The reference scorer keeps all shards in each task (one copy
    and trace per candidate, as the paper's code); the fast scorer gets one shard per task.
    """
    shard_sets = [tuple(shards)] if parallelism == 1 or scorer == "reference" else [(s,) for s in shards]
    units: list[list[int]] = []
    for i in indices:  # consecutive candidates of one group stay together (duplicates are scored once per task)
        if units and candidates[units[-1][0]].group == candidates[i].group:
            units[-1].append(i)
        else:
            units.append([i])
    n_chunks = max(1, min(len(units), math.ceil(parallelism / len(shard_sets))))
    weights = [sum(costs[i] for i in u) for u in units]
    total, chunks, current, acc = sum(weights), [], [], 0.0
    for u, w in zip(units, weights):
        current.extend(u)
        acc += w
        if len(chunks) < n_chunks - 1 and acc >= total * (len(chunks) + 1) / n_chunks:
            chunks.append(tuple(current))
            current = []
    if current:
        chunks.append(tuple(current))
    return [Task(s, chunk, scorer) for s in shard_sets for chunk in chunks]


# ------------------------------------------------------------------------------------------- the round


def step_cost(cfg: PruneConfig, latency: LatencyModel | None) -> StepCost:
    """What this config's steps and target are measured in: FLOPs, or `latency`'s estimate with target=latency."""
    if cfg.target != "latency":
        return FLOPS
    if latency is None:
        raise ConfigError("prune.target=latency needs a latency table (prune.latency_table, or a run measures one)")
    return latency


def round_to_of(cfg: PruneConfig) -> int:
    """`cfg.round_to` as a number (a run's config has it resolved; a bare PruneConfig's `auto` means this CPU)."""
    return resolve_round_to(cfg.round_to, "cpu")


def round_candidates(net: PrunableNetwork, cfg: PruneConfig, subset: SearchSubset | None = None, *,
                     round_index: int = 0, seed: int = 0, latency: LatencyModel | None = None) -> list[Candidate]:
    """This round's candidates (validated criteria; rounded widths; the last step trimmed to the target).

    An `activation` criterion (`taylor`) first measures its statistics on the network as it
    is now, with one gradient pass over `subset` (the first `cfg.taylor_images` images).
    `random` is seeded with `seed · 1 000 003 + round_index`.
    """
    pool = [get_criterion(name) for name in cfg.criteria]
    statistics = None
    if any(c.source == "activation" for c in pool):
        if subset is None or len(subset) == 0:
            raise PruningError(f"criteria {cfg.criteria} include a data-driven one (taylor), which needs the "
                               f"scoring subset")
        statistics = activation_statistics(net, subset, cfg)
    target, step, _ = cfg.goal()
    return net.candidates(cfg.criteria, step, cfg.max_prune_ratio, target_reduction=target,
                          aggregation=cfg.aggregation, seed=seed * 1_000_003 + round_index, statistics=statistics,
                          round_to=round_to_of(cfg), cost=step_cost(cfg, latency))


def activation_statistics(net: PrunableNetwork, subset: SearchSubset, cfg: PruneConfig) -> dict[str, torch.Tensor]:
    """`taylor_statistics` of every layer an activation criterion reads, on the subset's first images."""
    names = list(dict.fromkeys(m.name for g in net.groups for m in scored_members(g, "activation", cfg.aggregation)))
    device, chunk = net.parameters_device(), cfg.shard_batch_size

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for shard, take in subset.head(cfg.taylor_images or len(subset)):
            for start in range(0, take, chunk):
                stop = min(start + chunk, take)
                yield shard.inputs(device, start, stop), shard.labels[start:stop].to(device)

    return taylor_statistics(net.model, names, batches())


def search_round(net: PrunableNetwork, subset: SearchSubset, cfg: PruneConfig, round_index: int = 0,
                 executor: Executor | None = None, *, seed: int = 0, options: ScoreOptions | None = None,
                 candidates: Sequence[Candidate] | None = None,
                 latency: LatencyModel | None = None) -> RoundResult:
    """Pick this round's candidate by `cfg.selection` and return the winner and the full table.

    `loss` (LAASP): every candidate is scored on the subset with `cfg.search`; the lowest
    mean loss wins. `importance` (a control): no subset forwards; the lowest normalised
    criterion importance removed per % of the original FLOPs removed wins (a global
    ranking), and the table's `loss` is NaN. Ties: the earliest candidate (group order,
    then criterion order). Every row has `importance`, whichever rule selects.

    The network is not changed; apply `result.winner` to prune. `candidates` defaults to
    `round_candidates(net, cfg, subset, ...)`; the training job passes the coordinator's list
    so that every rank scores the same one. `executor` defaults to an in-process one over
    `subset` with `options` (default: chunks of `cfg.shard_batch_size`); a given executor
    brings its own options. `seconds` covers scoring and reduction, not building the
    candidate list. With a `latency` model (needed for `cfg.target == "latency"`) the
    table rows carry every candidate's estimated latency before and after.
    """
    evaluator = get_evaluator(cfg.search)
    if len(subset) == 0:
        raise DataError("the scoring subset is empty")
    calibration = calibration_shard(subset, cfg.bn_recalibration)
    if candidates is None:
        candidates = round_candidates(net, cfg, subset, round_index=round_index, seed=seed, latency=latency)
    candidates = list(candidates)
    if not candidates:
        raise PruningError(f"round {round_index}: no group can lose another channel within max_prune_ratio "
                           f"{cfg.max_prune_ratio} (round_to {round_to_of(cfg)}) and cut the {cfg.target} "
                           f"estimate; the target is unreachable")
    macs = net.cost.macs
    latency_ms = latency.estimate_ms(net) if latency is not None else None
    removed = [macs_removed(net.group(c.group), c.k, net.cost.layer_macs) for c in candidates]
    per_flop = np.array([c.importance / max(r / net.base_macs * 100.0, 1e-12) for c, r in zip(candidates, removed)])
    start = time.perf_counter()
    if cfg.selection == "importance":
        means = np.full(len(candidates), np.nan)
        shards_seen, images = [0] * len(candidates), np.zeros(len(candidates), dtype=np.int64)
        winner = select_winner(per_flop)
    else:
        means, shards_seen, images = _score(net, subset, cfg, evaluator, candidates, calibration, executor, options)
        winner = select_winner(means, np.array(shards_seen) == subset.num_shards)
    seconds = time.perf_counter() - start
    table = []
    for i, cand in enumerate(candidates):
        saved_ms = float(latency.removed_ms(net, net.group(cand.group), [cand.k])[0]) if latency is not None else None
        table.append({
            "round": round_index, "group": cand.group, "criterion": cand.criterion, "k": cand.k,
            "channels": list(cand.channels), "loss": float(means[i]), "importance": float(per_flop[i]),
            "shards_seen": shards_seen[i], "images_seen": int(images[i]), "chosen": i == winner,
            "macs_before": int(macs), "macs_after": int(round(macs - removed[i])),
            "latency_ms_before": latency_ms, "latency_ms_after": None if latency_ms is None else latency_ms - saved_ms,
        })
    return RoundResult(round_index, candidates[winner], float(means[winner]), table, seconds, int(macs),
                       evaluator.name if cfg.selection == "loss" else "importance", int(images.sum()))


def _score(net: PrunableNetwork, subset: SearchSubset, cfg: PruneConfig, evaluator: Evaluator,
           candidates: list[Candidate], calibration: Shard | None, executor: Executor | None,
           options: ScoreOptions | None
           ) -> tuple[np.ndarray, list[int], np.ndarray]:
    """Subset loss of every candidate: (mean loss, shards seen, images seen) per candidate."""
    own = executor is None
    executor = executor or LocalExecutor(subset, options or ScoreOptions(cfg.shard_batch_size, cfg.shard_batch_size))
    if executor.subset.num_shards != subset.num_shards or len(executor.subset) != len(subset):
        raise ConfigError("the executor holds a different scoring subset than the round was given")
    costs = candidate_costs(net, candidates)
    seen: list[list[tuple[int, np.ndarray]]] = [[] for _ in candidates]  # per candidate: (shard, losses)
    executor.start_round(net, candidates, calibration)
    try:
        all_shards = list(range(subset.num_shards))
        if not evaluator.adaptive:
            waves = [all_shards]
        else:
            waves = [[s] for s in all_shards]
        alive = list(range(len(candidates)))
        for w, wave in enumerate(waves):
            tasks = plan_tasks(candidates, alive, wave, executor.parallelism, costs, evaluator.scorer)
            for task, per_shard in zip(tasks, executor.run(tasks)):
                for shard, losses in zip(task.shards, per_shard):
                    for row, c in enumerate(task.candidates):
                        seen[c].append((shard, losses[row]))
            if evaluator.adaptive and w < len(waves) - 1 and len(alive) > 1:
                alive = eliminate(alive, {c: np.concatenate([a for _, a in sorted(seen[c], key=lambda t: t[0])])
                                          for c in alive}, cfg.adaptive_confidence)
    finally:
        executor.end_round()
        if own:
            executor.close()
    per_candidate = [[a for _, a in sorted(parts, key=lambda t: t[0])] for parts in seen]
    means, images = reduce_losses(per_candidate)
    return means, [len(parts) for parts in per_candidate], images
