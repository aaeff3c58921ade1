"""224×224-input models from torchvision (ResNet-18/34/50, MobileNetV2), randomly initialised."""

from __future__ import annotations

from torch import nn
from torchvision import models as tvm

from .registry import register_model


def torchvision_resnet_blocks(model: nn.Module) -> list[nn.Module]:
    """The model as a chain: stem, every residual block, head."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return [stem, *model.layer1, *model.layer2, *model.layer3, *model.layer4, head]


def mobilenet_v2_blocks(model: nn.Module) -> list[nn.Module]:
    """The model as a chain: every feature block, then pool + classifier."""
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
    return [*model.features, head]


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    if in_channels == conv.in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     bias=conv.bias is not None)


def _torchvision_resnet(fn, num_classes: int, in_channels: int) -> nn.Module:
    model = fn(weights=None, num_classes=num_classes)
    model.conv1 = _replace_first_conv(model.conv1, in_channels)
    return model


_RESNET = dict(input_size=224, classifier="fc", blocks=torchvision_resnet_blocks)


@register_model(**_RESNET, description="torchvision ResNet-18")
def resnet18(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tvm.resnet18, num_classes, in_channels)


@register_model(**_RESNET, description="torchvision ResNet-34")
def resnet34(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tvm.resnet34, num_classes, in_channels)


@register_model(**_RESNET, description="torchvision ResNet-50")
def resnet50(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    return _torchvision_resnet(tvm.resnet50, num_classes, in_channels)


@register_model(input_size=224, classifier="classifier.1", blocks=mobilenet_v2_blocks,
                description="torchvision MobileNetV2")
def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3) -> nn.Module:
    model = tvm.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = _replace_first_conv(model.features[0][0], in_channels)
    return model
