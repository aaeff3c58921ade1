"""The entry point of every Ray Train worker, `train_worker(loop_config)`, and the `Worker` that runs one rank.

A `Worker` walks the schedule (`schedule.next_action`): train an epoch (`trainer.EpochTrainer`),
measure before pruning, or run a pruning round (`coordinator.Coordinator`), and after each
reports a checkpoint (`run_record.RunRecord`); at the end it writes final/ and summary.json.
Rank 0 is the coordinator; what only it keeps is None elsewhere. A worker group that Ray
restarts after a failure starts again from `ray.train.get_checkpoint()`.

Devices and arithmetic: with ``ray.use_gpu`` each worker makes its Ray-assigned GPU the
current CUDA device before any collective or DALI pipeline; forward passes run under
`laasp_dist.precision` (``train.precision``, ``train.channels_last``). Before a new network
is installed the previous one, its DDP wrapper, compiled graph and optimizer are released,
and the peak memory of every epoch and round is recorded (`memory.PeakMemory`).
"""

from __future__ import annotations

import os
import platform
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from ..config import RunConfig
from ..errors import DeviceError
from ..latency import device_name
from ..precision import Numerics, train_numerics
from ..pruning import Arch, PrunableNetwork, network_spec
from ..storage import Storage
from . import sync
from .checkpoint import CheckpointError, cpu_state, read_reported
from .coordinator import Coordinator
from .data import RankData, load_splits
from .memory import MIB, PeakMemory
from .run_record import RunRecord, say
from .schedule import ScheduleState, next_action
from .trainer import EpochTrainer

if TYPE_CHECKING:
    from ..latency_table import LatencyModel


def arch_of(config: RunConfig, splits: Any) -> Arch:
    """The architecture a run trains: the config's model at the data's classes and input size."""
    return Arch(config.model.name, config.model.num_classes or splits.num_classes, config.model.in_channels,
                splits.input_size)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Entry point given to `TorchTrainer`.

    `loop_config`: {"config": RunConfig as a dict, "storage": the run folder's URI or path,
    "invocation": an id of the driver process, "resume": whether the driver expects a checkpoint}.
    """
    config = RunConfig.model_validate(loop_config["config"])
    import ray.train

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if config.ray.use_gpu:
        import ray.train.torch

        device = cuda_device(ray.train.torch.get_device())
    else:
        device = torch.device("cpu")
    torch.set_num_threads(config.ray.cpus_per_worker)
    worker = Worker(config, Storage(loop_config["storage"]), rank, world, device, loop_config["invocation"],
                    loop_config["resume"])
    worker.run()


def cuda_device(device: torch.device) -> torch.device:
    """Make the GPU Ray gave this worker the current CUDA device (NCCL's object collectives and DALI's default
    device use it) and turn cuDNN autotuning on (shapes are fixed between prunes). No silent CPU fallback."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise DeviceError(
            f"ray.use_gpu=true, but the Train worker on {platform.node()} sees no CUDA device (Ray gave it "
            f"{device}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}, torch {torch.__version__}"
            f" built for CUDA {torch.version.cuda}): fix the node's GPU set-up, or set ray.use_gpu=false")
    torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    return device


class Worker(EpochTrainer, Coordinator, RunRecord):
    """One rank of a run. State that only the coordinator keeps is None elsewhere."""

    def __init__(self, config: RunConfig, storage: Storage, rank: int, world: int, device: torch.device,
                 invocation: str, expect_checkpoint: bool) -> None:
        self.config, self.storage = config, storage
        self.rank, self.world, self.device = rank, world, device
        self.invocation, self.expect_checkpoint = invocation, expect_checkpoint
        self.coordinator = rank == 0
        self.splits = load_splits(config, storage)
        self.data = RankData(self.splits, config, rank, world, device)
        self.arch = arch_of(config, self.splits)
        self.gpu = device.type == "cuda"
        self.numerics: Numerics = train_numerics(config, device)
        self.memory = PeakMemory(device)
        self.net: PrunableNetwork | None = None
        self.ddp: nn.Module | None = None
        self.forward: nn.Module | None = None  # what a training step calls: the DDP module, or its compiled form
        self.optimizer: torch.optim.Optimizer | None = None
        self.state = ScheduleState()
        # coordinator-only records (all plain containers, all checkpointed)
        self.history: list[dict[str, Any]] = []
        self.epochs: list[dict[str, Any]] = []
        self.rounds: list[dict[str, Any]] = []
        self.sync_checks: list[dict[str, Any]] = []
        self.before: dict[str, Any] | None = None
        self.best: dict[str, Any] | None = None
        self.resumed = 0
        self.restarts: list[dict[str, Any]] = []
        self.reports = 0  # checkpoints reported so far (names them)
        self.started_as = "start"
        self.monitor = None
        self.searcher = None
        self.latency = None  # the run's LatencyModel (every rank), when it has a latency table

    # ------------------------------------------------------------------ setup

    def _initial_payload(self) -> dict[str, Any]:
        """Coordinator: the starting network (fresh, or from Ray Train's last checkpoint) and the run's records."""
        import ray.train

        reported = ray.train.get_checkpoint()
        if reported is not None:
            ck = read_reported(reported)
            self.history, self.epochs, self.rounds = ck["history"], ck["epochs"], ck["rounds"]
            self.sync_checks, self.before, self.best = ck["sync_checks"], ck["before"], ck["best"]
            self.resumed, self.restarts, self.reports = ck["resumed"], ck["restarts"], ck["reports"]
            torch.set_rng_state(ck["rng"])
            at = f"epoch {ck['schedule']['epoch']}, {ck['schedule']['rounds']} rounds done"
            if ck["invocation"] == self.invocation:  # the same driver: Ray restarted the worker group
                self.restarts.append({"restart": len(self.restarts) + 1, "epoch": ck["schedule"]["epoch"],
                                      "rounds": ck["schedule"]["rounds"], "phase": ck["schedule"]["phase"]})
                self.started_as = f"restart {len(self.restarts)}"
                say(f"[laasp] restart {len(self.restarts)}: Ray Train restarted the worker group after a failure; "
                     f"continuing from the checkpoint at {at}")
            else:
                self.resumed += 1
                self.started_as = "resume"
                say(f"[laasp] resuming from the checkpoint at {at}")
            return {"spec": ck["spec"], "model": ck["model"], "momentum": ck["momentum"], "schedule": ck["schedule"],
                    "started_as": self.started_as}
        if self.expect_checkpoint:
            raise CheckpointError(f"--resume: Ray Train found no checkpoint of this run under {self.storage}")
        torch.manual_seed(self.config.seed)
        net = PrunableNetwork.create(self.arch)
        return {"spec": network_spec(net), "model": cpu_state(net.model), "momentum": {},
                "schedule": ScheduleState().as_dict(), "started_as": self.started_as}

    def _peak_memory_mib(self) -> float:
        """The largest peak over the ranks since the last `memory.reset()`, in MiB."""
        return round(sync.max_over_ranks(self.memory.peak_bytes() / MIB, self.device), 1)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        if self.coordinator:
            from ..monitoring import RunMonitor

            self.monitor = RunMonitor(self.storage, self.config.prune.criteria)
            n = self.numerics
            say(f"[laasp] {self.world} worker(s), rank 0 on {self.device} ({device_name(self.device.type)}): "
                 f"{n.precision}, {'channels_last' if n.channels_last else 'contiguous'}"
                 f"{', torch.compile' if self.config.train.compile else ''}")
        payload = sync.broadcast(self._initial_payload() if self.coordinator else None, device=self.device)
        self.state = ScheduleState.from_dict(payload["schedule"])
        self.install(payload, payload["started_as"])
        del payload
        self.latency = self._latency_model()
        try:
            while True:
                action = next_action(self.state, self.config, self._reduction())
                if action == "done":
                    break
                if action == "train":
                    self.train_epoch()
                elif action == "check_latency":
                    with self._timed("latency"):
                        self.check_latency()
                elif action == "before_pruning":
                    with self._timed("eval"):
                        self.before = self.measure("before pruning")
                else:
                    with self._timed("search"):
                        self.prune_round()
                self.checkpoint()
            self.finish()
        finally:
            if self.searcher is not None:
                self.searcher.close()
            if self.monitor is not None:
                self.monitor.close()

    def _latency_model(self) -> "LatencyModel | None":
        """Every rank: the run's latency table (loaded, or measured by the coordinator, who broadcasts it)."""
        from ..latency_table import LatencyModel, run_table

        table = run_table(self.config, self.storage, self.arch, self.device, say) if self.coordinator else None
        table = sync.broadcast(table, device=self.device)
        return LatencyModel(table) if table is not None else None

    def _reduction(self) -> float:
        """Progress towards the target, in its unit (FLOPs, or estimated latency)."""
        return self.latency.reduction(self.net) if self.config.prune.target == "latency" else self.net.macs_reduction

    def _latency_scalars(self) -> dict[str, float]:
        if self.latency is None:
            return {}
        ms = self.latency.estimate_ms(self.net)
        return {"latency_ms_est": ms, "latency_reduction_est": 1 - ms / self.latency.original_ms}

    @contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.state.add_time(phase, time.perf_counter() - start)
