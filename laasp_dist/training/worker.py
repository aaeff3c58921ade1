"""The training loop of every Ray Train worker: `train_worker(loop_config)`.

Every rank trains its shard under DDP. Rank 0 is the coordinator: it runs the
search rounds (through `laasp_dist.search`, whose actors score candidates while
the other ranks wait at the broadcast), applies the winner, slices the optimizer
momentum to the kept channels, and broadcasts the slimmed model (spec + weights
+ momentum). Every rank — the coordinator included — rebuilds its network from
that payload, wraps it in a fresh DDP and optimizer, and the ranks then compare
an all-gathered SHA-256 of their weights and momentum (a mismatch stops the run).
The coordinator alone writes TensorBoard, history.parquet, final/ and summary.json
(through `laasp_dist.storage`, so the run folder may be a URI) and the checkpoints,
which every rank reports to Ray Train after every epoch and every round
(`ray.train.report`; only the coordinator's report carries the checkpoint). A worker
group that Ray restarts after a failure starts again from `ray.train.get_checkpoint()`.

Devices and arithmetic: with ``ray.use_gpu`` each worker makes its Ray-assigned GPU the
current CUDA device before any collective or DALI pipeline; forward passes run under
`laasp_dist.precision` (``train.precision``, ``train.channels_last``). Before a new network
is installed the previous one, its DDP wrapper, compiled graph and optimizer are released,
and the peak memory of every epoch and round is recorded (`memory.PeakMemory`).
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..errors import DeviceError
from ..precision import Numerics, train_numerics
from ..pruning import Arch, PrunableNetwork, load_slim_model, network_from_spec, network_spec, save_slim_model
from ..storage import Storage
from . import sync
from .checkpoint import CheckpointError, checkpoint_name, plain, read_reported, write_state
from .data import RankData, load_splits
from .evaluate import accuracy_sums, evaluate, summarise
from .memory import MIB, PeakMemory
from .momentum import load_momentum, momentum_by_name, removed_indices, slice_momentum
from ..pruning.steps import macs_removed
from .schedule import ScheduleState, epoch_done, learning_rate, next_action

if TYPE_CHECKING:
    from ..latency_table import LatencyModel
FINAL_DIR = "final"
SUMMARY = "summary.json"
HISTORY = "history.parquet"
SUBSET_DIR = "subset"
PROGRESS_EVERY = 25  # training steps between progress-bar loss updates (each one is a host-device sync)


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


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")


class Worker:
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

    # ------------------------------------------------------------------ setup and model installation

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
                _say(f"[laasp] restart {len(self.restarts)}: Ray Train restarted the worker group after a failure; "
                     f"continuing from the checkpoint at {at}")
            else:
                self.resumed += 1
                self.started_as = "resume"
                _say(f"[laasp] resuming from the checkpoint at {at}")
            return {"spec": ck["spec"], "model": ck["model"], "momentum": ck["momentum"], "schedule": ck["schedule"],
                    "started_as": self.started_as}
        if self.expect_checkpoint:
            raise CheckpointError(f"--resume: Ray Train found no checkpoint of this run under {self.storage}")
        torch.manual_seed(self.config.seed)
        net = PrunableNetwork.create(self.arch)
        return {"spec": network_spec(net), "model": _cpu_state(net.model), "momentum": {},
                "schedule": ScheduleState().as_dict(), "started_as": self.started_as}

    def install(self, payload: dict[str, Any], what: str) -> None:
        """Every rank: rebuild the network from a broadcast payload, a fresh DDP and optimizer; check identity.

        The previous network, DDP wrapper, compiled graph and optimizer are released first. Any process group
        (one worker too) gets DDP, so a one-GPU run takes the multi-GPU code path.
        """
        self._release()
        self.net = network_from_spec(payload["spec"], payload["model"])
        model = self.numerics.model(self.net.model.to(self.device))
        if dist.is_available() and dist.is_initialized():
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(model, device_ids=[self.device.index] if self.gpu else None)
        else:
            self.ddp = model
        t = self.config.train
        self.forward = torch.compile(self.ddp, backend=t.compile_backend, dynamic=False) if t.compile else self.ddp
        self.optimizer = torch.optim.SGD(model.parameters(), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov,
                                         weight_decay=t.weight_decay)
        load_momentum(self.optimizer, model, payload["momentum"])
        digests = sync.check_identical(model, momentum_by_name(self.optimizer, model), what)
        if self.coordinator:
            self.sync_checks.append({"after": what, "round": self.state.rounds, "digests": digests})

    def _release(self) -> None:
        """Drop the installed network, DDP wrapper, compiled graph and optimizer, and give their memory back."""
        self.forward = self.ddp = self.optimizer = self.net = None
        if self.config.train.compile:
            torch._dynamo.reset()  # one compiled network at a time: no recompiles pile up over the prunes
        gc.collect()  # DDP and compiled modules hold reference cycles
        if self.gpu:
            torch.cuda.empty_cache()

    def _peak_memory_mib(self) -> float:
        """The largest peak over the ranks since the last `memory.reset()`, in MiB."""
        return round(sync.max_over_ranks(self.memory.peak_bytes() / MIB, self.device), 1)

    # ------------------------------------------------------------------ main loop

    def run(self) -> None:
        if self.coordinator:
            from ..monitoring import RunMonitor

            self.monitor = RunMonitor(self.storage, self.config.prune.criteria)
            n = self.numerics
            _say(f"[laasp] {self.world} worker(s), rank 0 on {self.device} ({device_name(self.device)}): "
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

        table = run_table(self.config, self.storage, self.arch, self.device, _say) if self.coordinator else None
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

    # ------------------------------------------------------------------ training

    def train_epoch(self) -> None:
        epoch, phase = self.state.epoch, self.state.phase
        lr = learning_rate(self.config, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = self.data.train_batches(epoch)
        self.memory.reset()
        with self._timed({"pretrain": "pretrain", "recover": "recovery"}.get(phase, "finetune")):
            start = time.perf_counter()
            self.ddp.train()
            sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss and hits stay on the device
            bar = self._bar(len(batches), f"epoch {epoch} ({phase})")
            for step, (x, y) in enumerate(batches, 1):
                self.train_step(x, y, sums)
                if bar is not None:
                    bar.update(1)
                    if step % PROGRESS_EVERY == 0:
                        bar.set_postfix(loss=f"{float(sums[0] / sums[3]):.3f}", refresh=False)
            if bar is not None:
                bar.close()
            sync.broadcast_buffers(self.net.model)  # BN statistics of rank 0 everywhere: ranks identical again
            train = summarise(sums, distributed=True)  # the first host sync of the epoch
            images_per_s = train["images"] / max(time.perf_counter() - start, 1e-9)
        with self._timed("eval"):
            val = evaluate(self.net.model, self.data.eval_batches("val"), self.device, distributed=True,
                           numerics=self.numerics)
        peak = self._peak_memory_mib()
        epoch_done(self.state)
        after_target = self.state.target_reached
        if after_target and (self.best is None or val["top1"] > self.best["val_top1"]) and self.coordinator:
            self.best = {"epoch": epoch, "val_top1": val["top1"], "spec": network_spec(self.net),
                         "model": _cpu_state(self.net.model)}
        if self.coordinator:
            cost = self.net.cost
            row = {"epoch": epoch, "phase": phase, "lr": lr, "train_loss": train["loss"], "train_top1": train["top1"],
                   "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"], "macs": cost.macs,
                   "params": cost.params, "flops_reduction": self.net.macs_reduction,
                   "train_images_per_s": round(images_per_s, 1), "peak_memory_mib": peak} | self._latency_scalars()
            self.epochs.append(row)
            self.monitor.scalars(epoch, {
                "train/loss": train["loss"], "train/top1": train["top1"], "val/loss": val["loss"],
                "val/top1": val["top1"], "val/top5": val["top5"], "lr": lr, "model/macs": cost.macs,
                "model/params": cost.params, "prune/flops_reduction": self.net.macs_reduction,
                "model/latency_ms_est": row.get("latency_ms_est"),
                "prune/latency_reduction_est": row.get("latency_reduction_est"),
                "train/images_per_s": images_per_s, "memory/epoch_peak_mib": peak})
            if phase == "recover" and self.state.recover_left == 0:
                self.monitor.widths(epoch, self.net.original_widths, self.net.widths(),
                                    f"after recovery, {self.net.macs_reduction:.1%} FLOPs removed")
            _say(f"[laasp] epoch {epoch} ({phase}) lr {lr:.4g} train loss {train['loss']:.4f} "
                  f"top1 {train['top1']:.4f} | val loss {val['loss']:.4f} top1 {val['top1']:.4f} | "
                  f"FLOPs -{self.net.macs_reduction:.1%} | {images_per_s:.0f} img/s, peak {peak:.0f} MiB")

    def train_step(self, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        """One optimizer step on a batch; its loss and hits are added to `sums` on the device (no host sync)."""
        n = self.numerics
        x, y = n.inputs(x.to(self.device, non_blocking=True)), y.to(self.device, non_blocking=True)
        with n.autocast():
            logits = self.forward(x)
            loss = F.cross_entropy(logits.float(), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            sums += accuracy_sums(logits.detach().float(), y)

    def measure(self, label: str) -> dict[str, Any]:
        """Val and test metrics of the current network (every rank evaluates its shard)."""
        n = self.numerics
        val = evaluate(self.net.model, self.data.eval_batches("val"), self.device, distributed=True, numerics=n)
        test = evaluate(self.net.model, self.data.eval_batches("test"), self.device, distributed=True, numerics=n)
        out = {"epoch": self.state.epoch, "macs": self.net.cost.macs, "params": self.net.cost.params,
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]}
        if self.coordinator:
            _say(f"[laasp] {label}: val top1 {val['top1']:.4f} top5 {val['top5']:.4f}, "
                  f"test top1 {test['top1']:.4f} top5 {test['top5']:.4f}")
        return out

    # ------------------------------------------------------------------ pruning

    def prune_round(self) -> None:
        """One search/apply round: the coordinator decides and broadcasts; every rank installs the result."""
        from .rounds import Searcher, executor_kind

        index = self.state.rounds + 1
        self.memory.reset()
        if self.gpu:
            torch.cuda.empty_cache()  # training idles during the round: cached blocks back to the GPU's search actor
        all_ranks = executor_kind(self.config) == "ranks"
        if self.searcher is None and (self.coordinator or all_ranks):  # built at the first round
            self.searcher = Searcher(self.config, self.storage.child(SUBSET_DIR), self.device, self.rank, self.world)
        result = self.searcher.run(self.net, index, self.latency) if (self.coordinator or all_ranks) else None
        payload = self._apply_winner(index, result) if self.coordinator else None
        del result
        payload = sync.broadcast(payload, device=self.device)
        self.state.rounds += 1
        self.install(payload, f"round {self.state.rounds}")
        del payload
        peak = self._peak_memory_mib()
        if self.coordinator:
            self.rounds[-1]["peak_memory_mib"] = peak
            self.monitor.scalars(index, {"memory/round_peak_mib": peak})

    def _apply_winner(self, index: int, result: Any) -> dict[str, Any]:
        """Coordinator: prune the winner, record the round, and return the payload every rank installs."""
        winner = result.winner
        group = self.net.group(winner.group)
        channel_macs = macs_removed(group, 1, self.net.cost.layer_macs) / self.net.base_macs
        payload = pruned_payload(self.net, self.optimizer, winner, self.config.train.keep_momentum)
        self.history.extend(plain(r) for r in result.table)
        cost = self.net.cost
        chosen = next(r for r in result.table if r["chosen"])
        measured = not math.isnan(result.loss)  # prune.selection=importance measures no subset loss
        record = {"round": index, "epoch": self.state.epoch, "group": winner.group,
                  "criterion": winner.criterion, "k": len(winner.channels), "channels": list(winner.channels),
                  "loss": float(result.loss) if measured else None, "importance": chosen["importance"],
                  "channel_flops_share": channel_macs, "macs": cost.macs,
                  "params": cost.params, "flops_reduction": self.net.macs_reduction,
                  "candidates": len(result.table), "seconds": float(result.seconds)} | self._latency_scalars()
        self.rounds.append(record)
        self.monitor.round(index, winner.group, winner.criterion, float(result.loss), self.net.macs_reduction)
        self.monitor.scalars(index, {"prune/round_macs": cost.macs, "prune/round_params": cost.params,
                                     "prune/round_seconds": result.seconds,
                                     "prune/round_latency_ms_est": record.get("latency_ms_est")})
        why = f"subset loss {result.loss:.4f}" if measured else f"importance {chosen['importance']:.4g} per % FLOPs"
        latency = f", est. latency -{record['latency_reduction_est']:.2%}" if self.latency else ""
        _say(f"[laasp] round {index}: {winner.criterion} removes {len(winner.channels)} of {winner.group} "
              f"({why}, {len(result.table)} candidates, {result.seconds:.1f} s) "
              f"-> FLOPs -{self.net.macs_reduction:.2%}{latency}")
        return payload

    # ------------------------------------------------------------------ persistence

    def checkpoint(self) -> None:
        """Every rank: report this point to Ray Train; the coordinator's report carries the checkpoint.

        Called after every epoch and round (and at the end), so a restart loses at most one of them.
        """
        import ray.train

        metrics = {"epoch": self.state.epoch, "rounds": self.state.rounds}
        if not self.coordinator:
            ray.train.report(metrics)
            return
        if self.history:
            _write_history(self.storage, self.history)
        self.monitor.flush()
        self.reports += 1
        with tempfile.TemporaryDirectory(prefix="laasp-checkpoint-") as tmp:
            write_state(tmp, self._state())
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_name(self.reports))

    def _state(self) -> dict[str, Any]:
        """Everything a restart or a resume needs, as plain containers (see checkpoint.py)."""
        model = self.net.model
        return {
            "config": self.config.model_dump(mode="json"),
            "spec": network_spec(self.net),
            "model": _cpu_state(model),
            "momentum": momentum_by_name(self.optimizer, model) if self.config.train.keep_momentum else {},
            "schedule": self.state.as_dict(),
            "history": self.history, "epochs": self.epochs, "rounds": self.rounds,
            "sync_checks": self.sync_checks, "before": self.before, "best": self.best,
            "resumed": self.resumed, "restarts": self.restarts, "invocation": self.invocation,
            "reports": self.reports, "rng": torch.get_rng_state(),
        }

    def finish(self) -> None:
        """Coordinator: save final/ (best post-pruning val model), re-measure it alone, write summary.json;
        then every rank reports the last checkpoint."""
        if self.coordinator:
            self._write_final()
        self.checkpoint()

    def _write_final(self) -> None:
        start = time.perf_counter()
        if self.best is not None:
            final_net = network_from_spec(self.best["spec"], self.best["model"])
            selected = self.best["epoch"]
        else:
            final_net = network_from_spec(network_spec(self.net), _cpu_state(self.net.model))
            selected = self.state.epoch - 1
        final_dir = self.storage.child(FINAL_DIR)
        final = measure_slim_model(save_slim_model(final_net, final_dir), self.config, self.device,
                                   run_dir=self.storage)
        self.state.add_time("final_eval", time.perf_counter() - start)
        _say(f"[laasp] final (epoch {selected}): val top1 {final['val_top1']:.4f}, test top1 {final['test_top1']:.4f}"
              f", FLOPs -{final_net.macs_reduction:.2%}")
        from ..latency_table import latency_summary

        with self._timed("latency"):
            latency = latency_summary(self.latency, final_dir, self.device, self.config)
        measured, estimated = latency["measured"], latency["estimated"]
        self.monitor.scalars(self.state.epoch, {"final/latency_ms_measured": measured["final_ms"],
                                                "final/speedup_measured": measured["speedup"],
                                                "final/latency_ms_est": estimated and estimated["final_ms"]})
        _say(f"[laasp] latency at batch {measured['batch']}: measured speed-up {measured['speedup']:.2f}x "
             f"(-{measured['reduction']:.1%}), FLOPs promise {latency['flops_promise']:.2f}x"
             + (f", table estimate {estimated['speedup']:.2f}x" if estimated else ""))
        self.monitor.widths(self.state.epoch, final_net.original_widths, final_net.widths(),
                            f"final: {final_net.macs_reduction:.1%} FLOPs removed")
        self.monitor.scalars(self.state.epoch, {"final/val_top1": final["val_top1"],
                                                "final/test_top1": final["test_top1"]})
        from ..monitoring import width_figure

        fig = width_figure(final_net.original_widths, final_net.widths(),
                           f"{self.arch.model}: {final_net.macs_reduction:.1%} FLOPs removed")
        self.storage.write_with("widths.png", lambda p: fig.savefig(p, format="png"))
        base_macs, base_params = final_net.base_macs, self.before["params"] if self.before else None
        summary = {
            "name": self.config.name, "model": self.arch.model, "dataset": self.config.data.dataset,
            "units": "macs = multiply-accumulates per image; flops = 2 x macs",
            "base": {"macs": base_macs, "flops": 2 * base_macs, "params": base_params},
            "final": {"macs": final_net.cost.macs, "flops": 2 * final_net.cost.macs, "params": final_net.cost.params},
            "flops_reduction": final_net.macs_reduction,
            "params_reduction": 1 - final_net.cost.params / base_params if base_params else None,
            "target_flops_reduction": self.config.prune.target_flops_reduction,
            "target": self.config.prune.target, "round_to": self.config.prune.round_to,
            "target_latency_reduction": (self.config.prune.target_latency_reduction
                                         if self.config.prune.target == "latency" else None),
            "latency": latency,
            "before_pruning": self.before,
            "final_metrics": {**final, "selected_epoch": selected, "selected_by": "best held-out val top-1 "
                              "after the target was reached" if self.best is not None else "last epoch"},
            "epochs": self.state.epoch, "rounds": self.state.rounds, "resumed": self.resumed,
            "restarts": self.restarts,
            "winners": [{k: r[k] for k in ("round", "group", "criterion", "k", "loss", "flops_reduction",
                                           "latency_reduction_est") if k in r} for r in self.rounds],
            "phase_seconds": {k: round(v, 3) for k, v in self.state.phase_seconds.items()},
            "sync_checks": self.sync_checks,
            "training": self._training_summary(),
        }
        self.storage.write_json(SUMMARY, plain(summary))

    def _training_summary(self) -> dict[str, Any]:
        """Where and how the run trained, and the peak memory of its epochs and rounds (max over the ranks)."""
        epochs = [r["peak_memory_mib"] for r in self.epochs if r.get("peak_memory_mib") is not None]
        rounds = [r["peak_memory_mib"] for r in self.rounds if r.get("peak_memory_mib") is not None]
        speeds = [r["train_images_per_s"] for r in self.epochs if r.get("train_images_per_s")]
        return {"device": str(self.device), "device_name": device_name(self.device), "workers": self.world,
                **self.numerics.describe(), "compile": self.config.train.compile,
                "median_train_images_per_s": round(statistics.median(speeds), 1) if speeds else None,
                "memory": {"measure": self.memory.measure, "unit": "MiB", "epoch_peak": max(epochs, default=None),
                           "round_peak": max(rounds, default=None), "per_round": rounds}}

    # ------------------------------------------------------------------ progress

    def _bar(self, total: int, desc: str):
        if not (self.coordinator and self.config.train.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, mininterval=2.0, dynamic_ncols=True)


def _say(text: str) -> None:
    """One progress line on the worker's stdout (Ray Train patches `print` to also log, which doubles lines)."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def pruned_payload(net: PrunableNetwork, optimizer: torch.optim.Optimizer, winner: Any,
                   keep_momentum: bool) -> dict[str, Any]:
    """Apply `winner` to `net` (in place) and return what every rank installs: the spec, CPU weights and the
    momentum buffers sliced to the kept channels (none without `keep_momentum`: the reference's reset)."""
    group = net.group(winner.group)
    momentum = momentum_by_name(optimizer, net.model) if keep_momentum else {}
    removed = removed_indices(group, winner.channels)
    net.apply(winner)
    shapes = {n: p.shape for n, p in net.model.named_parameters()}
    sliced = slice_momentum(momentum, removed, shapes) if keep_momentum else {}
    return {"spec": network_spec(net), "model": _cpu_state(net.model), "momentum": sliced}


def _write_history(run: Storage, rows: list[dict[str, Any]]) -> None:
    """Every round's candidate table, in the search package's history schema."""
    from types import SimpleNamespace

    from ..search import write_history

    write_history([SimpleNamespace(table=rows)], run.child(HISTORY))


def measure_slim_model(model_dir: str | Path | Storage, config: RunConfig, device: torch.device | str = "cpu",
                       numerics: Numerics | None = None, *, run_dir: str | Path | Storage | None = None
                       ) -> dict[str, Any]:
    """Load a slim model from its folder alone and measure it on the run's val and test splits (one process).

    This is how summary.json's final accuracy is produced, and how anyone can re-check it. `numerics`
    defaults to the run's training arithmetic on `device`; the device (cpu or cuda: also where DALI
    decodes), precision and memory format used are part of the result. Image folders: the splits come
    from the data index of the run folder `run_dir`.
    """
    from .data import eval_loader

    device = torch.device(device)
    numerics = numerics or train_numerics(config, device)
    net = load_slim_model(model_dir)
    model = numerics.model(net.model.to(device))
    splits = load_splits(config, run_dir)
    out: dict[str, Any] = {"macs": net.cost.macs, "params": net.cost.params, "device": device.type,
                           **numerics.describe()}
    for split in ("val", "test"):
        loader = eval_loader(getattr(splits, split), splits, config, config.data.eval_batch_size, device=device)
        m = evaluate(model, loader, device, numerics=numerics)
        out.update({f"{split}_loss": m["loss"], f"{split}_top1": m["top1"], f"{split}_top5": m["top5"],
                    f"{split}_images": m["images"]})
    return out
