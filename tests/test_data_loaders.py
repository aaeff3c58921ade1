"""The sharded in-memory loader: disjoint covering shards, reproducible epochs, correct augmentation and scaling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import ArrayLoader, ImageArrays
from data_pipelines.loaders import random_crop_flip
from laasp_dist.errors import DataError


def _identified(n: int) -> ImageArrays:
    """n random images whose label is their own index, so every served sample can be traced."""
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return ImageArrays(images, torch.arange(n), n, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.mark.timeout(10)
def test_eval_shards_of_two_ranks_are_disjoint_and_cover_everything() -> None:
    data = _identified(101)
    loaders = [ArrayLoader(data, 16, train=False, rank=r, world_size=2) for r in (0, 1)]
    served = [torch.cat([y for _, y in loader]).numpy() for loader in loaders]
    assert [len(s) for s in served] == [51, 50]
    assert [len(loader) for loader in loaders] == [4, 4]
    assert len(np.intersect1d(*served)) == 0
    assert np.array_equal(np.sort(np.concatenate(served)), np.arange(101))
    assert [np.array_equal(s, loader.indices()) for s, loader in zip(served, loaders)] == [True, True]


@pytest.mark.timeout(10)
def test_train_shards_are_disjoint_equal_sized_and_reshuffled_per_epoch() -> None:
    data = _identified(101)
    loaders = [ArrayLoader(data, 8, train=True, rank=r, world_size=2, seed=5, drop_last=True) for r in (0, 1)]
    assert [len(loader) for loader in loaders] == [6, 6], "50 samples per rank, 6 full batches"
    epochs = []
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        shards = [loader.indices() for loader in loaders]
        assert [len(s) for s in shards] == [50, 50] and len(np.intersect1d(*shards)) == 0
        served = [torch.cat([y for _, y in loader]).numpy() for loader in loaders]
        assert [np.array_equal(s, sh[:48]) for s, sh in zip(served, shards)] == [True, True]
        epochs.append(shards[0])
    assert not np.array_equal(epochs[0], epochs[1])
    loaders[0].set_epoch(0)
    assert np.array_equal(loaders[0].indices(), epochs[0]), "an epoch's order is reproducible"


@pytest.mark.timeout(20)
def test_eval_path_is_exact_normalisation_and_deterministic(fashion_test: ImageArrays) -> None:
    data = fashion_test.subset(np.arange(2000))
    loader = ArrayLoader(data, 300, train=False)
    first = [x for x, _ in loader]
    second = [x for x, _ in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    images = torch.cat(first)
    assert images.shape == (2000, 3, 32, 32) and images.dtype == torch.float32
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    expected = (data.images.float() / 255 - mean) / std
    assert torch.allclose(images, expected, atol=1e-5)


@pytest.mark.timeout(30)
def test_train_batches_are_normalised_and_reproducible(fashion_test: ImageArrays) -> None:
    loader = ArrayLoader(fashion_test, 500, train=True, seed=1)
    images = torch.cat([x for x, _ in loader])
    assert images.shape == (10_000, 3, 32, 32)
    # The constants are the padded train split's statistics (the test split's are close);
    # crops add a little more black.
    assert abs(images.mean().item()) < 0.05 and abs(images.std().item() - 1) < 0.05
    x1, y1 = next(iter(loader))
    x2, y2 = next(iter(loader))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[0], x1)


@pytest.mark.timeout(10)
def test_random_crop_flip_takes_a_window_of_the_padded_image() -> None:
    images = torch.randint(1, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(3))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    flips = shifts = 0
    for img, crop in zip(padded, out):
        views = {(dy, dx): img[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
        windows = [
            (shift, flip)
            for shift, view in views.items()
            for flip in (False, True)
            if torch.equal(crop, view.flip(2) if flip else view)
        ]
        assert len(windows) == 1, "each output is exactly one (maybe mirrored) window"
        flips += windows[0][1]
        shifts += windows[0][0] != (4, 4)
    assert 10 < flips < 54 and shifts > 50


@pytest.mark.timeout(10)
def test_loader_rejects_bad_arguments() -> None:
    data = _identified(10)
    with pytest.raises(DataError, match="batch_size"):
        ArrayLoader(data, 0, train=False)
    with pytest.raises(DataError, match="rank"):
        ArrayLoader(data, 4, train=False, rank=2, world_size=2)
