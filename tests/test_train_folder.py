"""The job on an ImageNet-layout folder of real JPEGs: DALI's CPU pipeline, sharded over 2 Ray Train workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from laasp_dist.config import build_config  # noqa: E402
from laasp_dist.errors import DataError  # noqa: E402
from laasp_dist.training import measure_slim_model, run_job  # noqa: E402


def _config(root: Path) -> dict:
    return {
        "name": "folder", "seed": 0,
        "model": {"name": "resnet20"},
        "data": {"dataset": "image_folder", "root": str(root), "image_size": 32, "val_size": 20,
                 "batch_size": 16, "eval_batch_size": 20, "num_threads": 1},
        "train": {"total_epochs": 2, "lr": 0.05, "milestones": [], "steps_per_epoch": 2, "progress_bar": False},
        "prune": {"start_epoch": 1, "target_flops_reduction": 0.08, "step_flops": 0.05, "recover_flops": 0.1,
                  "recover_epochs": 1, "subset_size": 40, "subset_shards": 2, "criteria": ["l1", "l2"]},
        "ray": {"num_workers": 2, "search_workers": 1},
    }


@pytest.mark.timeout(300)
def test_job_on_a_jpeg_folder_through_dali(ray_session, jpeg_folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("nvidia.dali")
    summary = run_job(build_config(_config(jpeg_folder)), tmp_path / "run")
    assert summary["flops_reduction"] >= 0.08 and summary["rounds"] >= 1
    assert summary["final_metrics"]["test_images"] == 50  # the folder's val/ (test) is reported in full
    assert summary["final_metrics"]["val_images"] == 20
    again = measure_slim_model(tmp_path / "run" / "final", build_config(_config(jpeg_folder)))
    assert again["test_top1"] == summary["final_metrics"]["test_top1"]
    assert json.loads((tmp_path / "run" / "subset" / "manifest.json").read_text())["num_classes"] == 11


def test_missing_folder_is_a_data_error_before_ray(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        run_job(build_config(_config(tmp_path / "nowhere")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
