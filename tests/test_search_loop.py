"""The pruning loop: reproducible history, history.parquet, and bad input refused before any work."""

from __future__ import annotations

import pytest
import torch

from laasp_dist.config import PruneConfig
from laasp_dist.errors import ConfigError, DataError, PruningError
from laasp_dist.pruning import Arch, PrunableNetwork
from laasp_dist.search import (LocalExecutor, ScoreOptions, build_subset, check_search_inputs, max_reduction,
                               prune_to_target, read_history, search_round)
from laasp_dist.search.loop import HISTORY_COLUMNS


def net_of(seed: int = 0, name: str = "resnet20") -> PrunableNetwork:
    torch.manual_seed(seed)
    return PrunableNetwork.create(Arch(name, 10, 3, 32))


def cfg_of(**kw) -> PruneConfig:
    base = dict(criteria=["l1", "fpgm"], subset_size=60, subset_shards=2, shard_batch_size=30,
                target_flops_reduction=0.05, step_flops=0.02, round_to=1)  # unrounded steps (rounding: test_latency)
    return PruneConfig(**(base | kw))


class SpyExecutor(LocalExecutor):
    """Counts the shard tasks it ran."""

    tasks = 0

    def run(self, tasks):
        SpyExecutor.tasks += len(tasks)
        return super().run(tasks)


def test_same_seed_same_subset_and_same_history(fashion_train, tmp_path):
    runs = []
    for i in range(2):
        subset = build_subset(fashion_train, 60, 2, seed=3)
        net = net_of(0)
        results = prune_to_target(net, subset, cfg_of(), seed=5, history_path=tmp_path / f"h{i}.parquet")
        runs.append((results, read_history(tmp_path / f"h{i}.parquet"), net.widths()))
    (a, ha, wa), (b, hb, wb) = runs
    assert len(a) >= 2 and [r.winner for r in a] == [r.winner for r in b]
    assert ha == hb and wa == wb
    assert set(HISTORY_COLUMNS) <= set(ha[0])
    rounds = sorted({row["round"] for row in ha})
    assert rounds == list(range(len(a)))
    for r in rounds:
        rows = [row for row in ha if row["round"] == r]
        assert sum(row["chosen"] for row in rows) == 1
        chosen = next(row for row in rows if row["chosen"])
        assert chosen["loss"] == min(row["loss"] for row in rows)
        assert chosen["macs_after"] < chosen["macs_before"]
    # the run stops on the target: the last step is trimmed, not a whole step past it
    net = net_of(0)
    for r in a:
        net.apply(r.winner)
    assert 0.05 <= net.macs_reduction < 0.05 + 0.02


def test_round_table_rows_follow_candidate_order(fashion_train):
    subset = build_subset(fashion_train, 60, 2, seed=0)
    net = net_of(1)
    result = search_round(net, subset, cfg_of(criteria=["l2", "cosine", "l1"]), round_index=4)
    names = [g.name for g in net.groups]
    keys = [(names.index(r["group"]), ["l2", "cosine", "l1"].index(r["criterion"])) for r in result.table]
    assert keys == sorted(keys) and all(r["round"] == 4 for r in result.table)


def test_unknown_criterion_is_refused_before_any_work(fashion_train):
    with pytest.raises(ConfigError, match="unknown criterion 'taylorr'"):
        cfg_of(criteria=["l1", "taylorr"])
    bad = cfg_of().model_copy(update={"criteria": ["l1", "taylorr"]})  # bypassing validation
    subset = build_subset(fashion_train, 60, 2, seed=0)
    SpyExecutor.tasks = 0
    with pytest.raises(ConfigError, match="unknown criterion 'taylorr'"):
        prune_to_target(net_of(), subset, bad, SpyExecutor(subset))
    with pytest.raises(ConfigError, match="unknown search evaluator"):
        prune_to_target(net_of(), subset, cfg_of().model_copy(update={"search": "fastest"}), SpyExecutor(subset))
    assert SpyExecutor.tasks == 0


def test_unreachable_target_is_refused_before_any_work(fashion_train):
    subset = build_subset(fashion_train, 60, 2, seed=0)
    net = net_of()
    reachable = max_reduction(net, 0.3)
    assert 0.3 < reachable < 0.7
    SpyExecutor.tasks = 0
    with pytest.raises(PruningError, match=r"target FLOPs reduction 70.0% is unreachable .* max_prune_ratio 0.3"):
        prune_to_target(net, subset, cfg_of(target_flops_reduction=0.7, max_prune_ratio=0.3), SpyExecutor(subset))
    assert SpyExecutor.tasks == 0 and not net.prunes


def test_max_reduction_matches_cutting_every_group_to_its_cap():
    net = net_of()
    expected = max_reduction(net, 0.5)
    from laasp_dist.pruning.steps import min_width
    for g in list(net.groups):
        keep = min_width(net.original_widths[g.name], 0.5)
        net.prune(g.name, range(keep, net.group(g.name).width))
    assert net.macs_reduction == pytest.approx(expected, abs=1e-9)


def test_bad_subset_input_is_refused(fashion_train):
    subset = build_subset(fashion_train, 60, 2, seed=0)
    with pytest.raises(DataError, match="bn_recalibration asks for 100 images"):
        check_search_inputs(net_of(), subset, cfg_of(bn_recalibration=100))
    with pytest.raises(ConfigError, match="different scoring subset"):
        search_round(net_of(), subset, cfg_of(), executor=LocalExecutor(build_subset(fashion_train, 40, 2, seed=0)))
    with pytest.raises(ConfigError):
        ScoreOptions(0, 10)


def test_importance_selection_picks_the_least_importance_per_flop_without_scoring(fashion_train, tmp_path):
    """selection=importance: same candidates as a loss round, no shard task at all, and the winner is the
    lowest Σ normalised importance of the removed channels per % of the original FLOPs that pruning a copy
    actually removes; loss is NaN. Then a whole run to the target on that rule alone."""
    import copy
    import math

    from laasp_dist.pruning import get_criterion
    from laasp_dist.pruning.importance import group_importance

    subset = build_subset(fashion_train, 60, 2, seed=0)
    net = net_of(2)
    net.apply(net.candidates(["l1"], 0.03, 0.75)[5])  # a network that was pruned before
    SpyExecutor.tasks = 0
    result = search_round(net, subset, cfg_of(criteria=["l1", "fpgm"], selection="importance"),
                          executor=SpyExecutor(subset))
    assert SpyExecutor.tasks == 0 and result.evaluator == "importance"
    by_loss = search_round(net, subset, cfg_of(criteria=["l1", "fpgm"]))
    assert [r["channels"] for r in result.table] == [r["channels"] for r in by_loss.table]
    keys = []
    for row in result.table:
        scores = group_importance(net.group(row["group"]), get_criterion(row["criterion"]))
        clone = PrunableNetwork(copy.deepcopy(net.model), net.arch, base_macs=net.base_macs)
        clone.prune(row["group"], row["channels"])
        removed_pct = 100 * (net.cost.macs - clone.cost.macs) / net.base_macs
        keys.append(float(scores[row["channels"]].sum()) / removed_pct)
        assert math.isnan(row["loss"]) and row["shards_seen"] == 0
    assert [r["importance"] for r in result.table] == pytest.approx(keys, rel=1e-9)
    assert [r["importance"] for r in by_loss.table] == pytest.approx(keys, rel=1e-9)
    best = min(range(len(keys)), key=lambda i: (keys[i], i))
    assert [r["chosen"] for r in result.table] == [i == best for i in range(len(keys))]
    assert math.isnan(result.loss)

    results = prune_to_target(net, subset, cfg_of(selection="importance", target_flops_reduction=0.2),
                              SpyExecutor(subset), history_path=tmp_path / "h.parquet")
    assert SpyExecutor.tasks == 0 and 0.2 <= net.macs_reduction < 0.22
    history = read_history(tmp_path / "h.parquet")
    assert len({r["round"] for r in history}) == len(results) and all(math.isnan(r["loss"]) for r in history)
