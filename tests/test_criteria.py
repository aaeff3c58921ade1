"""Criteria: the formulas of SPEC §1 on hand-made filters; registry; group vs root aggregation."""

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
    dist = torch.cdist(ROWS, ROWS).sum(1)
    assert get_criterion("fpgm").fn(ROWS, GEN).tolist() == pytest.approx(dist.tolist())
    unit = ROWS / ROWS.norm(dim=1, keepdim=True)
    assert get_criterion("cosine").fn(ROWS, GEN).tolist() == pytest.approx((1 - unit @ unit.T).sum(1).tolist())


def test_pool_and_unknown():
    assert list_criteria()[:4] == ["l1", "l2", "fpgm", "cosine"]
    assert {"bn_scale", "random"} <= set(list_criteria())
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
