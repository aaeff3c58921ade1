"""The training job's side of a search round: which executor scores, and one call to `search_round`.

Executors (``ray.search_executor``):

- ``actors``: the search package's `RayExecutor`, ``ray.search_workers`` Ray actors that
  hold the subset shards; the coordinator alone calls `search_round`, the other ranks
  wait at the broadcast that follows. The CPU default.
- ``ranks``: every training rank calls `search_round` on its identical copy of the
  network (checked after every install); `RankExecutor` gives rank r the tasks
  r, r+W, r+2W, … on its own device and all-gathers the per-image losses, so every
  rank reduces the same table and picks the same winner. Needs no extra devices:
  the GPU default (search actors would each ask for a whole GPU, which training holds).
- ``local``: the coordinator scores everything itself (`LocalExecutor`). Also what a
  ``prune.selection: importance`` run uses, whatever is configured: it scores nothing.

The candidate list comes from the coordinator: with ``ranks`` it is built on rank 0 and
broadcast, so that every rank scores the same candidates even where a criterion's
statistics (``taylor``'s gradients) could differ in the last bits between devices.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..config import RunConfig
from ..pruning import Candidate, PrunableNetwork
from ..search import LocalExecutor, RoundResult, ScoreOptions, SearchSubset, Task, read_subset, search_round
from ..search.round import round_candidates
from ..search.subset import Shard
from ..storage import Storage
from . import sync

if TYPE_CHECKING:
    from ..latency_table import LatencyModel


def executor_kind(config: RunConfig) -> str:
    kind = config.ray.search_executor
    if config.prune.selection == "importance":
        return "local"
    if kind == "auto":
        return "ranks" if config.ray.use_gpu else "actors"
    return kind


class RankExecutor:
    """Tasks split round-robin over the training ranks; results all-gathered (every rank gets all of them)."""

    def __init__(self, subset: SearchSubset, options: ScoreOptions, rank: int, world: int) -> None:
        self.subset, self.options, self.rank, self.world = subset, options, rank, world
        self._local = LocalExecutor(subset, options)

    @property
    def parallelism(self) -> int:
        return self.world

    def start_round(self, net: PrunableNetwork, candidates: Sequence[Candidate], calibration: Shard | None) -> None:
        self._local.start_round(net, candidates, calibration)

    def run(self, tasks: Sequence[Task]) -> list[list[np.ndarray]]:
        mine = list(range(self.rank, len(tasks), self.world))
        done = dict(zip(mine, self._local.run([tasks[i] for i in mine])))
        merged: dict[int, list[np.ndarray]] = {}
        for part in sync.all_gather(done):
            merged.update(part)
        return [merged[i] for i in range(len(tasks))]

    def end_round(self) -> None:
        self._local.end_round()

    def close(self) -> None:
        self._local.close()


class Searcher:
    """Holds the subset and the executor across the rounds of a run."""

    def __init__(self, config: RunConfig, subset_dir: Path | Storage, device: torch.device, rank: int, world: int) -> None:
        self.config, self.kind, self.rank, self.device = config, executor_kind(config), rank, device
        self.subset = read_subset(subset_dir)
        p = config.prune
        options = ScoreOptions(chunk_size=p.shard_batch_size, max_batch=p.shard_batch_size)
        if self.kind == "actors":
            from ..search import RayExecutor

            r = config.ray
            self.executor = RayExecutor(self.subset, r.search_workers, options=options, address=r.address,
                                        cpus_per_worker=1, threads_per_worker=1)
        elif self.kind == "ranks":
            self.executor = RankExecutor(self.subset, options, rank, world)
        else:
            self.executor = LocalExecutor(self.subset, options)

    @property
    def all_ranks(self) -> bool:
        """Whether every rank takes part in a round (else the coordinator alone)."""
        return self.kind == "ranks"

    def run(self, net: PrunableNetwork, index: int, latency: LatencyModel | None = None) -> RoundResult:
        """One round; with ``ranks``, every rank calls this and gets rank 0's candidate list."""
        p, seed = self.config.prune, self.config.seed
        candidates = None
        if self.all_ranks:
            mine = (round_candidates(net, p, self.subset, round_index=index, seed=seed, latency=latency)
                    if self.rank == 0 else None)
            candidates = sync.broadcast(mine, device=self.device)
        return search_round(net, self.subset, p, index, self.executor, seed=seed, candidates=candidates,
                            latency=latency)

    def close(self) -> None:
        self.executor.close()
