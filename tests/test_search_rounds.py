"""Search rounds equal the oracle (the paper's copy-trace-prune-forward procedure): locally and on Ray.

Real Fashion-MNIST images (padded to 32×32), small models with non-trivial BN so
that a wrong mask shows in the loss: CIFAR ResNet-20 (projection shortcuts,
already pruned once), torchvision ResNet-18 and MobileNetV2 at 32×32 (residual
groups with downsample convs; depthwise groups), VGG-16-BN at 16×16.
One embedded Ray instance (2 CPUs) serves the module's Ray tests.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from conftest import randomise_bn  # noqa: E402
from data_pipelines.small_images import ImageArrays  # noqa: E402
from laasp_dist.config import PruneConfig  # noqa: E402
from laasp_dist.pruning import Arch, PrunableNetwork  # noqa: E402
from laasp_dist.search import (LocalExecutor, ScoreOptions, build_subset, prune_to_target,  # noqa: E402
                               reduce_losses, score_fast, score_reference, search_round, select_winner)
from laasp_dist.search.round import eliminate  # noqa: E402
from laasp_dist.search.subset import calibration_shard  # noqa: E402

REL = 1e-5
# Whole rounds against the oracle (each oracle candidate costs a copy, a trace and a prune: ~1 s here).
CASES = {  # model: (input size, criteria)
    "resnet20": (32, ["l1", "l2"]),
    "resnet18": (32, ["fpgm"]),
}
# Sampled candidates (first, middle and last groups) against the oracle's scorer.
SAMPLED = {
    "mobilenet_v2": (32, ["bn_scale", "cosine"]),
    "vgg16_bn": (16, ["l1", "random"]),
}


def make_net(name: str, size: int, seed: int = 0) -> PrunableNetwork:
    torch.manual_seed(seed)
    net = PrunableNetwork.create(Arch(name, 10, 3, size))
    randomise_bn(net.model, seed, bias_scale=0.2)
    if name == "resnet20":  # score a network that has already been slimmed once
        net.apply(net.candidates(["l1"], 0.02, 0.75)[3])
    return net


def prune_cfg(criteria, search="exact", **kw) -> PruneConfig:
    kw.setdefault("round_to", 1)  # unrounded steps: the cases below size their rounds by single channels
    return PruneConfig(criteria=criteria, search=search, subset_size=64, subset_shards=2, shard_batch_size=32,
                       target_flops_reduction=kw.pop("target", 0.5), **kw)


@pytest.fixture(scope="module")
def subsets(fashion_train):
    small = ImageArrays(F.interpolate(fashion_train.images[:6000].float(), size=16, mode="area").round().to(torch.uint8),
                        fashion_train.labels[:6000].clone(), 10, fashion_train.mean, fashion_train.std)
    return {32: build_subset(fashion_train, 64, 2, seed=0), 16: build_subset(small, 64, 2, seed=0)}


@pytest.fixture(scope="module")
def oracle(subsets):
    """The reference round of every case, computed once."""
    out = {}
    for name, (size, criteria) in CASES.items():
        out[name] = search_round(make_net(name, size), subsets[size], prune_cfg(criteria, "reference"))
    return out


def assert_same_round(result, expected):
    assert result.winner == expected.winner
    assert [(r["group"], r["criterion"], r["channels"]) for r in result.table] == \
        [(r["group"], r["criterion"], r["channels"]) for r in expected.table]
    np.testing.assert_allclose(result.losses, expected.losses, rtol=REL, atol=0)


@pytest.mark.parametrize("name", list(CASES))
def test_exact_round_equals_oracle(name, subsets, oracle):
    size, criteria = CASES[name]
    net = make_net(name, size)
    before = {k: v.clone() for k, v in net.model.state_dict().items()}
    result = search_round(net, subsets[size], prune_cfg(criteria, "exact"))
    assert_same_round(result, oracle[name])
    assert all(r["shards_seen"] == 2 and r["images_seen"] == 64 for r in result.table)
    assert sum(r["chosen"] for r in result.table) == 1
    # scoring leaves the network exactly as it was (no hooks, same weights and BN statistics)
    assert all(torch.equal(before[k], v) for k, v in net.model.state_dict().items())
    assert not any(m._forward_hooks for m in net.model.modules())


def sample(cands, n_each=2):
    mid = len(cands) // 2
    return cands[:n_each] + cands[mid:mid + n_each] + cands[-n_each:]


@pytest.mark.parametrize("name", list(SAMPLED))
def test_fast_scorer_equals_oracle_on_sampled_candidates(name, subsets):
    size, criteria = SAMPLED[name]
    net = make_net(name, size)
    pick = sample(net.candidates(criteria, 0.01, 0.75))
    shards = subsets[size].shards
    ref = score_reference(net, pick, shards, ScoreOptions(32, 32))
    fast = score_fast(net, pick, shards, ScoreOptions(32, 32))
    assert [a.shape for a in fast] == [(len(pick), 32), (len(pick), 32)]
    np.testing.assert_allclose(np.concatenate(fast, 1), np.concatenate(ref, 1), rtol=REL, atol=0)


def test_batched_variants_and_duplicates_match_reference(subsets):
    net = make_net("resnet20", 32)
    cands = net.candidates(["l1", "l2", "fpgm", "cosine"], 0.01, 0.75)
    assert len({(c.group, c.channels) for c in cands}) < len(cands)  # l1 and l2 agree somewhere
    shards = subsets[32].shards[1:]
    pick = cands[:4] + cands[-4:]
    [ref] = score_reference(net, pick, shards, ScoreOptions(32, 32))
    [fast] = score_fast(net, pick, shards, ScoreOptions(16, 64))  # up to 4 variants of a group per forward
    np.testing.assert_allclose(fast, ref, rtol=REL, atol=0)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_bn_recalibration_matches_reference(name, subsets):
    net = make_net(name, 32)
    cands = net.candidates(["l1"], 0.01, 0.75)
    pick = sample(cands, 1) + cands[1:2]
    sub = subsets[32]
    cal = calibration_shard(sub, 48)  # two chunks of 32 + 16: cumulative statistics over chunks
    [ref] = score_reference(net, pick, sub.shards[1:], ScoreOptions(32, 32), cal)
    [fast] = score_fast(net, pick, sub.shards[1:], ScoreOptions(32, 32), cal)
    np.testing.assert_allclose(fast, ref, rtol=1e-4, atol=1e-6)
    [plain] = score_fast(net, pick, sub.shards[1:], ScoreOptions(32, 32))
    assert np.abs(plain - fast).max() > 1e-3  # recalibration does change the scores


def test_adaptive_round_keeps_the_oracle_winner(subsets, oracle):
    size, criteria = CASES["resnet18"]
    result = search_round(make_net("resnet18", size), subsets[size], prune_cfg(criteria, "adaptive"))
    assert result.winner == oracle["resnet18"].winner
    win = [r for r in result.table if r["chosen"]][0]
    assert win["shards_seen"] == 2
    np.testing.assert_allclose(win["loss"], oracle["resnet18"].loss, rtol=REL)
    seen = np.array([r["shards_seen"] for r in result.table])
    assert (seen >= 1).all()
    # dropped candidates carry the mean of the shard they saw
    for r, o in zip(result.table, oracle["resnet18"].table):
        if r["shards_seen"] == 2:
            np.testing.assert_allclose(r["loss"], o["loss"], rtol=REL)


def test_reduction_is_sample_weighted_and_ties_break_by_order():
    means, counts = reduce_losses([[np.array([1.0, 1.0]), np.array([4.0])], [np.array([2.0, 2.0, 2.0])]])
    np.testing.assert_allclose(means, [2.0, 2.0])
    assert counts.tolist() == [3, 3]
    assert select_winner(means) == 0
    assert select_winner(np.array([3.0, 1.0, 1.0])) == 1
    assert select_winner(np.array([3.0, 1.0, 0.5]), np.array([True, True, False])) == 1


def test_elimination_drops_only_clearly_worse_candidates():
    rng = np.random.default_rng(0)
    base = rng.exponential(1.0, 400)
    seen = {0: base + 0.5, 1: base, 2: base + rng.normal(0, 0.05, 400), 3: base + 0.01 + rng.normal(0, 1, 400)}
    assert eliminate([0, 1, 2, 3], seen, 0.999) == [1, 2, 3]


# ----------------------------------------------------------------------------------------------- Ray


@pytest.fixture(scope="module")
def ray_executor(ray_session, subsets):
    from laasp_dist.search.ray_executor import RayExecutor

    executor = RayExecutor(subsets[32], 2, options=ScoreOptions(32, 32))
    yield executor
    executor.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["resnet20", "resnet18"])
def test_ray_round_equals_oracle(name, ray_executor, subsets, oracle):
    size, criteria = CASES[name]
    result = search_round(make_net(name, size), subsets[size], prune_cfg(criteria, "exact"), executor=ray_executor)
    assert_same_round(result, oracle[name])


@pytest.mark.timeout(240)
def test_killing_a_search_worker_mid_round_leaves_the_answer_unchanged(ray_executor, subsets, oracle):
    """A search actor SIGKILLed from outside once it is busy scoring: the round still gives the oracle's answer."""
    import threading

    import ray

    from processes import cpu_ticks, kill, wait_for

    size, criteria = CASES["resnet20"]
    pids = [ray.get(a.ping.remote()) for a in ray_executor.actors]
    killed = threading.Event()

    def kill_when_busy() -> None:
        idle = cpu_ticks(pids[0])
        wait_for(lambda: cpu_ticks(pids[0]) >= idle + 5, 120, "the search worker to score")  # 50 ms of CPU
        kill([pids[0]])
        killed.set()

    killer = threading.Thread(target=kill_when_busy, daemon=True)
    killer.start()
    result = search_round(make_net("resnet20", size), subsets[size], prune_cfg(criteria, "exact"),
                          executor=ray_executor)
    assert killed.is_set()  # the kill landed before the round ended
    assert_same_round(result, oracle["resnet20"])
    new_pids = [ray.get(a.ping.remote()) for a in ray_executor.actors]
    assert new_pids[0] != pids[0] and new_pids[1] == pids[1]  # the worker really died and was restarted


@pytest.mark.timeout(240)
def test_ray_adaptive_and_pruning_history_equal_local(ray_executor, subsets):
    cfg = prune_cfg(["l1", "fpgm"], "adaptive", target=0.06, step_flops=0.02)
    local_net, ray_net = make_net("resnet20", 32), make_net("resnet20", 32)
    local = prune_to_target(local_net, subsets[32], cfg, LocalExecutor(subsets[32], ScoreOptions(32, 32)))
    remote = prune_to_target(ray_net, subsets[32], cfg, ray_executor)
    assert len(local) >= 2
    assert [r.winner for r in remote] == [r.winner for r in local]
    for a, b in zip(remote, local):
        assert [r["shards_seen"] for r in a.table] == [r["shards_seen"] for r in b.table]
        np.testing.assert_allclose(a.losses, b.losses, rtol=REL)
    assert ray_net.widths() == local_net.widths()


@pytest.mark.timeout(120)
def test_search_actors_that_cannot_be_placed_are_a_clear_error(ray_executor, subsets):
    from laasp_dist.errors import LaaspError
    from laasp_dist.search.ray_executor import RayExecutor

    with pytest.raises(LaaspError, match="could not be placed within 3 s"):
        RayExecutor(subsets[32], 1, cpus_per_worker=64, start_timeout_s=3)
