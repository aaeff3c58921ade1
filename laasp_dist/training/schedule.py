"""The LAASP schedule (SPEC §1) as a small resumable state machine, and the learning-rate schedules.

Phases, in order:

- ``pretrain``: train epochs 0 .. prune.start_epoch-1;
- ``prune``: search/apply rounds until about ``recover_flops`` have gone since the last
  recovery (at least ``recover_flops - step_flops/2``: a step only lands near its size),
  or the target is reached; with ``prune.target: latency`` the same in the table-estimated
  latency (``target_latency_reduction``, ``step_latency``, ``recover_latency``), the
  caller passing the estimated latency reduction as ``reduction``. There, a recovery
  that starts within one ``recover_latency`` of the target (or at it) is preceded by a
  measured check (``"check_latency"``, at most ``prune.latency_checks`` in a run): the
  caller times the network and books the result with `book_latency_check`, which
  either settles the target (the measurement reached it) or moves the estimate's aim
  (`latency_table.next_latency_aim`);
- ``recover``: train ``recover_epochs`` epochs (ordinary epochs of the LR schedule),
  then back to ``prune`` — or, once the target is reached, on to
- ``finetune``: train up to ``train.total_epochs``;
- ``done``.

The reaching of the target is followed by its own recovery like any other
``recover_flops`` chunk. If pruning needs more epochs than ``total_epochs`` allows,
the run keeps going until the target is reached and its recovery is done
(``schedule_warnings`` says so before the run starts).

The whole state is a plain dict (``ScheduleState.as_dict``) so that checkpoints
stay loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..config import RunConfig

EPS = 1e-9
PHASES = ("pretrain", "prune", "recover", "finetune", "done")


def learning_rate(config: RunConfig, epoch: int) -> float:
    """LR of an epoch (set once at the start of every epoch, so it survives optimizer rebuilds and resumes).

    multistep: lr × gamma^(number of milestones ≤ epoch); cosine: lr/2 × (1 + cos(π·epoch/total_epochs)),
    clamped at the last epoch when pruning runs past total_epochs.
    """
    t = config.train
    if t.schedule == "multistep":
        return t.lr * t.gamma ** sum(1 for m in t.milestones if m <= epoch)
    progress = min(epoch, t.total_epochs - 1) / t.total_epochs
    return 0.5 * t.lr * (1.0 + math.cos(math.pi * progress))


def estimated_prune_epochs(config: RunConfig) -> int:
    """Epochs the pruning phase needs: one recovery per started recovery chunk of the target."""
    target, _, recover = config.prune.goal()
    return math.ceil(target / recover - EPS) * config.prune.recover_epochs


def schedule_warnings(config: RunConfig) -> list[str]:
    """Problems worth a warning (not an error) before a run starts."""
    out = []
    p = config.prune
    target, step, recover = p.goal()
    unit = "estimated latency" if p.target == "latency" else "FLOPs"
    need = p.start_epoch + estimated_prune_epochs(config)
    if need > config.train.total_epochs:
        out.append(
            f"pruning {unit} by {target:.0%} needs about {need} epochs "
            f"({config.prune.start_epoch} before pruning + {estimated_prune_epochs(config)} of recovery), more than "
            f"train.total_epochs={config.train.total_epochs}: the run will go on until the target is reached and recovered")
    if recover < step:
        kind = "latency" if p.target == "latency" else "flops"
        out.append(f"prune.recover_{kind} ({recover}) is below prune.step_{kind} ({step}): "
                   f"every round is followed by a recovery")
    return out


@dataclass
class ScheduleState:
    """Where a run stands; every field is a plain Python value."""

    phase: str = "pretrain"
    epoch: int = 0  # next epoch to train
    rounds: int = 0  # search rounds done
    recover_left: int = 0  # recovery epochs still to train in the current recovery
    reduction_at_recovery: float = 0.0  # reduction (in the target's unit) when the last recovery started
    target_reached: bool = False
    phase_seconds: dict[str, float] = field(default_factory=dict)
    latency_checks: list[dict[str, Any]] = field(default_factory=list)  # target=latency: `book_latency_check`

    @property
    def latency_aim(self) -> float | None:
        """The estimated reduction aimed at after the last measured check that moved the aim, if any."""
        aims = [c["next_aim"] for c in self.latency_checks if c["next_aim"] is not None]
        return aims[-1] if aims else None

    @property
    def latency_settled(self) -> bool:
        """A measured check reached the target."""
        return bool(self.latency_checks) and self.latency_checks[-1]["next_aim"] is None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ScheduleState":
        # checkpoints written before the two were derived from latency_checks still carry them
        return cls(**{k: v for k, v in data.items() if k not in ("latency_aim", "latency_settled")})

    def add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + float(seconds)


def next_action(state: ScheduleState, config: RunConfig, reduction: float) -> str:
    """Advance phase transitions that need no work and return what to do next.

    Returns one of ``"train"`` (train epoch ``state.epoch``), ``"round"`` (one search/apply
    round), ``"before_pruning"`` (measure the unpruned model, then pruning starts),
    ``"check_latency"`` (time the network, then `book_latency_check`) or ``"done"``.
    ``reduction`` is measured in the unit of ``prune.target`` (FLOPs, or estimated latency).
    """
    p, t = config.prune, config.train
    target, step, recover = p.goal()
    while True:
        if state.phase == "pretrain":
            if state.epoch < p.start_epoch:
                return "train"
            state.phase = "prune"
            return "before_pruning"
        if state.phase == "prune":
            goal = aim(state, config)
            reached = state.latency_settled or reduction >= goal - EPS
            # steps are only about one step each: recover once the next step would overshoot the
            # recovery mark by more than we are short of it
            chunk_done = reduction - state.reduction_at_recovery >= recover - step / 2 - EPS
            if (reached or chunk_done) and _check_due(state, config, reduction >= goal - recover - EPS):
                return "check_latency"
            if reached or chunk_done:
                state.target_reached = reached
                state.phase = "recover"
                state.recover_left = p.recover_epochs
                state.reduction_at_recovery = reduction
                continue
            return "round"
        if state.phase == "recover":
            if state.recover_left > 0:
                return "train"
            state.phase = "finetune" if state.target_reached else "prune"
            continue
        if state.phase == "finetune":
            if state.epoch < t.total_epochs:
                return "train"
            state.phase = "done"
        return "done"


def epoch_done(state: ScheduleState) -> None:
    """Book one trained epoch."""
    state.epoch += 1
    if state.phase == "recover":
        state.recover_left -= 1


def aim(state: ScheduleState, config: RunConfig) -> float:
    """The reduction pruning goes on to, in the target's unit: the target, or the aim of the last measured check."""
    return config.prune.goal()[0] if state.latency_aim is None else state.latency_aim


def _check_due(state: ScheduleState, config: RunConfig, near: bool) -> bool:
    """A measured latency check before this recovery: near the aim, checks left, none yet after this round."""
    p = config.prune
    return (p.target == "latency" and near and not state.latency_settled
            and len(state.latency_checks) < p.latency_checks
            and not (state.latency_checks and state.latency_checks[-1]["round"] == state.rounds))


def book_latency_check(state: ScheduleState, check: dict[str, Any], next_aim: float | None) -> None:
    """Record a measured check (`latency_table.measured_reduction`'s figures) and what follows: prune to
    `next_aim` (an estimated reduction), or, with None, the target is settled (reached)."""
    state.latency_checks.append({"round": state.rounds, "epoch": state.epoch, **check, "next_aim": next_aim})
