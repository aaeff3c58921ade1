"""Model registry: every model builds, its block chain equals its forward, known sizes hold."""

import pytest
import torch

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
