"""The coordinator's side of a pruning round, and how every rank installs its result.

Rank 0 runs the search round (`rounds.Searcher`: search actors, the ranks, or itself), applies
the winner, slices the optimizer momentum to the kept channels and broadcasts the slim model
(spec + weights + momentum). Every rank — the coordinator included — rebuilds its network from
that payload, wraps it in a fresh DDP and optimizer, and the ranks then compare an all-gathered
SHA-256 of their weights and momentum (a mismatch stops the run).
"""

from __future__ import annotations

import gc
import math
from typing import Any

import torch
import torch.distributed as dist

from ..config import executor_kind
from ..pruning import PrunableNetwork, network_from_spec, network_spec
from ..pruning.steps import macs_removed
from . import sync
from .checkpoint import cpu_state, plain
from .momentum import load_momentum, momentum_by_name, removed_indices, slice_momentum
from .run_record import SUBSET_DIR, say
from .schedule import book_latency_check


class Coordinator:
    """The pruning side of a `Worker` (see worker.py for the state it shares)."""

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

    def prune_round(self) -> None:
        """One search/apply round: the coordinator decides and broadcasts; every rank installs the result."""
        from .rounds import Searcher

        index = self.state.rounds + 1
        self.memory.reset()
        if self.gpu:
            torch.cuda.empty_cache()  # training idles during the round: cached blocks back to the GPU's search actor
        all_ranks = executor_kind(self.config) == "ranks"
        if self.searcher is None and (self.coordinator or all_ranks):  # built at the first round
            self.searcher = Searcher(self.config, self.storage.child(SUBSET_DIR), self.device, self.rank, self.world)
        result = (self.searcher.run(self.net, index, self.latency, self.state.latency_aim)
                  if (self.coordinator or all_ranks) else None)
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

    def check_latency(self) -> None:
        """A recovery near (or at) the latency target is due: the coordinator times the network against its
        unpruned original and decides where pruning goes (`latency_table.next_latency_aim`); every rank books
        it (`schedule.book_latency_check`)."""
        from ..latency_table import measured_reduction, next_latency_aim
        from ..search.round import round_to_of

        booked = None
        if self.coordinator:
            p = self.config.prune
            check = measured_reduction(self.latency, self.net, self.device, self.config)
            reachable = self.latency.max_reduction(self.net, p.max_prune_ratio, round_to_of(p))
            aim = next_latency_aim(p, check["estimated"], check["measured"], reachable)
            then = "target reached" if aim is None else f"aiming at an estimated -{aim:.1%}"
            say(f"[laasp] latency check {len(self.state.latency_checks) + 1}: estimated -{check['estimated']:.1%}, "
                f"measured -{check['measured']:.1%} at batch {check['batch']} (target -{p.target_latency_reduction:.0%}"
                f"): {then}")
            self.monitor.scalars(self.state.rounds, {"prune/latency_check_measured": check["measured"],
                                                     "prune/latency_check_estimated": check["estimated"]})
            booked = {"check": check, "aim": aim}
        booked = sync.broadcast(booked, device=self.device)
        book_latency_check(self.state, booked["check"], booked["aim"])

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
        say(f"[laasp] round {index}: {winner.criterion} removes {len(winner.channels)} of {winner.group} "
              f"({why}, {len(result.table)} candidates, {result.seconds:.1f} s) "
              f"-> FLOPs -{self.net.macs_reduction:.2%}{latency}")
        return payload


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
    return {"spec": network_spec(net), "model": cpu_state(net.model), "momentum": sliced}
