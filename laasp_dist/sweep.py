"""`sweep`: whole LAASP runs over a grid of settings on Ray Tune, compared by accuracy vs FLOPs.

Each trial is one `run_job` (its own Ray Train workers and search actors) in
`SWEEP_DIR/trials/<trial>`; Tune's state lives in `SWEEP_DIR/tune`. Results are
read back from each trial's `summary.json`, so a resumed sweep reports finished
trials from before the crash alongside the new ones.

A configuration is one point of the grid; with `seeds`, every configuration runs once
per seed (the config's top-level `seed`: initialisation, data order, validation split,
scoring subset). `results.parquet` has one row per trial, `summary.parquet` one row per
configuration: mean, sample standard deviation (ddof = 1) and count of the finished
trials' metrics.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from .config import RunConfig, Section, build_config, load_config, merge_dicts, parse_overrides
from .errors import ConfigError, LaaspError
from .storage import atomic_write
from .runtime import ensure_ray

TUNE_DIR = "tune"
TRIALS_DIR = "trials"
SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.parquet"
SUMMARY_FILE = "summary.parquet"
PAIRED_FILE = "paired.parquet"
PAIRED_PLOT = "paired.png"
PAIRED_METRICS = ("test_top1", "val_top1", "flops_reduction")
PLOT_FILE = "accuracy_vs_flops.png"
# Per-configuration statistics of these trial columns (top-1 and reductions are fractions; wall time in s).
SUMMARY_METRICS = ("test_top1", "val_top1", "flops_reduction", "params_reduction", "wall_seconds", "test_top1_before")
TRIAL_CPU = 0.01  # a trial's driver only waits on its own Train workers and search actors


class SweepDirError(LaaspError):
    """The sweep folder holds another sweep, or nothing to resume."""


class SweepTables(NamedTuple):
    """A sweep's tables: a row per trial, a row per configuration, and (with a reference) paired differences."""

    results: Any
    summary: Any
    paired: Any | None


def _leaf_keys(model: type[RunConfig] = RunConfig, prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, Section):
            keys += _leaf_keys(sub, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _sections() -> list[str]:
    return [name for name, field in RunConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, Section)]


def resolve_key(key: str) -> str:
    """`step_flops` → `prune.step_flops`; a full dotted key or a section name must exist. Else ConfigError."""
    keys = _leaf_keys()
    if key in keys or key in _sections():
        return key
    matches = [k for k in keys if k.rsplit(".", 1)[-1] == key]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"sweep key {key!r} is ambiguous: {', '.join(matches)}")
    raise ConfigError(f"unknown sweep key {key!r}; sweepable keys look like prune.step_flops, prune.recover_flops")


def parse_params(items: list[str]) -> dict[str, list[Any]]:
    """`["step_flops=0.005,0.01"]` → `{"prune.step_flops": [0.005, 0.01]}` (values parsed as YAML).

    `criteria=[[l1,l2,fpgm,cosine],[l1]]` gives list-valued trials; a section's values are
    mappings of some of its keys, for configurations that differ in several keys at once:
    `prune=[{criteria: [l1]}, {criteria: [l1], selection: importance}]`.
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
        if full in _sections() and not all(isinstance(v, dict) and v for v in values):
            raise ConfigError(f"--param {full}=...: each value of a section must be a mapping such as "
                              f"[{{criteria: [l1]}}, {{criteria: [l2]}}]")
        params[full] = values
    if not params:
        raise ConfigError("a sweep needs at least one --param KEY=V1,V2,...")
    return params


def parse_seeds(text: str | None) -> list[int] | None:
    """`"0,1,2"` → [0, 1, 2]; None stays None (one trial per configuration, the config's own seed)."""
    if text is None:
        return None
    try:
        seeds = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds {text!r} is not a comma-separated list of integers") from None
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r} repeats a seed")
    return seeds


def trial_grid(base: dict[str, Any], params: dict[str, list[Any]], seeds: list[int] | None = None
               ) -> list[dict[str, Any]]:
    """Every seed × combination as {"name", "configuration", "values", "seed", "config"}, validated now.

    Without `seeds` a trial is named after its configuration (as before seeds existed) and keeps
    the base seed; with them, `<configuration>_seed=<s>`. Seed-major order (every configuration's
    first seed, then every second seed, ...): a sweep stopped early still compares like with like.
    """
    if seeds is not None and "seed" in params:
        raise ConfigError("give seeds with --seeds, not --param seed=...")
    trials = []
    for seed in seeds if seeds is not None else [None]:
        for combo in itertools.product(*params.values()):
            values = dict(zip(params, combo))
            configuration = "_".join(f"{k.rsplit('.', 1)[-1]}={_label(v)}" for k, v in values.items())
            name = configuration if seed is None else f"{configuration}_seed={seed}"
            data = merge_dicts(base, parse_overrides([f"{k}={json.dumps(v)}" for k, v in values.items()]))
            data["name"] = f"{base.get('name', 'run')}-{name}"
            if seed is not None:
                data["seed"] = seed
            try:
                config = build_config(data)
            except ConfigError as exc:
                raise ConfigError(f"trial {name}: {exc}") from None
            trials.append({"name": name, "configuration": configuration, "values": values, "seed": config.seed,
                           "config": config.model_dump(mode="json")})
    return trials


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return ",".join(f"{k}={_label(v)}" for k, v in value.items())
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
              resume: bool = False, max_concurrent: int = 1, seeds: list[int] | None = None,
              reference: str | None = None) -> SweepTables:
    """Run (or resume) a sweep; `reference` (a configuration's name) adds its paired differences to the others."""
    from ray import tune

    base = load_config(config_path, overrides)
    grid = trial_grid(base.model_dump(mode="json"), parse_params(params), seeds)
    names = list(dict.fromkeys(t["configuration"] for t in grid))
    if reference is not None and reference not in names:
        raise ConfigError(f"--reference {reference!r} is not a configuration of this sweep; they are: {', '.join(names)}")
    sweep_dir = Path(out_dir).resolve()
    tune_dir = sweep_dir / TUNE_DIR
    if resume:
        if not tune.Tuner.can_restore(str(tune_dir)):
            raise SweepDirError(f"cannot resume: no sweep state in {tune_dir}")
        saved = yaml.safe_load((sweep_dir / SWEEP_FILE).read_text())
        if saved["trials"] != [t["name"] for t in grid]:
            raise ConfigError(f"--resume with a different grid or --seeds than {sweep_dir / SWEEP_FILE}")
    elif sweep_dir.exists() and any(p.name != SWEEP_FILE for p in sweep_dir.iterdir()):
        raise SweepDirError(f"{sweep_dir} is not empty: pass --resume to continue that sweep, or choose another --out")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        text = yaml.safe_dump({"base": base.model_dump(mode="json"), "params": parse_params(params),
                               "seeds": seeds, "trials": [t["name"] for t in grid]}, sort_keys=False)
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
    return write_results(sweep_dir, grid, errors, reference)


def write_results(sweep_dir: Path, grid: list[dict[str, Any]], errors: dict[str, BaseException],
                  reference: str | None = None) -> SweepTables:
    """Collect every trial's summary into results.parquet, summary.parquet (paired.parquet with a reference)
    and the accuracy-vs-FLOPs plot."""
    import pandas as pd

    rows = []
    for trial in grid:
        summary_file = sweep_dir / TRIALS_DIR / trial["name"] / "summary.json"
        row: dict[str, Any] = {"trial": trial["name"], "configuration": trial["configuration"], "seed": trial["seed"],
                               **{k: _label(v) for k, v in trial["values"].items()}}
        if summary_file.is_file():
            s = json.loads(summary_file.read_text())
            before = s.get("before_pruning") or {}
            row.update(status="done", flops_reduction=s["flops_reduction"], params_reduction=s.get("params_reduction"),
                       macs=s["final"]["macs"], params=s["final"]["params"], val_top1=s["final_metrics"]["val_top1"],
                       test_top1=s["final_metrics"]["test_top1"], test_top1_before=before.get("test_top1"),
                       rounds=s["rounds"], wall_seconds=s.get("wall_seconds"))
        else:
            err = errors.get(trial["name"])
            row["status"] = f"error: {str(err).strip().splitlines()[-1][:200]}" if err else "not finished"
        rows.append(row)
    table = pd.DataFrame(rows)
    summary = summarise(table, list(grid[0]["values"]) if grid else [])
    atomic_write(sweep_dir / RESULTS_FILE, lambda p: table.to_parquet(p, index=False))
    atomic_write(sweep_dir / SUMMARY_FILE, lambda p: summary.to_parquet(p, index=False))
    paired = None
    if reference is not None:
        paired = paired_differences(table, reference)
        atomic_write(sweep_dir / PAIRED_FILE, lambda p: paired.to_parquet(p, index=False))
        _plot_paired(paired, reference, sweep_dir / PAIRED_PLOT)
    _plot(table, summary, sweep_dir / PLOT_FILE)
    return SweepTables(table, summary, paired)


def summarise(table: "Any", param_columns: list[str]) -> "Any":
    """One row per configuration (in grid order): the swept values, `trials`, `n` finished, and per metric
    `<metric>_mean` and `<metric>_sd` (sample standard deviation, ddof = 1: NaN when n < 2) over the finished trials."""
    import numpy as np
    import pandas as pd

    rows = []
    for configuration, trials in table.groupby("configuration", sort=False):
        done = trials[trials["status"] == "done"]
        row = {"configuration": configuration, **{k: trials[k].iloc[0] for k in param_columns},
               "trials": len(trials), "n": len(done)}
        for metric in SUMMARY_METRICS:
            values = pd.to_numeric(done[metric], errors="coerce").dropna() if metric in done else pd.Series([], float)
            row[f"{metric}_mean"] = float(values.mean()) if len(values) else np.nan
            row[f"{metric}_sd"] = float(values.std(ddof=1)) if len(values) > 1 else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(table: "Any", reference: str, metrics: tuple[str, ...] = PAIRED_METRICS) -> "Any":
    """Per other configuration and metric, `reference − configuration` seed by seed, over the seeds where both
    finished: `n`, `mean`, `sd` (sample, ddof = 1; NaN when n < 2), and the raw `seeds` and `differences`."""
    import math
    import statistics

    import pandas as pd

    done = table[table["status"] == "done"] if "status" in table else table.iloc[0:0]
    ref = done[done["configuration"] == reference].set_index("seed")
    rows = []
    for configuration in dict.fromkeys(table["configuration"]):
        if configuration == reference:
            continue
        other = done[done["configuration"] == configuration].set_index("seed")
        seeds = [int(s) for s in ref.index if s in other.index]
        for metric in metrics:
            diffs = [float(ref.at[s, metric]) - float(other.at[s, metric]) for s in seeds]
            rows.append({"configuration": configuration, "metric": metric, "n": len(diffs),
                         "mean": statistics.fmean(diffs) if diffs else math.nan,
                         "sd": statistics.stdev(diffs) if len(diffs) > 1 else math.nan,
                         "seeds": seeds, "differences": diffs})
    return pd.DataFrame(rows, columns=["configuration", "metric", "n", "mean", "sd", "seeds", "differences"])


def format_paired(paired: "Any", reference: str, metric: str = "test_top1") -> str:
    """Paired differences of one metric as a printable table, in points (%)."""
    rows = paired[paired["metric"] == metric]
    lines = [f"{reference} minus each configuration, {metric} in points, paired by seed (mean ± sample sd; raw)"]
    width = max([len(str(c)) for c in rows["configuration"]] + [13])
    for _, r in rows.iterrows():
        sd = "" if r["sd"] != r["sd"] else f" ± {100 * r['sd']:.2f}"
        raw = ", ".join(f"{100 * d:+.2f}" for d in r["differences"])
        lines.append(f"{str(r['configuration']).ljust(width)}  n={r['n']}  {100 * r['mean']:+.2f}{sd}  [{raw}]")
    return "\n".join(lines)


def format_summary(summary: "Any") -> str:
    """The summary as a printable table: mean ± sample sd (n) per configuration, accuracies and reductions in %."""
    import math

    def cell(row: Any, metric: str, scale: float, digits: int) -> str:
        mean, sd = row[f"{metric}_mean"], row[f"{metric}_sd"]
        if mean != mean:
            return "-"
        return f"{mean * scale:.{digits}f}" + ("" if math.isnan(sd) else f" ± {sd * scale:.{digits}f}")

    header = ["configuration", "n", "test top-1 %", "val top-1 %", "FLOPs -%", "params -%", "wall s"]
    lines = [[str(r["configuration"]), f"{r['n']}/{r['trials']}", cell(r, "test_top1", 100, 2),
              cell(r, "val_top1", 100, 2), cell(r, "flops_reduction", 100, 2), cell(r, "params_reduction", 100, 2),
              cell(r, "wall_seconds", 1, 0)] for _, r in summary.iterrows()]
    widths = [max(len(x) for x in col) for col in zip(header, *lines)]
    out = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths)))
           for line in [header, *lines]]
    return "\n".join(out)


def _plot(table: "Any", summary: "Any", path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = table[table["status"] == "done"] if "flops_reduction" in table else table.iloc[0:0]
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (_, row) in enumerate(summary[summary["n"] > 0].iterrows()):
        colour = colours[i % len(colours)]
        trials = done[done["configuration"] == row["configuration"]]
        ax.scatter(100 * trials["flops_reduction"], 100 * trials["test_top1"], s=12, alpha=0.35, color=colour)
        x, y = 100 * row["flops_reduction_mean"], 100 * row["test_top1_mean"]
        xerr, yerr = (100 * row[f"{m}_sd"] if row["n"] > 1 else None for m in ("flops_reduction", "test_top1"))
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt="o", ms=6, capsize=3, color=colour,
                    label=f"{row['configuration']} (n={row['n']})")
    ax.set_xlabel("FLOPs reduction (%)")
    ax.set_ylabel("final test top-1 (%)")
    seeds = int(summary["n"].max()) if len(summary) else 0
    ax.set_title(f"sweep: accuracy vs FLOPs ({len(done)}/{len(table)} trials done"
                 + ("; mean ± sample sd over seeds" if seeds > 1 else "") + ")", fontsize=9)
    if len(summary[summary["n"] > 0]):
        ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _plot_paired(paired: "Any", reference: str, path: Path, metric: str = "test_top1") -> None:
    """Per configuration: reference − configuration in points, each seed's difference and their mean ± sd."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = paired[paired["metric"] == metric].reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8), dpi=110)
    for i, r in rows.iterrows():
        y = len(rows) - 1 - i
        ax.scatter([100 * d for d in r["differences"]], [y] * len(r["differences"]), s=14, alpha=0.5, color="grey")
        if r["n"]:
            ax.errorbar(100 * r["mean"], y, xerr=None if r["sd"] != r["sd"] else 100 * r["sd"], fmt="o", capsize=3,
                        color="C0")
    ax.axvline(0.0, color="black", lw=0.8)
    ax.set_yticks(range(len(rows)), [f"{c} (n={n})" for c, n in zip(rows["configuration"], rows["n"])][::-1],
                  fontsize=7)
    ax.set_xlabel(f"reference minus configuration, {metric} (points)\n> 0: the reference is better", fontsize=8)
    ax.set_title(f"paired by seed against the reference {reference}\neach seed (grey), mean ± sample sd (blue)",
                 fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
