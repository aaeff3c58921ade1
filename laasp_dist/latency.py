"""Latency and throughput of a slim model against the unpruned original of the same architecture.

Both models run the same random input at the spec's input size, in eval mode under
``torch.inference_mode``; each figure is the median of ``repeats`` timed forward passes
after ``warmup`` untimed ones, the two models taking turns pass by pass (CUDA is
synchronised around every pass). The 1-minute load average is reported with the figures:
on a busy machine they mean little. The FLOPs ratio
(slim MACs / original MACs) is printed beside the measured speed-up (original time /
slim time): structured pruning only pays when the second follows the first.
``torch.set_num_threads`` is left at PyTorch's default.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from .errors import ConfigError
from .export import resolve_model_dir
from .models import create_model
from .pruning import count_cost, load_slim_model
from .storage import Storage


CUDA_ROUND_TO = 8  # tensor cores take bf16/fp16 channels in multiples of 8 (NVIDIA's performance guide)


def cpu_vector_lanes() -> int:
    """float32 lanes of this CPU's widest vector unit: 16 (AVX-512), 8 (AVX/AVX2), else 4."""
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    capability = torch.backends.cpu.get_cpu_capability().lower()
    if "avx512f" in flags or capability.startswith("avx512"):
        return 16
    if "avx2" in flags or "avx" in flags or capability.startswith("avx"):
        return 8
    return 4


def resolve_round_to(value: int | str, device: str) -> int:
    """`round_to` as a number: `auto` is CUDA_ROUND_TO on cuda and the CPU's float32 vector lanes on cpu."""
    if value == "auto":
        return CUDA_ROUND_TO if device == "cuda" else cpu_vector_lanes()
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"round_to must be a positive integer or 'auto' (got {value!r})") from None
    if n < 1:
        raise ConfigError(f"round_to must be a positive integer or 'auto' (got {value!r})")
    return n


@dataclass(frozen=True)
class BatchTiming:
    """Median latency (ms per batch), throughput (images/s, from the median) and speed-up of both
    models at one batch size; the fastest pass of each too (the figure least hurt by other load)."""

    batch: int
    original_ms: float
    slim_ms: float
    original_images_per_s: float
    slim_images_per_s: float
    speedup: float
    original_min_ms: float
    slim_min_ms: float


def pass_times_ms(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int,
                  bf16: bool) -> dict[str, list[float]]:
    """Wall time of each timed forward pass per model, in milliseconds.

    The models take turns pass by pass, so a change of machine load during the
    measurement hits all of them alike instead of biasing the ratio.
    """
    device = x.device.type
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
        for i in range(warmup + repeats):
            for name, model in models.items():
                sync()
                start = time.perf_counter()
                model(x)
                sync()
                if i >= warmup:
                    times[name].append(1000.0 * (time.perf_counter() - start))
    return times


def device_name(device: str) -> str:
    """The GPU's name on cuda; on cpu the processor's model name (with "cpu" before it)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"cpu: {model or platform.processor() or platform.machine()}"


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Run with `threads` intra-op threads (None: leave them), restoring the count afterwards."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.eval().to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def time_pair(original: nn.Module, slim: nn.Module, input_shape: tuple[int, ...], batch: int, device: torch.device,
              *, bf16: bool, repeats: int, warmup: int, channels_last: bool) -> BatchTiming:
    """Both models timed in turns at one batch size (random input, seeded; the models are moved to `device`
    and put in eval mode: pass copies of a model that is still training)."""
    models = {"original": _prepare(original, device, channels_last), "slim": _prepare(slim, device, channels_last)}
    x = torch.randn((batch, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times = pass_times_ms(models, x, repeats, warmup, bf16)
    ms = {name: statistics.median(t) for name, t in times.items()}
    return BatchTiming(batch, round(ms["original"], 4), round(ms["slim"], 4),
                       round(1000.0 * batch / ms["original"], 2), round(1000.0 * batch / ms["slim"], 2),
                       round(ms["original"] / ms["slim"], 4),
                       round(min(times["original"]), 4), round(min(times["slim"]), 4))


def benchmark(path: str | Path | Storage, batches: list[int], device: str = "cpu", bf16: bool = False,
              repeats: int = 20, warmup: int = 3, channels_last: bool | None = None) -> dict[str, Any]:
    """Time the slim model under `path` (run folder or slim-model folder) against its unpruned original."""
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here")
    if not batches or min(batches) < 1:
        raise ConfigError(f"--batch sizes must be positive integers (got {batches})")
    if repeats < 1 or warmup < 0:
        raise ConfigError("--repeats must be >= 1 and --warmup >= 0")
    channels_last = device == "cuda" if channels_last is None else channels_last
    net = load_slim_model(resolve_model_dir(path))
    arch = net.arch
    original = create_model(arch.model, arch.num_classes, arch.in_channels)
    original_cost, slim_cost = count_cost(original, arch.input_shape), net.cost
    dev = torch.device(device)
    rows = [time_pair(original, net.model, arch.input_shape, batch, dev, bf16=bf16,
                      repeats=repeats, warmup=warmup, channels_last=channels_last) for batch in batches]
    return {
        "model": arch.model,
        "input_shape": list(arch.input_shape),
        "device": torch.cuda.get_device_name(dev) if device == "cuda" else "cpu",
        "device_name": device_name(device),
        "dtype": "bfloat16 (autocast)" if bf16 else "float32",
        "channels_last": channels_last,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "repeats": repeats,
        "warmup": warmup,
        "macs": {"original": original_cost.macs, "slim": slim_cost.macs,
                 "ratio": round(slim_cost.macs / original_cost.macs, 6)},
        "params": {"original": original_cost.params, "slim": slim_cost.params},
        "batches": [asdict(r) for r in rows],
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a `benchmark` report."""
    macs, params = report["macs"], report["params"]
    c, h, w = report["input_shape"]
    lines = [
        (f"{report['model']} @ {c}x{h}x{w} on {report['device']} ({report['dtype']}, "
         f"{report['threads']} threads{', channels_last' if report['channels_last'] else ''}, "
         f"load {report['load_avg_1m']}), median of {report['repeats']} runs after {report['warmup']} warm-up"),
        (f"MACs: original {macs['original'] / 1e6:.2f} M, slim {macs['slim'] / 1e6:.2f} M "
         f"(ratio {macs['ratio']:.3f}, FLOPs -{1 - macs['ratio']:.1%}); "
         f"params {params['original'] / 1e6:.3f} M -> {params['slim'] / 1e6:.3f} M"),
        (f"{'batch':>6s} {'original ms':>12s} {'slim ms':>10s} {'original img/s':>15s} {'slim img/s':>11s} "
         f"{'speed-up':>9s} {'FLOPs ratio⁻¹':>13s} {'min ms orig/slim':>18s}"),
    ]
    for r in report["batches"]:
        lines.append(f"{r['batch']:6d} {r['original_ms']:12.2f} {r['slim_ms']:10.2f} "
                     f"{r['original_images_per_s']:15.1f} {r['slim_images_per_s']:11.1f} "
                     f"{r['speedup']:8.2f}x {1 / macs['ratio']:12.2f}x "
                     f"{r['original_min_ms']:10.2f}/{r['slim_min_ms']:.2f}")
    est = report.get("table_estimate")
    if est is not None:
        measured = next((r["speedup"] for r in report["batches"] if r["batch"] == est["batch"]), None)
        beside = f"; measured here at batch {est['batch']}: {measured:.2f}x" if measured is not None else ""
        lines.append(f"latency table ({est['device']}, batch {est['batch']}, {est['precision']}): estimated "
                     f"{est['original_ms']:.2f} -> {est['slim_ms']:.2f} ms, speed-up {est['speedup']:.2f}x{beside}")
    return "\n".join(lines)
