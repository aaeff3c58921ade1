"""Run folders on an object store: moto's S3 server on 127.0.0.1 (conftest) stands in for S3.

Storage round trips (checked with boto3, not with the pyarrow code under test) and one-line
errors; then the tiny job written to ``s3://…`` with one restart allowed: a killed Train worker
is replaced by Ray with nobody intervening, a second kill stops the run, ``resume`` from the URI
finishes it with the uninterrupted run's history, nothing lands on the local disk, and report,
evaluate, export and latency read the run back from the URI. (A driver killed outright and
resumed by the command is test_sweep_report's.)
"""

from __future__ import annotations

import copy
import io
import json
import os
import threading
import uuid
from pathlib import Path
from typing import Iterator

import pandas as pd
import pytest
import yaml

from conftest import S3_BUCKET as BUCKET
from conftest import TINY, free_port, run_cli
from laasp_dist.config import build_config
from laasp_dist.storage import Storage, StorageError
from laasp_dist.training import TrainingError, run_job
from processes import checkpoints_reported, kill, train_worker_pids, wait_for


@pytest.fixture(scope="module")
def s3(s3_server: dict[str, str]) -> Iterator[dict[str, str]]:
    """The S3 server's address and credentials, in this process's environment for the module."""
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.items():
            patch.setenv(key, value)
        yield s3_server


def _object(s3: dict[str, str], key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(s3: dict[str, str], prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ------------------------------------------------------------------------------------ the storage layer


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["local", "s3"])
def test_storage_writes_reads_lists_and_replaces(where: str, s3: dict[str, str], tmp_path: Path) -> None:
    prefix = f"unit-{uuid.uuid4().hex[:8]}"
    store = Storage(tmp_path / prefix if where == "local" else f"s3://{BUCKET}/{prefix}")

    def raw(rel: str) -> bytes:  # read back without the code under test
        return (tmp_path / prefix / rel).read_bytes() if where == "local" else _object(s3, f"{prefix}/{rel}")

    assert store.is_empty() and not store.exists()
    store.write_json("summary.json", {"a": 1})
    store.write_bytes("sub/deep/blob.bin", b"\x00\x01")
    store.write_with("plot.png", lambda p: p.write_bytes(b"\x89PNG-ish"))
    assert json.loads(raw("summary.json")) == {"a": 1} and raw("sub/deep/blob.bin") == b"\x00\x01"
    assert raw("plot.png") == b"\x89PNG-ish"
    assert store.listdir() == ["plot.png", "sub", "summary.json"] and store.listdir("nope") == []
    assert store.is_file("summary.json") and not store.is_file("sub") and store.exists("sub")
    assert store.child("sub").read_bytes("deep/blob.bin") == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        store.read_bytes("missing.json")

    def fill(d: Path) -> None:
        (d / "weights.pt").write_bytes(b"w2")
        (d / "spec.json").write_text("{}")

    store.write_bytes("final/stale.txt", b"old")
    store.write_dir("final", fill, last="spec.json")
    assert raw("final/weights.pt") == b"w2" and raw("final/spec.json") == b"{}"
    with store.local_copy("sub") as local:
        assert (local / "deep" / "blob.bin").read_bytes() == b"\x00\x01"
    store.delete("sub")
    assert not store.exists("sub") and store.is_file("summary.json")


@pytest.mark.timeout(120)
def test_storage_failures_are_one_line_storage_errors(s3: dict[str, str], tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match="cannot write to s3://no-such-bucket/run") as missing:
        Storage("s3://no-such-bucket/run").check_writable()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(StorageError, match="cannot write to .*a-file/run") as blocked:
        Storage(tmp_path / "a-file" / "run").check_writable()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody listens there
    with pytest.raises(StorageError, match="cannot list s3://runs/x") as unreachable:
        Storage(f"s3://{BUCKET}/x").listdir()
    for error in (missing, blocked, unreachable):
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ a whole run on S3


@pytest.fixture(scope="module")
def s3_run(ray_session, s3: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny job on s3://runs/tiny with ``ray.max_failures=1``, run from an empty working directory: one
    Train worker SIGKILLed after the 3rd checkpoint (Ray restarts the worker group from the checkpoint on
    S3), both after the 6th (no restart left: the run stops with an error), then resumed from the URI."""
    uri = f"s3://{BUCKET}/tiny"
    config = copy.deepcopy(TINY)
    config["ray"]["max_failures"] = 1
    cwd = tmp_path_factory.mktemp("cwd")  # the default run folder would be cwd/runs/tiny
    killed: list[int] = []

    def kill_workers() -> None:
        wait_for(lambda: checkpoints_reported(uri) >= 3 and train_worker_pids(os.getpid()), 600, "checkpoint 3")
        killed.append(train_worker_pids(os.getpid())[-1])
        kill(killed[-1:])
        wait_for(lambda: checkpoints_reported(uri) >= 6 and train_worker_pids(os.getpid()), 600, "checkpoint 6")
        killed.extend(train_worker_pids(os.getpid()))
        kill(killed[1:])

    killer = threading.Thread(target=kill_workers, daemon=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cwd)
        killer.start()
        with pytest.raises(TrainingError) as stopped:
            run_job(build_config(config), uri)
        killer.join(timeout=1)
        state_after_stop = {"checkpoints": checkpoints_reported(uri), "summary": Storage(uri).is_file("summary.json")}
        run_job(build_config(config), uri, resume=True)
    return {"uri": uri, "cwd": cwd, "killed": killed, "stopped": str(stopped.value), "after_stop": state_after_stop}


@pytest.mark.timeout(900)
def test_a_run_on_s3_survives_lost_workers_and_a_stop_with_the_same_history(s3_run: dict, tiny_run: Path,
                                                                            s3: dict[str, str]) -> None:
    killed, after_stop = s3_run["killed"], s3_run["after_stop"]
    assert len(killed) == 3 and not any(Path(f"/proc/{pid}").exists() for pid in killed)
    assert after_stop["checkpoints"] >= 6 and not after_stop["summary"]
    assert "\n" not in s3_run["stopped"]
    keys = _keys(s3, "tiny/")
    for expected in ("tiny/config.yaml", "tiny/summary.json", "tiny/history.parquet", "tiny/final/spec.json",
                     "tiny/final/weights.pt", "tiny/subset/manifest.json", "tiny/widths.png"):
        assert expected in keys
    assert any(k.startswith("tiny/tensorboard/events.out.tfevents.") for k in keys)
    assert any(k.startswith("tiny/checkpoints/checkpoint_") and k.endswith("/state.pt") for k in keys)
    summary = json.loads(_object(s3, "tiny/summary.json"))
    assert summary["resumed"] == 1 and len(summary["restarts"]) == 1
    restart = summary["restarts"][0]
    assert restart["restart"] == 1 and restart["rounds"] >= 1  # it went on from a mid-pruning checkpoint
    history = pd.read_parquet(io.BytesIO(_object(s3, "tiny/history.parquet")))
    pd.testing.assert_frame_equal(pd.read_parquet(tiny_run / "history.parquet"), history)
    full = json.loads((tiny_run / "summary.json").read_text())
    assert summary["winners"] == full["winners"] and summary["final"] == full["final"]
    assert summary["final_metrics"]["test_top1"] == full["final_metrics"]["test_top1"]
    assert list(s3_run["cwd"].iterdir()) == []  # nothing on the local disk, not even runs/


@pytest.mark.timeout(600)
def test_report_evaluate_export_and_latency_read_the_run_from_the_uri(s3_run: dict, s3: dict[str, str],
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    uri = s3_run["uri"]
    monkeypatch.chdir(tmp_path)
    proc = run_cli("report", uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("training.png", "criteria.png", "widths.png"):
        assert _object(s3, f"tiny/report/{name}")[:4] == b"\x89PNG"
    proc = run_cli("evaluate", uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(_object(s3, "tiny/summary.json"))
    assert json.loads(proc.stdout)["test_top1"] == summary["final_metrics"]["test_top1"]
    proc = run_cli("export", uri, "--format", "torchscript")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["out"] == f"{uri}/export/model.pt" and _object(s3, "tiny/export/model.pt")
    proc = run_cli("latency", uri, "--batch", "2", "--repeats", "2", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["macs"]["slim"] == summary["final"]["macs"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(300)
def test_bad_run_locations_are_one_line_errors(s3_run: dict, s3: dict[str, str], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    uri = s3_run["uri"]
    config = copy.deepcopy(TINY)
    config["ray"]["max_failures"] = 1  # the run's own config: only what a case sets differs
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(config))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cases = [
        (["--out", uri], "is not empty: pass --resume"),
        (["--out", uri, "--resume", "--set", "prune.step_flops=0.1"], "--resume with a different config: "
                                                                      "prune.step_flops was 0.05"),
        (["--out", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run"], "cannot write to s3://no-such-bucket"),
        (["--out", str(config_file / "run")], "cannot write to"),
    ]
    for args, message in cases:
        proc = run_cli("run", config_file, *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
    assert _keys(s3, "no-such") == [] and list(cwd.iterdir()) == []
