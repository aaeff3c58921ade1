"""The coordinator's side of a search round: a thin adapter over `laasp_dist.search`.

`Searcher.run(net, index)` returns the round's winner, its subset loss and the
candidate table rows (one per candidate, with the round index added).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..pruning import Candidate, PrunableNetwork


@dataclass
class RoundOutcome:
    winner: Candidate
    loss: float
    rows: list[dict[str, Any]]
    seconds: float


class Searcher:
    """Holds the subset (and the search package's actors) across rounds."""

    def __init__(self, config: RunConfig, subset_dir: Path, device: torch.device) -> None:
        from ..search.subset import read_subset

        self.config, self.device = config, device
        self.subset = read_subset(subset_dir)

    def run(self, net: PrunableNetwork, index: int) -> RoundOutcome:
        import numpy as np

        from ..search.scoring import ScoreOptions, get_scorer

        p = self.config.prune
        start = time.perf_counter()
        cands = net.candidates(p.criteria, p.step_flops, p.max_prune_ratio,
                               target_reduction=p.target_flops_reduction, aggregation=p.aggregation, seed=index)
        scorer = get_scorer("fast")
        opts = ScoreOptions(chunk_size=p.shard_batch_size, max_batch=p.shard_batch_size)
        sums = np.zeros(len(cands))
        n = 0
        for shard in self.subset.shards:
            sums += scorer(net, cands, shard, opts, None).sum(1)
            n += len(shard)
        losses = sums / n
        best = int(np.argmin(losses))
        rows = [{"round": index, "group": c.group, "criterion": c.criterion, "k": c.k, "loss": float(l),
                 "winner": i == best} for i, (c, l) in enumerate(zip(cands, losses))]
        return RoundOutcome(cands[best], float(losses[best]), rows, time.perf_counter() - start)

    def close(self) -> None:
        pass
