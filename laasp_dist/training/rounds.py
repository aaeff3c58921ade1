"""The training job's side of a search round: which executor scores, and one call to `search_round`.

Executors (``ray.search_executor``):

- ``actors`` (the default): the search package's `RayExecutor`, ``ray.search_workers`` Ray
  actors that hold the subset shards on their device; the coordinator alone calls
  `search_round`, the other ranks wait at the broadcast that follows. With ``use_gpu``
  each actor asks Ray for ``ray.search_gpu_fraction`` of a GPU and each training worker
  for the rest of one (`gpu_shares`; of ``ray.gpu_share`` of one where several runs share a
  GPU), so an actor fits beside every training worker on its GPU (training is idle during a
  round); an actor that gets no CUDA device is an error.
- ``ranks``: every training rank calls `search_round` on its identical copy of the
  network (checked after every install); the search's `RankExecutor` gives rank r the tasks
  r, r+W, r+2W, … on its own device and all-gathers the per-image losses, so every
  rank reduces the same table and picks the same winner. Needs no extra processes.
- ``local``: the coordinator scores everything itself (`LocalExecutor`). Also what a
  ``prune.selection: importance`` run uses, whatever is configured: it scores nothing.

The candidate list comes from the coordinator: with ``ranks`` it is built on rank 0 and
broadcast, so that every rank scores the same candidates even where a criterion's
statistics (``taylor``'s gradients) could differ in the last bits between devices.

Scoring arithmetic: ``prune.score_precision`` (auto = the training's) in the training's
memory format (`laasp_dist.precision.score_numerics`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config import RunConfig, executor_kind, gpu_shares
from ..precision import score_numerics
from ..pruning import PrunableNetwork
from ..search import LocalExecutor, RankExecutor, RoundResult, ScoreOptions, read_subset, search_round
from ..search.round import round_candidates
from ..storage import Storage
from . import sync

if TYPE_CHECKING:
    from ..latency_table import LatencyModel


class Searcher:
    """Holds the subset and the executor across the rounds of a run."""

    def __init__(self, config: RunConfig, subset_dir: Path | Storage, device: torch.device, rank: int, world: int) -> None:
        self.config, self.kind, self.rank, self.device = config, executor_kind(config), rank, device
        self.subset = read_subset(subset_dir)
        p = config.prune
        numerics = score_numerics(config, device)
        options = ScoreOptions(chunk_size=p.shard_batch_size, max_batch=p.shard_batch_size,
                               precision=numerics.precision, channels_last=numerics.channels_last)
        if self.kind == "actors":
            from ..search import RayExecutor

            r = config.ray
            self.executor = RayExecutor(self.subset, r.search_workers, options=options, address=r.address,
                                        cpus_per_worker=1, threads_per_worker=1, gpus_per_worker=gpu_shares(config)[1])
        else:
            if device.type == "cuda":
                self.subset = self.subset.to(device)  # held on the GPU for the whole run
            self.executor = (RankExecutor(self.subset, options, rank, world, sync.all_gather)
                             if self.kind == "ranks" else LocalExecutor(self.subset, options))

    @property
    def all_ranks(self) -> bool:
        """Whether every rank takes part in a round (else the coordinator alone)."""
        return self.kind == "ranks"

    def run(self, net: PrunableNetwork, index: int, latency: LatencyModel | None = None,
            latency_aim: float | None = None) -> RoundResult:
        """One round; with ``ranks``, every rank calls this and gets rank 0's candidate list. `latency_aim`: the
        estimated reduction a measured latency check moved the target to (steps are trimmed to it)."""
        p, seed = self.config.prune, self.config.seed
        if latency_aim is not None:
            p = p.model_copy(update={"target_latency_reduction": latency_aim})
        candidates = None
        if self.all_ranks:
            mine = (round_candidates(net, p, self.subset, round_index=index, seed=seed, latency=latency)
                    if self.rank == 0 else None)
            candidates = sync.broadcast(mine, device=self.device)
        return search_round(net, self.subset, p, index, self.executor, seed=seed, candidates=candidates,
                            latency=latency)

    def close(self) -> None:
        self.executor.close()
