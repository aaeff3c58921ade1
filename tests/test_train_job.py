"""The main job end to end on tiny real data (Fashion-MNIST) with 2 Ray Train workers on CPU.

One embedded Ray (conftest) serves the module; the uninterrupted tiny run (conftest) is shared
with other modules (test_run_storage kills its workers mid-run and compares with it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import TINY, TINY_TARGET
from laasp_dist.config import build_config
from laasp_dist.pruning import load_slim_model
from laasp_dist.storage import Storage
from laasp_dist.training import latest_state, run_job
from laasp_dist.training.data import load_splits

TARGET = TINY_TARGET
# The variants below need a whole schedule, not the tiny run's length: two rounds to -10 % in two epochs (the first
# round is the tiny run's own: same network, subset and candidates).
SHORT = {"train": {"total_epochs": 2}, "prune": {"target_flops_reduction": 0.1}}


def short_tiny(**changes: dict) -> dict:
    """TINY shortened to SHORT, with `changes` (section -> keys) on top."""
    import copy

    cfg = copy.deepcopy(TINY)
    for section, values in [*SHORT.items(), *changes.items()]:
        cfg[section] = {**cfg[section], **values}
    return cfg


@pytest.fixture(scope="module")
def full_run(tiny_run: Path) -> Path:
    return tiny_run


@pytest.mark.timeout(900)
def test_full_schedule_reaches_target_and_final_model_stands_alone(full_run: Path) -> None:
    import json

    summary = json.loads((full_run / "summary.json").read_text())
    reduction = summary["flops_reduction"]
    last = latest_state(Storage(full_run))["rounds"][-1]
    assert TARGET <= reduction <= TARGET + last["channel_flops_share"] + 1e-9
    assert summary["final"]["macs"] < summary["base"]["macs"]
    assert summary["before_pruning"]["test_top1"] is not None
    for key in ("pretrain", "search", "recovery", "eval", "final_eval", "setup"):
        assert key in summary["phase_seconds"]

    # final/ alone: rebuilt from its spec, measured here with our own loop on the run's test split
    net = load_slim_model(full_run / "final")
    assert net.cost.macs == summary["final"]["macs"]
    assert abs(net.macs_reduction - reduction) < 1e-12
    splits = load_splits(build_config(TINY))
    test = splits.test
    x = (test.images.float() / 255 - torch.tensor(test.mean).view(1, -1, 1, 1)) / torch.tensor(test.std).view(1, -1, 1, 1)
    net.model.eval()
    with torch.no_grad():
        pred = torch.cat([net.model(x[i:i + 50]).argmax(1) for i in range(0, len(x), 50)])
    top1 = (pred == test.labels).double().mean().item()
    assert top1 == pytest.approx(summary["final_metrics"]["test_top1"], abs=1e-12)

    history = pd.read_parquet(full_run / "history.parquet")
    assert history["round"].nunique() == summary["rounds"] >= 2
    assert history.groupby("round")["chosen"].sum().eq(1).all()
    assert latest_state(Storage(full_run))["schedule"]["phase"] == "done"


@pytest.mark.timeout(900)
def test_ranks_hold_identical_weights_after_every_prune(full_run: Path) -> None:
    import json

    summary = json.loads((full_run / "summary.json").read_text())
    checks = {c["after"]: c["digests"] for c in summary["sync_checks"]}
    for r in range(1, summary["rounds"] + 1):
        digests = checks[f"round {r}"]
        assert len(digests) == 2 and digests[0] == digests[1]
    assert len({d[0] for d in checks.values()}) == len(checks)  # the weights did change between rounds


@pytest.mark.timeout(900)
def test_tensorboard_has_the_scalars(full_run: Path) -> None:
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/top1", "val/loss", "val/top1", "lr", "model/macs", "model/params",
                "prune/flops_reduction", "prune/winner_loss", "prune/winner_criterion", "train/images_per_s",
                "memory/epoch_peak_mib", "memory/round_peak_mib"):
        assert tag in tags, tag
    summary = json.loads((full_run / "summary.json").read_text())
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(summary["epochs"]))
    assert [e.step for e in acc.Scalars("prune/winner_loss")] == list(range(1, summary["rounds"] + 1))
    assert [e.value for e in acc.Scalars("prune/winner_loss")] == pytest.approx([w["loss"] for w in summary["winners"]])
    assert np.all(np.diff([e.value for e in acc.Scalars("model/macs")]) <= 0)
    assert "model/widths" in acc.Tags()["images"]


@pytest.mark.timeout(900)
def test_scoring_on_the_training_ranks_with_momentum_reset(ray_session, full_run: Path, tmp_path: Path) -> None:
    """search_executor=ranks and keep_momentum=false (the reference) complete the schedule,
    with `taylor` (gradient statistics: the candidate list comes from rank 0) in the pool; the first round,
    scored on the same network and subset, gives the same candidate losses as the actors."""
    import json

    cfg = short_tiny(ray={"search_executor": "ranks"}, train={"keep_momentum": False},
                     prune={"criteria": ["l1", "fpgm", "taylor"]})
    summary = run_job(build_config(cfg), tmp_path / "run")
    target = cfg["prune"]["target_flops_reduction"]
    assert target <= summary["flops_reduction"] < target + 0.05 and summary["rounds"] >= 2
    assert all(len(set(c["digests"])) == 1 for c in summary["sync_checks"])
    ours = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert set(ours["criterion"]) == {"l1", "fpgm", "taylor"} and ours["loss"].notna().all()
    ours = ours[ours["criterion"] != "taylor"]
    theirs = pd.read_parquet(full_run / "history.parquet")
    first = ours[ours["round"] == 1].reset_index(drop=True)
    ref = theirs[theirs["round"] == 1].reset_index(drop=True)
    assert list(first["group"]) == list(ref["group"]) and list(first["criterion"]) == list(ref["criterion"])
    np.testing.assert_allclose(first["loss"], ref["loss"], rtol=1e-5)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["rounds"] == summary["rounds"]


@pytest.mark.timeout(240)
def test_importance_selection_prunes_without_subset_losses(ray_session, tmp_path: Path) -> None:
    """prune.selection=importance runs the same schedule with no subset loss: NaN in the history, None in the
    summary's winners, and each round's winner is its lowest importance per % FLOPs."""
    import json

    cfg = short_tiny(prune={"selection": "importance"})
    summary = run_job(build_config(cfg), tmp_path / "run")
    target = cfg["prune"]["target_flops_reduction"]
    assert target <= summary["flops_reduction"] < target + 0.05 and summary["rounds"] >= 2
    history = pd.read_parquet(tmp_path / "run" / "history.parquet")
    assert history["loss"].isna().all() and history["importance"].notna().all()
    for _, rows in history.groupby("round"):
        assert rows["chosen"].sum() == 1 and rows.loc[rows["chosen"], "importance"].iloc[0] == rows["importance"].min()
    winners = json.loads((tmp_path / "run" / "summary.json").read_text())["winners"]
    assert len(winners) == summary["rounds"] and all(w["loss"] is None for w in winners)


@pytest.mark.timeout(600)
def test_latency_target_run_checks_the_measurement_and_prunes_on_when_the_table_overstates(ray_session, tmp_path: Path,
                                                                                           capsys) -> None:
    """A table that overstates the savings (this CPU's, every layer's share of its full-width latency raised to
    the 4th power): the run prunes by its estimate towards the target, measures, finds the network far short,
    aims the estimate further and, its one check spent, prunes on to that aim; widths rounded to 8 after every round; estimated and measured
    latency reported. (A run measuring its own table: test_latency.py; more checks: test_train_units.py.)"""
    import copy
    import json

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from laasp_dist.cli import main
    from laasp_dist.latency_table import LatencyModel, measure_table, read_table, write_table
    from laasp_dist.monitoring.report import write_report
    from laasp_dist.pruning import Arch, PrunableNetwork, replay

    target, step = 0.5, 0.1  # far above what the network measures when its overstated estimate nears the target
    table = measure_table(Arch("resnet20", 10, 3, 32), batch=8, round_to=8, points=3, repeats=3, warmup=1, threads=1)
    for entry in table["signatures"].values():  # every layer's share of its full-width time, to the 4th power
        ms = np.asarray(entry["ms"])
        full = ms[(-1,) * ms.ndim]
        entry["ms"] = (full * (ms / full) ** 4).tolist()
    write_table(table, tmp_path / "overstated.json")
    cfg = copy.deepcopy(TINY)
    cfg["prune"] |= {"target": "latency", "target_latency_reduction": target, "step_latency": step,
                     "recover_latency": 0.2, "round_to": 8, "latency_checks": 1,
                     "latency_table": str(tmp_path / "overstated.json")}
    run = tmp_path / "run"
    summary = run_job(build_config(cfg), run)
    assert read_table(run / "latency_table.json") == read_table(tmp_path / "overstated.json")  # kept beside the run
    model = LatencyModel(table)
    final = load_slim_model(run / "final")
    net = PrunableNetwork.create(final.arch)
    reductions = []
    for record in final.prunes:  # the network after every round, rebuilt from the record
        replay(net, [record])
        reductions.append(model.reduction(net))
        assert all(w % 8 == 0 for w in net.widths().values()), net.widths()
    assert len(reductions) == summary["rounds"]
    (check,) = summary["latency_checks"]
    # the check: before a recovery within one recovery of the target, not after the target; measured far short
    assert check["estimated"] == pytest.approx(reductions[check["round"] - 1], rel=1e-9)
    assert check["estimated"] >= target - 0.2 and all(r < target for r in reductions[:check["round"] - 1])
    # measured more than half a step short, so the aim moves on past the estimate; past the target too only where
    # the measurement falls below the estimate, which the overstated table makes likely, not certain (on the CI
    # box one check measured -34.74 % against an estimated -34.72 %, and the aim became -49.99 %)
    assert check["measured"] < target - step / 2 and check["next_aim"] > check["estimated"]
    assert check["next_aim"] == pytest.approx(1 - (1 - target) * (1 - check["estimated"]) / (1 - check["measured"]))
    # then pruned on, by the estimate, to the aim
    assert len(reductions) > check["round"] and reductions[-1] >= check["next_aim"]
    assert all(r < check["next_aim"] for r in reductions[check["round"]:-1])
    assert all(w % 8 == 0 for w in json.loads((run / "final" / "spec.json").read_text())["widths"].values())
    latency = summary["latency"]
    assert latency["estimated"]["reduction"] == pytest.approx(reductions[-1], rel=1e-9)
    assert latency["measured"]["batch"] == 8 and latency["measured"]["final_ms"] > 0
    assert latency["flops_promise"] == pytest.approx(summary["base"]["macs"] / summary["final"]["macs"])
    assert summary["target"] == "latency" and summary["round_to"] == 8
    history = pd.read_parquet(run / "history.parquet")
    assert history["latency_ms_after"].notna().all()
    assert (history["latency_ms_after"] < history["latency_ms_before"]).all()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"model/latency_ms_est", "prune/latency_reduction_est", "prune/round_latency_ms_est",
            "prune/latency_check_measured", "final/speedup_measured", "final/latency_ms_measured"} <= tags

    write_report(run)
    text = (run / "report" / "summary.txt").read_text()
    assert "measured speed-up" in text and "FLOPs promise" in text and "table estimate" in text
    assert "latency check 1 after round" in text and "aiming at" in text
    capsys.readouterr()
    assert main(["latency", str(run), "--batch", "8", "--repeats", "2", "--warmup", "0", "--json"]) == 0
    est = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["table_estimate"]
    assert est["batch"] == 8 and est["speedup"] == pytest.approx(latency["estimated"]["speedup"], rel=1e-9)
