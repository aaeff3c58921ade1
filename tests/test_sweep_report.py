"""Sweep, report and evaluate as a user runs them: a tiny Ray Tune grid that crashes and resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_cli

TINY = {
    "name": "tiny", "seed": 0,
    "model": {"name": "resnet20"},
    "data": {"dataset": "fashion_mnist", "val_size": 100, "train_limit": 400, "test_limit": 200,
             "batch_size": 64, "eval_batch_size": 100},
    "train": {"total_epochs": 2, "lr": 0.05, "milestones": [1], "steps_per_epoch": 2, "progress_bar": False},
    "prune": {"start_epoch": 1, "target_flops_reduction": 0.1, "step_flops": 0.05, "recover_flops": 0.1,
              "recover_epochs": 0, "subset_size": 64, "subset_shards": 2, "criteria": ["l1", "fpgm"]},
    "ray": {"num_workers": 2, "search_executor": "ranks"},  # no search actor to start in each trial
}
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}


def cli(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "laasp_dist.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env or ENV)


@pytest.fixture(scope="module")
def config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def sweep(config_file, tmp_path_factory):
    """A sweep of one configuration over seeds 0 and 1 (2 trials) whose driver (with its Ray and every trial
    process) is killed in the first trial's pruning, then resumed: (the killed driver's exit code, resumed proc,
    dir)."""
    from processes import checkpoints_reported, kill, pids_with_env, wait_for

    out = tmp_path_factory.mktemp("sweep") / "s"
    args = ("sweep", config_file, "--param", "step_flops=0.05", "--seeds", "0,1", "--out", out)
    marker = uuid.uuid4().hex
    driver = subprocess.Popen([sys.executable, "-m", "laasp_dist.cli", *map(str, args)],
                              env={**ENV, "LAASP_TEST_DRIVER": marker}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first = out / "trials" / "step_flops=0.05_seed=0"
    try:
        wait_for(lambda: checkpoints_reported(first) >= 3 or driver.poll() is not None, 600, "a trial's round")
    finally:
        kill(pids_with_env("LAASP_TEST_DRIVER", marker))
    driver.wait(timeout=60)
    resumed = cli(*args, "--resume")
    return driver.returncode, resumed, out


@pytest.mark.timeout(900)
def test_sweep_resumes_after_a_crash_and_tabulates(sweep):
    killed, resumed, out = sweep
    assert killed == -9
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    table = pd.read_parquet(out / "results.parquet")
    assert list(table["trial"]) == ["step_flops=0.05_seed=0", "step_flops=0.05_seed=1"]
    assert list(table["seed"]) == [0, 1] and (table["status"] == "done").all()
    assert (table["flops_reduction"] >= 0.1).all() and table["test_top1"].between(0, 1).all()
    assert "step_flops=0.05_seed=1" in resumed.stdout and "flops_reduction" in resumed.stdout
    # Ray Train's placement-group cleaner has no State API in the embedded Ray: quiet, even beside another Ray
    assert "PlacementGroupCleaner" not in resumed.stdout + resumed.stderr
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    resumed_counts = [json.loads((out / "trials" / t / "summary.json").read_text())["resumed"] for t in table["trial"]]
    assert resumed_counts == [1, 0]  # the first continued from its checkpoint; the second had not started
    for trial, seed in zip(table["trial"], table["seed"]):
        config = yaml.safe_load((out / "trials" / trial / "config.yaml").read_text())
        assert config["seed"] == seed and config["prune"]["step_flops"] == 0.05


@pytest.mark.timeout(900)
def test_seeded_summary_is_the_mean_and_sample_sd_of_the_trials(sweep):
    """summary.parquet against Python's statistics module over each trial's own summary.json."""
    import statistics

    out = sweep[2]
    runs = [json.loads((out / "trials" / f"step_flops=0.05_seed={s}" / "summary.json").read_text()) for s in (0, 1)]
    assert runs[0]["final_metrics"]["test_top1"] != runs[1]["final_metrics"]["test_top1"]  # seeds differ
    values = {
        "test_top1": [r["final_metrics"]["test_top1"] for r in runs],
        "val_top1": [r["final_metrics"]["val_top1"] for r in runs],
        "flops_reduction": [r["flops_reduction"] for r in runs],
        "params_reduction": [1 - r["final"]["params"] / r["base"]["params"] for r in runs],
        "wall_seconds": [r["wall_seconds"] for r in runs],
        "test_top1_before": [r["before_pruning"]["test_top1"] for r in runs],
    }
    summary = pd.read_parquet(out / "summary.parquet")
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["configuration"] == "step_flops=0.05" and row["n"] == 2 and row["trials"] == 2
    for metric, xs in values.items():
        assert row[f"{metric}_mean"] == pytest.approx(statistics.mean(xs), rel=1e-12), metric
        assert row[f"{metric}_sd"] == pytest.approx(statistics.stdev(xs), rel=1e-9, abs=1e-15), metric
    printed = f"{100 * statistics.mean(values['test_top1']):.2f} ± {100 * statistics.stdev(values['test_top1']):.2f}"
    assert printed in sweep[1].stdout


@pytest.mark.timeout(900)
def test_report_and_evaluate_on_a_finished_run(sweep):
    run = sweep[2] / "trials" / "step_flops=0.05_seed=0"
    proc = run_cli("report", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {Path(line).name for line in proc.stdout.split()}
    assert names == {"training.png", "criteria.png", "widths.png"}
    for name in names:
        assert (run / "report" / name).read_bytes()[:4] == b"\x89PNG"
    proc = run_cli("evaluate", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert measured["test_top1"] == summary["final_metrics"]["test_top1"]
    assert measured["macs"] == summary["final"]["macs"]
    # both numbers above come from measure_slim_model: final/ alone, measured here with a plain loop on the test split
    import torch

    from laasp_dist.config import load_config
    from laasp_dist.pruning import load_slim_model
    from laasp_dist.training.data import load_splits

    test = load_splits(load_config(run / "config.yaml")).test
    assert len(test) == TINY["data"]["test_limit"]
    model = load_slim_model(run / "final").model.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (test.mean, test.std))
    correct = 0
    with torch.no_grad():
        for i in range(0, len(test), 50):
            x = (test.images[i:i + 50].float() / 255 - mean) / std
            correct += int((model(x).argmax(1) == test.labels[i:i + 50]).sum())
    top1 = correct / len(test)
    assert summary["final_metrics"]["test_top1"] == pytest.approx(top1, abs=1e-12)
    assert measured["test_top1"] == pytest.approx(top1, abs=1e-12)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (("sweep", "CFG", "--param", "stepflops=0.1,0.2", "--out", "OUT"), "unknown sweep key 'stepflops'"),
    (("sweep", "CFG", "--param", "step_flops=0.1,7", "--out", "OUT"), "trial step_flops=7"),
    (("sweep", "CFG", "--param", "step_flops=0.1", "--seeds", "0,x", "--out", "OUT"), "--seeds '0,x'"),
    (("sweep", "CFG", "--param", "step_flops=0.1,0.2", "--reference", "step_flops=0.3", "--out", "OUT"),
     "--reference 'step_flops=0.3' is not a configuration"),
    (("report", "OUT"), "is not a laasp-dist run folder"),
    (("evaluate", "RUN"), "has no final model yet"),
    (("export", "RUN", "--format", "onnx"), "final"),
])
def test_bad_input_is_one_line(args, message, config_file, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_file.read_text())
    (run / "tensorboard").mkdir()
    subs = {"CFG": str(config_file), "OUT": str(tmp_path / "out"), "RUN": str(run)}
    proc = run_cli(*[subs.get(a, a) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_grid_of_configurations_and_seeds(config_file):
    """Seeds multiply the grid; a section's values set several keys per configuration; no seeds: names as before."""
    from laasp_dist.config import load_config
    from laasp_dist.errors import ConfigError
    from laasp_dist.sweep import parse_params, parse_seeds, trial_grid

    base = load_config(config_file).model_dump(mode="json")
    params = parse_params(["prune=[{criteria: [l1, fpgm]}, {criteria: [l1], selection: importance}]"])
    grid = trial_grid(base, params, parse_seeds("3,1"))
    assert [(t["name"], t["seed"]) for t in grid] == [  # seed-major: every configuration's first seed first
        ("prune=criteria=l1+fpgm_seed=3", 3), ("prune=criteria=l1,selection=importance_seed=3", 3),
        ("prune=criteria=l1+fpgm_seed=1", 1), ("prune=criteria=l1,selection=importance_seed=1", 1)]
    last = grid[-1]["config"]
    assert (last["seed"], last["prune"]["criteria"], last["prune"]["selection"]) == (1, ["l1"], "importance")
    assert last["prune"]["step_flops"] == TINY["prune"]["step_flops"]  # the rest of the section is the base's
    plain = trial_grid(base, parse_params(["step_flops=0.05,0.1"]))
    assert [(t["name"], t["seed"], t["configuration"]) for t in plain] == [
        ("step_flops=0.05", 0, "step_flops=0.05"), ("step_flops=0.1", 0, "step_flops=0.1")]
    for bad, message in [(lambda: parse_seeds("0,x"), "not a comma-separated list"),
                         (lambda: parse_seeds("1,1"), "repeats"),
                         (lambda: parse_params(["prune=[l1]"]), "must be a mapping"),
                         (lambda: trial_grid(base, parse_params(["seed=0,1"]), [0, 1]), "--seeds"),
                         (lambda: trial_grid(base, parse_params(["prune=[{nope: 1}]"])), "nope")]:
        with pytest.raises(ConfigError, match=message):
            bad()


def test_summary_groups_trials_by_configuration():
    """Several configurations, unfinished trials left out of the statistics: against the statistics module."""
    import math
    import statistics

    from laasp_dist.sweep import SUMMARY_METRICS, format_summary, summarise

    rows = []
    for c, config in enumerate(["a", "b", "c"]):
        for seed in range(3):
            row = {"trial": f"{config}_seed={seed}", "configuration": config, "seed": seed, "x": config}
            if (c, seed) == (1, 2) or c == 2 and seed > 0:
                row["status"] = "error: boom"
            else:
                row.update(status="done", **{m: 0.1 * c + 0.37 * seed ** 2 + 0.01 * i
                                            for i, m in enumerate(SUMMARY_METRICS)})
            rows.append(row)
    summary = summarise(pd.DataFrame(rows), ["x"])
    assert list(summary["configuration"]) == ["a", "b", "c"] and list(summary["x"]) == ["a", "b", "c"]
    assert list(summary["n"]) == [3, 2, 1] and list(summary["trials"]) == [3, 3, 3]
    for _, row in summary.iterrows():
        done = [r for r in rows if r["configuration"] == row["configuration"] and r["status"] == "done"]
        for m in SUMMARY_METRICS:
            xs = [r[m] for r in done]
            assert row[f"{m}_mean"] == pytest.approx(statistics.mean(xs), rel=1e-12)
            if len(xs) > 1:
                assert row[f"{m}_sd"] == pytest.approx(statistics.stdev(xs), rel=1e-12)
            else:
                assert math.isnan(row[f"{m}_sd"])
    text = format_summary(summary)
    assert "2/3" in text and "1/3" in text and len(text.splitlines()) == 4


def test_paired_differences_match_a_plain_loop():
    """reference − configuration seed by seed, only where both finished; mean and sample sd from `statistics`."""
    import math
    import random
    import statistics

    from laasp_dist.sweep import format_paired, paired_differences

    rng = random.Random(0)
    rows = [{"configuration": c, "seed": seed, "status": "error: x" if (c, seed) in {("b", 1), ("pool", 3)} else "done",
             "test_top1": rng.random(), "val_top1": rng.random(), "flops_reduction": rng.random()}
            for seed in (3, 0, 1) for c in ("pool", "a", "b", "c")]
    rows = [r for r in rows if (r["configuration"], r["seed"]) != ("c", 0)]  # never ran
    paired = paired_differences(pd.DataFrame(rows), "pool")
    value = {(r["configuration"], r["seed"]): r for r in rows if r["status"] == "done"}
    assert list(dict.fromkeys(paired["configuration"])) == ["a", "b", "c"]
    for _, row in paired.iterrows():
        seeds = [s for s in (3, 0, 1) if ("pool", s) in value and (row["configuration"], s) in value]
        diffs = [value["pool", s][row["metric"]] - value[row["configuration"], s][row["metric"]] for s in seeds]
        assert list(row["seeds"]) == seeds and list(row["differences"]) == pytest.approx(diffs, abs=1e-15)
        assert row["n"] == len(seeds) and row["mean"] == pytest.approx(statistics.mean(diffs), rel=1e-12)
        assert row["sd"] == pytest.approx(statistics.stdev(diffs), rel=1e-12) if len(diffs) > 1 else math.isnan(row["sd"])
    assert dict(zip(paired["configuration"], paired["n"])) == {"a": 2, "b": 1, "c": 1}
    assert "n=2" in format_paired(paired, "pool")
