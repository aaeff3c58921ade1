"""Shared fixtures: the real data sets that ship on these machines, one Ray session, and one finished tiny run."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import pytest
import torch
from torch import nn

from data_pipelines.make_folder import foolbox_data_dir, write_fashion_mnist_folder
from data_pipelines.small_images import ImageArrays, load_small_dataset

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# The tiny LAASP job of the tests: ResNet-20 on 400 Fashion-MNIST images, 2 Ray Train workers on CPU,
# 3 epochs, 4 pruning rounds to -20 % FLOPs (about a minute).
TINY_TARGET = 0.2
TINY = {
    "name": "tiny", "seed": 0,
    "model": {"name": "resnet20"},
    "data": {"dataset": "fashion_mnist", "val_size": 100, "train_limit": 400, "test_limit": 200,
             "batch_size": 64, "eval_batch_size": 100},
    "train": {"total_epochs": 3, "lr": 0.05, "milestones": [2], "steps_per_epoch": 3, "progress_bar": False},
    "prune": {"start_epoch": 1, "target_flops_reduction": TINY_TARGET, "step_flops": 0.05, "recover_flops": 0.1,
              "recover_epochs": 1, "subset_size": 100, "subset_shards": 2, "criteria": ["l1", "fpgm"],
              "round_to": 1, "latency_batch": 8},  # unrounded steps: the landing bound in tests is one channel
    "ray": {"num_workers": 2, "search_workers": 1},
}


# Relative difference allowed between a candidate's mean subset loss scored in bf16 and in fp32: above the
# largest one measured over a whole pruning run (0.70 %: docs/benchmarks.md, "bf16 scoring against fp32"),
# far below the gaps between candidates that decide a round.
BF16_SCORE_REL_TOL = 1e-2


def run_cli(*args: object) -> subprocess.CompletedProcess:
    """`laasp-dist ARGS` in this process, as the console script calls `main` (exit code, stdout, stderr): a
    command's whole path without a fresh interpreter's seconds of imports. test_cli_core::test_flops_json runs
    the installed console script itself."""
    from laasp_dist.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["laasp-dist", *map(str, args)], code, out.getvalue(), err.getvalue())


def randomise_bn(model: nn.Module, seed: int = 0, bias_scale: float = 0.5) -> None:
    """Non-trivial BN affine and running stats, so that a wrong mask or a wrong loss shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * bias_scale
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


def pytest_configure(config: pytest.Config) -> None:
    # torchvision 0.29 deprecates its image codecs (for TorchCodec, not installed here); they still work.
    config.addinivalue_line(
        "filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
    )


@pytest.fixture(scope="session")
def fashion_train() -> ImageArrays:
    """Fashion-MNIST train split (60 000 images, 3 x 32 x 32 uint8). Do not modify it in place."""
    return load_small_dataset("fashion_mnist", "train")


@pytest.fixture(scope="session")
def fashion_test() -> ImageArrays:
    """Fashion-MNIST test split (10 000 images, 3 x 32 x 32 uint8). Do not modify it in place."""
    return load_small_dataset("fashion_mnist", "test")


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """The foolbox wheel's real sample images (imagenet_XX_<label>.jpg, fashionMNIST_XX_<label>.png, ...)."""
    return foolbox_data_dir()


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ImageNet-layout JPEG folder: 10 Fashion-MNIST classes at 64 x 64 (8 train, 4 val each)
    plus class 10_photo (10 real ImageNet photos in train, 10 in val). Copy it before changing it."""
    return write_fashion_mnist_folder(
        tmp_path_factory.mktemp("jpeg_folder"),
        image_size=64,
        train_per_class=8,
        val_per_class=4,
        photos=True,
    )


# Loaded as `sitecustomize` by the Ray session's processes: records Python-level access to the data folders.
AUDIT_HOOK = '''
import os
import sys

_roots = tuple(r for r in os.environ.get("LAASP_TEST_AUDIT_ROOTS", "").split(os.pathsep) if r)
if _roots:
    _fd = os.open(os.environ["LAASP_TEST_AUDIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    _events = {"open", "os.listdir", "os.scandir", "glob.glob", "glob.glob/2", "pathlib.Path.glob",
               "pathlib.Path.rglob"}

    def _audit(event, args):
        if event in _events and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(os.path.abspath(args[0]))
            if path.startswith(_roots):
                os.write(_fd, f"{os.getpid()} {event} {path}\\n".encode())

    sys.addaudithook(_audit)
'''


@pytest.fixture(scope="session")
def data_audit(jpeg_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A `sitecustomize` audit hook logging Python-level listing/opening of the JPEG folder (and of a copy of it,
    `moved`): `env` puts it into processes started with it. See test_train_folder."""
    hooks = tmp_path_factory.mktemp("audit")
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    moved = Path(shutil.copytree(jpeg_folder, tmp_path_factory.mktemp("mounted") / "data"))
    log = hooks / "access.log"
    env = {"PYTHONPATH": os.pathsep.join(p for p in (str(hooks), os.environ.get("PYTHONPATH")) if p),
           "LAASP_TEST_AUDIT_ROOTS": os.pathsep.join((str(jpeg_folder), str(moved))),
           "LAASP_TEST_AUDIT_LOG": str(log)}
    return SimpleNamespace(log=log, moved=moved, env={**os.environ, **env}, extra=env)


S3_BUCKET = "runs"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 with one bucket (S3_BUCKET), standing in for S3: the environment that
    points boto3 and pyarrow at it. Not set in this process; the Ray session's processes carry it."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    try:
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                     aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
        yield env
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_session(data_audit: SimpleNamespace, s3_server: dict[str, str]):
    """One embedded Ray for every in-process Ray test (3 logical CPUs: 2 Train workers + 1 search actor).

    Its processes carry the data audit hook and the S3 server's address (they inherit the driver's
    environment at ray.init)."""
    import ray

    from laasp_dist.runtime import ensure_ray

    with pytest.MonkeyPatch.context() as patch:
        for key, value in {**data_audit.extra, **s3_server}.items():
            patch.setenv(key, value)
        ensure_ray(num_cpus=3, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_session, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The TINY job run once, uninterrupted: the reference of every test that only reads a run folder."""
    from laasp_dist.config import build_config
    from laasp_dist.training import run_job

    out = tmp_path_factory.mktemp("tiny") / "run"
    run_job(build_config(TINY), out)
    return out
