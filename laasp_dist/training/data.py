"""The data of a run: splits (train / held-out val / test / scoring subset) and one rank's loaders.

Splits are pure functions of the config (data set, ``val_size``, ``train_limit``,
``test_limit``, ``seed``), so every rank, the driver and a test that re-measures
``final/`` compute the same ones without talking to each other.

- small images (``fashion_mnist``, ``cifar10``): whole splits in memory
  (``data_pipelines.ImageArrays``), served by ``ArrayLoader`` (sharded by rank, CIFAR
  augmentation for training);
- ``synthetic``: random uint8 images at ``data.image_size`` (fixed seed), labels cycling over
  the classes, served like the small images: the training loop's throughput without any
  decoding, and smoke runs on machines without data;
- ``image_folder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` through DALI
  (GPU decoding when the rank has a GPU, DALI's CPU pipeline otherwise). The
  training iterator is rebuilt every epoch with a seed derived from (seed, epoch),
  so the data order of an epoch does not depend on the history of the process,
  and a resumed run reads the same batches as an uninterrupted one.

The held-out validation split is carved from the training data (stratified); the
scoring subset is drawn from what remains (never from val); the test split
(Fashion-MNIST/CIFAR test, or the folder's ``val/``) is only ever reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

from ..config import RunConfig
from ..errors import DataError

SUBSET_SEED_OFFSET = 1  # the scoring subset uses seed + 1, the val split seed, train_limit seed + 2
LIMIT_SEED_OFFSET = 2
SYNTHETIC_IMAGES = {"train": 4096, "test": 1024}
SYNTHETIC_CLASSES = 1000


def holdout_amount(val_size: float) -> int | float:
    """``data.val_size``: ≥ 1 is a count of images, below 1 a fraction."""
    return int(val_size) if val_size >= 1 else float(val_size)


@dataclass(frozen=True)
class Splits:
    """Index-level description of a run's data (arrays or image folders)."""

    kind: str  # "arrays" | "folder"
    train: Any  # ImageArrays | ImageFolder (training images actually used)
    val: Any
    test: Any
    num_classes: int
    input_size: int
    in_channels: int
    train_pool: Any  # what the scoring subset is drawn from (train split without val)
    exclude: np.ndarray | None  # indices of train_pool the subset may not use


def _limit(data: Any, limit: int | None, seed: int) -> Any:
    from data_pipelines.splits import stratified_sample

    if limit is None or limit >= len(data):
        return data
    return data.subset(stratified_sample(data.labels, limit, seed))


def load_splits(config: RunConfig) -> Splits:
    """The train / val / test splits the config describes (DataError when the data is missing or too small)."""
    d = config.data
    if d.dataset == "image_folder":
        return _folder_splits(config)
    from data_pipelines.small_images import load_fashion_mnist, load_small_dataset
    from data_pipelines.splits import stratified_split

    channels = config.model.in_channels
    if d.dataset == "synthetic":
        full, test = (synthetic_arrays(SYNTHETIC_IMAGES[s], config.model.num_classes or SYNTHETIC_CLASSES,
                                       channels, d.image_size, seed=i) for i, s in enumerate(("train", "test")))
    elif d.dataset == "fashion_mnist":
        if channels not in (1, 3):
            raise DataError(f"fashion_mnist feeds 1 or 3 input channels, model.in_channels is {channels}")
        full, test = (load_fashion_mnist(s, d.root, channels=channels) for s in ("train", "test"))
    else:
        full, test = (load_small_dataset(d.dataset, s, d.root) for s in ("train", "test"))
        if channels != full.images.shape[1]:
            raise DataError(f"{d.dataset} has {full.images.shape[1]} channels, model.in_channels is {channels}")
    train_idx, val_idx = stratified_split(full.labels, holdout_amount(d.val_size), config.seed)
    pool = full.subset(train_idx)
    train = _limit(pool, d.train_limit, config.seed + LIMIT_SEED_OFFSET)
    return Splits("arrays", train, full.subset(val_idx), _limit(test, d.test_limit, config.seed + LIMIT_SEED_OFFSET),
                  full.num_classes, full.images.shape[-1], full.images.shape[1], train, None)


def synthetic_arrays(n: int, num_classes: int, channels: int, size: int, seed: int) -> Any:
    """`n` uniformly random uint8 images (labels 0, 1, …, num_classes-1 in turn), the same for a given seed."""
    from data_pipelines.small_images import ImageArrays

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.arange(n, dtype=torch.int64) % num_classes
    return ImageArrays(images, labels, num_classes, (0.5,) * channels, (0.2887,) * channels)  # uniform: 1/sqrt(12)


def _folder_splits(config: RunConfig) -> Splits:
    from data_pipelines.image_folder import scan_image_folder, split_image_folder

    d = config.data
    if d.root is None:
        raise DataError("data.dataset=image_folder needs data.root (a folder holding train/ and val/)")
    root = Path(d.root)
    full = scan_image_folder(root / "train", skip_bad=d.skip_bad)
    test = scan_image_folder(root / "val", classes=full.classes, skip_bad=d.skip_bad)
    train, val = split_image_folder(full, holdout_amount(d.val_size), config.seed)
    train = _limit(train, d.train_limit, config.seed + LIMIT_SEED_OFFSET)
    return Splits("folder", train, val, _limit(test, d.test_limit, config.seed + LIMIT_SEED_OFFSET),
                  full.num_classes, d.image_size, 3, train, None)


def decode_eval_images(files: Iterable[str], image_size: int) -> torch.Tensor:
    """JPEG/PNG files → uint8 N×3×S×S with the eval transform (shorter side to S·256/224, centre crop S)."""
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF

    from data_pipelines.image_folder import EVAL_RESIZE_RATIO

    out = []
    for f in files:
        try:
            img = torchvision.io.decode_image(torchvision.io.read_file(str(f)), mode=torchvision.io.ImageReadMode.RGB)
        except (RuntimeError, ValueError) as exc:
            raise DataError(f"cannot decode {f} ({exc})") from None
        img = TF.resize(img, round(image_size * EVAL_RESIZE_RATIO), antialias=True)
        out.append(TF.center_crop(img, [image_size, image_size]))
    return torch.stack(out) if out else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)


def subset_source(splits: Splits, config: RunConfig) -> tuple[Any, np.ndarray | None]:
    """An ImageArrays the search subset is drawn from (folders: the drawn images decoded), and indices to exclude."""
    if splits.kind == "arrays":
        return splits.train_pool, splits.exclude
    from data_pipelines.image_folder import IMAGENET_MEAN, IMAGENET_STD
    from data_pipelines.small_images import ImageArrays
    from data_pipelines.splits import stratified_sample

    p = config.prune
    if p.subset_size > len(splits.train):
        raise DataError(f"a scoring subset of {p.subset_size} images was asked for, but the training data "
                        f"has only {len(splits.train)} images")
    idx = stratified_sample(splits.train.labels, p.subset_size, config.seed + SUBSET_SEED_OFFSET)
    chosen = splits.train.subset(idx)
    images = decode_eval_images(chosen.files, splits.input_size)
    return ImageArrays(images, torch.as_tensor(chosen.labels, dtype=torch.int64), splits.num_classes,
                       IMAGENET_MEAN, IMAGENET_STD), None


# --------------------------------------------------------------------------------------------- loaders


class _Capped:
    """At most `limit` batches of an iterable; len() honours the cap."""

    def __init__(self, batches: Any, limit: int | None) -> None:
        self.batches, self.limit = batches, limit

    def __len__(self) -> int:
        n = len(self.batches)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self.batches):
            if self.limit is not None and i >= self.limit:
                break
            yield batch


class RankData:
    """One rank's view of the splits: a training iterable per epoch and sharded eval iterables."""

    def __init__(self, splits: Splits, config: RunConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.splits, self.config, self.rank, self.world, self.device = splits, config, rank, world_size, device
        d = config.data
        self.batch_size = max(1, d.batch_size // world_size)
        self.eval_batch_size = max(1, d.eval_batch_size // world_size)
        if splits.kind == "arrays":
            from data_pipelines.loaders import ArrayLoader

            self._train = ArrayLoader(splits.train, self.batch_size, train=True, rank=rank, world_size=world_size,
                                      seed=config.seed, drop_last=True, device=device)
            if len(self._train) == 0:
                raise DataError(f"{len(splits.train)} training images are too few for {world_size} worker(s) "
                                f"with batches of {self.batch_size}")

    def train_batches(self, epoch: int) -> _Capped:
        """The batches of one training epoch (capped at ``train.steps_per_epoch``)."""
        cap = self.config.train.steps_per_epoch
        if self.splits.kind == "arrays":
            self._train.set_epoch(epoch)
            return _Capped(self._train, cap)
        from data_pipelines.image_folder import DaliImageIterator

        seed = int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0] & 0x7FFFFFFF)
        it = DaliImageIterator(self.splits.train, self.batch_size, train=True, image_size=self.splits.input_size,
                               shard_id=self.rank, num_shards=self.world, seed=seed,
                               num_threads=self.config.data.num_threads,
                               device_id=self.device.index or 0 if self.device.type == "cuda" else None)
        return _Capped(it, cap)

    def eval_batches(self, split: str, *, sharded: bool = True) -> Any:
        """Eval-transform batches of ``val`` or ``test``: this rank's shard, or everything (``sharded=False``)."""
        data = getattr(self.splits, split)
        rank, world = (self.rank, self.world) if sharded else (0, 1)
        bs = self.eval_batch_size if sharded else self.config.data.eval_batch_size
        return eval_loader(data, self.splits, self.config, bs, rank, world, self.device)


def eval_loader(data: Any, splits: Splits, config: RunConfig, batch_size: int, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu") -> Any:
    """Batches of `data` with the eval transform, shard `rank` of `world` (each image exactly once overall)."""
    if splits.kind == "arrays":
        from data_pipelines.loaders import ArrayLoader

        return ArrayLoader(data, batch_size, train=False, rank=rank, world_size=world, seed=config.seed, device=device)
    from data_pipelines.image_folder import DaliImageIterator

    return DaliImageIterator(data, batch_size, train=False, image_size=splits.input_size, shard_id=rank,
                             num_shards=world, seed=config.seed, num_threads=config.data.num_threads,
                             device_id=(torch.device(device).index or 0) if torch.device(device).type == "cuda" else None)
