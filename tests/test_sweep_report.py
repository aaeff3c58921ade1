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

TINY = {
    "name": "tiny", "seed": 0,
    "model": {"name": "resnet20"},
    "data": {"dataset": "fashion_mnist", "val_size": 100, "train_limit": 400, "test_limit": 200,
             "batch_size": 64, "eval_batch_size": 100},
    "train": {"total_epochs": 2, "lr": 0.05, "milestones": [1], "steps_per_epoch": 2, "progress_bar": False},
    "prune": {"start_epoch": 1, "target_flops_reduction": 0.1, "step_flops": 0.05, "recover_flops": 0.1,
              "recover_epochs": 0, "subset_size": 64, "subset_shards": 2, "criteria": ["l1", "fpgm"]},
    "ray": {"num_workers": 2, "search_workers": 1},
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
    """A 2-trial sweep whose driver (with its Ray and every trial process) is killed in the first trial's
    pruning, then resumed: (the killed driver's exit code, resumed proc, dir)."""
    from processes import checkpoints_reported, kill, pids_with_env, wait_for

    out = tmp_path_factory.mktemp("sweep") / "s"
    args = ("sweep", config_file, "--param", "step_flops=0.05,0.1", "--out", out)
    marker = uuid.uuid4().hex
    driver = subprocess.Popen([sys.executable, "-m", "laasp_dist.cli", *map(str, args)],
                              env={**ENV, "LAASP_TEST_DRIVER": marker}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    first = out / "trials" / "step_flops=0.05"
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
    assert list(table["trial"]) == ["step_flops=0.05", "step_flops=0.1"]
    assert (table["status"] == "done").all()
    assert (table["flops_reduction"] >= 0.1).all() and table["test_top1"].between(0, 1).all()
    assert "step_flops=0.1" in resumed.stdout and "flops_reduction" in resumed.stdout
    assert (out / "accuracy_vs_flops.png").read_bytes()[:4] == b"\x89PNG"
    resumed_counts = [json.loads((out / "trials" / t / "summary.json").read_text())["resumed"] for t in table["trial"]]
    assert resumed_counts == [1, 0]  # the first continued from its checkpoint; the second had not started


@pytest.mark.timeout(900)
def test_report_and_evaluate_on_a_finished_run(sweep):
    run = sweep[2] / "trials" / "step_flops=0.05"
    proc = cli("report", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = {Path(line).name for line in proc.stdout.split()}
    assert names == {"training.png", "criteria.png", "widths.png"}
    for name in names:
        assert (run / "report" / name).read_bytes()[:4] == b"\x89PNG"
    proc = cli("evaluate", run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    summary = json.loads((run / "summary.json").read_text())
    assert measured["test_top1"] == summary["final_metrics"]["test_top1"]
    assert measured["macs"] == summary["final"]["macs"]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("args, message", [
    (("sweep", "CFG", "--param", "stepflops=0.1,0.2", "--out", "OUT"), "unknown sweep key 'stepflops'"),
    (("sweep", "CFG", "--param", "step_flops=0.1,7", "--out", "OUT"), "trial step_flops=7"),
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
    proc = cli(*[subs.get(a, a) for a in args])
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
