"""Scoring candidates on one shard: per-candidate, per-image cross-entropy losses (float64).

Two scorers, one contract — `scorer(net, candidates, shards, options, calibration) -> [array [C, N_s] per shard]`:

* `reference`: what the paper's code does, one candidate at a time: deep-copy the
  model, trace a fresh dependency graph, physically prune, forward the shard. It is
  the oracle of the tests and the baseline of the benchmark.
* `fast`: the same numbers without copies. Removed channels are zeroed at the output
  of every conv/BN of the group (exact: a zero channel contributes nothing to any
  consumer and zeroing after the BN removes its shift). The model is walked as its
  chain of blocks (stem, residual blocks, head); a candidate only needs the forward
  from the first block that holds one of its group's layers, so the prefix is
  computed once per data chunk and walked forward progressively. Candidates that
  remove exactly the same channels (e.g. `l1` and `l2` agreeing) are scored once.
  Distinct candidates of one group can be batched into one forward (`max_batch`).

Arithmetic: `ScoreOptions.precision` (``fp32`` or ``bf16`` autocast on the scoring device) and
`channels_last` (model and inputs in that memory format), through `laasp_dist.precision`; the
per-image losses are computed in float64 from the logits either way.

Optional BN recalibration (`calibration` images): before scoring, each candidate's
BN running statistics are re-estimated on those images with the candidate applied
(cumulative average over chunks of `chunk_size`, BN layers in train mode, every
other layer in eval mode), as adaptive-BN does. The fast scorer re-estimates the
unmasked network once and then, per candidate, only the BNs at or after the
candidate's first block (those before it see the same inputs, so their statistics
are the same); that costs about one extra suffix forward over the calibration
images per distinct candidate.
"""

from __future__ import annotations

import copy
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..models import model_entry
from ..precision import Numerics
from ..pruning import Candidate, PrunableNetwork
from ..pruning.groups import ChannelGroup, masked_variants
from .subset import Shard


@dataclass(frozen=True)
class ScoreOptions:
    """How a shard is walked: images per data chunk, images per forward pass (variants × chunk), and the
    arithmetic (`precision`: fp32 | bf16) and memory format (`channels_last`) of the forward passes."""

    chunk_size: int = 500
    max_batch: int = 500
    precision: str = "fp32"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.chunk_size < 1 or self.max_batch < 1:
            raise ConfigError(f"chunk_size and max_batch must be >= 1 (got {self.chunk_size}, {self.max_batch})")
        Numerics(self.precision, self.channels_last)  # type: ignore[arg-type]  # validates the precision

    def numerics(self, device: torch.device) -> Numerics:
        """These options on `device`."""
        return Numerics(self.precision, self.channels_last, device.type)  # type: ignore[arg-type]


Scorer = Callable[[PrunableNetwork, Sequence[Candidate], Sequence[Shard], ScoreOptions, "Shard | None"],
                  list[np.ndarray]]


def _per_image_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.double(), labels, reduction="none")


def _batchnorms(modules: Iterator[nn.Module]) -> list[nn.modules.batchnorm._BatchNorm]:
    seen, out = set(), []
    for m in modules:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; afterwards every BN buffer, momentum and every module's mode are as before."""
    modes = {m: m.training for m in model.modules()}
    bns = _batchnorms(model.modules())
    saved = [({k: v.clone() for k, v in bn._buffers.items() if v is not None}, bn.momentum) for bn in bns]
    model.eval()
    try:
        yield
    finally:
        for bn, (buffers, momentum) in zip(bns, saved):
            for k, v in buffers.items():
                bn._buffers[k].copy_(v)
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode


def _start_recalibration(bns: Sequence[nn.Module]) -> None:
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration chunks
        bn.train()


def _chunks(shard: Shard, device: torch.device, size: int, numerics: Numerics) -> list[torch.Tensor]:
    return [numerics.inputs(shard.inputs(device, s, s + size)) for s in range(0, len(shard), size)]


# ----------------------------------------------------------------------------------------------- reference

# Seconds the reference scorer spent in this process on copy + trace + prune ("setup") and on the
# forward passes (for the benchmark's breakdown; reset it yourself).
REFERENCE_TIMINGS = {"setup": 0.0, "forward": 0.0}


def score_reference(net: PrunableNetwork, candidates: Sequence[Candidate], shards: Sequence[Shard],
                    options: ScoreOptions, calibration: Shard | None = None) -> list[np.ndarray]:
    """The paper's procedure: per candidate a deep copy, a fresh trace, a physical prune, a forward over the shards."""
    device = net.parameters_device()
    numerics = options.numerics(device)
    out = [np.empty((len(candidates), len(shard)), dtype=np.float64) for shard in shards]
    for i, cand in enumerate(candidates):
        t0 = time.perf_counter()
        clone = PrunableNetwork(copy.deepcopy(net.model), net.arch, base_macs=net.base_macs,
                                original_widths=net.original_widths)
        clone.apply(cand)
        model = numerics.model(clone.model.eval())
        t1 = time.perf_counter()
        REFERENCE_TIMINGS["setup"] += t1 - t0
        with torch.no_grad(), numerics.autocast():
            if calibration is not None:
                bns = _batchnorms(model.modules())
                _start_recalibration(bns)
                for x in _chunks(calibration, device, options.chunk_size, numerics):
                    model(x)
                model.eval()
            for shard, losses in zip(shards, out):
                labels = shard.labels.to(device)
                for start in range(0, len(shard), options.chunk_size):
                    logits = model(numerics.inputs(shard.inputs(device, start, start + options.chunk_size)))
                    losses[i, start:start + len(logits)] = _per_image_loss(
                        logits, labels[start:start + len(logits)]).cpu().numpy()
        REFERENCE_TIMINGS["forward"] += time.perf_counter() - t1
        del clone, model
    return out


# ----------------------------------------------------------------------------------------------- fast


@dataclass
class _Plan:
    """Distinct variants of a shard task, grouped by group and ordered by their first block."""

    blocks: list[nn.Module]
    steps: list[tuple[int, ChannelGroup, list[int]]]  # (first block, group, variant ids)
    variants: list[tuple[str, tuple[int, ...]]]
    variant_of: list[int]


def first_blocks(net: PrunableNetwork) -> tuple[list[nn.Module], dict[str, int]]:
    """The model's block chain and, per group, the index of the first block holding one of its outputs."""
    blocks = model_entry(net.arch.model).blocks(net.model)
    block_of: dict[int, int] = {}
    for i, block in enumerate(blocks):
        for m in block.modules():
            block_of.setdefault(id(m), i)
    first = {g.name: min((block_of.get(id(m.module), 0) for m in g.members if m.dim == "out"), default=0)
             for g in net.groups}
    return blocks, first


def _plan(net: PrunableNetwork, candidates: Sequence[Candidate]) -> _Plan:
    blocks, first = first_blocks(net)
    keys: dict[tuple[str, tuple[int, ...]], int] = {}
    variant_of = [keys.setdefault((c.group, tuple(c.channels)), len(keys)) for c in candidates]
    variants = list(keys)
    order = {g.name: i for i, g in enumerate(net.groups)}
    by_group: dict[str, list[int]] = {}
    for v, (group, _) in enumerate(variants):
        by_group.setdefault(group, []).append(v)
    names = sorted(by_group, key=lambda g: (first[g], order[g]))
    steps = [(first[g], net.group(g), by_group[g]) for g in names]
    return _Plan(blocks, steps, variants, variant_of)


def _run(blocks: Sequence[nn.Module], start: int, x: torch.Tensor) -> torch.Tensor:
    for block in blocks[start:]:
        x = block(x)
    return x


def _recalibrate_fast(net: PrunableNetwork, plan: _Plan, calibration: Shard, options: ScoreOptions,
                      device: torch.device) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Base BN re-estimation (left in the model) and per-variant statistics of the BNs from its first block on."""
    all_bns = _batchnorms(net.model.modules())
    cal = _chunks(calibration, device, options.chunk_size, options.numerics(device))
    _start_recalibration(all_bns)
    for x in cal:
        _run(plan.blocks, 0, x)
    base = {id(bn): (bn.running_mean.clone(), bn.running_var.clone()) for bn in all_bns}
    for bn in all_bns:  # train-mode forwards that leave the statistics alone
        bn.momentum = 0.0
    later = [_batchnorms(m for b in plan.blocks[f:] for m in b.modules()) for f in range(len(plan.blocks) + 1)]
    overrides: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    h, p = cal, 0
    for f, group, vids in plan.steps:
        while p < f:
            h = [plan.blocks[p](x) for x in h]
            p += 1
        for v in vids:
            _start_recalibration(later[f])
            with masked_variants(group, [plan.variants[v][1]]):
                for x in h:
                    _run(plan.blocks, f, x)
            overrides[v] = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in later[f]]
            for bn in later[f]:
                bn.running_mean.copy_(base[id(bn)][0])
                bn.running_var.copy_(base[id(bn)][1])
                bn.momentum = 0.0
    for bn in all_bns:
        bn.eval()
    return overrides


@contextmanager
def _bn_override(bns: Sequence[nn.Module], stats: list[tuple[torch.Tensor, torch.Tensor]] | None) -> Iterator[None]:
    if stats is None:
        yield
        return
    saved = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    for bn, (mean, var) in zip(bns, stats):
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
    try:
        yield
    finally:
        for bn, (mean, var) in zip(bns, saved):
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)


def score_fast(net: PrunableNetwork, candidates: Sequence[Candidate], shards: Sequence[Shard],
               options: ScoreOptions, calibration: Shard | None = None) -> list[np.ndarray]:
    """Masked, prefix-cached, deduplicated scoring; equals `score_reference` up to float rounding."""
    if not candidates:
        return [np.empty((0, len(shard)), dtype=np.float64) for shard in shards]
    device = net.parameters_device()
    numerics = options.numerics(device)
    numerics.model(net.model)
    plan = _plan(net, candidates)
    out = []
    with _preserved(net.model), torch.no_grad(), numerics.autocast():
        overrides = _recalibrate_fast(net, plan, calibration, options, device) if calibration is not None else None
        later = {f: _batchnorms(m for b in plan.blocks[f:] for m in b.modules()) for f, _, _ in plan.steps}
        for shard in shards:
            # losses stay on the scoring device until the shard is done: no host sync per forward pass
            losses_out = torch.empty((len(plan.variants), len(shard)), dtype=torch.float64, device=device)
            labels_all = shard.labels.to(device)
            for start in range(0, len(shard), options.chunk_size):
                x = numerics.inputs(shard.inputs(device, start, start + options.chunk_size))
                n = len(x)
                labels = labels_all[start:start + n]
                h, p = x, 0
                for f, group, vids in plan.steps:
                    while p < f:
                        h = plan.blocks[p](h)
                        p += 1
                    per_pass = 1 if overrides is not None else max(1, options.max_batch // n)
                    for j in range(0, len(vids), per_pass):
                        batch = vids[j:j + per_pass]
                        z = h if len(batch) == 1 else h.repeat(len(batch), *([1] * (h.ndim - 1)))
                        stats = overrides[batch[0]] if overrides is not None else None
                        with masked_variants(group, [plan.variants[v][1] for v in batch]), \
                                _bn_override(later[f], stats):
                            logits = _run(plan.blocks, f, z)
                        losses = _per_image_loss(logits, labels.repeat(len(batch))).view(len(batch), n)
                        for row, v in enumerate(batch):
                            losses_out[v, start:start + n] = losses[row]
            out.append(losses_out.cpu().numpy())
    return [o[plan.variant_of] for o in out]


SCORERS: dict[str, Scorer] = {"reference": score_reference, "fast": score_fast}


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise ConfigError(f"unknown scorer {name!r}; known: {', '.join(SCORERS)}") from None
