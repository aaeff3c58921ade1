"""What a run leaves, written by the coordinator: Ray Train checkpoints, history.parquet, final/,
summary.json and widths.png (TensorBoard: `laasp_dist.monitoring.RunMonitor`), all through
`laasp_dist.storage`, so the run folder may be a URI.

Every rank reports to Ray Train after every epoch and every round (`ray.train.report`; only the
coordinator's report carries the checkpoint), so a restart loses at most one of them.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from typing import Any

import torch

from ..latency import device_name
from ..pruning import network_from_spec, network_spec, save_slim_model
from ..storage import Storage
from .checkpoint import checkpoint_name, cpu_state, plain, write_state
from .measure import measure_slim_model
from .momentum import momentum_by_name

FINAL_DIR = "final"
SUMMARY = "summary.json"
HISTORY = "history.parquet"
SUBSET_DIR = "subset"


class RunRecord:
    """The persistence side of a `Worker` (see worker.py for the state it shares)."""

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
            write_run_history(self.storage, self.history)
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
            "model": cpu_state(model),
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
            final_net = network_from_spec(network_spec(self.net), cpu_state(self.net.model))
            selected = self.state.epoch - 1
        final_dir = self.storage.child(FINAL_DIR)
        final = measure_slim_model(save_slim_model(final_net, final_dir), self.config, self.device,
                                   run_dir=self.storage)
        self.state.add_time("final_eval", time.perf_counter() - start)
        say(f"[laasp] final (epoch {selected}): val top1 {final['val_top1']:.4f}, test top1 {final['test_top1']:.4f}"
              f", FLOPs -{final_net.macs_reduction:.2%}")
        from ..latency_table import latency_summary

        with self._timed("latency"):
            latency = latency_summary(self.latency, final_dir, self.device, self.config)
        measured, estimated = latency["measured"], latency["estimated"]
        self.monitor.scalars(self.state.epoch, {"final/latency_ms_measured": measured["final_ms"],
                                                "final/speedup_measured": measured["speedup"],
                                                "final/latency_ms_est": estimated and estimated["final_ms"]})
        say(f"[laasp] latency at batch {measured['batch']}: measured speed-up {measured['speedup']:.2f}x "
             f"({-measured['reduction']:+.1%}), FLOPs promise {latency['flops_promise']:.2f}x"
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
            "latency_checks": self.state.latency_checks,
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
        return {"device": str(self.device), "device_name": device_name(self.device.type), "workers": self.world,
                **self.numerics.describe(), "compile": self.config.train.compile,
                "median_train_images_per_s": round(statistics.median(speeds), 1) if speeds else None,
                "memory": {"measure": self.memory.measure, "unit": "MiB", "epoch_peak": max(epochs, default=None),
                           "round_peak": max(rounds, default=None), "per_round": rounds}}


def say(text: str) -> None:
    """One progress line on the worker's stdout (Ray Train patches `print` to also log, which doubles lines)."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(text + "\n")
    stream.flush()


def write_run_history(run: Storage, rows: list[dict[str, Any]]) -> None:
    """Every round's candidate table, in the search package's history schema."""
    from types import SimpleNamespace

    from ..search import write_history

    write_history([SimpleNamespace(table=rows)], run.child(HISTORY))
