"""Run folders on an object store: moto's S3 server on 127.0.0.1 stands in for S3.

Storage round trips (checked with boto3, not with the pyarrow code under test) and one-line
errors; then the tiny job written to ``s3://…``: its driver is killed outright mid-run (every
process it started, found by an environment marker), ``--resume`` from the URI finishes it
with the uninterrupted run's history, nothing lands on the local disk, and report, evaluate,
export and latency read the run back from the URI.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import TINY
from laasp_dist.storage import Storage, StorageError
from processes import checkpoints_reported, kill, pids_with_env, wait_for

BUCKET = "runs"
MARK = "LAASP_TEST_DRIVER"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3() -> dict[str, str]:
    """An S3 server with one bucket; its address and credentials in this process's environment too."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
            yield env
    finally:
        server.stop()


def _object(s3: dict[str, str], key: str) -> bytes:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    return client.get_object(Bucket=BUCKET, Key=key)["Body"].read()


def _keys(s3: dict[str, str], prefix: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _cli(*args: str | Path, cwd: Path, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "laasp_dist.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


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
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")  # nobody listens there
    with pytest.raises(StorageError, match="cannot list s3://runs/x") as unreachable:
        Storage(f"s3://{BUCKET}/x").listdir()
    for error in (missing, blocked, unreachable):
        assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------ a whole run on S3


@pytest.fixture(scope="module")
def config_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


@pytest.fixture(scope="module")
def s3_run(s3: dict[str, str], config_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny job on s3://runs/tiny: driver killed outright after the 4th checkpoint, then --resume."""
    uri = f"s3://{BUCKET}/tiny"
    cwd = tmp_path_factory.mktemp("cwd")  # the default run folder would be cwd/runs/tiny
    marker = uuid.uuid4().hex
    env = {**os.environ, **s3, MARK: marker}
    driver = subprocess.Popen([sys.executable, "-m", "laasp_dist.cli", "run", str(config_file), "--out", uri],
                              cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: checkpoints_reported(uri) >= 4 or driver.poll() is not None, 600, "the 4th checkpoint")
    finally:
        kill(pids_with_env(MARK, marker))  # the driver, its embedded Ray and every worker
    driver.wait(timeout=60)
    left = pids_with_env(MARK, marker)
    state_after_kill = {"returncode": driver.returncode, "left": left, "checkpoints": checkpoints_reported(uri),
                        "summary": Storage(uri).is_file("summary.json")}
    resumed = _cli("run", config_file, "--out", uri, "--resume", cwd=cwd, env={**os.environ, **s3})
    return {"uri": uri, "cwd": cwd, "killed": state_after_kill, "resumed": resumed}


@pytest.mark.timeout(900)
def test_a_run_on_s3_survives_a_killed_driver_with_the_same_history(s3_run: dict, tiny_run: Path,
                                                                    s3: dict[str, str]) -> None:
    killed, resumed = s3_run["killed"], s3_run["resumed"]
    assert killed["returncode"] == -9 and killed["left"] == [] and not killed["summary"]
    assert killed["checkpoints"] >= 4
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    keys = _keys(s3, "tiny/")
    for expected in ("tiny/config.yaml", "tiny/summary.json", "tiny/history.parquet", "tiny/final/spec.json",
                     "tiny/final/weights.pt", "tiny/subset/manifest.json", "tiny/widths.png"):
        assert expected in keys
    assert any(k.startswith("tiny/tensorboard/events.out.tfevents.") for k in keys)
    assert any(k.startswith("tiny/checkpoints/checkpoint_") and k.endswith("/state.pt") for k in keys)
    summary = json.loads(_object(s3, "tiny/summary.json"))
    assert summary["resumed"] == 1 and summary["restarts"] == []
    history = pd.read_parquet(__import__("io").BytesIO(_object(s3, "tiny/history.parquet")))
    pd.testing.assert_frame_equal(pd.read_parquet(tiny_run / "history.parquet"), history)
    assert summary["final"] == json.loads((tiny_run / "summary.json").read_text())["final"]
    assert list(s3_run["cwd"].iterdir()) == []  # nothing on the local disk, not even runs/


@pytest.mark.timeout(600)
def test_report_evaluate_export_and_latency_read_the_run_from_the_uri(s3_run: dict, s3: dict[str, str],
                                                                      tmp_path: Path) -> None:
    uri, env = s3_run["uri"], {**os.environ, **s3}
    assert s3_run["resumed"].returncode == 0
    report = _cli("report", uri, cwd=tmp_path, env=env)
    assert report.returncode == 0, report.stderr[-2000:]
    for name in ("training.png", "criteria.png", "widths.png"):
        assert _object(s3, f"tiny/report/{name}")[:4] == b"\x89PNG"
    evaluate = _cli("evaluate", uri, cwd=tmp_path, env=env)
    assert evaluate.returncode == 0, evaluate.stderr[-2000:]
    summary = json.loads(_object(s3, "tiny/summary.json"))
    assert json.loads(evaluate.stdout)["test_top1"] == summary["final_metrics"]["test_top1"]
    export = _cli("export", uri, "--format", "torchscript", cwd=tmp_path, env=env)
    assert export.returncode == 0, export.stderr[-2000:]
    assert json.loads(export.stdout)["out"] == f"{uri}/export/model.pt" and _object(s3, "tiny/export/model.pt")
    latency = _cli("latency", uri, "--batch", "2", "--repeats", "2", "--warmup", "0", "--json", cwd=tmp_path, env=env)
    assert latency.returncode == 0, latency.stderr[-2000:]
    assert json.loads(latency.stdout)["macs"]["slim"] == summary["final"]["macs"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.timeout(300)
def test_bad_run_locations_are_one_line_errors(s3_run: dict, s3: dict[str, str], config_file: Path,
                                               tmp_path: Path) -> None:
    uri, env = s3_run["uri"], {**os.environ, **s3}
    cases = [
        (["--out", uri], "is not empty: pass --resume"),
        (["--out", uri, "--resume", "--set", "prune.step_flops=0.1"], "--resume with a different config: "
                                                                      "prune.step_flops was 0.05"),
        (["--out", f"s3://no-such-bucket-{uuid.uuid4().hex[:6]}/run"], "cannot write to s3://no-such-bucket"),
        (["--out", str(config_file / "run")], "cannot write to"),
    ]
    for args, message in cases:
        proc = _cli("run", config_file, *args, cwd=tmp_path, env=env, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr[-2000:])
    assert _keys(s3, "no-such") == [] and list(tmp_path.iterdir()) == []
