"""The epoch trainer of a rank: one epoch of DDP training, its validation, and the val/test measurement.

Every rank trains its data shard; losses and hits are summed on the device (no host sync per
step) and reduced over the ranks at the end of the epoch. The coordinator records the epoch
(history row, TensorBoard, console) and keeps the best post-target model by held-out val top-1.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..precision import Numerics
from ..pruning import network_spec
from . import sync
from .checkpoint import cpu_state
from .evaluate import accuracy_sums, evaluate, summarise
from .run_record import say
from .schedule import epoch_done, learning_rate

PROGRESS_EVERY = 25  # training steps between progress-bar loss updates (each one is a host-device sync)


def sgd_step(forward: nn.Module, optimizer: torch.optim.Optimizer, numerics: Numerics, x: torch.Tensor,
             y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training step of every loop: cross-entropy on `forward(x)` under `numerics`, backward, optimizer step.

    `x` and `y` are on the model's device; returns the detached (logits, loss) without a host sync."""
    with numerics.autocast():
        logits = forward(numerics.inputs(x))
        loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return logits.detach(), loss.detach()


class EpochTrainer:
    """The training side of a `Worker` (see worker.py for the state it shares)."""

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
                         "model": cpu_state(self.net.model)}
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
            say(f"[laasp] epoch {epoch} ({phase}) lr {lr:.4g} train loss {train['loss']:.4f} "
                  f"top1 {train['top1']:.4f} | val loss {val['loss']:.4f} top1 {val['top1']:.4f} | "
                  f"FLOPs -{self.net.macs_reduction:.1%} | {images_per_s:.0f} img/s, peak {peak:.0f} MiB")

    def train_step(self, x: torch.Tensor, y: torch.Tensor, sums: torch.Tensor) -> None:
        """One optimizer step on a batch; its loss and hits are added to `sums` on the device (no host sync)."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        logits, _ = sgd_step(self.forward, self.optimizer, self.numerics, x, y)
        with torch.no_grad():
            sums += accuracy_sums(logits.float(), y)

    def measure(self, label: str) -> dict[str, Any]:
        """Val and test metrics of the current network (every rank evaluates its shard)."""
        n = self.numerics
        val = evaluate(self.net.model, self.data.eval_batches("val"), self.device, distributed=True, numerics=n)
        test = evaluate(self.net.model, self.data.eval_batches("test"), self.device, distributed=True, numerics=n)
        out = {"epoch": self.state.epoch, "macs": self.net.cost.macs, "params": self.net.cost.params,
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "test_loss": test["loss"], "test_top1": test["top1"], "test_top5": test["top5"]}
        if self.coordinator:
            say(f"[laasp] {label}: val top1 {val['top1']:.4f} top5 {val['top5']:.4f}, "
                  f"test top1 {test['top1']:.4f} top5 {test['top5']:.4f}")
        return out

    # ------------------------------------------------------------------ progress

    def _bar(self, total: int, desc: str):
        if not (self.coordinator and self.config.train.progress_bar):
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, leave=False, mininterval=2.0, dynamic_ncols=True)
