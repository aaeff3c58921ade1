"""Group importance from a criterion, the channels a candidate removes, and the data pass of `taylor`."""

from __future__ import annotations

from typing import Iterable, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import PruningError
from .criteria import Criterion, Source
from .groups import ChannelGroup, Member

Aggregation = Literal["group", "root"]


def _member_rows(member: Member, source: Source, statistics: Mapping[str, Tensor] | None) -> Tensor:
    if source == "activation":
        if statistics is None or member.name not in statistics:
            raise PruningError(f"this criterion reads activation statistics measured on data, and there are none "
                               f"for {member.name} (only a search round, which has the scoring subset, measures them)")
        return statistics[member.name].unsqueeze(1)
    module = member.module
    if isinstance(module, nn.BatchNorm2d):
        return module.weight.detach().unsqueeze(1)
    return module.weight.detach().flatten(1)


def scored_members(group: ChannelGroup, source: Source, aggregation: Aggregation = "group") -> list[Member]:
    """The members whose channels a criterion of this `source` scores.

    `activation` criteria read each BN's output (the point the scorer's mask zeroes last), or
    each conv's where the group has no BN.
    """
    if source == "activation":
        kind = nn.BatchNorm2d if group.outputs(nn.BatchNorm2d) else nn.Conv2d
    else:
        kind = nn.BatchNorm2d if source == "bn" else nn.Conv2d
    members = group.outputs(kind)
    if aggregation == "root":
        root = group.root_bn if kind is nn.BatchNorm2d else group.name
        members = [m for m in members if m.name == root] or members[:1]
    return members


def group_importance(
    group: ChannelGroup, criterion: Criterion, aggregation: Aggregation = "group", seed: int = 0,
    statistics: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """One float64 score per root channel.

    `group`: each member layer's scores are divided by their mean (so layers of
    different scale weigh alike), mapped to root channels and averaged.
    `root`: the root conv (or its BN) alone, as the reference code ranks.
    `statistics` (module name → per-channel tensor) feeds `activation` criteria.
    """
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros(group.width, dtype=torch.float64)
    members = scored_members(group, criterion.source, aggregation)
    for member in members:
        rows = _member_rows(member, criterion.source, statistics).to("cpu", torch.float64)
        scores = criterion.fn(rows, generator)[list(member.idxs)]
        scores = scores / scores.mean().clamp_min(1e-12)
        per_root = torch.zeros(group.width, dtype=torch.float64).index_add_(0, torch.tensor(member.root_idxs), scores)
        counts = torch.zeros(group.width, dtype=torch.float64).index_add_(
            0, torch.tensor(member.root_idxs), torch.ones(len(member.root_idxs), dtype=torch.float64))
        total += per_root / counts.clamp_min(1)
    return total / max(len(members), 1)


def least_important(scores: Tensor, k: int) -> tuple[int, ...]:
    """The k lowest-scoring channels (ties: lower index first), sorted ascending."""
    order = torch.sort(scores, stable=True).indices[:k]
    return tuple(sorted(int(i) for i in order))


def taylor_statistics(model: nn.Module, names: Sequence[str], batches: Iterable[tuple[Tensor, Tensor]]
                      ) -> dict[str, Tensor]:
    """Per named module and output channel: the mean over images of |mean over positions of a · ∂L/∂a|.

    `a` is the module's output, `L` the sum of the images' cross-entropy losses, in eval mode (as
    the subset is scored), so the gradient at an image's activation is that of its own loss: the
    first-order Taylor estimate of the loss change when the channel is zeroed (Molchanov et al. 2017),
    averaged over images of its magnitude. One forward and backward per batch; float64 on the CPU.
    Parameters' `.grad` are left alone; every module's train/eval mode is restored.
    """
    modules = dict(model.named_modules())
    outputs: dict[str, Tensor] = {}

    def keep(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
            if name in outputs:
                raise PruningError(f"{name} runs more than once per forward: its channel statistics are ambiguous")
            outputs[name] = output
            return output.clone()  # later in-place ops (a residual `out += x`) must not rewrite `a`

        return hook

    handles = [modules[n].register_forward_hook(keep(n)) for n in names]
    modes = {m: m.training for m in model.modules()}
    sums: dict[str, Tensor] = {}
    images = 0
    model.eval()
    try:
        for x, y in batches:
            outputs.clear()
            with torch.enable_grad():
                logits = model(x)
                loss = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), y, reduction="sum")
                grads = torch.autograd.grad(loss, [outputs[n] for n in names])
            for n, g in zip(names, grads):
                term = (outputs[n].detach() * g).double()
                per_image = term.flatten(2).mean(2) if term.ndim > 2 else term
                sums[n] = sums.get(n, 0) + per_image.abs().sum(0).cpu()
            images += len(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
        outputs.clear()
    if images == 0:
        raise PruningError("the taylor criterion's gradient pass got no images")
    return {n: s / images for n, s in sums.items()}
