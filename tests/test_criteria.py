"""Criteria: the formulas of SPEC §1 on hand-made filters; registry; group vs root aggregation."""

import math

import numpy as np
import pytest
import torch

from laasp_dist.errors import ConfigError
from laasp_dist.pruning import Arch, PrunableNetwork, get_criterion, list_criteria, register_criterion
from laasp_dist.pruning.criteria import _CRITERIA
from laasp_dist.pruning.importance import group_importance, least_important

ROWS = torch.tensor([[1.0, 0.0], [0.0, -2.0], [3.0, 4.0], [1.0, 0.1]], dtype=torch.float64)
GEN = torch.Generator().manual_seed(0)


def test_formulas():
    assert get_criterion("l1").fn(ROWS, GEN).tolist() == [1.0, 2.0, 7.0, 1.1]
    assert get_criterion("l2").fn(ROWS, GEN).tolist() == pytest.approx([1.0, 2.0, 5.0, (1.01) ** 0.5])
    # fpgm and cosine against plain loops over every pair of filters (numpy, math), not torch's matrix forms
    rows = ROWS.numpy()
    n = len(rows)
    dist = [sum(math.sqrt(sum((a - b) ** 2 for a, b in zip(rows[i], rows[j]))) for j in range(n)) for i in range(n)]
    assert get_criterion("fpgm").fn(ROWS, GEN).tolist() == pytest.approx(dist, rel=1e-12)
    assert dist[0] == pytest.approx(math.sqrt(5) + math.sqrt(20) + 0.1)  # row 0 by hand: to rows 1, 2, 3

    def cos(u: np.ndarray, v: np.ndarray) -> float:
        return float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v)))

    cosine = [sum(1 - cos(rows[i], rows[j]) for j in range(n)) for i in range(n)]
    assert get_criterion("cosine").fn(ROWS, GEN).tolist() == pytest.approx(cosine, rel=1e-12)
    assert cosine[0] == pytest.approx(1 + (1 - 0.6) + (1 - 1 / math.sqrt(1.01)))  # row 0 by hand


def test_pool_and_unknown():
    assert list_criteria()[:4] == ["l1", "l2", "fpgm", "cosine"]
    assert {"bn_scale", "taylor", "random"} <= set(list_criteria())
    with pytest.raises(ConfigError, match="unknown criterion 'nope'"):
        get_criterion("nope")


def test_least_important_is_stable_on_ties():
    assert least_important(torch.tensor([1.0, 1.0, 1.0, 0.5]), 2) == (0, 3)


def test_adding_a_criterion_is_one_function():
    @register_criterion("max_abs")
    def max_abs(rows, generator):
        return rows.abs().amax(1)

    try:
        assert get_criterion("max_abs").fn(ROWS, GEN).tolist() == [1.0, 2.0, 4.0, 1.0]
        net = PrunableNetwork.create(Arch("resnet20", 10))
        assert {c.criterion for c in net.candidates(["max_abs"], 0.01, 0.75)} == {"max_abs"}
    finally:
        del _CRITERIA["max_abs"]


def test_group_aggregation_differs_from_root_alone():
    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10))
    stream = net.group("conv1")  # stem + every block output of stage 1 write into this stream
    l1 = get_criterion("l1")
    root = group_importance(stream, l1, "root")
    expected = net.model.conv1.weight.detach().abs().flatten(1).sum(1).double()
    torch.testing.assert_close(root, expected / expected.mean())
    group = group_importance(stream, l1, "group")
    assert len(stream.outputs(torch.nn.Conv2d)) == 4
    assert not torch.allclose(group, root)


def test_bn_scale_reads_the_bn():
    net = PrunableNetwork.create(Arch("resnet20", 10))
    g = net.group("layer1.0.conv1")
    net.model.layer1[0].bn1.weight.data = torch.arange(1, 17, dtype=torch.float32)
    scores = group_importance(g, get_criterion("bn_scale"), "group")
    assert least_important(scores, 3) == (0, 1, 2)


def test_random_is_seeded():
    net = PrunableNetwork.create(Arch("resnet20", 10))
    a = net.candidates(["random"], 0.01, 0.75, seed=1)
    b = net.candidates(["random"], 0.01, 0.75, seed=1)
    c = net.candidates(["random"], 0.01, 0.75, seed=2)
    assert a == b and a != c


def _directional_derivative(model, x, y, module, channel, eps=1e-7):
    """Per image: d/dε of its loss when `channel` of `module`'s output is scaled by (1 + ε) (central differences)
    = Σ over positions of a·∂L/∂a; and the number of positions. ε is small enough (float64) that no ReLU
    or max-pool downstream switches inside ±ε (with 1e-5 one of the stem's channels here does)."""
    shape = {}

    def loss_at(scale):
        def hook(m, inputs, out):
            shape["hw"] = out[0, 0].numel()
            out = out.clone()
            out[:, channel] *= scale
            return out

        handle = module.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        finally:
            handle.remove()

    return (loss_at(1 + eps) - loss_at(1 - eps)) / (2 * eps), shape["hw"]


def test_taylor_statistics_equal_finite_differences(fashion_train):
    """|a·∂L/∂a| per channel against forward passes alone; torchvision ResNet-18 adds its residual in place
    (`out += identity`) right after bn2, which must not leak into bn2's statistics."""
    from conftest import randomise_bn
    from laasp_dist.pruning.importance import taylor_statistics

    torch.manual_seed(0)
    model = PrunableNetwork.create(Arch("resnet18", 10, 3, 32)).model
    randomise_bn(model, 0, bias_scale=0.2)
    model.double()
    model.train()  # the pass must score in eval mode and restore this
    x = (fashion_train.images[:6].double() / 255 - 0.3) / 0.3
    y = fashion_train.labels[:6]
    names = ["bn1", "layer1.0.bn2", "layer3.1.bn1", "layer4.1.bn2"]
    stats = taylor_statistics(model, names, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert model.training and all(p.grad is None for p in model.parameters())
    model.eval()
    modules = dict(model.named_modules())
    for name in names:
        assert stats[name].shape == (modules[name].num_features,) and stats[name].dtype == torch.float64
        for channel in (0, 3, modules[name].num_features - 1):
            d, hw = _directional_derivative(model, x, y, modules[name], channel)
            expected = (d.abs() / hw).mean().item()
            assert stats[name][channel].item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_taylor_ranks_by_its_statistics_and_needs_them():
    from laasp_dist.errors import PruningError

    torch.manual_seed(0)
    net = PrunableNetwork.create(Arch("resnet20", 10))
    stats = {}
    for g in net.groups:
        for m in g.outputs(torch.nn.BatchNorm2d):
            stats[m.name] = torch.rand(m.module.num_features, dtype=torch.float64)
    cands = net.candidates(["taylor"], 0.02, 0.75, statistics=stats)
    plain = {c.group: c for c in cands}["layer2.1.conv1"]  # one BN: its statistics alone decide
    order = np.argsort(stats["layer2.1.bn1"].numpy(), kind="stable")[:plain.k]
    assert plain.channels == tuple(sorted(order.tolist()))
    with pytest.raises(PruningError, match="activation statistics"):
        net.candidates(["taylor"], 0.02, 0.75)
