"""In-memory data sets for 32x32 models: Fashion-MNIST (idx.gz) and CIFAR-10 (python or binary batches)."""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from data_pipelines.errors import DataError

Split = Literal["train", "test"]

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "t_shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# Per-channel mean/std of the *training* split in [0, 1], as the loaders see it.
# Fashion-MNIST: measured on the 32x32 zero-padded images (the padding lowers both).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2190,), (0.3318,)
# CIFAR-10: population per-pixel std (not the often-copied 0.2023/0.1994/0.2010).
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True, eq=False)
class ImageArrays:
    """A whole split in memory: uint8 images N x C x H x W, int64 labels N, normalisation constants in [0, 1]."""

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DataError(
                f"images must be a uint8 N x C x H x W tensor, got {self.images.dtype} {tuple(self.images.shape)}."
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise DataError(
                f"labels must be int64 of shape ({len(self.images)},), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}."
            )
        if not len(self.mean) == len(self.std) == self.images.shape[1]:
            raise DataError(
                f"mean/std need one value per channel ({self.images.shape[1]}), got {self.mean} / {self.std}."
            )
        if len(self.labels) and not 0 <= int(self.labels.min()) <= int(self.labels.max()) < self.num_classes:
            raise DataError(
                f"labels must lie in [0, {self.num_classes}), got [{int(self.labels.min())}, {int(self.labels.max())}]."
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | torch.Tensor | Sequence[int]) -> ImageArrays:
        """The samples at `indices` (a copy), with the same classes and constants."""
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageArrays(self.images[idx], self.labels[idx], self.num_classes, self.mean, self.std)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """One gzipped idx file (ubyte data) as an array of `ndim` dimensions."""
    if not path.is_file():
        raise DataError(
            f"Fashion-MNIST file {path} is missing: install the Debian package dataset-fashion-mnist "
            f"or pass the folder holding the *-ubyte.gz files as root."
        )
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise DataError(f"{path} is not a readable gzip file ({exc}).") from exc
    header = 4 + 4 * ndim
    if len(raw) < header or raw[:2] != b"\0\0" or raw[2] != 0x08 or raw[3] != ndim:
        raise DataError(f"{path} is not an idx file of {ndim}-d unsigned bytes.")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    if len(raw) - header != int(np.prod(shape)):
        raise DataError(f"{path} holds {len(raw) - header} bytes of data, its header promises shape {shape}.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(split: Split, root: str | Path | None = None, channels: int = 3) -> ImageArrays:
    """Fashion-MNIST, 28x28 zero-padded to 32x32, grey repeated to `channels` (1 or 3)."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}.")
    folder = Path(root or FASHION_MNIST_ROOT)
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 3)
    labels = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 1)
    if len(images) != len(labels):
        raise DataError(f"Fashion-MNIST {split} in {folder} has {len(images)} images but {len(labels)} labels.")
    padded = torch.zeros((len(images), channels, 32, 32), dtype=torch.uint8)
    padded.numpy()[:, :, 2:30, 2:30] = images[:, None]
    return ImageArrays(
        padded,
        torch.from_numpy(labels.astype(np.int64)),
        len(FASHION_MNIST_CLASSES),
        FASHION_MNIST_MEAN * channels,
        FASHION_MNIST_STD * channels,
    )


def _cifar10_batches(folder: Path, split: Split) -> tuple[np.ndarray, np.ndarray]:
    """Images (N x 3072 uint8, CHW order) and labels of a CIFAR-10 split in python or binary format."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    py_dir, bin_dir = folder / "cifar-10-batches-py", folder / "cifar-10-batches-bin"
    if folder.name in ("cifar-10-batches-py", "cifar-10-batches-bin"):
        py_dir = bin_dir = folder
    if all((py_dir / n).is_file() for n in names):
        data, labels = [], []
        for n in names:
            try:
                with open(py_dir / n, "rb") as f:
                    batch = pickle.load(f, encoding="bytes")
                data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3072))
                labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
            except (OSError, pickle.UnpicklingError, EOFError, KeyError, ValueError) as exc:
                raise DataError(f"{py_dir / n} is not a CIFAR-10 python batch ({exc!r}).") from exc
        return np.concatenate(data), np.concatenate(labels)
    if all((bin_dir / f"{n}.bin").is_file() for n in names):
        records = []
        for n in names:
            raw = np.fromfile(bin_dir / f"{n}.bin", dtype=np.uint8)
            if raw.size % 3073:
                raise DataError(f"{bin_dir / n}.bin is not a whole number of 3073-byte CIFAR-10 records.")
            records.append(raw.reshape(-1, 3073))
        rec = np.concatenate(records)
        return rec[:, 1:], rec[:, 0].astype(np.int64)
    raise DataError(
        f"No CIFAR-10 {split} batches ({', '.join(names)}) under {folder}: pass the folder holding "
        f"cifar-10-batches-py or cifar-10-batches-bin (CIFAR-10 is not shipped on these machines)."
    )


def load_cifar10(split: Split, root: str | Path | None) -> ImageArrays:
    """CIFAR-10 from the official python or binary batches under `root`."""
    if root is None:
        raise DataError(
            "CIFAR-10 is not shipped on these machines: pass root, the folder holding cifar-10-batches-py or -bin."
        )
    data, labels = _cifar10_batches(Path(root), split)
    if len(labels) and (labels.min() < 0 or labels.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"CIFAR-10 labels under {root} fall outside 0..9.")
    images = torch.from_numpy(np.ascontiguousarray(data.reshape(-1, 3, 32, 32)))
    return ImageArrays(images, torch.from_numpy(labels), len(CIFAR10_CLASSES), CIFAR10_MEAN, CIFAR10_STD)


SMALL_DATASETS: dict[str, Callable[[Split, str | Path | None], ImageArrays]] = {
    "fashion_mnist": load_fashion_mnist,
    "cifar10": load_cifar10,
}


def load_small_dataset(name: str, split: Split, root: str | Path | None = None) -> ImageArrays:
    """Load split 'train' or 'test' of a registered 32x32 data set (`SMALL_DATASETS`) as uint8 NCHW tensors."""
    if name not in SMALL_DATASETS:
        raise DataError(f"Unknown data set {name!r}: choose one of {', '.join(sorted(SMALL_DATASETS))}.")
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}.")
    return SMALL_DATASETS[name](split, root)
