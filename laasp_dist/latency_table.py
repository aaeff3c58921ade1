"""Per-layer latency tables: measured once per (model, input, device, batch, precision), reused across runs.

A table holds, for every conv, BN and linear layer whose width a channel group changes, its
latency measured alone on the target device over a grid of the widths pruning can reach:
a conv or linear layer on a 2-D grid over (input width, output width) — the two may belong to
different groups — and a BN or depthwise conv on a 1-D grid over its channels. Each grid axis
holds the reachable widths at `round_to` steps (the cap `max_prune_ratio` bounds it below),
thinned evenly to at most `points` values; latencies between grid values are interpolated
(bilinear), never extrapolated. Layers of identical signature (kind, kernel, stride, padding,
dilation, bias, input size) share one set of measurements.

Timing is `latency.pass_times_ms` — warm-up passes, then the median of `repeats` passes, the
layers of one input width taking turns pass by pass — at the table's batch, precision and
memory format. The whole unpruned network is timed too (before and after the layers), and a
network's estimate is the sum of its layers' table latencies scaled so that the unpruned
network's estimate equals its measured latency (`CALIBRATION`; the work between the layers —
activations, additions, pooling, framework overhead — is taken to shrink with them; see
docs/latency.md for the measurement that chose this over a constant offset).

The file is JSON (`FORMAT`, `VERSION`) with the model, input, device, batch, precision,
`round_to`, cap, thread count, torch version and the load average before and after.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from .errors import LaaspError
from .latency import device_name, pass_times_ms, resolve_round_to, torch_threads
from .pruning import Arch, ChannelGroup, PrunableNetwork
from .pruning.flops import trace_once
from .pruning.steps import narrowest_width
from .storage import Storage, StorageError, as_storage

if TYPE_CHECKING:
    from .config import PruneConfig, RunConfig

FORMAT = "laasp-dist/latency-table"
VERSION = 1
RUN_TABLE_FILE = "latency_table.json"  # the table a run used, kept in its run folder
CALIBRATION = "scale"
PRECISIONS = ("fp32", "bf16")


class LatencyTableError(LaaspError):
    """A latency table is missing, corrupt, or does not fit the model, device or run."""


# ------------------------------------------------------------------------------------------- layers


@dataclass(frozen=True)
class Site:
    """One layer the table models: its signature (what its latency depends on besides widths) and widths."""

    name: str
    params: dict[str, Any]
    dims: tuple[int, ...]  # (in, out) for conv/linear, (channels,) for bn/dwconv

    @property
    def signature(self) -> str:
        return json.dumps(self.params, sort_keys=True, separators=(",", ":"))


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        if module.groups == 1:
            return "conv"
        if module.groups == module.in_channels == module.out_channels:
            return "dwconv"
        raise LatencyTableError(f"grouped convolution {module} is not supported by latency tables")
    if isinstance(module, nn.BatchNorm2d):
        return "bn"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def _dims(module: nn.Module, kind: str) -> tuple[int, ...]:
    if kind == "conv":
        return module.in_channels, module.out_channels
    if kind == "dwconv":
        return (module.out_channels,)
    if kind == "bn":
        return (module.num_features,)
    return module.in_features, module.out_features


def _axis(kind: str, dim: str) -> int | None:
    """Which table axis a group member's dimension is (None: the same channels as another axis)."""
    if kind in ("conv", "linear"):
        return 0 if dim == "in" else 1
    return 0 if dim == "out" else None


def _shares(groups: Sequence[ChannelGroup], modules: dict[str, nn.Module]
            ) -> dict[str, dict[int, dict[str, float]]]:
    """Per modelled layer, per axis, per group: channels of that axis per root channel of the group."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for g in groups:
        for m in g.members:
            kind = _kind(modules[m.name])
            axis = None if kind is None else _axis(kind, m.dim)
            if axis is not None:
                per_group = out.setdefault(m.name, {}).setdefault(axis, {})
                per_group[g.name] = per_group.get(g.name, 0.0) + len(m.idxs) / g.width
    return out


def _input_sizes(model: nn.Module, input_shape: tuple[int, int, int]) -> dict[str, tuple[int, ...]]:
    """Spatial size of every conv's/BN's input for one image."""
    names = {m: n for n, m in model.named_modules()}
    sizes: dict[str, tuple[int, ...]] = {}

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        sizes[names[module]] = tuple(inputs[0].shape[2:])

    trace_once(model, input_shape, (nn.Conv2d, nn.BatchNorm2d), hook)
    return sizes


def network_sites(net: PrunableNetwork) -> list[Site]:
    """Every layer of `net` whose width a group changes, in model order."""
    modules = dict(net.model.named_modules())
    shares = _shares(net.groups, modules)
    sizes = _input_sizes(net.model, net.arch.input_shape)
    sites = []
    for name, module in modules.items():
        if name not in shares:
            continue
        kind = _kind(module)
        params: dict[str, Any] = {"kind": kind, "bias": getattr(module, "bias", None) is not None}
        if kind in ("conv", "dwconv"):
            params |= {"kernel": list(module.kernel_size), "stride": list(module.stride),
                       "padding": module.padding if isinstance(module.padding, str) else list(module.padding),
                       "dilation": list(module.dilation), "input": list(sizes[name])}
        elif kind == "bn":
            params = {"kind": kind, "input": list(sizes[name])}
        sites.append(Site(name, params, _dims(module, kind)))
    return sites


def _axis_grid(lo: int, hi: int, round_to: int, points: int) -> list[int]:
    """Widths from lo to hi at round_to steps (both ends kept), thinned evenly to at most `points`."""
    values = sorted({lo, hi} | set(range(math.ceil(lo / round_to) * round_to, hi + 1, round_to)) - {0})
    if len(values) <= points:
        return values
    picks = np.unique(np.round(np.linspace(0, len(values) - 1, points)).astype(int))
    return [values[i] for i in picks]


def reachable_ranges(net: PrunableNetwork, max_prune_ratio: float, round_to: int) -> dict[str, list[tuple[int, int]]]:
    """Per modelled layer, per axis: (narrowest, widest) width the caps and rounding let pruning reach."""
    modules = dict(net.model.named_modules())
    shares = _shares(net.groups, modules)
    narrow = {g.name: narrowest_width(g.width, net.original_widths[g.name], max_prune_ratio, round_to)
              for g in net.groups}
    widths = net.widths()
    out = {}
    for name, axes in shares.items():
        dims = _dims(modules[name], _kind(modules[name]))
        out[name] = [(max(1, round(d - sum(s * (widths[g] - narrow[g]) for g, s in axes.get(a, {}).items()))), d)
                     for a, d in enumerate(dims)]
    return out


# ------------------------------------------------------------------------------------------- measuring


def _layer(params: dict[str, Any], dims: Sequence[int]) -> nn.Module:
    kind = params["kind"]
    if kind == "conv":
        return nn.Conv2d(dims[0], dims[1], params["kernel"], params["stride"], params["padding"], params["dilation"],
                         bias=params["bias"])
    if kind == "dwconv":
        return nn.Conv2d(dims[0], dims[0], params["kernel"], params["stride"], params["padding"], params["dilation"],
                         groups=dims[0], bias=params["bias"])
    if kind == "bn":
        return nn.BatchNorm2d(dims[0])
    return nn.Linear(dims[0], dims[1], bias=params["bias"])


def _medians(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, warmup: int, bf16: bool) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in pass_times_ms(models, x, repeats, warmup, bf16).items()}


def measure_table(arch: Arch, *, device: str = "cpu", batch: int = 256, precision: str = "fp32", round_to: int = 1,
                  max_prune_ratio: float = 0.75, points: int = 8, repeats: int = 10, warmup: int = 3,
                  channels_last: bool | None = None, threads: int | None = None,
                  progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure the latency table of `arch` (unpruned, fresh weights) on `device`; returns the JSON-able table."""
    if precision not in PRECISIONS:
        raise LatencyTableError(f"precision must be one of {', '.join(PRECISIONS)} (got {precision!r})")
    if device not in ("cpu", "cuda"):
        raise LatencyTableError(f"device must be cpu or cuda (got {device!r})")
    if device == "cuda" and not torch.cuda.is_available():
        raise LatencyTableError("device cuda: no CUDA device is available here")
    if batch < 1 or round_to < 1 or points < 2 or repeats < 1 or warmup < 0 or not 0 < max_prune_ratio < 1:
        raise LatencyTableError("batch, round_to, repeats must be >= 1, points >= 2, warmup >= 0, "
                                "max_prune_ratio in (0, 1)")
    channels_last = device == "cuda" if channels_last is None else channels_last
    bf16 = precision == "bf16"
    dev = torch.device(device)
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    net = PrunableNetwork.create(arch)
    sites = network_sites(net)
    ranges = reachable_ranges(net, max_prune_ratio, round_to)
    grids: dict[str, list[set[int]]] = {}
    params: dict[str, dict[str, Any]] = {}
    for site in sites:
        axes = grids.setdefault(site.signature, [set() for _ in site.dims])
        params[site.signature] = site.params
        for a, (lo, hi) in enumerate(ranges[site.name]):
            axes[a].update(_axis_grid(lo, hi, round_to, points))

    def prepare(module: nn.Module) -> nn.Module:
        module = module.eval().to(dev)
        return module.to(memory_format=torch.channels_last) if channels_last else module

    def tensor(shape: Sequence[int]) -> torch.Tensor:
        x = torch.randn(*shape, device=dev, dtype=torch.bfloat16 if bf16 else torch.float32)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

    with torch_threads(threads):
        model = prepare(net.model)
        full = tensor((batch, *arch.input_shape))
        network = pass_times_ms({"network": model}, full, repeats, warmup, bf16)["network"]
        entries = {}
        for n, (signature, axes) in enumerate(grids.items(), 1):
            p = params[signature]
            grid = [sorted(a) for a in axes]
            if progress is not None:
                progress(f"[{n}/{len(grids)}] {p['kind']} {'x'.join(str(len(g)) for g in grid)} widths")
            shape_of = (lambda c: (batch, c, *p["input"])) if p["kind"] != "linear" else (lambda c: (batch, c))
            if len(grid) == 1:
                ms = [_medians({"layer": prepare(_layer(p, [c]))}, tensor(shape_of(c)), repeats, warmup, bf16)["layer"]
                      for c in grid[0]]
            else:
                ms = []
                for c_in in grid[0]:
                    row = _medians({str(c_out): prepare(_layer(p, [c_in, c_out])) for c_out in grid[1]},
                                   tensor(shape_of(c_in)), repeats, warmup, bf16)
                    ms.append([row[str(c_out)] for c_out in grid[1]])
            entries[signature] = {"params": p, "grid": grid, "ms": ms}
        network += pass_times_ms({"network": model}, full, repeats, warmup, bf16)["network"]
        used_threads = torch.get_num_threads()
    return {
        "format": FORMAT, "version": VERSION,
        "model": arch.model, "num_classes": arch.num_classes, "input_shape": list(arch.input_shape),
        "device": {"kind": device, "name": device_name(device), "threads": used_threads,
                   "cpu_capability": torch.backends.cpu.get_cpu_capability(), "host": platform.node()},
        "batch": batch, "precision": precision, "channels_last": channels_last,
        "round_to": round_to, "max_prune_ratio": max_prune_ratio, "points": points,
        "repeats": repeats, "warmup": warmup, "torch": torch.__version__,
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - start, 1),
        "network_ms": statistics.median(network),
        "layers": {s.name: {"signature": s.signature, "dims": list(s.dims)} for s in sites},
        "signatures": entries,
    }


# ------------------------------------------------------------------------------------------- files


def write_table(table: dict[str, Any], location: str | Path | Storage) -> str:
    """Write a table atomically to a file location (a path or a URI); returns where."""
    target = as_storage(location)
    target.write_json("", table)
    return target.location


def read_table(location: str | Path | Storage) -> dict[str, Any]:
    """Read and check a table file (format, version, fields) from a path or a URI."""
    source = as_storage(location)
    try:
        table = json.loads(source.read_bytes(""))
    except FileNotFoundError:
        raise LatencyTableError(f"no latency table at {source.location}") from None
    except (StorageError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LatencyTableError(f"{source.location} is not a readable latency table ({type(exc).__name__})") from None
    check_format(table, source.location)
    return table


def check_format(table: Any, where: str | Path = "latency table") -> None:
    if not isinstance(table, dict) or table.get("format") != FORMAT:
        raise LatencyTableError(f"{where} is not a {FORMAT} file")
    if table.get("version") != VERSION:
        raise LatencyTableError(f"{where} has latency-table version {table.get('version')}, this build reads {VERSION}")
    missing = {"model", "input_shape", "device", "batch", "precision", "round_to", "max_prune_ratio", "network_ms",
               "layers", "signatures"} - table.keys()
    if missing:
        raise LatencyTableError(f"{where} lacks {', '.join(sorted(missing))}")
    for name, layer in table["layers"].items():
        entry = table["signatures"].get(layer.get("signature"))
        if entry is None or len(entry.get("grid", ())) != len(layer.get("dims", ())):
            raise LatencyTableError(f"{where}: layer {name} has no matching measurements")


def write_run_table(run: Storage, table: dict[str, Any]) -> str:
    """Keep the table a run uses in its run folder."""
    return write_table(table, run.child(RUN_TABLE_FILE))


def read_run_table(run: Storage) -> dict[str, Any] | None:
    """The table kept in a run folder, or None if the run has none."""
    return read_table(run.child(RUN_TABLE_FILE)) if run.is_file(RUN_TABLE_FILE) else None


# ------------------------------------------------------------------------------------------- estimating


def _interp(grid: Sequence[np.ndarray], values: np.ndarray, query: Sequence[np.ndarray]) -> np.ndarray:
    """Multilinear interpolation on a 1-D or 2-D grid, queries clamped to the grid's range."""
    corners = []
    for g, q in zip(grid, query):
        q = np.clip(np.asarray(q, dtype=np.float64), g[0], g[-1])
        if len(g) == 1:
            i0 = np.zeros(q.shape, dtype=np.int64)
            corners.append((i0, i0, np.zeros(q.shape)))
            continue
        i0 = np.clip(np.searchsorted(g, q, side="right") - 1, 0, len(g) - 2)
        corners.append((i0, i0 + 1, (q - g[i0]) / (g[i0 + 1] - g[i0])))
    if len(corners) == 1:
        (a0, a1, t), = corners
        return values[a0] * (1 - t) + values[a1] * t
    (a0, a1, t), (b0, b1, u) = corners
    return ((values[a0, b0] * (1 - u) + values[a0, b1] * u) * (1 - t)
            + (values[a1, b0] * (1 - u) + values[a1, b1] * u) * t)


class LatencyModel:
    """A network's latency estimated from a table: the `StepCost` of a latency target."""

    name = "latency"

    def __init__(self, table: dict[str, Any]) -> None:
        check_format(table)
        self.table = table
        self._entries = {sig: ([np.asarray(g, dtype=np.float64) for g in e["grid"]], np.asarray(e["ms"], np.float64))
                         for sig, e in table["signatures"].items()}
        self._signature = {name: layer["signature"] for name, layer in table["layers"].items()}
        self.original_ms = float(table["network_ms"])
        self.original_layers_ms = sum(float(self._layer_ms(name, layer["dims"]))
                                      for name, layer in table["layers"].items())

    @property
    def batch(self) -> int:
        return int(self.table["batch"])

    def _layer_ms(self, name: str, dims: Sequence[Any]) -> np.ndarray:
        grid, values = self._entries[self._signature[name]]
        return _interp(grid, values, [np.asarray(d, dtype=np.float64) for d in dims[:len(grid)]])

    def _calibrate(self, layers_ms: float | np.ndarray) -> float | np.ndarray:
        return layers_ms * (self.original_ms / self.original_layers_ms)

    def estimate_ms(self, net: PrunableNetwork, widths: dict[str, int] | None = None) -> float:
        """Estimated latency of `net` (ms per batch of `batch`), or of `net` with some groups at other `widths`."""
        return float(self._calibrate(self.layers_ms(net, widths)))

    def layers_ms(self, net: PrunableNetwork, widths: dict[str, int] | None = None) -> float:
        """Sum of the modelled layers' table latencies (uncalibrated)."""
        modules = dict(net.model.named_modules())
        changed = {}
        if widths:
            current = net.widths()
            changed = {g: current[g] - w for g, w in widths.items() if w != current[g]}
        shares = _shares(net.groups, modules) if changed else {}
        total = 0.0
        for name in self._signature:
            dims = list(_dims(modules[name], _kind(modules[name])))
            for axis, per_group in shares.get(name, {}).items():
                dims[axis] -= sum(s * changed.get(g, 0) for g, s in per_group.items())
            total += float(self._layer_ms(name, dims))
        return total

    def reduction(self, net: PrunableNetwork) -> float:
        """Fraction of the unpruned network's estimated latency removed."""
        return 1.0 - self.estimate_ms(net) / self.original_ms

    def removed_ms(self, net: PrunableNetwork, group: ChannelGroup, ks: Sequence[int] | np.ndarray) -> np.ndarray:
        """Estimated ms saved by removing k channels of `group`, per k."""
        ks = np.asarray(ks, dtype=np.float64)
        modules = dict(net.model.named_modules())
        total = np.zeros_like(ks)
        for name, axes in _shares([group], modules).items():
            if name not in self._signature:
                continue
            dims = _dims(modules[name], _kind(modules[name]))
            now = self._layer_ms(name, dims)
            after = [np.asarray(d) - axes.get(a, {}).get(group.name, 0.0) * ks for a, d in enumerate(dims)]
            total += now - self._layer_ms(name, after)
        return self._calibrate(total)

    def removed(self, net: PrunableNetwork, group: ChannelGroup, ks: np.ndarray) -> np.ndarray:
        return self.removed_ms(net, group, ks) / self.original_ms

    def max_reduction(self, net: PrunableNetwork, max_prune_ratio: float, round_to: int) -> float:
        """Estimated latency reduction with every group cut to the narrowest width the caps and rounding allow."""
        narrow = {g.name: narrowest_width(g.width, net.original_widths[g.name], max_prune_ratio, round_to)
                  for g in net.groups}
        return 1.0 - self.estimate_ms(net, narrow) / self.original_ms

    def describe(self) -> dict[str, Any]:
        """What a report says about the table (no measurements)."""
        t = self.table
        return {"model": t["model"], "device": t["device"]["name"], "device_kind": t["device"]["kind"],
                "batch": t["batch"], "precision": t["precision"], "round_to": t["round_to"],
                "network_ms": t["network_ms"], "created": t.get("created")}

    def check_fits(self, arch: Arch, *, device: str | None = None, name: str | None = None,
                   max_prune_ratio: float | None = None) -> None:
        """One-line error unless the table was measured for this architecture (and device, and cap)."""
        t = self.table
        if t["model"] != arch.model or list(t["input_shape"]) != list(arch.input_shape):
            c, h, w = t["input_shape"]
            raise LatencyTableError(
                f"the latency table is for {t['model']} at {c}x{h}x{w}, not {arch.model} at "
                f"{'x'.join(map(str, arch.input_shape))}: measure one with `laasp-dist latency-table {arch.model}`")
        sites = {s.name: s for s in network_sites(PrunableNetwork.create(arch))}
        mine = {n: {"signature": s.signature, "dims": list(s.dims)} for n, s in sites.items()}
        if mine != {n: {"signature": v["signature"], "dims": list(v["dims"])} for n, v in t["layers"].items()}:
            raise LatencyTableError(f"the latency table's layers do not match {arch.model} "
                                    f"({len(t['layers'])} layers in the table, {len(mine)} here)")
        if device is not None and t["device"]["kind"] != device:
            raise LatencyTableError(f"the latency table was measured on {t['device']['kind']} "
                                    f"({t['device']['name']}), this run prunes for {device}")
        if name is not None and t["device"]["name"] != name:
            raise LatencyTableError(f"the latency table was measured on {t['device']['name']}, this run's device is "
                                    f"{name}: measure one here (leave prune.latency_table unset)")
        if max_prune_ratio is not None and max_prune_ratio > t["max_prune_ratio"] + 1e-12:
            raise LatencyTableError(
                f"the latency table covers widths down to max_prune_ratio {t['max_prune_ratio']}, the run allows "
                f"{max_prune_ratio}: measure it with --max-prune-ratio {max_prune_ratio}")


# ------------------------------------------------------------------------------------------- runs


def given_run_table(config: "RunConfig", run: Storage, arch: Arch) -> LatencyModel | None:
    """Driver, before any work: the run folder's table (a resume), or `prune.latency_table`, read and checked
    against the model, the device kind (and this CPU's name for a local CPU run) and the cap.

    None when the run has neither (a latency-targeted run then measures its own before pretraining).
    """
    p = config.prune
    table = read_run_table(run)
    if table is None and p.latency_table is not None:
        table = read_table(p.latency_table)
    if table is None:
        return None
    model = LatencyModel(table)
    device = "cuda" if config.ray.use_gpu else "cpu"
    local_cpu = device == "cpu" and config.ray.address is None
    model.check_fits(arch, device=device, name=device_name("cpu") if local_cpu else None,
                     max_prune_ratio=p.max_prune_ratio)
    return model


def keep_run_table(run: Storage, model: LatencyModel | None) -> None:
    """Copy a given table into the run folder (kept there, a resume reads it back)."""
    if model is not None and not run.is_file(RUN_TABLE_FILE):
        write_run_table(run, model.table)


def run_table(config: "RunConfig", run: Storage, arch: Arch, device: torch.device,
              say: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Coordinator, before pretraining: the run folder's table, checked against this device; or, for a
    latency target without one, a table measured now on this device at `prune.latency_batch`
    (all of the machine's cores on a CPU; the training's bf16 and channels_last on a GPU) and kept in the
    run folder. A latency target the table cannot reach is an error here. None: no table, FLOPs target.
    The run's random stream is left as it was (a latency-targeted run pretrains as the FLOPs-targeted one)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _run_table(config, run, arch, device, say)


def _run_table(config: "RunConfig", run: Storage, arch: Arch, device: torch.device,
               say: Callable[[str], None]) -> dict[str, Any] | None:
    from .precision import train_numerics

    p, numerics = config.prune, train_numerics(config, device)
    table = read_run_table(run)
    gpu = device.type == "cuda"
    if table is None and p.target == "latency":
        round_to = resolve_round_to(p.round_to, device.type)
        say(f"[laasp] measuring a latency table of {arch.model} on {device_name(device.type)} at batch "
            f"{p.latency_batch} (round_to {round_to}), kept as {run.uri_of(RUN_TABLE_FILE)}")
        with torch.cuda.device(device) if gpu else nullcontext():
            table = measure_table(arch, device=device.type, batch=p.latency_batch,
                                  precision=numerics.precision if gpu else "fp32", round_to=round_to,
                                  max_prune_ratio=p.max_prune_ratio, channels_last=gpu and numerics.channels_last,
                                  threads=None if gpu else os.cpu_count())
        write_run_table(run, table)
    if table is None:
        return None
    model = LatencyModel(table)
    model.check_fits(arch, device=device.type, name=device_name(device.type), max_prune_ratio=p.max_prune_ratio)
    if p.target == "latency":
        from .search.loop import check_target

        check_target(PrunableNetwork.create(arch), p, model)
    return table


def table_estimate(table_path: str | Path | Storage, model_dir: str | Path | Storage) -> dict[str, Any]:
    """The table's estimate for the slim model in `model_dir` against its unpruned original."""
    from .pruning import load_slim_model

    model = LatencyModel(read_table(table_path))
    net = load_slim_model(model_dir)
    model.check_fits(net.arch)
    slim = model.estimate_ms(net)
    t = model.table
    return {"table": as_storage(table_path).location, "device": t["device"]["name"], "batch": t["batch"], "precision": t["precision"],
            "original_ms": model.original_ms, "slim_ms": slim, "speedup": model.original_ms / slim}


def _timing(model: LatencyModel | None, device: torch.device, config: "RunConfig") -> tuple[int, bool, bool, int | None]:
    """(batch, bf16, channels_last, threads) a run times its networks at: the table's, or without one
    `prune.latency_batch` and what a table would be measured at (all cores on a CPU; the training's
    bf16 and channels_last on a GPU)."""
    gpu = device.type == "cuda"
    if model is not None:
        t = model.table
        return model.batch, t["precision"] == "bf16", t["channels_last"], None if gpu else t["device"].get("threads")
    from .precision import train_numerics

    numerics = train_numerics(config, device)
    return (config.prune.latency_batch, gpu and numerics.precision == "bf16", gpu and numerics.channels_last,
            None if gpu else os.cpu_count())


def latency_summary(model: LatencyModel | None, final_dir: str | Path | Storage, device: torch.device, config: "RunConfig",
                    repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    """summary.json's `latency`: final/'s speed-up over the unpruned original measured now on this device (as
    `laasp-dist latency` does) beside the FLOPs promise and, with a table, beside the table's estimate. With a
    table, at its batch, precision and thread count; without, at `prune.latency_batch` as a table would be."""
    from .latency import benchmark
    from .pruning import load_slim_model

    batch, bf16, channels_last, threads = _timing(model, device, config)
    with torch_threads(threads):
        report = benchmark(final_dir, [batch], device=device.type, bf16=bf16, repeats=repeats, warmup=warmup,
                           channels_last=channels_last)
    row = report["batches"][0]
    out: dict[str, Any] = {
        "measured": {"batch": row["batch"], "base_ms": row["original_ms"], "final_ms": row["slim_ms"],
                     "reduction": 1 - row["slim_ms"] / row["original_ms"], "speedup": row["speedup"],
                     "device": report["device_name"], "precision": "bf16" if bf16 else "fp32",
                     "threads": report["threads"], "load_avg_1m": report["load_avg_1m"],
                     "repeats": repeats, "warmup": warmup},
        "flops_promise": report["macs"]["original"] / report["macs"]["slim"],  # not from the rounded ratio
        "table": None, "estimated": None,
    }
    if model is not None:
        final_ms = model.estimate_ms(load_slim_model(final_dir))
        out["table"] = model.describe()
        out["estimated"] = {"base_ms": model.original_ms, "final_ms": final_ms,
                            "reduction": 1 - final_ms / model.original_ms, "speedup": model.original_ms / final_ms}
    return out


# ------------------------------------------------------------------------------------------- measured checks


def measured_reduction(model: LatencyModel, net: PrunableNetwork, device: torch.device, config: "RunConfig",
                       repeats: int = 10, warmup: int = 3) -> dict[str, Any]:
    """`net` (a copy of it: it may be training) timed now against a fresh unpruned original, in turns, at the
    table's batch, precision and thread count; beside the table's estimate of the same reduction."""
    from .latency import time_pair
    from .models import create_model

    batch, bf16, channels_last, threads = _timing(model, device, config)
    arch = net.arch
    with torch.random.fork_rng(devices=[]):  # the original's initialisation must not move the run's RNG
        original = create_model(arch.model, arch.num_classes, arch.in_channels)
    slim = copy.deepcopy(net.model)
    with torch_threads(threads):
        row = time_pair(original, slim, arch.input_shape, batch, device, bf16=bf16, repeats=repeats, warmup=warmup,
                        channels_last=channels_last)
    return {"estimated": model.reduction(net), "measured": 1 - row.slim_ms / row.original_ms, "batch": batch,
            "base_ms": row.original_ms, "ms": row.slim_ms, "load_avg_1m": round(os.getloadavg()[0], 2)}


def next_latency_aim(cfg: "PruneConfig", estimated: float, measured: float, reachable: float) -> float | None:
    """After a measured check: the estimated reduction to prune to, or None when the target is settled.

    Settled once the measurement is within half a step of `target_latency_reduction` (or past it), or when
    the caps leave less than half a step to gain. Otherwise the estimate is aimed where the target would
    be measured if measured and estimated latency keep their present ratio:
    1 − (1 − target)·(1 − estimated)/(1 − measured), at most `reachable` (always above `estimated`: the
    measurement is short of the target).
    """
    target, step = cfg.target_latency_reduction, cfg.step_latency
    if measured >= target - step / 2:
        return None
    aim = min(1.0 - (1.0 - target) * (1.0 - estimated) / (1.0 - measured), reachable)
    return aim if aim - estimated >= step / 2 else None
