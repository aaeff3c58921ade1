"""Fashion-MNIST from the Debian idx files and CIFAR-10 batch parsing, checked against independent sources."""

from __future__ import annotations

import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io

from data_pipelines import ImageArrays, load_small_dataset
from data_pipelines.small_images import load_fashion_mnist
from laasp_dist.errors import DataError


@pytest.mark.timeout(30)
def test_fashion_mnist_shapes_counts_and_padding(fashion_train: ImageArrays, fashion_test: ImageArrays) -> None:
    for data, n in ((fashion_train, 60_000), (fashion_test, 10_000)):
        assert data.images.shape == (n, 3, 32, 32) and data.images.dtype == torch.uint8
        assert data.labels.shape == (n,) and data.labels.dtype == torch.int64
        assert data.num_classes == 10
        assert torch.bincount(data.labels).tolist() == [n // 10] * 10
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert data.images[:, :, border].max() == 0, "the 2-pixel padding must be black"
        assert torch.equal(data.images[:, 0], data.images[:, 2]) and torch.equal(data.images[:, 1], data.images[:, 2])


@pytest.mark.timeout(30)
def test_fashion_mnist_centre_equals_independent_png_copies(fashion_test: ImageArrays, sample_images_dir: Path) -> None:
    """foolbox ships the first 20 test images as PNGs (fashionMNIST_<index>_<label>.png)."""
    pngs = sorted(sample_images_dir.glob("fashionMNIST_*.png"))
    assert len(pngs) == 20
    for png in pngs:
        index, label = map(int, re.fullmatch(r"fashionMNIST_(\d+)_(\d+)\.png", png.name).groups())
        reference = torchvision.io.decode_image(torchvision.io.read_file(str(png)))[0]
        assert torch.equal(fashion_test.images[index, 0, 2:30, 2:30], reference), png.name
        assert fashion_test.labels[index].item() == label


@pytest.mark.timeout(30)
def test_fashion_mnist_one_channel_and_normalisation_constants(fashion_test: ImageArrays) -> None:
    grey = load_fashion_mnist("train", channels=1)
    assert grey.images.shape == (60_000, 1, 32, 32)
    assert len(grey.mean) == len(grey.std) == 1 and len(fashion_test.mean) == 3
    pixels = grey.images.double() / 255
    assert pixels.mean().item() == pytest.approx(grey.mean[0], abs=1e-4)
    assert pixels.std().item() == pytest.approx(grey.std[0], abs=1e-4)


@pytest.mark.timeout(10)
def test_missing_fashion_mnist_names_path_and_package(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*dataset-fashion-mnist") as info:
        load_small_dataset("fashion_mnist", "train", root=tmp_path)
    assert str(tmp_path) in str(info.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "images_payload, message",
    [
        (b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)) + bytes(10), "promises shape"),
        (b"\x00\x00\x0d\x03" + bytes(12), "not an idx file"),
    ],
)
def test_broken_idx_files_raise(tmp_path: Path, images_payload: bytes, message: str) -> None:
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(images_payload))
    labels_payload = b"\x00\x00\x08\x01" + (2).to_bytes(4, "big") + b"\x01\x02"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(labels_payload))
    with pytest.raises(DataError, match=message):
        load_small_dataset("fashion_mnist", "test", root=tmp_path)


def _fake_cifar(n_per_batch: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    data = [rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8) for _ in range(6)]
    labels = [rng.integers(0, 10, n_per_batch) for _ in range(6)]
    return data, labels


@pytest.mark.timeout(10)
@pytest.mark.parametrize("layout", ["py", "bin"])
def test_cifar10_python_and_binary_batches(tmp_path: Path, layout: str) -> None:
    data, labels = _fake_cifar(7, seed=1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    folder = tmp_path / f"cifar-10-batches-{layout}"
    folder.mkdir()
    for name, d, lab in zip(names, data, labels):
        if layout == "py":
            with open(folder / name, "wb") as f:
                pickle.dump({b"data": d, b"labels": lab.tolist(), b"batch_label": name.encode()}, f)
        else:
            (folder / f"{name}.bin").write_bytes(np.concatenate([lab[:, None].astype(np.uint8), d], axis=1).tobytes())
    train = load_small_dataset("cifar10", "train", root=tmp_path)
    test = load_small_dataset("cifar10", "test", root=folder)
    assert train.images.shape == (35, 3, 32, 32) and test.images.shape == (7, 3, 32, 32)
    assert train.labels.tolist() == np.concatenate(labels[:5]).tolist()
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values, each row-major 32 x 32.
    n, c, y, x = 9, 2, 5, 17
    assert train.images[n, c, y, x].item() == data[1][n - 7, c * 1024 + y * 32 + x]
    assert train.mean == (0.4914, 0.4822, 0.4465) and train.num_classes == 10


@pytest.mark.timeout(10)
def test_cifar10_and_registry_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not shipped"):
        load_small_dataset("cifar10", "train", root=None)
    with pytest.raises(DataError, match=str(tmp_path)):
        load_small_dataset("cifar10", "test", root=tmp_path)
    with pytest.raises(DataError, match="Unknown data set 'mnist'"):
        load_small_dataset("mnist", "train")
    with pytest.raises(DataError, match="split"):
        load_small_dataset("fashion_mnist", "val")  # type: ignore[arg-type]


@pytest.mark.timeout(10)
def test_image_arrays_validate_and_subset(fashion_test: ImageArrays) -> None:
    part = fashion_test.subset(np.array([5, 0, 5]))
    assert len(part) == 3 and torch.equal(part.images[1], fashion_test.images[0])
    assert part.labels.tolist() == [fashion_test.labels[i].item() for i in (5, 0, 5)]
    with pytest.raises(DataError, match="labels must lie"):
        ImageArrays(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 3]), 3, (0.5,), (0.5,))
    with pytest.raises(DataError, match="uint8"):
        ImageArrays(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1]), 3, (0.5,), (0.5,))
