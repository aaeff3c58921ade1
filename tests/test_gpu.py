"""The GPU suite (`pytest -m gpu`): what only a CUDA device can show. Without CUDA every test is skipped.

Each test names its CPU counterpart, which runs in CI. One process group (NCCL, one rank) serves
the module: NCCL refuses two ranks on one GPU ("Duplicate GPU detected", NVIDIA/nccl#1241), so the
two-rank paths (DDP gradient sync, broadcasts between ranks) are covered by the two-worker gloo
runs on the CPU and by multi-GPU runs; the one-rank NCCL collectives here are the calls a run makes.
"""

from __future__ import annotations

import copy
import socket
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import BF16_SCORE_REL_TOL, randomise_bn
from laasp_dist.config import build_config
from laasp_dist.pruning import Arch, PrunableNetwork, network_spec
from laasp_dist.search import LocalExecutor, ScoreOptions, build_subset, score_fast, search_round

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; each test names its CPU counterpart"),
]

SYNTHETIC = {
    "name": "gpu", "seed": 0, "model": {"name": "resnet20", "num_classes": 10},
    "data": {"dataset": "synthetic", "image_size": 32, "val_size": 100, "train_limit": 512, "batch_size": 64},
    "train": {"total_epochs": 2, "progress_bar": False},  # precision and channels_last: auto = bf16 + channels_last
    "prune": {"start_epoch": 1, "subset_size": 64, "subset_shards": 2, "criteria": ["l1"]},
    "ray": {"num_workers": 1, "use_gpu": True, "search_workers": 1},
}


@pytest.fixture(scope="module")
def nccl():
    """A one-rank NCCL process group on cuda:0, made current the way a Train worker does it."""
    from laasp_dist.training.worker import cuda_device

    device = cuda_device(torch.device("cuda:0"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=device)
    yield device
    dist.destroy_process_group()


@pytest.fixture
def worker(nccl, tmp_path):
    from laasp_dist.storage import Storage
    from laasp_dist.training.worker import Worker

    return Worker(build_config(SYNTHETIC), Storage(tmp_path), 0, 1, nccl, "test", False)


def _fresh(worker) -> dict:
    torch.manual_seed(0)
    net = PrunableNetwork.create(worker.arch)
    return {"spec": network_spec(net), "model": net.model.state_dict(), "momentum": {}}


def test_current_device_and_one_rank_nccl_collectives(nccl) -> None:
    """CPU: the two-worker gloo runs (test_train_job, test_precision) use the same sync calls."""
    from laasp_dist.training import sync

    assert torch.cuda.current_device() == nccl.index and torch.backends.cudnn.benchmark
    assert dist.get_backend() == "nccl"
    payload = {"spec": {"a": 1}, "model": {"w": torch.arange(6.0).view(2, 3)}}
    back = sync.broadcast(payload, device=nccl)
    assert back["spec"] == {"a": 1} and torch.equal(back["model"]["w"], payload["model"]["w"])
    assert sync.all_gather({"r": 0}) == [{"r": 0}]
    assert sync.max_over_ranks(3.5, nccl) == 3.5
    model = torch.nn.BatchNorm2d(4).to(nccl)
    sync.broadcast_buffers(model)
    assert len(sync.check_identical(model, None, "test")) == 1
    sync.barrier()


def test_channels_last_ddp_install_after_a_prune(worker) -> None:
    """CPU: test_precision.test_install_after_a_prune_releases_the_old_network_and_keeps_channels_last."""
    from torch.nn.parallel import DistributedDataParallel

    from laasp_dist.training.coordinator import pruned_payload

    worker.install(_fresh(worker), "start")
    assert isinstance(worker.ddp, DistributedDataParallel)  # a one-rank run takes the DDP path too
    assert (worker.numerics.precision, worker.numerics.channels_last) == ("bf16", True)
    batch = next(iter(worker.data.train_batches(0)))
    sums = torch.zeros(4, dtype=torch.float64, device=worker.device)
    worker.train_step(*batch, sums)
    for p in worker.net.model.parameters():
        worker.optimizer.state[p]["momentum_buffer"] = p.detach().clone()
    old = [weakref.ref(o) for o in (worker.net, worker.net.model, worker.optimizer, worker.ddp)]
    before = torch.cuda.memory_allocated()
    payload = pruned_payload(worker.net, worker.optimizer, worker.net.candidates(["l1"], 0.05, 0.75)[1], True)
    worker.install(payload, "round 1")
    assert [r() for r in old] == [None] * 4
    assert torch.cuda.memory_allocated() <= before  # the old network's memory went back (the new one is smaller)
    for name, p in worker.net.model.named_parameters():
        buf = worker.optimizer.state[p]["momentum_buffer"]
        assert torch.equal(buf, p.detach()) and buf.device == p.device, name
        if p.ndim == 4:
            assert p.is_contiguous(memory_format=torch.channels_last), name
            assert buf.is_contiguous(memory_format=torch.channels_last), name
    sums.zero_()
    worker.train_step(*batch, sums)
    assert torch.isfinite(sums).all()


def test_training_steps_never_wait_for_the_device(worker) -> None:
    """CPU: the same `Worker.train_step` trains in every CPU test; syncs cannot be seen there."""
    worker.install(_fresh(worker), "start")
    batches = iter(worker.data.train_batches(0))
    sums = torch.zeros(4, dtype=torch.float64, device=worker.device)
    for _ in range(2):  # warm-up: cuDNN autotuning and DDP's first-iteration bucket rebuild may sync
        worker.train_step(*next(batches), sums)
    steps = [next(batches) for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in steps:
            worker.train_step(x, y, sums)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(sums[3]) == 5 * len(steps[0][1])


def test_peak_memory_of_a_gpu_phase(nccl) -> None:
    """CPU: test_precision.test_peak_memory_sees_an_allocation_and_resets (peak RSS)."""
    from laasp_dist.training.memory import MIB, PeakMemory

    meter = PeakMemory(nccl)
    meter.reset()
    base = meter.peak_bytes()
    block = torch.ones(256 * MIB // 4, device=nccl)
    peak = meter.peak_bytes()
    del block
    meter.reset()
    assert peak >= base + 256 * MIB > meter.peak_bytes() and meter.measure == "cuda max_memory_allocated"


def test_bf16_scoring_on_the_gpu_within_the_measured_tolerance(nccl, fashion_train) -> None:
    """CPU: test_precision.test_bf16_scoring_runs_in_bf16_within_the_measured_tolerance."""
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10, 3, 32))
    randomise_bn(net.model, 0, bias_scale=0.2)
    subset = build_subset(fashion_train, 256, 2, seed=0)
    cands = net.candidates(["l1", "l2", "fpgm", "cosine"], 0.01, 0.75)
    cpu = np.concatenate(score_fast(net, cands, subset.shards, ScoreOptions(128, 512)), 1).mean(1)
    net.model.to(nccl)
    gpu_subset = subset.to(nccl)
    fp32 = np.concatenate(score_fast(net, cands, gpu_subset.shards, ScoreOptions(128, 512)), 1).mean(1)
    bf16 = np.concatenate(score_fast(net, cands, gpu_subset.shards, ScoreOptions(128, 512, "bf16", True)), 1).mean(1)
    np.testing.assert_allclose(fp32, cpu, rtol=BF16_SCORE_REL_TOL)  # cuDNN's TF32 convolutions: within bf16's
    np.testing.assert_allclose(bf16, fp32, rtol=BF16_SCORE_REL_TOL)
    assert np.abs(bf16 - fp32).max() > 0  # it really ran in bf16


@pytest.fixture(scope="module")
def ray_gpu():
    import ray

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_gpu_search_actors_score_beside_a_training_worker(ray_gpu, nccl, fashion_train) -> None:
    """CPU: test_precision.test_gpu_search_actors_fit_beside_a_training_worker_and_never_fall_back and
    test_search_rounds' Ray tests."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from laasp_dist.config import PruneConfig
    from laasp_dist.search.ray_executor import RayExecutor
    from laasp_dist.config import gpu_shares

    train, actor = gpu_shares(build_config(SYNTHETIC))
    pg = placement_group([{"CPU": 1, "GPU": train}])  # the training worker's share of the GPU
    ray.get(pg.ready(), timeout=120)
    subset = build_subset(fashion_train, 128, 2, seed=0)
    options = ScoreOptions(64, 256, "bf16", True)
    cfg = PruneConfig(criteria=["l1", "fpgm"], subset_size=128, subset_shards=2, shard_batch_size=64,
                      target_flops_reduction=0.5)
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10, 3, 32))
    randomise_bn(net.model, 0, bias_scale=0.2)
    try:
        with RayExecutor(subset, 1, options=options, gpus_per_worker=actor, start_timeout_s=300) as ex:
            remote = search_round(copy.deepcopy(net), subset, cfg, executor=ex)
            status = ray.get(ex.actors[0].status.remote())
    finally:
        remove_placement_group(pg)
    assert status["device"].startswith("cuda") and set(status["shards"].values()) == {"cuda:0"}
    net.model.to(nccl).to(memory_format=torch.channels_last)
    local = search_round(net, subset.to(nccl), cfg, executor=LocalExecutor(subset.to(nccl), options))
    assert remote.winner == local.winner
    np.testing.assert_allclose(remote.losses, local.losses, rtol=1e-3)  # another process: other cuDNN kernels


def test_dali_mixed_decoding_of_a_real_jpeg_folder(nccl, jpeg_folder: Path) -> None:
    """CPU: test_data_image_folder's DALI CPU-pipeline tests (and the job on a JPEG folder)."""
    pytest.importorskip("nvidia.dali")
    from data_pipelines.image_folder import DaliImageIterator, scan_image_folder

    folder = scan_image_folder(jpeg_folder / "val")
    gpu = list(DaliImageIterator(folder, 16, train=False, image_size=64, device_id=nccl.index))
    cpu = list(DaliImageIterator(folder, 16, train=False, image_size=64, device_id=None))
    assert gpu[0][0].is_cuda and gpu[0][1].is_cuda
    images = torch.cat([x for x, _ in gpu]).cpu()
    reference = torch.cat([x for x, _ in cpu])
    assert images.shape == reference.shape == (len(folder), 3, 64, 64)
    assert torch.equal(torch.cat([y for _, y in gpu]).cpu(), torch.cat([y for _, y in cpu]))
    # nvJPEG and libjpeg-turbo round differently: close, not equal (normalised units, 1/255 ≈ 0.017)
    assert (images - reference).abs().mean() < 0.05
