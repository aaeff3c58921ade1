"""`run_job(config, out_dir, resume)`: one LAASP run, from a validated config to summary.json.

1. check the run folder (a new run needs an empty or missing folder; ``--resume`` needs
   a checkpoint and the same config, ``ray.*`` aside) and the data, before Ray starts;
2. save the resolved ``config.yaml`` beside the run;
3. draw the scoring subset once and store it as Parquet shards (``subset/``);
4. start an embedded Ray (no ``ray.address``) or connect to the cluster;
5. run ``TorchTrainer(train_loop_per_worker=train_worker)`` — DDP on gloo (CPU) or
   NCCL (GPU); rank 0 coordinates the rounds (see ``worker.py``);
6. read back ``summary.json`` and add the driver's wall time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from ..config import RunConfig, load_config, save_config
from ..errors import ConfigError, DataError, LaaspError
from ..io import write_json
from ..runtime import ensure_ray
from ..pruning import PrunableNetwork
from ..search import check_search_inputs, read_subset
from .checkpoint import CHECKPOINT_DIR, CheckpointError, checkpoint_path, load_checkpoint
from .data import load_splits, subset_source
from .rounds import gpu_shares
from .schedule import schedule_warnings
from .worker import CRASH_ENV, SUMMARY, arch_of, train_worker

CONFIG_FILE = "config.yaml"
SUBSET_DIR = "subset"
RESUMABLE_SECTIONS = ("ray",)  # may change between a run and its resume


class RunDirError(LaaspError):
    """The run folder cannot be used (a previous run is there, or nothing to resume)."""


class TrainingError(LaaspError):
    """The distributed training failed (the first worker error, in one line)."""


def default_run_dir(config: RunConfig) -> Path:
    return Path("runs") / config.name


def check_run_dir(run_dir: Path, config: RunConfig, resume: bool) -> None:
    """New runs never overwrite a previous one; a resume needs a checkpoint and the same config."""
    if not resume:
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise RunDirError(f"{run_dir} is not empty: pass --resume to continue the run there, "
                              f"or choose another --out")
        return
    if not checkpoint_path(run_dir).is_file():
        raise CheckpointError(f"cannot resume: no checkpoint in {run_dir / CHECKPOINT_DIR}")
    load_checkpoint(run_dir)  # readable?
    saved_file = run_dir / CONFIG_FILE
    if saved_file.is_file():
        saved = load_config(saved_file).model_dump(mode="json")
        given = config.model_dump(mode="json")
        for key in _differences(saved, given):
            if key.split(".")[0] not in RESUMABLE_SECTIONS:
                raise ConfigError(f"--resume with a different config: {key} was {_get(saved, key)!r} in "
                                  f"{saved_file}, now {_get(given, key)!r}")


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


def build_subset_dir(config: RunConfig, splits: Any, directory: Path) -> Path:
    """Draw the scoring subset once per run and store it as Parquet shards (kept on resume)."""
    from ..search.subset import MANIFEST, build_subset, write_subset

    if (directory / MANIFEST).is_file():
        return directory
    source, exclude = subset_source(splits, config)
    p = config.prune
    subset = build_subset(source, p.subset_size, p.subset_shards, config.seed + 1, exclude=exclude)
    return write_subset(subset, directory)


def _first_laasp_error(exc: BaseException) -> LaaspError | None:
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, LaaspError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
        todo += list((getattr(e, "worker_failures", None) or {}).values())
        controller = getattr(e, "controller_failure", None)
        todo.append(controller if isinstance(controller, BaseException) else None)
    return None


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def run_job(config: RunConfig, out_dir: str | Path | None = None, resume: bool = False) -> dict[str, Any]:
    """Run (or resume) one LAASP job; returns the summary also written to `out_dir/summary.json`."""
    start = time.perf_counter()
    run_dir = Path(out_dir or default_run_dir(config)).resolve()
    check_run_dir(run_dir, config, resume)
    for message in schedule_warnings(config):
        print(f"laasp-dist: warning: {message}", file=sys.stderr)
    splits = load_splits(config)
    check_sizes(config, splits)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(config, run_dir / CONFIG_FILE)
    subset_dir = build_subset_dir(config, splits, run_dir / SUBSET_DIR)
    check_search_inputs(PrunableNetwork.create(arch_of(config, splits)), read_subset(subset_dir), config.prune)
    del splits
    setup_s = time.perf_counter() - start

    import ray
    from ray.train import RunConfig as RayRunConfig
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    r = config.ray
    # training ranks wait during a round, so the search actors get the cores
    started = ensure_ray(r.address, r.num_workers * r.cpus_per_worker + r.search_workers, log_to_driver=True)
    try:
        resources = {"CPU": r.cpus_per_worker, **({"GPU": gpu_shares(config)[0]} if r.use_gpu else {})}
        trainer = TorchTrainer(
            train_loop_per_worker=train_worker,
            train_loop_config={"config": config.model_dump(mode="json"), "run_dir": str(run_dir),
                               "subset_dir": str(subset_dir),
                               "crash_after_round": int(os.environ.get(CRASH_ENV, "0") or 0)},
            scaling_config=ScalingConfig(num_workers=r.num_workers, use_gpu=r.use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if r.use_gpu else "gloo", timeout_s=r.collective_timeout_s),
            run_config=RayRunConfig(name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}",
                                    storage_path=str(run_dir / "ray")),
        )
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; surface ours as one line
            inner = _first_laasp_error(exc)
            if inner is not None:  # Ray may hand back a derived class: rebuild ours
                cls = next(c for c in type(inner).__mro__ if issubclass(c, LaaspError)
                           and c.__module__.startswith("laasp_dist"))
                raise cls((str(inner).strip().splitlines() or [""])[0]) from None
            raise TrainingError(f"training failed: {_one_line(exc)}") from None
    finally:
        if started:
            ray.shutdown()
    summary_path = run_dir / SUMMARY
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        raise TrainingError(f"training ended without writing {summary_path}") from None
    summary["phase_seconds"]["setup"] = round(setup_s, 3)
    summary["wall_seconds"] = round(time.perf_counter() - start, 3)
    write_json(summary_path, summary)
    print(f"[laasp] {config.name}: FLOPs -{summary['flops_reduction']:.2%}, "
          f"test top1 {summary['final_metrics']['test_top1']:.4f} "
          f"(before pruning {summary['before_pruning']['test_top1'] if summary['before_pruning'] else float('nan'):.4f}),"
          f" {summary['wall_seconds']:.0f} s -> {run_dir}", file=sys.stderr)
    return summary
