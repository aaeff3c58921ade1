"""cluster/: the launcher and KubeRay definitions are well formed and name real commands and
job configs; cluster/local_cluster.sh starts a two-node Ray cluster on this machine that
runs `ray job submit` jobs (a FLOPs count, and a tiny LAASP run whose two Ray Train
workers sit on different nodes), and is always stopped again.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import pytest
import yaml

from laasp_dist.cli import COMMANDS
from laasp_dist.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
RAYJOB = CLUSTER / "kuberay" / "rayjob.yaml"
DOCS = ROOT / "docs" / "cluster.md"
SCRIPT = CLUSTER / "local_cluster.sh"
VENV = Path(sys.executable).parent.parent
RAY = VENV / "bin" / "ray"
JOB_CONFIG = re.compile(r"(?:/app/)?(jobs/[\w.-]+\.ya?ml)")
CONSOLE_SCRIPT = re.compile(r"laasp-[a-z][\w-]*")


def _yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def _launcher() -> dict[str, Any]:
    return yaml.safe_load(LAUNCHER.read_text())


def _commands() -> dict[str, str]:
    """Every shell command of the cluster definitions and the docs' code blocks, by where it is from."""
    cfg = _launcher()
    out = {f"{LAUNCHER.name}:{key}[{i}]": cmd for key in ("setup_commands", "head_setup_commands",
                                                          "worker_setup_commands", "head_start_ray_commands",
                                                          "worker_start_ray_commands")
           for i, cmd in enumerate(cfg.get(key) or [])}
    for path in _yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "RayJob":
                out[f"{path.name}:entrypoint"] = doc["spec"]["entrypoint"]
    if DOCS.is_file():
        blocks = re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
        lines = " ".join(blocks).replace("\\\n", " ").splitlines()
        out.update({f"{DOCS.name}:{i}": line for i, line in enumerate(lines) if "laasp-dist " in line})
    return out


def _laasp_invocations(command: str) -> list[list[str]]:
    """The argument lists of every `laasp-dist ...` call in a shell command."""
    calls, current = [], None
    for token in shlex.split(command, comments=False):
        if token in (";", "&&", "||", "|") or token.endswith(";"):
            current = None
        elif CONSOLE_SCRIPT.fullmatch(token):
            current = [token]
            calls.append(current)
        elif current is not None:
            current.append(token)
    return calls


@pytest.mark.timeout(60)
def test_every_cluster_yaml_parses() -> None:
    files = _yaml_files()
    assert {f.relative_to(CLUSTER).as_posix() for f in files} >= {"aws-gpu.yaml", "kuberay/raycluster.yaml",
                                                                   "kuberay/rayjob.yaml"}
    for path in files:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


@pytest.mark.timeout(60)
def test_launcher_config_satisfies_rays_schema() -> None:
    from ray.autoscaler._private.util import validate_config

    cfg = _launcher()
    assert {"cluster_name", "provider", "available_node_types", "head_node_type", "setup_commands"} <= cfg.keys()
    validate_config(cfg)  # the JSON schema `ray up` checks before it launches anything
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [t for t in types.values() if re.match(r"(g5|g6|p4d|p5)\.", t["node_config"]["InstanceType"])]
    assert gpu_types and all(t["max_workers"] >= 1 for t in gpu_types)
    install = " ".join(cfg["setup_commands"])
    assert "-c requirements.lock" in install and '-e ".[dali' in install
    assert cfg["file_mounts"]["~/laasp-dist"] == "."


@pytest.mark.timeout(60)
def test_kuberay_manifests_have_a_gpu_worker_group() -> None:
    (cluster,) = yaml.safe_load_all((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    (job,) = yaml.safe_load_all(RAYJOB.read_text())
    assert (cluster["apiVersion"], cluster["kind"], job["apiVersion"], job["kind"]) == (
        "ray.io/v1", "RayCluster", "ray.io/v1", "RayJob")
    (group,) = cluster["spec"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) >= 1
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert job["spec"]["entrypoint"].startswith("laasp-dist run ")


@pytest.mark.timeout(60)
def test_commands_name_existing_scripts_and_job_configs() -> None:
    scripts = {ep.name for ep in distribution("laasp-dist").entry_points if ep.group == "console_scripts"}
    referenced: set[str] = set()
    for where, command in _commands().items():
        for call in _laasp_invocations(command):
            assert call[0] in scripts, f"{where}: {call[0]} is not a console script of the project"
            if len(call) > 1 and not call[1].startswith("-"):
                assert call[1] in COMMANDS, f"{where}: laasp-dist has no subcommand {call[1]!r}"
        for config in JOB_CONFIG.findall(command):
            assert (ROOT / config).is_file(), f"{where}: {config} does not exist"
            referenced.add(config)
            for call in _laasp_invocations(command):
                if call[1:2] == ["run"]:  # the config and its --set overrides must validate
                    sets = [call[i + 1] for i, t in enumerate(call[:-1]) if t == "--set"]
                    load_config(ROOT / config, sets)
    assert {"jobs/demo.yaml", "jobs/resnet50_imagenet.yaml"} <= referenced


# --- the local two-node cluster -------------------------------------------------------------------


@dataclass(frozen=True)
class LocalCluster:
    gcs: str
    jobs_url: str
    env: dict[str, str]  # what a client needs (token, usage stats off)


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _run(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=ROOT, timeout=timeout, capture_output=True, text=True, check=False)


def _client_python(code: str, cluster: LocalCluster, timeout: float = 60) -> Any:
    """Run `code` (which prints one JSON value last) in a fresh interpreter connected to the cluster."""
    res = _run([sys.executable, "-c", code], cluster.env, timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    if not RAY.is_file():
        pytest.skip(f"no ray CLI at {RAY}")
    from ray._private.utils import get_dashboard_dependency_error

    if get_dashboard_dependency_error() is not None:  # the job API lives in the dashboard
        pytest.skip(f"ray[default] is not installed ({get_dashboard_dependency_error()}): no job API")
    state = Path(tempfile.mkdtemp(prefix="lc-", dir="/tmp"))  # short: Ray's socket paths live under it
    gcs, dashboard, client = _free_ports(3)
    env = {**os.environ, "LAASP_CLUSTER_DIR": str(state), "LAASP_RAY_PORT": str(gcs),
           "LAASP_DASHBOARD_PORT": str(dashboard), "LAASP_CLIENT_PORT": str(client), "LAASP_VENV": str(VENV),
           "LAASP_STOP_GRACE_S": "3", "RAY_USAGE_STATS_ENABLED": "0"}
    try:
        started = _run(["bash", str(SCRIPT), "start"], env, timeout=180)
        assert started.returncode == 0, started.stdout + started.stderr
        exports = _run(["bash", str(SCRIPT), "env"], env, timeout=30).stdout
        client_env = dict(env)
        for line in exports.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client_env[key] = shlex.split(value)[0]
        yield LocalCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", client_env)
    finally:
        _run(["bash", str(SCRIPT), "stop"], env, timeout=60)
        shutil.rmtree(state, ignore_errors=True)


NO_AGENT_YET = "No available agent to submit job"  # the head's job agent is still starting (a loaded machine)


def _job_submit(cluster: LocalCluster, args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`ray job submit ARGS`, tried again for up to a minute while the job agent is not up yet."""
    for _ in range(30):
        res = _run([str(RAY), "job", "submit", "--address", cluster.jobs_url, *args], cluster.env, timeout)
        if NO_AGENT_YET not in res.stderr:
            return res
        time.sleep(2)
    return res


def _submit(cluster: LocalCluster, entrypoint: list[str], timeout: float, **env_vars: str) -> tuple[str, str]:
    """`ray job submit` (blocking) from the repository root; returns (submission id, the job's logs)."""
    job_id = f"laasp-test-{uuid.uuid4().hex[:8]}"
    runtime_env = ["--runtime-env-json", json.dumps({"env_vars": env_vars})] if env_vars else []
    res = _job_submit(cluster, ["--submission-id", job_id, "--working-dir", ".", *runtime_env, "--", *entrypoint],
                      timeout)
    status = _run([str(RAY), "job", "status", "--address", cluster.jobs_url, job_id], cluster.env, 60)
    logs = _run([str(RAY), "job", "logs", "--address", cluster.jobs_url, job_id], cluster.env, 60).stdout
    assert res.returncode == 0 and "succeeded" in status.stdout.lower(), (res.stdout + res.stderr)[-4000:]
    return job_id, logs


@pytest.mark.timeout(240)
def test_local_cluster_has_two_alive_nodes(local_cluster: LocalCluster) -> None:
    nodes = _client_python(
        "import json, ray\n"
        f"ray.init(address={local_cluster.gcs!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(json.dumps([{'alive': n['Alive'], 'resources': n['Resources']} for n in ray.nodes()]))",
        local_cluster)
    assert [n["alive"] for n in nodes] == [True, True]
    assert sorted(k for n in nodes for k in n["resources"] if k.startswith("node_")) == ["node_head", "node_worker"]
    assert all(n["resources"]["CPU"] == 2 for n in nodes)
    if shutil.which("ss"):  # the job API listens on loopback only
        port = local_cluster.jobs_url.rsplit(":", 1)[1]
        listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=False).stdout.split()
        assert [a for a in listening if a.endswith(f":{port}")] == [f"127.0.0.1:{port}"]


@pytest.mark.timeout(180)
def test_flops_job_runs_on_the_cluster(local_cluster: LocalCluster) -> None:
    from laasp_dist.models import create_model
    from laasp_dist.pruning import count_cost

    _, logs = _submit(local_cluster, ["laasp-dist", "flops", "resnet20", "--json"], timeout=150)
    (line,) = [ln for ln in logs.splitlines() if ln.startswith("{")]
    result = json.loads(line)
    assert result["model"] == "resnet20"
    assert result["macs"] == count_cost(create_model("resnet20", 10, 3), (3, 32, 32)).macs


TINY_RUN = [
    "ray.address=auto", "ray.num_workers=2", "ray.cpus_per_worker=1", "ray.placement_strategy=SPREAD",
    "ray.search_executor=ranks", "data.train_limit=200", "data.val_size=64", "data.test_limit=100",
    "data.batch_size=32", "data.eval_batch_size=100", "train.total_epochs=3", "train.steps_per_epoch=1",
    "train.progress_bar=false", "prune.start_epoch=1", "prune.target_flops_reduction=0.1", "prune.step_flops=0.05",
    "prune.recover_flops=0.1", "prune.subset_size=32", "prune.subset_shards=2", "prune.criteria=[l1,fpgm]",
]


def _train_worker_nodes(cluster: LocalCluster) -> list[str]:
    """The nodes Ray Train workers run on now."""
    filters = [("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")]
    return _client_python(
        "import json\nfrom ray.util.state import list_actors\n"
        f"actors = list_actors(address={cluster.jobs_url!r}, filters={filters!r},"
        " detail=True, raise_on_missing_output=False)\n"
        "print(json.dumps(sorted({a.node_id for a in actors})))",
        cluster)


def _run_entrypoint(out: Path) -> list[str]:
    # SPREAD puts the two 1-CPU workers on different nodes; the candidate search runs on the training
    # ranks, so that after losing a node the head's 2 CPUs hold the whole run again.
    return ["laasp-dist", "run", "jobs/demo.yaml", *[arg for s in TINY_RUN for arg in ("--set", s)], "--out", str(out)]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cluster job's config run uninterrupted on an embedded Ray of its own, started and stopped by the run
    (a run's history does not depend on where its ranks sit): what a run that loses a node must still end with."""
    from laasp_dist.training import run_job

    out = tmp_path_factory.mktemp("reference") / "run"
    run_job(load_config(ROOT / "jobs" / "demo.yaml", [s for s in TINY_RUN if not s.startswith("ray.address=")]), out)
    return out


@pytest.mark.timeout(600)
def test_run_trains_across_both_nodes_and_survives_losing_one(local_cluster: LocalCluster, reference_run: Path,
                                                             tmp_path: Path) -> None:
    """Last in the module: the tiny job, its Train workers on both nodes, loses the worker node; it goes on on
    the head node by itself and ends with the uninterrupted run's history."""
    import pandas as pd

    from processes import checkpoints_reported, wait_for

    out = tmp_path / "run"
    job_id = f"laasp-node-loss-{uuid.uuid4().hex[:8]}"
    submitted = _job_submit(local_cluster, ["--submission-id", job_id, "--no-wait", "--working-dir", ".",
                                            "--runtime-env-json",
                                            json.dumps({"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}}),
                                            "--", *_run_entrypoint(out)], 120)
    assert submitted.returncode == 0, submitted.stderr[-2000:]
    wait_for(lambda: checkpoints_reported(out) >= 3, 300, "the 3rd checkpoint")
    assert len(_train_worker_nodes(local_cluster)) == 2  # the run is on both nodes when one goes
    killed = _run(["bash", str(SCRIPT), "kill-worker"], local_cluster.env, 60)
    assert killed.returncode == 0, killed.stderr

    def finished() -> bool:
        status = _run([str(RAY), "job", "status", "--address", local_cluster.jobs_url, job_id], local_cluster.env, 60)
        said = (status.stdout + status.stderr).lower()  # "Job '…' succeeded" is logged, to stderr
        return any(f"' {word}" in said for word in ("succeeded", "failed", "stopped"))

    wait_for(finished, 480, "the job to end")
    logs = _run([str(RAY), "job", "logs", "--address", local_cluster.jobs_url, job_id], local_cluster.env, 60).stdout
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["restarts"]) >= 1, logs[-3000:]
    assert "[laasp] restart 1: Ray Train restarted the worker group" in logs
    assert summary["flops_reduction"] >= 0.1 - 1e-9
    pd.testing.assert_frame_equal(pd.read_parquet(reference_run / "history.parquet"),
                                  pd.read_parquet(out / "history.parquet"))
    assert summary["final"] == json.loads((reference_run / "summary.json").read_text())["final"]
