"""Pieces of the training job that need no Ray: schedule, LR, momentum slicing, checkpoints, run-folder rules."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from laasp_dist.config import build_config
from laasp_dist.errors import ConfigError
from laasp_dist.pruning import Arch, PrunableNetwork
from laasp_dist.storage import Storage
from laasp_dist.training import CheckpointError, RunDirError
from laasp_dist.training.checkpoint import CHECKPOINT_DIR, STATE_FILE, checkpoint_name, latest_state, write_state
from laasp_dist.training.job import check_run_dir
from laasp_dist.training.momentum import load_momentum, momentum_by_name, removed_indices, slice_momentum
from laasp_dist.training.schedule import (ScheduleState, book_latency_check, epoch_done, learning_rate, next_action,
                                          schedule_warnings)

REPO = Path(__file__).resolve().parents[1]


def _walk(config, step: float) -> list[str]:
    """Actions of a whole schedule when every round removes `step` of the FLOPs."""
    state, reduction, actions = ScheduleState(), 0.0, []
    while (a := next_action(state, config, reduction)) != "done":
        actions.append(a if a != "train" else f"train:{state.phase}")
        if a == "train":
            epoch_done(state)
        elif a == "round":
            reduction = min(config.prune.target_flops_reduction, reduction + step)
            state.rounds += 1
        assert len(actions) < 1000
    return actions


def test_schedule_follows_spec_order() -> None:
    cfg = build_config({"train": {"total_epochs": 8},
                        "prune": {"start_epoch": 2, "target_flops_reduction": 0.05, "step_flops": 0.01,
                                  "recover_flops": 0.02, "recover_epochs": 1}})
    actions = _walk(cfg, 0.01)
    assert actions == (["train:pretrain"] * 2 + ["before_pruning"]
                       + ["round", "round", "train:recover"] * 2 + ["round", "train:recover"]
                       + ["train:finetune"] * 3)


def test_schedule_overrun_warns_and_still_reaches_target() -> None:
    cfg = build_config({"train": {"total_epochs": 3},
                        "prune": {"start_epoch": 2, "target_flops_reduction": 0.1, "step_flops": 0.02,
                                  "recover_flops": 0.02, "recover_epochs": 1}})
    assert any("more than train.total_epochs" in w for w in schedule_warnings(cfg))
    actions = _walk(cfg, 0.02)
    assert actions.count("round") == 5 and actions[-1] == "train:recover"


def _walk_latency(cfg, measured: dict[float, tuple[float, float | None]]) -> tuple[list[str], ScheduleState]:
    """Actions of a latency-targeted schedule whose rounds each remove 0.1 of the estimate; a check at estimate e
    'measures' measured[e] = (measured reduction, the aim the coordinator would then set)."""
    state, reduction, actions = ScheduleState(), 0.0, []
    while (a := next_action(state, cfg, reduction)) != "done":
        actions.append(a)
        if a == "train":
            epoch_done(state)
        elif a == "round":
            reduction, state.rounds = round(reduction + 0.1, 6), state.rounds + 1
        elif a == "check_latency":
            m, aim = measured[reduction]
            book_latency_check(state, {"estimated": reduction, "measured": m}, aim)
        assert len(actions) < 100
    return actions, state


def test_latency_target_checks_the_measurement_near_the_target_and_moves_the_aim() -> None:
    """A recovery within recover_latency of the aim (or at it) is preceded by one measured check; a check that
    moves the aim sends pruning on to it, one that reaches the target ends pruning even below the estimate's
    target; none once latency_checks are spent, or with 0."""
    base = {"train": {"total_epochs": 6},
            "prune": {"start_epoch": 1, "target": "latency", "target_latency_reduction": 0.2, "step_latency": 0.1,
                      "recover_latency": 0.2, "recover_epochs": 1}}
    cfg = build_config(base)
    actions, state = _walk_latency(cfg, {0.2: (0.12, 0.4), 0.4: (0.25, None)})
    assert actions == (["train", "before_pruning", "round", "round", "check_latency", "train",
                        "round", "round", "check_latency", "train"] + ["train"] * 3)
    assert [(c["round"], c["estimated"], c["next_aim"]) for c in state.latency_checks] == [(2, 0.2, 0.4),
                                                                                          (4, 0.4, None)]
    assert state.latency_settled and state.target_reached and state.latency_aim == 0.4
    assert ScheduleState.from_dict(state.as_dict()) == state  # checkpointed as plain values
    # checkpoints of 48a14e3..4ee3a6c also stored the aim and the settled flag, now derived from the checks
    assert ScheduleState.from_dict(state.as_dict() | {"latency_aim": 0.4, "latency_settled": True}) == state
    # target 0.5, recoveries every 0.2: no check at 0.2 (more than one recovery away), one at 0.4 measures 0.5
    far = build_config(base | {"prune": base["prune"] | {"target_latency_reduction": 0.5}})
    actions, state = _walk_latency(far, {0.4: (0.5, None)})
    assert actions[:8] == ["train", "before_pruning", "round", "round", "train", "round", "round", "check_latency"]
    assert state.latency_settled and state.rounds == 4 and actions.count("check_latency") == 1
    one = build_config(base | {"prune": base["prune"] | {"latency_checks": 1}})
    actions, state = _walk_latency(one, {0.2: (0.12, 0.4)})  # the one check spent: pruned on to the aim by estimate
    assert actions.count("check_latency") == 1 and state.rounds == 4 and not state.latency_settled
    none = build_config(base | {"prune": base["prune"] | {"latency_checks": 0}})
    actions, state = _walk_latency(none, {})
    assert "check_latency" not in actions and state.rounds == 2


def test_learning_rate_schedules() -> None:
    ms = build_config({"train": {"lr": 0.1, "milestones": [2, 4], "gamma": 0.1, "total_epochs": 6},
                       "prune": {"start_epoch": 1}})
    assert [round(learning_rate(ms, e), 6) for e in range(6)] == [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    cos = build_config({"train": {"lr": 0.2, "schedule": "cosine", "total_epochs": 4}, "prune": {"start_epoch": 1}})
    assert learning_rate(cos, 0) == pytest.approx(0.2)
    assert learning_rate(cos, 2) == pytest.approx(0.1)
    assert learning_rate(cos, 9) == pytest.approx(0.1 * (1 + math.cos(math.pi * 3 / 4)))


@pytest.mark.parametrize("group_index", [0, 1, 3])
def test_momentum_is_sliced_like_the_weights(group_index: int) -> None:
    """With every momentum buffer set to a copy of its parameter, slicing must give the pruned parameters."""
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10))
    opt = torch.optim.SGD(net.model.parameters(), lr=0.1, momentum=0.9)
    for p in net.model.parameters():
        opt.state[p]["momentum_buffer"] = p.detach().clone()
    group = net.groups[group_index]
    channels = (0, 3, 5)
    buffers = momentum_by_name(opt, net.model)
    removed = removed_indices(group, channels)
    net.prune(group.name, channels)
    new = dict(net.model.named_parameters())
    sliced = slice_momentum(buffers, removed, {n: p.shape for n, p in new.items()})
    assert set(sliced) == set(new)
    for name, p in new.items():
        assert torch.equal(sliced[name], p.detach()), name
    opt2 = torch.optim.SGD(net.model.parameters(), lr=0.1, momentum=0.9)
    assert load_momentum(opt2, net.model, sliced) == len(new)


def _checkpoint(run: Path, index: int, payload: dict) -> Path:
    """A checkpoint directory as Ray Train leaves it in the run folder."""
    folder = run / CHECKPOINT_DIR / checkpoint_name(index)
    folder.mkdir(parents=True)
    return write_state(folder, payload)


def test_checkpoint_round_trip_skips_a_cut_off_one_and_names_damage(tmp_path: Path) -> None:
    run = Storage(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        latest_state(run)
    _checkpoint(tmp_path, 1, {"model": {"w": torch.ones(2)}, "history": [{"round": 1, "loss": 0.5}],
                              "rng": torch.get_rng_state()})
    _checkpoint(tmp_path, 2, {"model": {"w": torch.zeros(2)}, "history": []})
    assert torch.equal(latest_state(run)["model"]["w"], torch.zeros(2))  # the newest
    (tmp_path / CHECKPOINT_DIR / checkpoint_name(3)).mkdir()  # an upload that was cut off: no state.pt
    data = latest_state(run)
    assert data["history"] == [] and torch.equal(data["model"]["w"], torch.zeros(2))
    (tmp_path / CHECKPOINT_DIR / checkpoint_name(2) / STATE_FILE).write_bytes(b"garbage")
    assert latest_state(run)["history"][0]["loss"] == 0.5  # a damaged newest one: the one before it
    (tmp_path / CHECKPOINT_DIR / checkpoint_name(1) / STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        latest_state(run)


def test_run_folder_rules(tmp_path: Path) -> None:
    cfg = build_config({})
    check_run_dir(Storage(tmp_path / "new"), cfg, resume=False)  # missing: fine
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text("{}")
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir(Storage(tmp_path / "old"), cfg, resume=False)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        check_run_dir(Storage(tmp_path / "old"), cfg, resume=True)


def test_resume_refuses_a_changed_config(tmp_path: Path) -> None:
    from laasp_dist.config import save_config

    cfg = build_config({"prune": {"step_flops": 0.02}})
    save_config(cfg, tmp_path / "config.yaml")
    _checkpoint(tmp_path, 1, {"model": {}, "config": cfg.model_dump(mode="json")})
    run = Storage(tmp_path)
    check_run_dir(run, build_config({"prune": {"step_flops": 0.02}, "ray": {"num_workers": 4}}), resume=True)
    with pytest.raises(ConfigError, match="prune.step_flops was 0.02"):
        check_run_dir(run, build_config({}), resume=True)
    (tmp_path / "config.yaml").unlink()  # the checkpoint alone carries the config too
    with pytest.raises(ConfigError, match="prune.step_flops was 0.02 in .*checkpoints"):
        check_run_dir(run, build_config({}), resume=True)


@pytest.mark.parametrize("args, message", [
    (["--set", "train.bogus=1"], "config error at train.bogus"),
    (["--set", "train.total_epochs=abc"], "config error at train.total_epochs"),
    (["--resume"], "cannot resume"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    proc = run_cli("run", REPO / "jobs" / "demo.yaml", "--out", tmp_path / "run", *args)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_run_folder_errors_reach_the_cli_as_one_line_exit_2(tmp_path: Path) -> None:
    """RunDirError and CheckpointError as the user meets them: `laasp-dist run` on a folder that holds a run,
    and `--resume` on one whose only checkpoint is damaged; one line, exit 2, nothing in the folder touched."""
    def run(out: Path, *args: str) -> subprocess.CompletedProcess:
        return run_cli("run", REPO / "jobs" / "demo.yaml", "--out", out, *args)

    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "summary.json").write_text("{}")
    damaged = _checkpoint(tmp_path / "damaged", 1, {"model": {}})
    damaged.write_bytes(b"garbage")
    for proc, message in [(run(tmp_path / "old"), "is not empty: pass --resume"),
                          (run(tmp_path / "damaged", "--resume"), "is not a readable checkpoint")]:
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("laasp-dist: error: ") and message in lines[0], proc.stderr
    assert (tmp_path / "old" / "summary.json").read_text() == "{}" and damaged.read_bytes() == b"garbage"
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == ["summary.json"]


def test_jobs_configs_validate() -> None:
    from laasp_dist.config import load_config

    for path in sorted((REPO / "jobs").glob("*.yaml")):
        load_config(path)


def test_worker_errors_come_back_as_one_laasp_line() -> None:
    from ray.train.v2.api.exceptions import WorkerGroupError

    from laasp_dist.errors import DataError
    from laasp_dist.training.job import user_error

    inner = DataError("3 images are too few")
    try:
        try:
            raise inner
        except DataError as exc:
            raise RuntimeError("wrapped") from exc
    except RuntimeError as wrapped:
        err = WorkerGroupError("Training failed", {1: wrapped})
    found = user_error(err)
    assert type(found) is DataError and str(found) == str(inner)
    assert user_error(WorkerGroupError("x", {0: RuntimeError("y")})) is None
