"""A sharded CPU/GPU batch iterator over in-memory uint8 images, with batched CIFAR-style augmentation."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from data_pipelines.small_images import ImageArrays
from data_pipelines.splits import epoch_shard
from data_pipelines.errors import DataError
from data_pipelines.normalise import Normalise


def random_crop_flip(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop of the original size from the zero-padded batch, plus a random horizontal flip, per sample.

    Works on any dtype (uint8 included) with one gather; the crop and flip draws come from `generator`
    (a CPU generator), so a batch is reproducible whatever device `images` lives on.
    """
    n, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1, 1), generator=generator)
    flip = torch.rand((n, 1, 1), generator=generator) < 0.5
    rows = dy + torch.arange(h).view(1, h, 1)
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1), torch.arange(w)).view(-1, 1, w)
    flat = (rows * (w + 2 * padding) + cols).view(n, 1, h * w).to(images.device)
    return padded.flatten(2).gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


class ArrayLoader:
    """Batches (float32 NCHW normalised images, int64 labels) of one rank's shard of an ImageArrays.

    Sharding is DistributedSampler-like and deterministic: every rank draws the same permutation of
    all samples from (seed, epoch) and takes every `world_size`-th one starting at `rank`, so shards
    never overlap. When shuffling, the permutation is cut to a multiple of `world_size` (fewer than
    `world_size` samples, different ones each epoch, sit out) so every rank runs the same number of
    steps; without shuffling nothing is dropped and shards cover the data exactly once (sizes may
    differ by one). With `train=True` each image is randomly cropped back to its size from a copy
    zero-padded by `padding` and flipped horizontally with p = 0.5, seeded by (seed, epoch, rank);
    `train=False` applies no augmentation.
    Batches are moved to `device` as uint8 before augmentation and normalisation.
    """

    def __init__(
        self,
        data: ImageArrays,
        batch_size: int,
        *,
        train: bool,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool | None = None,
        drop_last: bool = False,
        padding: int = 4,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}.")
        self.data = data
        self.batch_size = batch_size
        self.train = train
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = drop_last
        self.padding = padding
        self.device = torch.device(device)
        self.epoch = 0
        self._normalise = Normalise(data.mean, data.std, self.device)

    def set_epoch(self, epoch: int) -> None:
        """Pick the epoch whose permutation and augmentation the next iteration uses."""
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """This rank's sample indices for the current epoch, in the order they are served."""
        return epoch_shard(len(self.data), self.rank, self.world_size, seed=self.seed, epoch=self.epoch,
                           shuffle=self.shuffle)

    def _num_samples(self) -> int:
        n = len(self.data)
        if self.shuffle:
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))

    def __len__(self) -> int:
        """Number of batches per epoch on this rank."""
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.from_numpy(self.indices())
        seed = np.random.SeedSequence([self.seed, self.epoch, self.rank]).generate_state(1, np.uint64)[0]
        generator = torch.Generator().manual_seed(int(seed >> 1))
        for b in range(len(self)):
            sel = idx[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.data.images[sel].to(self.device, non_blocking=True)
            labels = self.data.labels[sel].to(self.device, non_blocking=True)
            if self.train:
                images = random_crop_flip(images, self.padding, generator)
            yield self._normalise(images), labels
