"""Pruning core: masking equals physical removal, FLOPs bookkeeping, step sizing and caps."""

import math

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from conftest import randomise_bn
from laasp_dist.errors import PruningError
from laasp_dist.models import list_models, model_entry
from laasp_dist.pruning import Arch, PrunableNetwork, get_criterion, list_criteria
from laasp_dist.pruning.importance import scored_members, taylor_statistics
from laasp_dist.pruning.baseline import prune_by_criterion
from laasp_dist.pruning.steps import macs_removed, min_width


def small_arch(name: str) -> Arch:
    """Every model at a small input so the whole matrix runs in seconds."""
    size = 32 if model_entry(name).input_size == 32 else 64
    return Arch(name, num_classes=10, in_channels=3, input_size=size)


def torch_macs(model: nn.Module, shape) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name", list_models())
def test_mask_equals_physical_removal_for_every_criterion(name):
    torch.manual_seed(0)
    arch = small_arch(name)
    x = torch.randn(4, *arch.input_shape)
    for i, criterion in enumerate(list_criteria()):
        net = PrunableNetwork.create(arch)
        randomise_bn(net.model, seed=i)
        net.model.eval()
        statistics = None
        if get_criterion(criterion).source == "activation":  # taylor: measured on data, here on x
            names = [m.name for g in net.groups for m in scored_members(g, "activation")]
            statistics = taylor_statistics(net.model, names, [(x, torch.arange(len(x)) % 10)])
        candidates = net.candidates([criterion], 0.02, 0.75, statistics=statistics)
        # spread over the network, the criteria taking turns: first group (the residual stream in ResNets),
        # middle and last
        cand = (candidates[0], candidates[len(candidates) // 2], candidates[-1])[i % 3]
        with torch.no_grad(), net.masked(cand.group, cand.channels):
            masked = net.model(x)
        other = PrunableNetwork.create(arch)
        other.model.load_state_dict(net.model.state_dict())
        other.model.eval()
        other.prune(cand.group, cand.channels, criterion)
        with torch.no_grad():
            pruned = other.model(x)
        assert other.group(cand.group).width == net.group(cand.group).width - cand.k
        # 1e-5 on the logit scale (deep random-init ResNets reach logits of ~1e9)
        scale = max(1.0, masked.abs().max().item())
        torch.testing.assert_close(pruned / scale, masked / scale, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet56", "vgg16_bn", "mobilenet_v2", "resnet50"])
def test_flops_after_prune_match_torch_counter(name):
    arch = small_arch(name)
    net = PrunableNetwork.create(arch)
    assert net.cost.macs == torch_macs(net.model, arch.input_shape)
    for i in (1, 2, 3):
        before = net.cost.macs
        cand = net.candidates(["l1"], 0.01, 0.75)[len(net.groups) * i // 4]
        group = net.group(cand.group)
        expected = macs_removed(group, cand.k, net.cost.layer_macs)
        per_channel = macs_removed(group, 1, net.cost.layer_macs)
        net.apply(cand)
        assert net.cost.macs == torch_macs(net.model, arch.input_shape)
        assert before - net.cost.macs == pytest.approx(expected, rel=1e-9)
        # a step removes about step_flops of the ORIGINAL MACs, within one channel's worth
        assert abs((before - net.cost.macs) - 0.01 * net.base_macs) <= per_channel


def test_caps_hold_and_one_channel_stays():
    net = PrunableNetwork.create(Arch("resnet20", 10))
    original = dict(net.original_widths)
    for _ in range(40):
        cands = net.candidates(["l2"], 0.05, 0.75)
        if not cands:
            break
        net.apply(cands[0])  # always the first group, so it hits its cap
    first = net.groups[0]
    assert first.width == min_width(original[first.name], 0.75) == 4
    assert all(g.width >= max(1, math.ceil(original[g.name] * 0.25)) for g in net.groups)
    assert min_width(3, 0.9) == 1 and min_width(1, 0.75) == 1


def test_last_step_lands_on_target_within_one_channel():
    net = PrunableNetwork.create(Arch("resnet32", 10))
    prune_by_criterion(net, "fpgm", 0.30, step_fraction=0.04)
    assert net.macs_reduction >= 0.30
    last = net.prunes[-1]
    over = (net.macs_reduction - 0.30) * net.base_macs
    assert over <= macs_removed(net.group(last.group), 1, net.cost.layer_macs) * 1.5


def test_unreachable_target_is_an_error():
    net = PrunableNetwork.create(Arch("resnet20", 10))
    with pytest.raises(PruningError, match="unreachable"):
        prune_by_criterion(net, "l1", 0.95, step_fraction=0.05, max_prune_ratio=0.3)


def test_invalid_prune_request_is_an_error():
    net = PrunableNetwork.create(Arch("resnet20", 10))
    with pytest.raises(PruningError, match="no prunable group"):
        net.prune("fc", [0])
    with pytest.raises(PruningError, match="cannot remove"):
        net.prune("conv1", list(range(16)))
