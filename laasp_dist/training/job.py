"""`run_job(config, out, resume)`: one LAASP run, from a validated config to summary.json.

1. open the run folder — a local path, a shared mount or a URI (``s3://…``, ``gs://…``),
   see `laasp_dist.storage` — and check it before Ray starts: a new run needs an empty
   or missing folder, ``--resume`` a checkpoint there and the same config (``ray.*`` aside);
   check the data;
2. save the resolved ``config.yaml`` beside the run, and an image folder's data index;
3. draw the scoring subset once and store it as Parquet shards (``subset/``);
4. start an embedded Ray (no ``ray.address``) or connect to the cluster;
5. run ``TorchTrainer(train_loop_per_worker=train_worker)`` — DDP on gloo (CPU) or NCCL
   (GPU); rank 0 coordinates the rounds (see ``worker.py``). Its checkpoints go through
   ``ray.train.report`` to ``<run>/checkpoints`` (Ray Train's own storage, pointed at the run
   folder); ``ray.max_failures`` lets Ray restart a worker group that lost a worker or a node
   from the last checkpoint, and the same folder with ``--resume`` lets Ray Train find that
   checkpoint again after the driver itself died;
6. read back ``summary.json`` and add the driver's wall time.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path
from typing import Any

from ..config import RunConfig, gpu_shares, load_config, save_config
from ..errors import ConfigError, DataError, LaaspError
from ..latency_table import given_run_table, keep_run_table
from ..runtime import ensure_ray
from ..pruning import PrunableNetwork
from ..search import check_search_inputs, read_subset
from ..storage import Storage, as_storage
from .checkpoint import CHECKPOINT_DIR, KEEP, latest_state
from .data import INDEX_FILE, build_data_index, load_splits, read_data_index, subset_source, write_data_index
from .schedule import schedule_warnings
from .run_record import SUMMARY
from .worker import arch_of, train_worker

CONFIG_FILE = "config.yaml"
SUBSET_DIR = "subset"
RESUMABLE_SECTIONS = ("ray",)  # may change between a run and its resume


class RunDirError(LaaspError):
    """The run folder cannot be used (a previous run is there, or nothing to resume)."""


class TrainingError(LaaspError):
    """The distributed training failed (the first worker error, in one line)."""


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / config.name


def check_run_dir(storage: Storage, config: RunConfig, resume: bool) -> None:
    """New runs never overwrite a previous one; a resume needs a checkpoint of the same config."""
    if not resume:
        if not storage.is_empty():
            raise RunDirError(f"{storage} is not empty: pass --resume to continue the run there, "
                              f"or choose another --out")
        return
    state = latest_state(storage)
    given = config.model_dump(mode="json")
    saved = {}
    if storage.is_file(CONFIG_FILE):
        saved = load_config(storage.child(CONFIG_FILE)).model_dump(mode="json")
        _same_config(saved, given, storage.uri_of(CONFIG_FILE))
    _same_config(state.get("config") or saved, given, storage.uri_of(CHECKPOINT_DIR))


def _same_config(saved: dict[str, Any], given: dict[str, Any], where: str) -> None:
    for key in _differences(saved, given):
        if key.split(".")[0] not in RESUMABLE_SECTIONS:
            raise ConfigError(f"--resume with a different config: {key} was {_get(saved, key)!r} in "
                              f"{where}, now {_get(given, key)!r}")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in list(a) + [k for k in b if k not in a]:
            out += _differences(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _get(data: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def check_sizes(config: RunConfig, splits: Any) -> None:
    """Size constraints that need the data: DataError before anything starts."""
    if config.data.batch_size < config.ray.num_workers:
        raise ConfigError(f"data.batch_size ({config.data.batch_size}) must be at least ray.num_workers "
                          f"({config.ray.num_workers})")
    if len(splits.val) < config.ray.num_workers:
        raise DataError(f"the held-out val split has {len(splits.val)} images, fewer than the "
                        f"{config.ray.num_workers} workers")
    if config.prune.subset_size > len(splits.train):
        raise DataError(f"prune.subset_size={config.prune.subset_size} exceeds the {len(splits.train)} "
                        f"training images")
    per_rank = config.data.batch_size // config.ray.num_workers
    if len(splits.train) // config.ray.num_workers < per_rank:
        raise DataError(f"{len(splits.train)} training images are too few for {config.ray.num_workers} workers "
                        f"with batches of {per_rank}")
    if config.model.num_classes not in (None, splits.num_classes):
        raise ConfigError(f"model.num_classes={config.model.num_classes} but {config.data.dataset} has "
                          f"{splits.num_classes} classes")


def build_subset_dir(config: RunConfig, splits: Any, folder: Storage) -> Storage:
    """Draw the scoring subset once per run and store it as Parquet shards (kept on resume)."""
    from ..search.subset import MANIFEST, build_subset, write_subset

    if folder.is_file(MANIFEST):
        return folder
    source, exclude = subset_source(splits, config)
    p = config.prune
    subset = build_subset(source, p.subset_size, p.subset_shards, config.seed + 1, exclude=exclude)
    return write_subset(subset, folder)


def user_error(exc: BaseException) -> LaaspError | None:
    """The first LaaspError in a (Ray-wrapped) exception chain, as our own class; None if there is none."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LaaspError):
            # Ray may hand back a class derived from ours and its own: rebuild ours, message in one line
            cls = next(c for c in type(e).__mro__
                       if issubclass(c, LaaspError) and c.__module__.split(".")[0] in ("laasp_dist", "data_pipelines"))
            return cls((str(e).strip().splitlines() or [""])[0])
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        controller = getattr(e, "controller_failure", None)
        todo.append(controller if isinstance(controller, BaseException) else None)
    return None


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _stop_on_user_error() -> Any:
    """A Ray Train callback that ends the run at a worker's LaaspError instead of retrying it.

    Ray Train restarts the worker group after any worker error (up to ``ray.max_failures``);
    bad data, a broken checkpoint or ranks out of sync would only fail again. Raising from the
    controller's callback makes the failure final (a non-retryable controller error).
    """
    from ray.train.v2.api.callback import UserCallback

    class StopOnUserError(UserCallback):
        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            for exc in worker_exceptions.values():
                if (error := user_error(exc)) is not None:
                    raise error

    return StopOnUserError()


def run_job(config: RunConfig, out: str | Path | Storage | None = None, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) one LAASP job; returns the summary also written to `out/summary.json`.

    `out`: the run folder, a local path or a URI (default ``runs/<name>``).
    """
    start = time.perf_counter()
    storage = as_storage(out or default_run_dir(config))
    check_run_dir(storage, config, resume)
    for message in schedule_warnings(config):
        print(f"laasp-dist: warning: {message}", file=sys.stderr)
    index, new_index = None, False
    if config.data.dataset == "image_folder":  # listed once per run; ranks and resumes read the index
        new_index = not (resume and storage.is_file(INDEX_FILE))
        index = build_data_index(config) if new_index else read_data_index(storage)
    splits = load_splits(config, index=index)
    check_sizes(config, splits)
    arch = arch_of(config, splits)
    latency = given_run_table(config, storage, arch)  # the run folder's, or prune.latency_table, checked
    storage.check_writable()
    save_config(config, storage.child(CONFIG_FILE))
    if new_index:
        write_data_index(storage, index)
    del index
    subset = build_subset_dir(config, splits, storage.child(SUBSET_DIR))
    keep_run_table(storage, latency)
    check_search_inputs(PrunableNetwork.create(arch), read_subset(subset), config.prune, latency)
    del splits
    setup_s = time.perf_counter() - start

    import ray
    from ray.train import CheckpointConfig, FailureConfig, ScalingConfig
    from ray.train import RunConfig as RayRunConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = config.ray
    # training ranks wait during a round, so the search actors get the cores
    started = ensure_ray(r.address, r.num_workers * r.cpus_per_worker + r.search_workers, log_to_driver=True)
    try:
        resources = {"CPU": r.cpus_per_worker, **({"GPU": gpu_shares(config)[0]} if r.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker=train_worker,
            # `invocation` tells a worker group that Ray restarted (same driver) from a --resume (new driver)
            train_loop_config={"config": config.model_dump(mode="json"), "storage": storage.uri,
                               "invocation": uuid.uuid4().hex, "resume": resume},
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                         resources_per_worker=resources, placement_strategy=r.placement_strategy),
            torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=r.collective_timeout_s),
            run_config=RayRunConfig(name=CHECKPOINT_DIR, **storage.ray_storage(),
                                    failure_config=FailureConfig(max_failures=r.max_failures),
                                    checkpoint_config=CheckpointConfig(num_to_keep=KEEP),
                                    callbacks=[_stop_on_user_error()]),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; surface ours as one line
            error = user_error(exc)
            if error is not None:
                raise error from None
            raise TrainingError(f"training failed: {_one_line(exc)}") from None
    finally:
        if started:
            ray.shutdown()
    try:
        summary = storage.read_json(SUMMARY)
    except FileNotFoundError:
        raise TrainingError(f"training ended without writing {storage.uri_of(SUMMARY)}") from None
    summary["phase_seconds"]["setup"] = round(setup_s, 3)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    storage.write_json(SUMMARY, summary)
    restarts = len(summary.get("restarts", []))
    print(f"[laasp] {config.name}: FLOPs -{summary['flops_reduction']:.2%}, "
          f"test top1 {summary['final_metrics']['test_top1']:.4f} "
          f"(before pruning {summary['before_pruning']['test_top1'] if summary['before_pruning'] else float('nan'):.4f}),"
          f" {summary['wall_seconds']:.0f} s{f', {restarts} restart(s)' if restarts else ''} -> {storage}",
          file=sys.stderr)
    return summary
