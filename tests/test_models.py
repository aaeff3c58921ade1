"""Model registry: every model builds, its block chain equals its forward (and, for the 32×32 models, whose
forward is that chain, a forward written out here), known sizes hold."""

import pytest
import torch
import torch.nn.functional as F

from laasp_dist.errors import ConfigError
from laasp_dist.models import create_model, list_models, model_entry
from laasp_dist.pruning import count_cost


@pytest.mark.parametrize("name", list_models())
def test_blocks_compose_to_forward(name):
    entry = model_entry(name)
    size = 32 if entry.input_size == 32 else 64
    model = create_model(name, num_classes=7, in_channels=1).eval()
    x = torch.randn(2, 1, size, size)
    with torch.no_grad():
        y = model(x)
        z = x
        for block in entry.blocks(model):
            z = block(z)
    assert y.shape == (2, 7)
    assert torch.equal(y, z)


def _bn(x: torch.Tensor, bn: torch.nn.BatchNorm2d) -> torch.Tensor:
    """Eval-mode BN written out: (x − running mean) / √(running var + ε) · γ + β."""
    def per_channel(t: torch.Tensor) -> torch.Tensor:
        return t.view(1, -1, 1, 1)
    return (x - per_channel(bn.running_mean)) / torch.sqrt(per_channel(bn.running_var) + bn.eps) \
        * per_channel(bn.weight) + per_channel(bn.bias)


def _cifar_resnet_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """He et al.'s CIFAR ResNet on the model's weights: 3×3 stem, three stages of basic blocks (16/32/64 channels,
    the first block of stages 2 and 3 halving the size through a 1×1-conv+BN projection), global mean, linear."""
    relu = torch.relu
    x = relu(_bn(F.conv2d(x, model.conv1.weight, stride=1, padding=1), model.bn1))
    for stage, width in enumerate((16, 32, 64)):
        for j, b in enumerate(getattr(model, f"layer{stage + 1}")):
            stride = 2 if stage > 0 and j == 0 else 1
            out = relu(_bn(F.conv2d(x, b.conv1.weight, stride=stride, padding=1), b.bn1))
            out = _bn(F.conv2d(out, b.conv2.weight, stride=1, padding=1), b.bn2)
            if x.shape[1] != width or stride != 1:
                shortcut = _bn(F.conv2d(x, b.downsample[0].weight, stride=stride), b.downsample[1])
            else:
                assert b.downsample is None
                shortcut = x
            x = relu(out + shortcut)
            assert x.shape[1:] == (width, 32 >> stage, 32 >> stage)
    return x.mean((2, 3)) @ model.fc.weight.T + model.fc.bias


def _vgg16_bn_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """VGG-16-BN (13 conv3×3-BN-ReLU, max-pool 2×2 after the 2nd, 4th, 7th and 10th) on the model's weights,
    then global mean and linear."""
    convs = [m for m in model.features if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.features if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(bns) == 13
    for i, (conv, bn) in enumerate(zip(convs, bns)):
        x = torch.relu(_bn(F.conv2d(x, conv.weight, padding=1), bn))
        if i in (1, 3, 6, 9):
            x = F.max_pool2d(x, 2)
    return x.mean((2, 3)) @ model.classifier.weight.T + model.classifier.bias


@pytest.mark.parametrize("name", [n for n in list_models() if model_entry(n).input_size == 32])
def test_cifar_block_chain_matches_a_forward_written_out(name):
    """Their forward *is* the block chain, so the chain is checked against the architecture written out here."""
    reference = {"resnet": _cifar_resnet_forward, "vgg16_bn": _vgg16_bn_forward}
    forward = next((f for prefix, f in reference.items() if name.startswith(prefix)), None)
    assert forward is not None, f"no written-out forward for the 32×32 model {name}"
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=1).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):  # BN that is not an identity
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        expected = forward(model, x)
        z = x
        for block in model_entry(name).blocks(model):
            z = block(z)
    assert expected.shape == (2, 7)
    torch.testing.assert_close(z, expected, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(expected[0], expected[1])  # two inputs, two outputs: nothing collapsed


@pytest.mark.parametrize("name, macs, params", [
    ("resnet50", 4.11e9, 25_557_032),
    ("resnet18", 1.82e9, 11_689_512),
])
def test_known_imagenet_sizes(name, macs, params):
    cost = count_cost(create_model(name, num_classes=1000), (3, 224, 224))
    assert cost.params == params
    # SPEC quotes figures that also count BN/pooling; conv + linear MACs are within 1 %.
    assert abs(cost.macs - macs) / macs < 0.01


def test_cifar_resnet_depths_and_shortcuts():
    sizes = {n: sum(p.numel() for p in create_model(n).parameters()) for n in ("resnet20", "resnet56", "resnet110")}
    assert sizes["resnet20"] < sizes["resnet56"] < sizes["resnet110"]
    model = create_model("resnet56")
    projections = [m for n, m in model.named_modules() if n.endswith("downsample")]
    assert len(projections) == 2  # 1×1-conv projection only where the stage changes shape


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown model 'resnet9000'"):
        create_model("resnet9000")
