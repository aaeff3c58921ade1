"""Prunable channel groups on Torch-Pruning's DependencyGraph; masking and physical removal.

A group is a set of coupled channels that must go together: a conv's output
channels, its BN, every consumer's input channels, and for a residual stream all
convs writing into it. Groups are named after their root conv and listed in the
order the root appears in `model.named_modules()`.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import torch
import torch_pruning as tp
from torch import nn

_OUT_FNS = {
    tp.prune_conv_out_channels,
    tp.prune_depthwise_conv_out_channels,
    tp.prune_batchnorm_out_channels,
    tp.prune_linear_out_channels,
}


@dataclass(frozen=True)
class Member:
    """One layer dimension touched by a group; `idxs[j]` belongs to root channel `root_idxs[j]`."""

    name: str
    module: nn.Module
    dim: Literal["out", "in"]
    idxs: tuple[int, ...]
    root_idxs: tuple[int, ...]

    def indices_for(self, channels: Sequence[int]) -> list[int]:
        """This member's indices that belong to the given root channels."""
        chosen = set(channels)
        return [i for i, r in zip(self.idxs, self.root_idxs) if r in chosen]


@dataclass(frozen=True)
class ChannelGroup:
    """A prunable group at the network's current width."""

    name: str
    width: int
    members: tuple[Member, ...]
    root_bn: str | None

    def outputs(self, kind: type[nn.Module]) -> list[Member]:
        """Members of type `kind` whose output channels the group removes."""
        return [m for m in self.members if m.dim == "out" and isinstance(m.module, kind)]


def build_dependency_graph(model: nn.Module, input_shape: tuple[int, int, int]) -> tp.DependencyGraph:
    """Trace `model` once with a dummy input of shape (1, *input_shape)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)


def trace_groups(model: nn.Module, dg: tp.DependencyGraph, classifier: str) -> list[ChannelGroup]:
    """All prunable conv-rooted groups, in model order; the classifier's outputs are never pruned."""
    modules = dict(model.named_modules())
    order = {m: i for i, m in enumerate(modules.values())}
    roots = []
    for group in dg.get_all_groups(ignored_layers=[modules[classifier]], root_module_types=[nn.Conv2d]):
        convs = [item.dep.target.module for item in group.items
                 if item.dep.handler in _OUT_FNS and isinstance(item.dep.target.module, nn.Conv2d)]
        roots.append(min(convs, key=order.__getitem__))  # name a group after its earliest conv
    return [describe_group(model, dg, root) for root in sorted(roots, key=order.__getitem__)]


def describe_group(model: nn.Module, dg: tp.DependencyGraph, root: nn.Conv2d) -> ChannelGroup:
    """The group rooted at `root`, with every member's full index mapping."""
    names = {m: n for n, m in model.named_modules()}
    group = dg.get_pruning_group(root, tp.prune_conv_out_channels, list(range(root.out_channels)))
    members = []
    for item in group.items:
        module = item.dep.target.module
        if not isinstance(module, nn.Module) or module not in names:
            continue
        dim = "out" if item.dep.handler in _OUT_FNS else "in"
        members.append(Member(names[module], module, dim, tuple(int(i) for i in item.idxs),
                              tuple(int(i) for i in item.root_idxs)))
    root_bn = next((names[n.module] for n in dg.module2node[root].outputs if isinstance(n.module, nn.BatchNorm2d)), None)
    return ChannelGroup(names[root], root.out_channels, tuple(members), root_bn)


@contextmanager
def masked(group: ChannelGroup, channels: Sequence[int]) -> Iterator[None]:
    """Zero the given root channels at the output of every conv/BN/linear of the group.

    For scoring this equals physical removal: a zeroed channel contributes nothing
    to any consumer, and zeroing after each BN also removes the BN's shift.
    """
    with masked_variants(group, [tuple(channels)]):
        yield


@contextmanager
def masked_variants(group: ChannelGroup, variants: Sequence[Sequence[int]]) -> Iterator[None]:
    """`masked` for several candidates in one batch: rows [v·n, (v+1)·n) get variants[v] zeroed."""
    handles = []
    for member in group.members:
        if member.dim != "out":
            continue
        weight = member.module.weight
        mask = torch.ones(len(variants), weight.shape[0])
        for v, channels in enumerate(variants):
            mask[v, member.indices_for(channels)] = 0.0
        mask = mask.to(weight.device, non_blocking=True)  # filled on the host: no device sync per mask

        def zero(module: nn.Module, inputs: tuple, output: torch.Tensor, mask: torch.Tensor = mask) -> torch.Tensor:
            rows = mask.repeat_interleave(output.shape[0] // mask.shape[0], 0) if mask.shape[0] > 1 else mask
            return output * rows.view(*rows.shape, *([1] * (output.ndim - 2))).to(output.dtype)

        handles.append(member.module.register_forward_hook(zero))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def remove_channels(dg: tp.DependencyGraph, root: nn.Conv2d, channels: Sequence[int]) -> None:
    """Physically remove root channels (and everything coupled) from the network, in place."""
    dg.get_pruning_group(root, tp.prune_conv_out_channels, sorted(int(c) for c in channels)).prune()
