"""The job on an ImageNet-layout folder of real JPEGs: DALI's CPU pipeline, sharded over 2 Ray Train workers.

The folder is listed and checked once, by the driver; every other process (the Train ranks, the final
measurement on rank 0, a resumed run, `laasp-dist evaluate`) must read the run's data index instead. To
check that, every Python process of the tests' Ray session (conftest) loads a `sitecustomize` that records each
Python-level listing or opening of a path under the data folders (an audit hook; chmod would not do,
tests may run as root). DALI's own C++ reads of the images are expected and not seen by the hook.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from data_pipelines import scan_image_folder  # noqa: E402
from laasp_dist.config import build_config  # noqa: E402
from laasp_dist.errors import DataError  # noqa: E402
from laasp_dist.pruning import load_slim_model  # noqa: E402
from laasp_dist.training import TrainingError, measure_slim_model, run_job  # noqa: E402
from laasp_dist.training.data import INDEX_FILE  # noqa: E402
from processes import checkpoints_reported, kill, train_worker_pids, wait_for  # noqa: E402


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


def _accesses(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _pil_test_top1(model: torch.nn.Module, root: Path, image_size: int) -> float:
    """Top-1 of `model` on every image of root/val/ with the eval transform written out with PIL: shorter side to
    round(S·256/224), centre S×S crop (DALI puts the window at round(0.5·(W−S)), halves up), ImageNet mean/std.

    DALI's JPEG decoding and resize round differently from PIL's by at most one grey level here (measured on this
    folder: mean |Δ| 0.002, max 0.018 after normalisation), which can flip a near-tie: the caller allows one image.
    """
    import numpy as np
    from PIL import Image

    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())  # ids: train/'s sorted folders
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    short = round(image_size * 256 / 224)
    correct = total = 0
    model.eval()
    for label, name in enumerate(classes):
        for path in sorted((root / "val" / name).iterdir()):
            img = Image.open(path).convert("RGB")
            w, h = img.size
            img = img.resize((short, round(h * short / w)) if w <= h else (round(w * short / h), short),
                             Image.BILINEAR)
            left, top = (img.size[0] - image_size + 1) // 2, (img.size[1] - image_size + 1) // 2
            pixels = np.asarray(img.crop((left, top, left + image_size, top + image_size)), dtype=np.float64) / 255
            x = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy()).float()[None]
            with torch.no_grad():
                correct += int(model(x).argmax(1).item() == label)
            total += 1
    assert total == 50
    return correct / total


@pytest.fixture(scope="module")
def audited(ray_session, data_audit: SimpleNamespace, jpeg_folder: Path) -> SimpleNamespace:
    """The shared Ray session's processes record Python-level access to the data folder (conftest)."""
    pytest.importorskip("nvidia.dali")
    import ray

    # the hook works inside Ray's workers: a listing there is recorded
    ray.get(ray.remote(scan_image_folder).remote(jpeg_folder / "val"))
    assert any(f"os.scandir {jpeg_folder}/val" in line for line in _accesses(data_audit.log))
    data_audit.log.write_text("")
    return data_audit


@pytest.fixture(scope="module")
def full_run(audited, jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("full") / "run"
    return out, run_job(build_config(_config(jpeg_folder)), out)


@pytest.fixture(scope="module")
def resumed_run(audited, jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The same run with both Train workers killed after round 1's checkpoint (and no restarts allowed), then
    resumed: the rest of the run reads its batches from fresh pipelines."""
    out = tmp_path_factory.mktemp("killed") / "run"
    config = _config(jpeg_folder)
    config["ray"]["max_failures"] = 0

    def kill_the_workers() -> None:
        wait_for(lambda: checkpoints_reported(out) >= 2 and train_worker_pids(os.getpid()), 600, "round 1")
        kill(train_worker_pids(os.getpid()))

    killer = threading.Thread(target=kill_the_workers, daemon=True)
    killer.start()
    with pytest.raises(TrainingError):
        run_job(build_config(config), out)
    killer.join(timeout=1)
    return out, run_job(build_config(config), out, resume=True)


@pytest.mark.timeout(600)
def test_job_on_a_jpeg_folder_through_dali(full_run: tuple[Path, dict], jpeg_folder: Path) -> None:
    run_dir, summary = full_run
    assert summary["flops_reduction"] >= 0.08 and summary["rounds"] >= 1
    assert summary["final_metrics"]["test_images"] == 50  # the folder's val/ (test) is reported in full
    assert summary["final_metrics"]["val_images"] == 20
    again = measure_slim_model(run_dir / "final", build_config(_config(jpeg_folder)), run_dir=run_dir)
    assert again["test_top1"] == summary["final_metrics"]["test_top1"]
    # final/ alone against the folder's val/ JPEGs decoded here by PIL, not by DALI or the package
    top1 = _pil_test_top1(load_slim_model(run_dir / "final").model, jpeg_folder, image_size=32)
    assert abs(top1 - summary["final_metrics"]["test_top1"]) <= 1 / 50 + 1e-12
    assert json.loads((run_dir / "subset" / "manifest.json").read_text())["num_classes"] == 11
    assert (run_dir / INDEX_FILE).is_file()


@pytest.mark.timeout(900)
def test_a_resumed_run_reads_the_same_batches(full_run: tuple[Path, dict], resumed_run: tuple[Path, dict]) -> None:
    (full_dir, full), (resumed_dir, resumed) = full_run, resumed_run
    assert resumed["resumed"] == 1 and resumed["winners"] == full["winners"]
    # the fine-tuning epoch ran in the resumed run's fresh pipelines, in the full run's pipelines built at
    # epoch 0: identical weights mean identical batches (order, crops, flips)
    a = torch.load(full_dir / "final" / "weights.pt", weights_only=True)
    b = torch.load(resumed_dir / "final" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_metrics"]["val_loss"] == full["final_metrics"]["val_loss"]


@pytest.mark.timeout(900)
def test_ranks_resume_and_evaluate_never_list_or_open_the_data_folder(
    audited, full_run: tuple[Path, dict], resumed_run: tuple[Path, dict]
) -> None:
    run_dir, summary = full_run
    assert _accesses(audited.log) == [], "a Ray process listed or opened the data folder"
    # `laasp-dist evaluate` on the data set mounted elsewhere: the index, re-rooted, and DALI only
    out = subprocess.run([sys.executable, "-m", "laasp_dist.cli", "evaluate", str(run_dir), "--data",
                          str(audited.moved)], env=audited.env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    measured = json.loads(out.stdout)
    assert measured["test_top1"] == summary["final_metrics"]["test_top1"] and measured["test_images"] == 50
    assert _accesses(audited.log) == [], "evaluate listed or opened the data folder"


def test_missing_folder_is_a_data_error_before_ray(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        run_job(build_config(_config(tmp_path / "nowhere")), tmp_path / "run")
    assert not (tmp_path / "run").exists()
