"""32×32-input models: CIFAR ResNet-20/32/56/110 and VGG-16-BN.

The CIFAR ResNets use 1×1-conv projection shortcuts (+BN) where the shape changes
and identity shortcuts elsewhere ("option B"), as the LAASP reference code does,
not the zero-padding "option A" of He et al.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import register_model


class BasicBlock(nn.Module):
    """conv3×3-BN-ReLU-conv3×3-BN plus shortcut, then ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32×32 inputs: 16/32/64 channels in three stages."""

    def __init__(self, depth: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        planes, layers = 16, []
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(planes, width, 2 if (i > 0 and j == 0) else 1))
                planes = width
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for block in cifar_resnet_blocks(self):
            x = block(x)
        return x


def cifar_resnet_blocks(model: nn.Module) -> list[nn.Module]:
    """The model as a chain: stem, every residual block, head."""
    stem = nn.Sequential(model.conv1, model.bn1, model.relu)
    head = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return [stem, *model.layer1, *model.layer2, *model.layer3, head]


VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class CifarVGG(nn.Module):
    """VGG-16 with BN for 32×32 inputs; global average pool and one linear classifier."""

    def __init__(self, num_classes: int, in_channels: int, cfg=VGG16_CFG) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        for block in vgg_blocks(self):
            x = block(x)
        return x


def vgg_blocks(model: nn.Module) -> list[nn.Module]:
    """The model as a chain: one block per conv-BN-ReLU (pools attached), then the head."""
    blocks: list[nn.Module] = []
    current: list[nn.Module] = []
    for layer in model.features:
        if isinstance(layer, nn.Conv2d) and current:
            blocks.append(nn.Sequential(*current))
            current = []
        current.append(layer)
    blocks.append(nn.Sequential(*current))
    blocks.append(nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier))
    return blocks


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _cifar_resnet(depth: int, num_classes: int, in_channels: int) -> nn.Module:
    return CifarResNet(depth, num_classes, in_channels)


_RESNET = dict(input_size=32, classifier="fc", blocks=cifar_resnet_blocks)


@register_model(**_RESNET, description="CIFAR ResNet-20, projection shortcuts")
def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(20, num_classes, in_channels)


@register_model(**_RESNET, description="CIFAR ResNet-32, projection shortcuts")
def resnet32(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(32, num_classes, in_channels)


@register_model(**_RESNET, description="CIFAR ResNet-56, projection shortcuts")
def resnet56(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(56, num_classes, in_channels)


@register_model(**_RESNET, description="CIFAR ResNet-110, projection shortcuts")
def resnet110(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return _cifar_resnet(110, num_classes, in_channels)


@register_model(input_size=32, classifier="classifier", blocks=vgg_blocks, description="VGG-16-BN for 32×32")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return CifarVGG(num_classes, in_channels)
