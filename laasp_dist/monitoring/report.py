"""`report RUN_DIR`: PNG figures of a finished or running LAASP run.

- `training.png`: train/val top-1 and FLOPs reduction per epoch, pruning rounds marked;
- `widths.png`: retained channels per prunable group (original vs now);
- `criteria.png`: how often each criterion won a round, and the winners' subset loss per round.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from ..errors import LaaspError  # noqa: E402
from ..pruning import read_spec  # noqa: E402
from ..storage import Storage, as_storage  # noqa: E402
from .figures import width_figure  # noqa: E402


class NotARunError(LaaspError):
    """The folder is not a laasp-dist run folder."""


def _scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series of the run's TensorBoard logs; a repeated step keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(tb_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for e in acc.Scalars(tag):
                series.setdefault(tag, {})[e.step] = e.value
    return {tag: sorted(values.items()) for tag, values in series.items()}


def _save(fig: plt.Figure, out: Storage, name: str) -> str:
    out.write_with(name, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return out.uri_of(name)


def _plot_training(scalars: dict[str, list[tuple[int, float]]], winners: pd.DataFrame) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for tag, style in (("train/top1", "--"), ("val/top1", "-")):
        if tag in scalars:
            xs, ys = zip(*scalars[tag])
            ax.plot(xs, [100 * y for y in ys], style, label=tag)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("top-1 accuracy (%)")
    twin = ax.twinx()
    if "prune/flops_reduction" in scalars:
        xs, ys = zip(*scalars["prune/flops_reduction"])
        twin.step(xs, [100 * y for y in ys], where="post", color="tab:red", label="FLOPs reduction")
    if "prune/latency_reduction_est" in scalars:
        xs, ys = zip(*scalars["prune/latency_reduction_est"])
        twin.step(xs, [100 * y for y in ys], ":", where="post", color="tab:purple",
                  label="latency reduction (table estimate)")
    twin.set_ylabel("FLOPs / latency reduction (%)", color="tab:red")
    lines = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(lines, [h.get_label() for h in lines], loc="lower right", fontsize=8)
    ax.set_title(f"accuracy and FLOPs over the run ({len(winners)} pruning rounds)")
    fig.tight_layout()
    return fig


def _plot_criteria(winners: pd.DataFrame, criteria: list[str]) -> plt.Figure:
    counts = Counter(winners["criterion"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    names = criteria + sorted(set(counts) - set(criteria))
    left.bar(names, [counts.get(n, 0) for n in names], color="#2171b5")
    left.set_ylabel("rounds won")
    left.yaxis.set_major_locator(MaxNLocator(integer=True))
    right.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_title("winning criterion")
    if len(winners):
        right.plot(winners["round"], winners["loss"], "o-")
    right.set_xlabel("round")
    right.set_ylabel("subset loss of the winner")
    right.set_title("winner's loss per round")
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path | Storage, out_dir: str | Path | Storage | None = None) -> list[str]:
    """Write the three figures into `out_dir` (default RUN_DIR/report; local paths or URIs); returns where."""
    run = as_storage(run_dir)
    if not run.is_file("config.yaml") or not run.exists("tensorboard"):
        raise NotARunError(f"{run} is not a laasp-dist run folder (no config.yaml and tensorboard/)")
    out = as_storage(out_dir) if out_dir else run.child("report")
    history = pd.read_parquet(io.BytesIO(run.read_bytes("history.parquet"))) if run.is_file("history.parquet") else None
    winners = history[history["chosen"]] if history is not None else pd.DataFrame(columns=["round", "criterion", "loss"])
    criteria = list(dict.fromkeys(history["criterion"])) if history is not None else []
    with run.local_copy("tensorboard") as tb_dir:
        scalars = _scalars(tb_dir)
    paths = [_save(_plot_training(scalars, winners), out, "training.png"),
             _save(_plot_criteria(winners, criteria), out, "criteria.png")]
    if run.is_file("final/spec.json"):
        spec = read_spec(run.child("final"))
        fig = width_figure(spec["original_widths"], spec["widths"],
                           f"channels kept per group: FLOPs -{1 - spec['macs'] / spec['base_macs']:.1%}")
        paths.append(_save(fig, out, "widths.png"))
    if run.is_file("summary.json"):
        out.write_text("summary.txt", _summary_text(run.read_json("summary.json")))
    return paths


def _summary_text(s: dict) -> str:
    before, final = s.get("before_pruning") or {}, s["final_metrics"]
    text = (f"{s['name']}: {s['model']} on {s['dataset']}\n"
            f"MACs {s['base']['macs'] / 1e6:.2f} M -> {s['final']['macs'] / 1e6:.2f} M "
            f"(FLOPs -{s['flops_reduction']:.2%}), params {s['base']['params']} -> {s['final']['params']}\n"
            f"test top-1 before pruning {before.get('test_top1', float('nan')):.4f}, final {final['test_top1']:.4f}"
            f" (val {final['val_top1']:.4f})\n")
    latency = s.get("latency")
    if latency:
        m, e = latency["measured"], latency.get("estimated")
        text += (f"latency at batch {m['batch']} on {m['device']}: measured speed-up {m['speedup']:.2f}x "
                 f"({m['base_ms']:.1f} -> {m['final_ms']:.1f} ms, {-m['reduction']:+.1%}, load {m['load_avg_1m']}), "
                 f"FLOPs promise {latency['flops_promise']:.2f}x"
                 + (f", table estimate {e['speedup']:.2f}x ({-e['reduction']:+.1%})" if e else "") + "\n")
    for i, c in enumerate(s.get("latency_checks") or [], 1):
        then = "target reached" if c["next_aim"] is None else f"aiming at -{c['next_aim']:.1%} estimated"
        text += (f"latency check {i} after round {c['round']}: estimated -{c['estimated']:.1%}, "
                 f"measured -{c['measured']:.1%} at batch {c['batch']}: {then}\n")
    return text
