"""Real speed-up: rounded widths, latency tables (estimate vs. measurement), latency targets, bad input.

The Ray run with a latency target is in test_train_job.py (it shares that module's Ray session).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from laasp_dist.cli import main
from laasp_dist.config import PruneConfig, build_config
from laasp_dist.errors import ConfigError, PruningError
from laasp_dist.latency import pass_times_ms, resolve_round_to, torch_threads
from laasp_dist.latency_table import (LatencyModel, LatencyTableError, measure_table, measured_reduction,
                                      network_sites, next_latency_aim, read_table, reachable_ranges, run_table,
                                      write_table)
from laasp_dist.pruning import Arch, PrunableNetwork, load_slim_model, replay, save_slim_model
from laasp_dist.storage import Storage
from laasp_dist.pruning.baseline import prune_by_criterion
from laasp_dist.pruning.steps import macs_removed, min_width
from laasp_dist.search import build_subset, prune_to_target

R20 = Arch("resnet20", 10, 3, 32)


def rounded(widths: dict[str, int], original: dict[str, int], n: int) -> bool:
    """Every group a multiple of n, unless it was narrower than n to begin with."""
    return all(w % n == 0 or original[g] < n for g, w in widths.items())


# ------------------------------------------------------------------------------------------- round_to


@pytest.mark.parametrize("n", [8, 16])
def test_rounded_widths_after_every_step_and_in_the_saved_model(n, tmp_path):
    torch.manual_seed(0)
    net = PrunableNetwork.create(R20)
    prune_by_criterion(net, "l1", 0.45, step_fraction=0.04, round_to=n)
    assert net.macs_reduction >= 0.45 and len(net.prunes) >= 3
    step = PrunableNetwork.create(R20)
    for record in net.prunes:  # every intermediate network, rebuilt from the record
        replay(step, [record])
        assert rounded(step.widths(), step.original_widths, n), step.widths()
        assert all(step.widths()[g] >= min_width(w, 0.75) for g, w in step.original_widths.items())
    save_slim_model(net, tmp_path / "final")
    spec = json.loads((tmp_path / "final" / "spec.json").read_text())
    assert rounded(spec["widths"], spec["original_widths"], n)
    assert all(spec["layers"][name]["out_channels"] % n == 0 for name in spec["widths"])
    assert load_slim_model(tmp_path / "final").widths() == net.widths()


def test_a_group_narrower_than_n_keeps_at_least_one_channel_and_is_not_rounded():
    net = PrunableNetwork.create(R20)  # 16-channel groups with round_to 32: exempt, only the cap holds
    prune_by_criterion(net, "l2", 0.3, step_fraction=0.05, round_to=32, max_prune_ratio=0.9)
    widths = net.widths()
    assert any(w % 32 for g, w in widths.items() if net.original_widths[g] < 32)  # really pruned, unrounded
    assert all(w >= 1 for w in widths.values())
    assert all(w % 32 == 0 for g, w in widths.items() if net.original_widths[g] >= 32)


@pytest.mark.parametrize("n", [1, 8, 16])
def test_last_rounded_step_passes_the_target_by_less_than_n_channels(n):
    target = 0.30
    net = PrunableNetwork.create(R20)
    prune_by_criterion(net, "fpgm", target, step_fraction=0.04, round_to=n)
    before_last = replay(PrunableNetwork.create(R20), net.prunes[:-1])
    assert before_last.macs_reduction < target <= net.macs_reduction
    group = before_last.group(net.prunes[-1].group)
    # MACs are counted by torch (count_cost), the bound by the per-layer formula of N channels at that width
    over = (net.macs_reduction - target) * net.base_macs
    assert over < macs_removed(group, n, before_last.cost.layer_macs)


def test_round_to_resolves_per_device_and_bad_values_are_refused():
    assert resolve_round_to("auto", "cuda") == 8
    assert resolve_round_to("auto", "cpu") in (4, 8, 16)
    assert resolve_round_to(4, "cpu") == 4
    assert build_config({"ray": {"use_gpu": True}}).prune.round_to == 8
    assert build_config({}).prune.round_to == resolve_round_to("auto", "cpu")  # saved resolved in config.yaml
    for bad in (0, -8, "x", 2.5, True):
        with pytest.raises(ConfigError, match="prune.round_to"):
            build_config({"prune": {"round_to": bad}})


def test_flops_target_that_rounding_makes_unreachable_is_refused_before_any_work(fashion_train):
    subset = build_subset(fashion_train, 40, 2, seed=0)
    cfg = PruneConfig(criteria=["l1"], subset_size=40, subset_shards=2, target_flops_reduction=0.6, round_to=16)
    net = PrunableNetwork.create(R20)
    with pytest.raises(PruningError, match=r"60.0% is unreachable .* and round_to 16 at most"):
        prune_to_target(net, subset, cfg)
    assert not net.prunes


# ------------------------------------------------------------------------------------------- tables


def synthetic_table(arch: Arch, scale: float = 1.0) -> dict:
    """A table whose 'latencies' are a known bilinear function of the widths (so interpolation is exact)."""
    net = PrunableNetwork.create(arch)
    sites = network_sites(net)
    ranges = reachable_ranges(net, 0.75, 1)
    entries, layers = {}, {}
    for s in sites:
        grid = entries.setdefault(s.signature, [set() for _ in s.dims])
        for axis, (lo, hi) in enumerate(ranges[s.name]):
            grid[axis] |= {lo, hi, (lo + hi) // 2}
        layers[s.name] = {"signature": s.signature, "dims": list(s.dims)}
    signatures = {}
    for sig, axes in entries.items():
        grid = [sorted(a) for a in axes]
        ms = [[fake_ms(i, o) for o in grid[1]] for i in grid[0]] if len(grid) == 2 else [fake_ms(c) for c in grid[0]]
        signatures[sig] = {"params": json.loads(sig), "grid": grid, "ms": ms}
    total = sum(fake_ms(*layer["dims"]) for layer in layers.values())
    return {"format": "laasp-dist/latency-table", "version": 1, "model": arch.model, "num_classes": arch.num_classes,
            "input_shape": list(arch.input_shape), "device": {"kind": "cpu", "name": "cpu: test", "threads": 1},
            "batch": 4, "precision": "fp32", "channels_last": False, "round_to": 1, "max_prune_ratio": 0.75,
            "network_ms": scale * total, "layers": layers, "signatures": signatures}


def fake_ms(c_in: int, c_out: int | None = None) -> float:
    return 0.5 + 0.01 * c_in + (0.02 * c_out + 0.001 * c_in * c_out if c_out is not None else 0.0)


def layer_sum(net: PrunableNetwork, names) -> float:
    """Σ fake_ms over the modelled layers, read off the (physically pruned) modules."""
    total = 0.0
    for name, m in net.model.named_modules():
        if name not in names:
            continue
        if isinstance(m, nn.Conv2d):
            total += fake_ms(m.out_channels) if m.groups > 1 else fake_ms(m.in_channels, m.out_channels)
        elif isinstance(m, nn.BatchNorm2d):
            total += fake_ms(m.num_features)
        else:
            total += fake_ms(m.in_features, m.out_features)
    return total


@pytest.mark.parametrize("name", ["resnet20", "mobilenet_v2"])
def test_estimate_follows_the_widths_of_a_physically_pruned_network(name):
    arch = R20 if name == "resnet20" else Arch(name, 10, 3, 64)
    model = LatencyModel(synthetic_table(arch, scale=2.0))
    torch.manual_seed(0)
    net = PrunableNetwork.create(arch)
    names = model.table["layers"]
    assert model.estimate_ms(net) == pytest.approx(2 * layer_sum(net, names), rel=1e-9)
    for i, cand in enumerate(net.candidates(["l1"], 0.03, 0.75)[1::5][:4]):
        group = net.group(cand.group)
        saved = model.removed_ms(net, group, [cand.k, 1])
        what_if = model.estimate_ms(net, {cand.group: group.width - cand.k})
        before = model.estimate_ms(net)
        net.apply(cand)
        after = 2 * layer_sum(net, names)
        assert model.estimate_ms(net) == pytest.approx(after, rel=1e-9)
        assert what_if == pytest.approx(after, rel=1e-9)
        assert before - saved[0] == pytest.approx(after, rel=1e-9)
        assert 0 < saved[1] <= saved[0]
    assert model.reduction(net) == pytest.approx(1 - layer_sum(net, names) / layer_sum(PrunableNetwork.create(arch),
                                                                                       names), rel=1e-9)


def test_latency_target_stops_at_the_target_with_rounded_widths(fashion_train):
    model = LatencyModel(synthetic_table(R20))
    subset = build_subset(fashion_train, 20, 2, seed=0)
    cfg = PruneConfig(criteria=["l1", "fpgm"], subset_size=20, subset_shards=2, shard_batch_size=10,
                      target="latency", target_latency_reduction=0.3, step_latency=0.1, round_to=8)
    torch.manual_seed(0)
    net = PrunableNetwork.create(R20)
    widths = []
    results = prune_to_target(net, subset, cfg, latency=model, on_round=lambda r: widths.append(net.widths()))
    reductions = [1 - r.table[0]["latency_ms_before"] / model.original_ms for r in results[1:]]
    assert all(r < 0.3 for r in reductions)  # no round started after the target was reached
    final = 1 - layer_sum(net, model.table["layers"]) / layer_sum(PrunableNetwork.create(R20), model.table["layers"])
    assert 0.3 <= final < 0.3 + 0.1 and len(results) >= 3
    assert all(rounded(w, net.original_widths, 8) for w in widths)
    chosen = [row for r in results for row in r.table if row["chosen"]]
    assert all(row["latency_ms_after"] < row["latency_ms_before"] for row in chosen)


def test_latency_target_needs_a_table_and_a_reachable_target(fashion_train):
    subset = build_subset(fashion_train, 40, 2, seed=0)
    cfg = PruneConfig(criteria=["l1"], subset_size=40, subset_shards=2, target="latency",
                      target_latency_reduction=0.9, round_to=8)
    with pytest.raises(PruningError, match=r"target latency reduction 90.0% is unreachable .* estimates at most"):
        prune_to_target(PrunableNetwork.create(R20), subset, cfg, latency=LatencyModel(synthetic_table(R20)))
    with pytest.raises(ConfigError, match="needs a latency table"):
        prune_to_target(PrunableNetwork.create(R20), subset, cfg.model_copy(update={"target_latency_reduction": 0.2}))


def test_bad_tables_are_one_line_errors(tmp_path):
    table = synthetic_table(R20)
    model = LatencyModel(table)
    with pytest.raises(LatencyTableError, match="for resnet20 at 3x32x32, not resnet32"):
        model.check_fits(Arch("resnet32", 10))
    with pytest.raises(LatencyTableError, match="for resnet20 at 3x32x32, not resnet20 at 3x64x64"):
        model.check_fits(Arch("resnet20", 10, 3, 64))
    with pytest.raises(LatencyTableError, match="measured on cpu .* prunes for cuda"):
        model.check_fits(R20, device="cuda")
    with pytest.raises(LatencyTableError, match="measured on cpu: test, this run's device is cpu: other"):
        model.check_fits(R20, device="cpu", name="cpu: other")
    with pytest.raises(LatencyTableError, match="down to max_prune_ratio 0.75, the run allows 0.9"):
        model.check_fits(R20, max_prune_ratio=0.9)
    broken = copy.deepcopy(table)
    del broken["layers"]["layer1.0.conv1"]
    with pytest.raises(LatencyTableError, match="layers do not match resnet20"):
        LatencyModel(broken).check_fits(R20)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(LatencyTableError, match="not a readable latency table"):
        read_table(tmp_path / "junk.json")
    with pytest.raises(LatencyTableError, match="no latency table at"):
        read_table(tmp_path / "missing.json")
    write_table(table | {"version": 99}, tmp_path / "v99.json")
    with pytest.raises(LatencyTableError, match="latency-table version 99"):
        read_table(tmp_path / "v99.json")


def test_cli_refuses_a_table_for_another_model_before_any_work(tmp_path, capsys):
    write_table(synthetic_table(Arch("resnet32", 10)), tmp_path / "r32.json")
    config = tmp_path / "c.yaml"
    config.write_text("model: {name: resnet20}\nprune: {target: latency, latency_table: %s}\n" % (tmp_path / "r32.json"))
    assert main(["run", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "latency table is for resnet32" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["latency-table", "resnet20", "--out", str(tmp_path / "r32.json")]) == 2
    assert "exists: pass --force" in capsys.readouterr().err
    assert main(["latency-table", "resnet20", "--batch", "0", "--out", str(tmp_path / "t.json")]) == 2
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------------------------------- measured

# Measured with benchmarks/latency_table_accuracy.py (docs/benchmarks.md): on the dev CPU at batch 8, one thread,
# round_to 8, the largest relative error of the estimated speed-up over 5 slim ResNet-20s was 9.7 % (median
# 5.3 %, the estimate always below the measurement); the test allows a margin for a busier box.
TOLERANCE = 0.15
# The table and the networks are timed seconds apart; on a shared 2-core box a burst of other load in between
# skews one side (a CI run at load 3 saw 1.75 estimated vs 1.46 measured). A wrong table or estimate misses on
# every attempt; a burst of load does not last three.
ATTEMPTS = 3


def estimated_and_measured_speedups(nets: dict[str, PrunableNetwork], table_path: Path) -> dict[str, tuple[float, float]]:
    """(estimated, measured) speed-up over the original of every slim network, from a table measured now."""
    with torch_threads(1):
        write_table(measure_table(R20, batch=8, round_to=8, repeats=7, warmup=2, threads=1), table_path)
        times = pass_times_ms({k: v.model.eval() for k, v in nets.items()}, torch.randn(8, 3, 32, 32), 21, 3, False)
    model = LatencyModel(read_table(table_path))
    assert np.isfinite(model.original_ms) and model.original_ms > 0
    ms = {k: statistics.median(t) for k, t in times.items()}
    return {name: (model.original_ms / model.estimate_ms(net), ms["original"] / ms[name])
            for name, net in nets.items() if name != "original"}


@pytest.mark.timeout(300)
def test_table_estimate_matches_measured_latency_on_this_cpu(tmp_path):
    assert main(["latency-table", "resnet20", "--batch", "8", "--round-to", "8", "--repeats", "1", "--warmup", "0",
                 "--points", "2", "--threads", "1", "--out", str(tmp_path / "cli.json")]) == 0
    cli = read_table(tmp_path / "cli.json")
    assert cli["device"]["threads"] == 1 and cli["batch"] == 8
    nets = {"original": PrunableNetwork.create(R20)}
    for criterion, target in (("l1", 0.3), ("fpgm", 0.6)):
        torch.manual_seed(0)
        nets[criterion] = PrunableNetwork.create(R20)
        prune_by_criterion(nets[criterion], criterion, target, round_to=8)
    attempts = []
    for _ in range(ATTEMPTS):
        attempts.append(estimated_and_measured_speedups(nets, tmp_path / "t.json"))
        if all(e == pytest.approx(m, rel=TOLERANCE) for e, m in attempts[-1].values()):
            break
    assert all(e == pytest.approx(m, rel=TOLERANCE) for e, m in attempts[-1].values()), attempts
    assert read_table(tmp_path / "t.json")["layers"] == cli["layers"]


# ------------------------------------------------------------------------------------------- measured checks


def test_next_latency_aim_corrects_the_estimate_by_the_measured_ratio():
    cfg = PruneConfig(target="latency", target_latency_reduction=0.35, step_latency=0.04)
    # the miss of the first latency demo: estimated -35 %, measured -29.8 % -> aim at 1 - 0.65 * 0.65 / 0.702
    assert next_latency_aim(cfg, 0.35, 0.298, 0.9) == pytest.approx(1 - 0.65 * 0.65 / 0.702, rel=1e-12)
    # a check before the target, the table understating the savings: the aim comes down towards the estimate
    early = next_latency_aim(cfg, 0.25, 0.30, 0.9)
    assert early == pytest.approx(1 - 0.65 * 0.75 / 0.70, rel=1e-12) and 0.25 < early < 0.35
    assert next_latency_aim(cfg, 0.30, 0.331, 0.9) is None  # within half a step (0.02) of the target: reached
    assert next_latency_aim(cfg, 0.35, 0.40, 0.9) is None  # past it: nothing can be given back
    assert next_latency_aim(cfg, 0.35, 0.298, 0.38) == pytest.approx(0.38)  # at most what the caps reach
    assert next_latency_aim(cfg, 0.35, 0.298, 0.36) is None  # less than half a step left to gain


def test_a_measured_check_times_a_copy_and_leaves_the_training_network_alone():
    # one thread; the estimate is synthetic, the timing real. Batch 16: at the table's batch 4 ResNet-20 is
    # overhead-bound and a 60 % thinner network measured anywhere from -7 % to -27 % on a busy box
    model = LatencyModel({**synthetic_table(R20), "batch": 16})
    torch.manual_seed(0)
    net = PrunableNetwork.create(R20)
    prune_by_criterion(net, "fpgm", 0.6, round_to=8)
    net.model.train()
    weights = {k: v.clone() for k, v in net.model.state_dict().items()}
    rng = torch.get_rng_state()
    check = measured_reduction(model, net, torch.device("cpu"), build_config({}), repeats=5, warmup=1)
    assert torch.equal(torch.get_rng_state(), rng) and net.model.training
    assert all(torch.equal(v, weights[k]) for k, v in net.model.state_dict().items())
    assert check["estimated"] == pytest.approx(model.reduction(net), rel=1e-12) and check["batch"] == 16
    assert 0.2 < check["measured"] < 0.8 and check["ms"] < check["base_ms"]  # -60 % FLOPs runs faster, not 2.5x


def test_a_latency_run_without_a_table_measures_one_on_its_device_and_keeps_it(tmp_path):
    config = build_config({"prune": {"target": "latency", "target_latency_reduction": 0.1, "round_to": 8,
                                     "latency_batch": 4}})
    arch = R20
    rng = torch.get_rng_state()
    table = run_table(config, Storage(tmp_path), arch, torch.device("cpu"), say=lambda _: None)
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is a FLOPs-targeted run's
    assert read_table(tmp_path / "latency_table.json") == table
    assert table["batch"] == 4 and table["round_to"] == 8 and table["device"]["threads"] == os.cpu_count()
    assert run_table(config, Storage(tmp_path), arch, torch.device("cpu"), say=lambda _: None) == table  # kept
    assert run_table(build_config({}), Storage(tmp_path / "flops"), arch, torch.device("cpu")) is None
    far = config.model_copy(update={"prune": config.prune.model_copy(update={"target_latency_reduction": 0.95})})
    with pytest.raises(PruningError, match="target latency reduction 95.0% is unreachable for resnet20"):
        run_table(far, Storage(tmp_path), arch, torch.device("cpu"))
