"""Shard tasks on Ray worker actors.

* The subset's shards go into the object store once, as Arrow tables, when the
  executor starts; an actor decodes a shard the first time it needs it and keeps
  it on its device (GPU when it has one).
* GPU actors (`gpus_per_worker` > 0) ask Ray for that share of a GPU — a fraction, so
  that they fit beside the training workers, which ask for the rest — and score on it,
  in the round's `ScoreOptions` arithmetic and memory format. An actor that Ray gave
  a GPU but that sees no CUDA device fails with a clear error: never a silent CPU run.
* Per round, the network snapshot — the portable spec plus a plain state dict,
  never a pickled module — and the candidate list go into the object store once;
  each actor rebuilds the network once per round.
* Tasks are handed to idle actors (a task prefers the actor its shard lives on).
  An actor that dies mid-task is restarted by Ray (`max_restarts`) and the
  coordinator resubmits the lost task, to whichever actor is free; a task is a
  pure function of (snapshot, shard, candidates), so the answer does not change.
* Without an address an embedded local Ray is started; with one, the cluster is joined.
"""

from __future__ import annotations

import os
import re
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DeviceError, LaaspError
from ..pruning import Candidate, PrunableNetwork, network_from_spec, network_spec
from ..runtime import ensure_ray
from .executors import Task
from .scoring import ScoreOptions, get_scorer
from .subset import SearchSubset, Shard


class SearchWorker:
    """A Ray actor: holds shards on its device, rebuilds the round's network once, runs the shared scorer."""

    def __init__(self, threads: int | None, device: str) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                import platform

                raise DeviceError(
                    f"a GPU search actor on {platform.node()} sees no CUDA device (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch built for CUDA {torch.version.cuda}); it "
                    f"does not fall back to the CPU: fix the node's GPU set-up, or set ray.search_executor=ranks")
            torch.cuda.set_device(0)  # Ray makes the actor's GPU the only visible one
        self._shards: dict[int, Shard] = {}
        self._round: tuple[str, PrunableNetwork, list[Candidate], ScoreOptions, Shard | None] | None = None

    def ping(self) -> int:
        return os.getpid()

    def status(self) -> dict[str, Any]:
        """Where this actor scores and where its shards are held: {device, device_name, shards: {index: device}}."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return {"device": str(self.device), "device_name": name,
                "shards": {i: str(s.images.device) for i, s in self._shards.items()}}

    def _load_round(self, ref: Any) -> tuple[PrunableNetwork, list[Candidate], ScoreOptions, Shard | None]:
        import ray

        key = ref.hex()
        if self._round is None or self._round[0] != key:
            self._round = None
            snap = ray.get(ref)
            net = network_from_spec(snap["spec"], snap["state"])
            snap["options"].numerics(self.device).model(net.model.to(self.device))
            calibration = Shard.from_table(snap["calibration"]).to(self.device) if snap["calibration"] else None
            candidates = [Candidate(g, c, tuple(ch)) for g, c, ch in snap["candidates"]]
            self._round = (key, net, candidates, snap["options"], calibration)
        return self._round[1:]

    def score(self, round_ref: list, shard_refs: list, shard_indices: tuple[int, ...], candidates: tuple[int, ...],
              scorer: str) -> list[np.ndarray]:
        import ray

        net, cands, options, calibration = self._load_round(round_ref[0])
        for index, ref in zip(shard_indices, shard_refs):
            if index not in self._shards:
                self._shards[index] = Shard.from_table(ray.get(ref), f"shard {index}").to(self.device)
        shards = [self._shards[i] for i in shard_indices]
        return get_scorer(scorer)(net, [cands[i] for i in candidates], shards, options, calibration)


class RayExecutor:
    """Runs shard tasks on `num_workers` SearchWorker actors, each on `gpus_per_worker` of a GPU (0: on CPUs)."""

    def __init__(self, subset: SearchSubset, num_workers: int = 2, *, options: ScoreOptions | None = None,
                 address: str | None = None, gpus_per_worker: float = 0.0, cpus_per_worker: int = 1,
                 threads_per_worker: int | None = None, max_attempts: int = 3, num_cpus: int | None = None,
                 start_timeout_s: float = 600.0) -> None:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if num_workers < 1:
            raise LaaspError(f"num_workers must be >= 1 (got {num_workers})")
        ensure_ray(address, num_cpus)
        self.subset = subset
        self.options = options or ScoreOptions()
        self.max_attempts = max_attempts
        self._threads = threads_per_worker or cpus_per_worker
        # The pool is sized by the config, not by the caller's reservation: escape any enclosing
        # placement group (a Tune trial captures child actors into its own, and they would never fit).
        self._actor_options = dict(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=4,
                                   max_task_retries=0,
                                   scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
        self._device = "cuda" if gpus_per_worker > 0 else "cpu"
        self._cls = ray.remote(SearchWorker)
        self.actors = [self._new_actor() for _ in range(num_workers)]
        try:
            ray.get([a.ping.remote() for a in self.actors], timeout=start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.close()
            need = f"{num_workers} x {{CPU: {cpus_per_worker}{f', GPU: {gpus_per_worker:g}' if gpus_per_worker else ''}}}"
            raise LaaspError(f"search actors ({need}) could not be placed within {start_timeout_s:.0f} s: the "
                             f"cluster has no room for them; free resources, lower ray.search_workers, or set "
                             f"ray.search_executor=ranks") from None
        except ray.exceptions.RayActorError as exc:  # an actor failed to start: its own error, in one line
            self.close()
            raise _startup_error(exc) from None
        self._shard_refs = [ray.put(s.to_table()) for s in subset.shards]
        self._round_ref: Any = None

    @property
    def device(self) -> str:
        """Where the actors score: "cuda" or "cpu"."""
        return self._device

    def _new_actor(self) -> Any:
        return self._cls.options(**self._actor_options).remote(self._threads, self._device)

    @property
    def parallelism(self) -> int:
        return len(self.actors)

    def start_round(self, net: PrunableNetwork, candidates: Sequence[Candidate], calibration: Shard | None) -> None:
        import ray

        state = {k: v.detach().cpu() for k, v in net.model.state_dict().items()}
        self._round_ref = ray.put({
            "spec": network_spec(net), "state": state, "options": self.options,
            "candidates": [(c.group, c.criterion, list(c.channels)) for c in candidates],
            "calibration": calibration.to_table() if calibration is not None else None,
        })

    def run(self, tasks: Sequence[Task]) -> list[list[np.ndarray]]:
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        assert self._round_ref is not None, "start_round first"
        results: list[list[np.ndarray] | None] = [None] * len(tasks)
        pending = deque(range(len(tasks)))
        attempts = [0] * len(tasks)
        idle = deque(range(len(self.actors)))
        inflight: dict[Any, tuple[int, int]] = {}  # task ref -> (task, actor)
        recovering: dict[Any, int] = {}  # ping ref -> actor being restarted
        while pending or inflight:
            while idle and pending:
                a = idle.popleft()
                home = [t for t in pending if tasks[t].shards[0] % len(self.actors) == a]
                t = home[0] if home else pending[0]
                pending.remove(t)
                attempts[t] += 1
                task = tasks[t]
                ref = self.actors[a].score.remote([self._round_ref], [self._shard_refs[s] for s in task.shards],
                                                  task.shards, task.candidates, task.scorer)
                inflight[ref] = (t, a)
            done, _ = ray.wait(list(inflight) + list(recovering), num_returns=1)
            for ref in done:
                if ref in recovering:
                    a = recovering.pop(ref)
                    self._recover(a, ref, recovering, idle)
                    continue
                t, a = inflight.pop(ref)
                try:
                    results[t] = ray.get(ref)
                    idle.append(a)
                except (RayActorError, ActorUnavailableError) as exc:
                    if attempts[t] >= self.max_attempts:
                        raise LaaspError(f"search task on shards {list(tasks[t].shards)} failed {attempts[t]} times; "
                                         f"last error: {type(exc).__name__}") from None
                    pending.appendleft(t)  # resubmitted to whichever actor is free first
                    recovering[self.actors[a].ping.remote()] = a
        while recovering:  # let restarting actors settle before the next round
            ref = ray.wait(list(recovering), num_returns=1)[0][0]
            self._recover(recovering.pop(ref), ref, recovering, deque())
        return results  # type: ignore[return-value]

    def _recover(self, a: int, ping: Any, recovering: dict[Any, int], idle: deque) -> None:
        """A failed actor answered (or not) its ping: back to work, ping again while Ray restarts it,
        or replace it when it is gone for good (restarts exhausted)."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        try:
            ray.get(ping)
            idle.append(a)
            return
        except ActorUnavailableError:  # still restarting
            time.sleep(0.05)
        except RayActorError:
            self.actors[a] = self._new_actor()
        recovering[self.actors[a].ping.remote()] = a

    def end_round(self) -> None:
        self._round_ref = None

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _startup_error(exc: Exception) -> LaaspError:
    """The LaaspError an actor raised while starting (Ray hands it back as text), or a one-line LaaspError."""
    from .. import errors

    found = re.findall(r"laasp_dist\.errors\.(\w+): ([^\n]+)", str(exc))
    if found:
        name, message = found[-1]
        cls = getattr(errors, name, LaaspError)
        return cls(message.strip()) if isinstance(cls, type) and issubclass(cls, LaaspError) else LaaspError(message)
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return LaaspError(f"search actors failed to start: {lines[-1] if lines else type(exc).__name__}")
