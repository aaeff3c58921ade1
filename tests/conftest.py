"""Shared, generic fixtures: the real data sets that ship on these machines, loaded or written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from data_pipelines.make_folder import foolbox_data_dir, write_fashion_mnist_folder
from data_pipelines.small_images import ImageArrays, load_small_dataset


# Relative difference allowed between a candidate's mean subset loss scored in bf16 and in fp32: above the
# largest one measured over a whole pruning run (docs/benchmarks.md, "bf16 scoring"), far below the gaps
# between candidates that decide a round.
BF16_SCORE_REL_TOL = 1e-2


def randomise_bn(model: nn.Module, seed: int = 0, bias_scale: float = 0.5) -> None:
    """Non-trivial BN affine and running stats, so that a wrong mask or a wrong loss shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.data = torch.rand(n, generator=g) + 0.5
            m.bias.data = torch.randn(n, generator=g) * bias_scale
            m.running_mean = torch.randn(n, generator=g) * 0.1
            m.running_var = torch.rand(n, generator=g) + 0.5


def pytest_configure(config: pytest.Config) -> None:
    # torchvision 0.29 deprecates its image codecs (for TorchCodec, not installed here); they still work.
    config.addinivalue_line(
        "filterwarnings", "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning"
    )


@pytest.fixture(scope="session")
def fashion_train() -> ImageArrays:
    """Fashion-MNIST train split (60 000 images, 3 x 32 x 32 uint8). Do not modify it in place."""
    return load_small_dataset("fashion_mnist", "train")


@pytest.fixture(scope="session")
def fashion_test() -> ImageArrays:
    """Fashion-MNIST test split (10 000 images, 3 x 32 x 32 uint8). Do not modify it in place."""
    return load_small_dataset("fashion_mnist", "test")


@pytest.fixture(scope="session")
def sample_images_dir() -> Path:
    """The foolbox wheel's real sample images (imagenet_XX_<label>.jpg, fashionMNIST_XX_<label>.png, ...)."""
    return foolbox_data_dir()


@pytest.fixture(scope="session")
def jpeg_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only ImageNet-layout JPEG folder: 10 Fashion-MNIST classes at 64 x 64 (8 train, 4 val each)
    plus class 10_photo (10 real ImageNet photos in train, 10 in val). Copy it before changing it."""
    return write_fashion_mnist_folder(
        tmp_path_factory.mktemp("jpeg_folder"),
        image_size=64,
        train_per_class=8,
        val_per_class=4,
        photos=True,
    )
