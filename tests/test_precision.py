"""The GPU code paths, exercised on the CPU (their GPU side is tests/test_gpu.py).

Precision and memory format resolved from the config (old `bf16` configs keep their
meaning); momentum restored in its parameter's memory format; the previous network, DDP
wrapper and optimizer released at every install; peak memory that sees a real allocation;
bf16 scoring that really runs in bf16 and stays within the measured tolerance of fp32;
GPU search actors packed beside a training worker's share of a GPU, and failing clearly
(never a CPU fallback) where no CUDA is there; torch.compile across prunes without
piling up graphs; and a tiny bf16 + channels_last job on 2 Ray Train workers whose final
numbers `laasp-dist evaluate` re-measures by default.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from conftest import BF16_SCORE_REL_TOL, randomise_bn, run_cli  # noqa: E402
from laasp_dist.config import build_config  # noqa: E402
from laasp_dist.errors import DeviceError, LaaspError  # noqa: E402
from laasp_dist.precision import Numerics, resolve, score_numerics, train_numerics  # noqa: E402
from laasp_dist.pruning import Arch, PrunableNetwork, network_spec  # noqa: E402
from laasp_dist.search import ScoreOptions, build_subset, score_fast, score_reference  # noqa: E402
from laasp_dist.storage import Storage  # noqa: E402
from laasp_dist.training.memory import MIB, PeakMemory  # noqa: E402
from laasp_dist.config import gpu_shares  # noqa: E402
from laasp_dist.training.coordinator import pruned_payload  # noqa: E402
from laasp_dist.training.worker import Worker, cuda_device  # noqa: E402

TINY = {
    "name": "tiny-bf16", "seed": 0,
    "model": {"name": "resnet20"},
    "data": {"dataset": "fashion_mnist", "val_size": 40, "train_limit": 160, "test_limit": 40,
             "batch_size": 16, "eval_batch_size": 40},
    "train": {"total_epochs": 2, "lr": 0.05, "milestones": [], "steps_per_epoch": 2, "progress_bar": False},
    "prune": {"start_epoch": 1, "target_flops_reduction": 0.1, "step_flops": 0.05, "recover_flops": 0.1,
              "recover_epochs": 1, "subset_size": 32, "subset_shards": 2, "criteria": ["l1"], "round_to": 1},
    "ray": {"num_workers": 2, "search_workers": 1},
}


def config_of(**sections) -> object:
    cfg = copy.deepcopy(TINY)
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    return build_config(cfg)


def fresh_payload(worker: Worker, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    net = PrunableNetwork.create(worker.arch)
    return {"spec": network_spec(net), "model": net.model.state_dict(), "momentum": {}}


def train_step(worker: Worker, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The worker's own training step; returns the batch's mean loss (from the worker's sums)."""
    sums = torch.zeros(4, dtype=torch.float64)
    worker.train_step(*batch, sums)
    return float(sums[0] / sums[3])


# ----------------------------------------------------------------------------------------------- config


def test_precision_and_memory_format_follow_the_device_unless_set() -> None:
    assert resolve("auto", "auto", "cpu") == Numerics("fp32", False, "cpu")
    assert resolve("auto", "auto", "cuda:0") == Numerics("bf16", True, "cuda")
    assert resolve("bf16", True, "cpu") == Numerics("bf16", True, "cpu")  # explicit choices apply on the CPU too
    cfg = config_of(train={"precision": "bf16", "channels_last": True}, prune={"score_precision": "fp32"})
    assert train_numerics(cfg, "cpu") == Numerics("bf16", True, "cpu")
    assert score_numerics(cfg, "cpu") == Numerics("fp32", True, "cpu")
    assert score_numerics(config_of(), "cuda") == Numerics("bf16", True, "cuda")  # auto: the training's
    # configs saved before train.precision existed keep their meaning (bf16 and channels_last were GPU-only)
    old = build_config({"train": {"bf16": True, "channels_last": True}})
    assert (old.train.precision, old.train.channels_last) == ("auto", "auto")
    old = build_config({"train": {"bf16": False, "channels_last": False}})
    assert (old.train.precision, old.train.channels_last) == ("fp32", False)
    with pytest.raises(LaaspError, match="train.precision"):
        build_config({"train": {"precision": "fp16"}})
    with pytest.raises(LaaspError, match="unknown compile_backend 'nope'"):
        build_config({"train": {"compile": True, "compile_backend": "nope"}})


def test_gpu_shares_leave_room_for_one_search_actor_per_gpu() -> None:
    assert gpu_shares(config_of()) == (0.0, 0.0)
    assert gpu_shares(config_of(ray={"use_gpu": True})) == (0.75, 0.25)
    assert gpu_shares(config_of(ray={"use_gpu": True, "num_workers": 2, "search_workers": 4,
                                     "search_gpu_fraction": 0.2})) == (0.6, 0.2)  # two actors per GPU
    assert gpu_shares(config_of(ray={"use_gpu": True, "search_executor": "ranks"})) == (1.0, 0.0)
    # one training worker cannot meet another rank of its run on a GPU: it may keep half or less
    assert gpu_shares(config_of(ray={"use_gpu": True, "num_workers": 1, "search_workers": 2})) == (0.5, 0.25)
    with pytest.raises(LaaspError, match="would keep 0.5 of a GPU each.*NCCL refuses; raise ray.gpu_share"):
        config_of(ray={"use_gpu": True, "num_workers": 2, "search_workers": 4})


def test_a_gpu_share_packs_several_runs_on_one_gpu() -> None:
    # ray.gpu_share is what a training worker and the actors beside it take together: 10 runs fit one GPU
    assert gpu_shares(config_of(ray={"use_gpu": True, "num_workers": 1, "search_workers": 1,
                                     "gpu_share": 0.1})) == (0.075, 0.025)
    assert gpu_shares(config_of(ray={"use_gpu": True, "num_workers": 1, "search_executor": "ranks",
                                     "gpu_share": 0.1})) == (0.1, 0.0)
    assert gpu_shares(config_of(prune={"selection": "importance"},  # scores nothing: no actors
                                ray={"use_gpu": True, "num_workers": 1, "gpu_share": 0.1})) == (0.1, 0.0)
    assert gpu_shares(config_of(ray={"use_gpu": True, "gpu_share": 0.8, "search_executor": "ranks"})) == (0.8, 0.0)
    with pytest.raises(LaaspError, match=r"ray.num_workers=2 training workers would keep 0.5 of a GPU each \(ray.gpu_share=0.5"):
        config_of(ray={"use_gpu": True, "num_workers": 2, "search_executor": "ranks", "gpu_share": 0.5})
    with pytest.raises(LaaspError, match="gpu_share"):
        config_of(ray={"use_gpu": True, "gpu_share": 0})


def test_a_gpu_worker_without_cuda_is_an_error_not_a_cpu_run() -> None:
    with pytest.raises(DeviceError, match="sees no CUDA device.*ray.use_gpu=false"):
        cuda_device(torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="sees no CUDA device"):
            cuda_device(torch.device("cuda:0"))


def test_synthetic_data_is_seeded_uniform_noise() -> None:
    from laasp_dist.training.data import load_splits

    cfg = build_config({"data": {"dataset": "synthetic", "image_size": 40, "val_size": 96},
                        "model": {"num_classes": 12}})
    a, b = load_splits(cfg), load_splits(cfg)
    assert torch.equal(a.train.images, b.train.images) and a.input_size == 40 and a.num_classes == 12
    assert len(a.val) == 96 and len(a.test) == 1024
    pixels = a.train.images.double() / 255
    assert abs(pixels.mean().item() - 0.5) < 0.01 and abs(pixels.std().item() - 0.2887) < 0.01


# ----------------------------------------------------------------------------------------------- install


@pytest.fixture
def gloo_rank():
    """A one-rank gloo process group, as a one-worker Ray Train run has."""
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_install_after_a_prune_releases_the_old_network_and_keeps_channels_last(tmp_path: Path, gloo_rank) -> None:
    """The coordinator's path of a round, on one CPU rank (DDP over gloo) with channels_last and bf16."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = config_of(train={"precision": "bf16", "channels_last": True})
    worker = Worker(cfg, Storage(tmp_path), 0, 1, torch.device("cpu"), "test", False)
    worker.install(fresh_payload(worker), "start")
    assert isinstance(worker.ddp, DistributedDataParallel)  # a one-rank run takes the DDP path too
    batch = next(iter(worker.data.train_batches(0)))
    train_step(worker, batch)
    # every momentum buffer := a copy of its parameter (channels_last as SGD made it): slicing across the
    # prune must then give exactly the pruned parameters
    for p in worker.net.model.parameters():
        worker.optimizer.state[p]["momentum_buffer"] = p.detach().clone()
    old = [weakref.ref(obj) for obj in (worker.net, worker.net.model, worker.optimizer, worker.ddp)]
    candidate = worker.net.candidates(["l1"], 0.05, 0.75)[2]
    payload = pruned_payload(worker.net, worker.optimizer, candidate, keep_momentum=True)
    worker.install(payload, "round 1")
    del payload
    assert [ref() for ref in old] == [None] * 4  # nothing of the previous network survives the install
    four_d = 0
    for name, p in worker.net.model.named_parameters():
        buf = worker.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(buf, p.detach()), name
        if p.ndim == 4:
            four_d += 1
            assert p.is_contiguous(memory_format=torch.channels_last), name
            assert buf.is_contiguous(memory_format=torch.channels_last), name
    assert four_d > 10
    assert np.isfinite(train_step(worker, batch))


def test_peak_memory_sees_an_allocation_and_resets() -> None:
    meter = PeakMemory(torch.device("cpu"))
    meter.reset()
    base = meter.peak_bytes()
    block = torch.ones(256 * MIB // 4)  # 256 MiB, touched
    peak = meter.peak_bytes()
    del block
    assert peak >= base + 250 * MIB
    meter.reset()
    assert meter.peak_bytes() < peak - 200 * MIB  # the reset forgot the freed block
    assert meter.measure == "peak RSS (VmHWM)"


def test_compile_survives_prunes_without_piling_up_graphs(tmp_path: Path) -> None:
    """One compiled graph per installed network (Dynamo is reset), and it trains like eager mode."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    compiled = Worker(config_of(train={"compile": True, "compile_backend": "aot_eager"}), Storage(tmp_path), 0, 1,
                      torch.device("cpu"), "test", False)
    eager = Worker(config_of(), Storage(tmp_path), 0, 1, torch.device("cpu"), "test", False)
    batch = next(iter(eager.data.train_batches(0)))
    payload = fresh_payload(eager)
    for round_ in range(3):
        for w in (compiled, eager):
            w.install(copy.deepcopy(payload), f"round {round_}")
        losses = [train_step(w, batch) for w in (compiled, eager)]
        assert losses[0] == pytest.approx(losses[1], rel=1e-5)
        for a, b in zip(compiled.net.model.parameters(), eager.net.model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert len(_debug_get_cache_entry_list(type(compiled.net.model).forward.__code__)) == 1
        payload = pruned_payload(eager.net, eager.optimizer, eager.net.candidates(["l1"], 0.05, 0.75)[round_], True)


# ----------------------------------------------------------------------------------------------- scoring


def test_bf16_scoring_runs_in_bf16_within_the_measured_tolerance(fashion_train) -> None:
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10, 3, 32))
    randomise_bn(net.model, 0, bias_scale=0.2)
    net.model.eval()
    subset = build_subset(fashion_train, 32, 1, seed=0)
    cands = net.candidates(["l1", "fpgm"], 0.01, 0.75)
    pick = cands[:2] + cands[-2:]
    fp32 = score_fast(net, pick, subset.shards, ScoreOptions(32, 64))[0].mean(1)
    bf16 = score_fast(net, pick, subset.shards, ScoreOptions(32, 64, precision="bf16"))[0].mean(1)
    ref = score_reference(net, pick, subset.shards, ScoreOptions(32, 32, precision="bf16"))[0].mean(1)
    last = score_fast(net, pick, subset.shards, ScoreOptions(32, 64, channels_last=True))[0].mean(1)
    assert next(net.model.parameters()).is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(last, fp32, rtol=1e-5)  # the memory format does not change the arithmetic
    assert np.abs(bf16 - fp32).max() > 1e-6  # bf16 really ran
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_SCORE_REL_TOL)
    np.testing.assert_allclose(ref, fp32, rtol=BF16_SCORE_REL_TOL)


# ----------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_with_a_gpu():
    """An embedded Ray that declares one logical GPU (this machine has none)."""
    import ray

    ray.init(num_cpus=3, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.mark.timeout(600)
def test_gpu_search_actors_fit_beside_a_training_worker_and_never_fall_back(ray_with_a_gpu, fashion_train) -> None:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from laasp_dist.search.ray_executor import RayExecutor

    train, actor = gpu_shares(config_of(ray={"use_gpu": True}))
    subset = build_subset(fashion_train, 16, 1, seed=0)
    pg = placement_group([{"CPU": 1, "GPU": train}])  # what a training worker holds of the GPU
    ray.get(pg.ready(), timeout=300)
    try:
        with pytest.raises(LaaspError, match="could not be placed within 5 s"):
            RayExecutor(subset, 1, gpus_per_worker=2 * actor, start_timeout_s=5)  # no room beside it
        # placed on the rest of the GPU; without CUDA it stops with a clear error instead of scoring on the CPU
        with pytest.raises(DeviceError, match="GPU search actor .* sees no CUDA device.*ray.search_executor=ranks"):
            RayExecutor(subset, 1, gpus_per_worker=actor, start_timeout_s=300)
    finally:
        remove_placement_group(pg)


@pytest.fixture(scope="module")
def bf16_run(ray_with_a_gpu, tmp_path_factory) -> Path:
    from laasp_dist.training import run_job

    out = tmp_path_factory.mktemp("bf16") / "run"
    run_job(config_of(train={"precision": "bf16", "channels_last": True}), out)
    return out


@pytest.mark.timeout(900)
def test_bf16_channels_last_job_on_two_cpu_ranks(bf16_run: Path) -> None:
    summary = json.loads((bf16_run / "summary.json").read_text())
    assert summary["flops_reduction"] >= 0.1 and summary["rounds"] >= 2
    for check in summary["sync_checks"]:  # DDP + channels_last + momentum: ranks identical after every install
        assert len(set(check["digests"])) == 1
    training = summary["training"]
    assert (training["precision"], training["channels_last"], training["device"]) == ("bf16", True, "cpu")
    final = summary["final_metrics"]
    assert (final["precision"], final["channels_last"], final["device"]) == ("bf16", True, "cpu")
    memory = training["memory"]
    assert memory["measure"] == "peak RSS (VmHWM)" and len(memory["per_round"]) == summary["rounds"]
    assert all(100 < m < 20_000 for m in memory["per_round"])  # MiB of a process holding ResNet-20 and data
    from laasp_dist.training import latest_state

    epochs = latest_state(Storage(bf16_run))["epochs"]
    assert all(e["train_images_per_s"] > 0 and e["peak_memory_mib"] > 100 for e in epochs)


@pytest.mark.timeout(900)
def test_evaluate_rechecks_the_final_numbers_the_way_they_were_measured(bf16_run: Path, tmp_path: Path) -> None:
    summary = json.loads((bf16_run / "summary.json").read_text())
    proc = run_cli("evaluate", bf16_run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout)
    assert measured["precision"] == "bf16" and measured["channels_last"] is True
    assert measured["test_top1"] == summary["final_metrics"]["test_top1"]
    assert measured["test_loss"] == pytest.approx(summary["final_metrics"]["test_loss"], rel=1e-12)
    fp32 = json.loads(run_cli("evaluate", bf16_run, "--precision", "fp32").stdout)
    assert fp32["precision"] == "fp32" and fp32["test_loss"] != measured["test_loss"]
    if torch.cuda.is_available():
        return
    # a run measured on a GPU, re-checked here: one line naming the flag
    gpu_run = tmp_path / "gpu-run"
    shutil.copytree(bf16_run, gpu_run, ignore=shutil.ignore_patterns("ray", "checkpoints", "tensorboard"))
    recorded = json.loads((gpu_run / "summary.json").read_text())
    recorded["final_metrics"]["device"] = "cuda"
    (gpu_run / "summary.json").write_text(json.dumps(recorded))
    proc = run_cli("evaluate", gpu_run)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "measured its final numbers on cuda" in lines[0] and "--device cpu" in lines[0]
