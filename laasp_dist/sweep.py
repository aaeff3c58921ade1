"""`sweep`: whole LAASP runs over a grid of settings on Ray Tune, compared by accuracy vs FLOPs.

Each trial is one `run_job` (its own Ray Train workers and search actors) in
`SWEEP_DIR/trials/<trial>`; Tune's state lives in `SWEEP_DIR/tune`. Results are
read back from each trial's `summary.json`, so a resumed sweep reports finished
trials from before the crash alongside the new ones.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, Section, build_config, load_config, merge_dicts, parse_overrides
from .errors import ConfigError, LaaspError
from .io import atomic_write
from .runtime import ensure_ray

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.parquet"
PLOT_FILE = "accuracy_vs_flops.png"
TRIAL_CPU = 0.01  # a trial's driver only waits on its own Train workers and search actors


class SweepDirError(LaaspError):
    """The sweep folder holds another sweep, or nothing to resume."""


def _leaf_keys(model: type[RunConfig] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            keys += _leaf_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def resolve_key(key: str) -> str:
    """`step_flops` → `prune.step_flops`; a full dotted key must exist. Unknown/ambiguous: ConfigError."""
    keys = _leaf_keys()
    if key in keys:
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"sweep key {key!r} is ambiguous: {', '.join(matches)}")
    raise ConfigError(f"unknown sweep key {key!r}; sweepable keys look like prune.step_flops, prune.recover_flops")


def parse_params(items: list[str]) -> dict[str, list[Any]]:
    """`["step_flops=0.005,0.01"]` → `{"prune.step_flops": [0.005, 0.01]}` (values parsed as YAML).

    `criteria=[[l1,l2,fpgm,cosine],[l1]]` gives list-valued trials.
    """
    params: dict[str, list[Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not raw.strip():
            raise ConfigError(f"--param {item!r} is not KEY=V1,V2,...")
        full = resolve_key(key.strip())
        if full in params:
            raise ConfigError(f"--param {full} is given twice")
        if raw.strip().startswith("["):  # a YAML list, for values that are lists themselves
            values = yaml.safe_load(raw)
            if not isinstance(values, list) or not values:
                raise ConfigError(f"--param {item!r}: a [..] value must be a non-empty YAML list")
        else:
            values = [yaml.safe_load(v) for v in raw.split(",")]
        params[full] = values
    if not params:
        raise ConfigError("a sweep needs at least one --param KEY=V1,V2,...")
    return params


def trial_grid(base: dict[str, Any], params: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination as {"name", "values", "config"}; each config validated now, before any work."""
    trials = []
    for combo in itertools.product(*params.values()):
        values = dict(zip(params, combo))
        name = "_".join(f"{k.rsplit('.', 1)[-1]}={_label(v)}" for k, v in values.items())
        data = merge_dicts(base, parse_overrides([f"{k}={json.dumps(v)}" for k, v in values.items()]))
        data["name"] = f"{base.get('name', 'run')}-{name}"
        try:
            config = build_config(data)
        except ConfigError as exc:
            raise ConfigError(f"trial {name}: {exc}") from None
        trials.append({"name": name, "values": values, "config": config.model_dump(mode="json")})
    return trials


def _label(value: Any) -> str:
    return "+".join(map(str, value)) if isinstance(value, list) else str(value)


def sweep_trial(trial_config: dict[str, Any]) -> None:
    """Tune trainable (runs in a trial actor): one whole LAASP run, resumed if it was cut off."""
    from ray import tune

    from .storage import Storage
    from .training import run_job
    from .training.checkpoint import checkpoint_names

    trial = trial_config["trial"]
    run = Storage(Path(trial_config["sweep_dir"]) / TRIALS_DIR / trial["name"])
    resume = bool(checkpoint_names(run))
    if not resume:
        run.delete()  # a trial cut off before its first checkpoint starts over
    summary = run_job(build_config(trial["config"]), run, resume=resume)
    tune.report({"flops_reduction": summary["flops_reduction"],
                 "val_top1": summary["final_metrics"]["val_top1"],
                 "test_top1": summary["final_metrics"]["test_top1"]})


def run_sweep(config_path: str | Path, overrides: list[str], params: list[str], out_dir: str | Path,
              resume: bool = False, max_concurrent: int = 1) -> "Any":
    """Run (or resume) a sweep; returns the results table (a pandas DataFrame)."""
    from ray import tune

    base = load_config(config_path, overrides)
    grid = trial_grid(base.model_dump(mode="json"), parse_params(params))
    sweep_dir = Path(out_dir).resolve()
    tune_dir = sweep_dir / TUNE_DIR
    if resume:
        if not tune.Tuner.can_restore(str(tune_dir)):
            raise SweepDirError(f"cannot resume: no sweep state in {tune_dir}")
        saved = yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())
        if saved["trials"] != [t["name"] for t in grid]:
            raise ConfigError(f"--resume with a different grid than {sweep_dir / SWEEP_FILE}")
    elif sweep_dir.exists() and any(p.name != SWEEP_FILE for p in sweep_dir.iterdir()):
        raise SweepDirError(f"{sweep_dir} is not empty: pass --resume to continue that sweep, or choose another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        text = yaml.safe_dump({"base": base.model_dump(mode="json"), "params": parse_params(params),
                               "trials": [t["name"] for t in grid]}, sort_keys=False)
        atomic_write(sweep_dir / SWEEP_FILE, lambda p: p.write_text(text))

    import ray

    r = base.ray
    per_trial = r.num_workers * r.cpus_per_worker + r.search_workers
    started = ensure_ray(r.address, max_concurrent * per_trial + 1, log_to_driver=True)
    try:
        trainable = tune.with_resources(sweep_trial, {"CPU": TRIAL_CPU})
        if resume:
            tuner = tune.Tuner.restore(str(tune_dir), trainable, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={"trial": tune.grid_search(grid), "sweep_dir": str(sweep_dir)},
                tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent,
                                            trial_dirname_creator=lambda t: t.config["trial"]["name"]),
                run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(sweep_dir), verbose=0),
            )
        grid_result = tuner.fit()
        errors = {r.config["trial"]["name"]: r.error for r in grid_result if r.error is not None}
    finally:
        if started:
            ray.shutdown()
    return write_results(sweep_dir, grid, errors)


def write_results(sweep_dir: Path, grid: list[dict[str, Any]], errors: dict[str, BaseException]) -> "Any":
    """Collect every trial's summary into results.parquet and the accuracy-vs-FLOPs plot."""
    import pandas as pd

    rows = []
    for trial in grid:
        summary_file = sweep_dir / TRIALS_DIR / trial["name"] / "summary.json"
        row: dict[str, Any] = {"trial": trial["name"], **{k: _label(v) for k, v in trial["values"].items()}}
        if summary_file.is_file():
            s = json.loads(summary_file.read_text())
            before = s.get("before_pruning") or {}
            row.update(status="done", flops_reduction=s["flops_reduction"], macs=s["final"]["macs"],
                       params=s["final"]["params"], val_top1=s["final_metrics"]["val_top1"],
                       test_top1=s["final_metrics"]["test_top1"], test_top1_before=before.get("test_top1"),
                       rounds=s["rounds"], wall_seconds=s.get("wall_seconds"))
        else:
            err = errors.get(trial["name"])
            row["status"] = f"error: {str(err).strip().splitlines()[-1][:200]}" if err else "not finished"
        rows.append(row)
    table = pd.DataFrame(rows)
    atomic_write(sweep_dir / RESULTS_FILE, lambda p: table.to_parquet(p, index=False))
    _plot(table, sweep_dir / PLOT_FILE)
    return table


def _plot(table: "Any", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table["status"] == "done"] if "flops_reduction" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for _, row in done.iterrows():
        ax.scatter(100 * row["flops_reduction"], 100 * row["test_top1"], s=40)
        ax.annotate(row["trial"], (100 * row["flops_reduction"], 100 * row["test_top1"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("final test top-1 (%)")
    ax.set_title(f"sweep: accuracy vs FLOPs reduction ({len(done)}/{len(table)} trials done)")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
