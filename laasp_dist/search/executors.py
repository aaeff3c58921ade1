"""Where shard tasks run. One contract for every backend:

`start_round(net, candidates, calibration)` fixes the round's network snapshot,
`run(tasks)` scores each `Task` (some candidates of the round on some shards) and
returns, in task order, per shard of the task an array [len(task.candidates),
shard size] of per-image losses, and `end_round()` drops the snapshot. The local executor runs the scorer
in-process; the Ray executor (`ray_executor.py`) runs the very same scorer in
worker actors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..pruning import Candidate, PrunableNetwork
from .scoring import ScoreOptions, get_scorer
from .subset import SearchSubset, Shard


@dataclass(frozen=True)
class Task:
    """Score candidates (indices into the round's candidate list) on some shards with one scorer."""

    shards: tuple[int, ...]
    candidates: tuple[int, ...]
    scorer: str


class Executor(Protocol):
    subset: SearchSubset
    options: ScoreOptions

    @property
    def parallelism(self) -> int: ...

    def start_round(self, net: PrunableNetwork, candidates: Sequence[Candidate], calibration: Shard | None) -> None: ...

    def run(self, tasks: Sequence[Task]) -> list[list[np.ndarray]]: ...

    def end_round(self) -> None: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Runs shard tasks one after another in this process, on the network's own device."""

    def __init__(self, subset: SearchSubset, options: ScoreOptions | None = None) -> None:
        self.subset = subset
        self.options = options or ScoreOptions()
        self._round: tuple[PrunableNetwork, list[Candidate], Shard | None] | None = None

    @property
    def parallelism(self) -> int:
        return 1

    def start_round(self, net: PrunableNetwork, candidates: Sequence[Candidate], calibration: Shard | None) -> None:
        self._round = (net, list(candidates), calibration)

    def run(self, tasks: Sequence[Task]) -> list[list[np.ndarray]]:
        assert self._round is not None, "start_round first"
        net, candidates, calibration = self._round
        return [get_scorer(t.scorer)(net, [candidates[i] for i in t.candidates],
                                     [self.subset.shards[s] for s in t.shards], self.options, calibration)
                for t in tasks]

    def end_round(self) -> None:
        self._round = None

    def close(self) -> None:
        self._round = None

    def __enter__(self) -> "LocalExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RankExecutor:
    """Tasks split round-robin over the training ranks; results all-gathered (every rank gets all of them).

    Every rank calls `run` with the same tasks; `all_gather(obj)` returns every rank's `obj` in rank
    order (the training job passes its process group's, `laasp_dist.training.sync.all_gather`).
    """

    def __init__(self, subset: SearchSubset, options: ScoreOptions, rank: int, world: int,
                 all_gather: Callable[[Any], list[Any]]) -> None:
        self.subset, self.options, self.rank, self.world = subset, options, rank, world
        self.all_gather = all_gather
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
        for part in self.all_gather(done):
            merged.update(part)
        return [merged[i] for i in range(len(tasks))]

    def end_round(self) -> None:
        self._local.end_round()

    def close(self) -> None:
        self._local.close()
