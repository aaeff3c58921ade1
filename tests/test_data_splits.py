"""Seeded, class-stratified splits and samples: deterministic, disjoint, balanced, and loud on impossible requests."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipelines import ImageArrays, stratified_sample, stratified_split
from laasp_dist.errors import DataError


def _class_counts(labels: np.ndarray, idx: np.ndarray, num_classes: int) -> np.ndarray:
    return np.bincount(labels[idx], minlength=num_classes)


@pytest.mark.timeout(20)
def test_split_is_deterministic_disjoint_covering_and_stratified(fashion_train: ImageArrays) -> None:
    labels = fashion_train.labels.numpy()
    train, held = stratified_split(fashion_train.labels, 5003, seed=7)
    again_train, again_held = stratified_split(labels, 5003, seed=7)
    assert np.array_equal(train, again_train) and np.array_equal(held, again_held)
    assert train.dtype == held.dtype == np.int64
    assert np.all(np.diff(train) > 0) and np.all(np.diff(held) > 0), "sorted, without repeats"
    assert len(np.intersect1d(train, held)) == 0
    assert np.array_equal(np.union1d(train, held), np.arange(60_000))
    counts = _class_counts(labels, held, 10)
    assert counts.sum() == 5003 and counts.max() - counts.min() <= 1
    _, other = stratified_split(labels, 5003, seed=8)
    assert not np.array_equal(held, other)
    _, tenth = stratified_split(labels, 0.1, seed=0)
    assert _class_counts(labels, tenth, 10).tolist() == [600] * 10


@pytest.mark.timeout(10)
def test_split_keeps_class_proportions_of_imbalanced_labels() -> None:
    labels = np.repeat([0, 1, 2], [100, 50, 10])
    _, held = stratified_split(labels, 16, seed=0)
    assert _class_counts(labels, held, 3).tolist() == [10, 5, 1]
    train, held = stratified_split(labels, 0, seed=0)
    assert len(held) == 0 and np.array_equal(train, np.arange(160))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("holdout", [1.0, -0.5, -1, 160, 500, True, "10"])
def test_split_rejects_impossible_holdouts(holdout: object) -> None:
    with pytest.raises(DataError):
        stratified_split(np.repeat([0, 1], 80), holdout, seed=0)  # type: ignore[arg-type]


@pytest.mark.timeout(20)
def test_sample_balances_classes_excludes_and_is_reproducible(fashion_train: ImageArrays) -> None:
    labels = fashion_train.labels.numpy()
    _, held = stratified_split(labels, 5000, seed=0)
    subset = stratified_sample(labels, 10_007, seed=3, exclude=held)
    assert np.array_equal(subset, stratified_sample(torch.from_numpy(labels), 10_007, seed=3, exclude=held))
    assert subset.dtype == np.int64 and np.all(np.diff(subset) > 0)
    assert len(np.intersect1d(subset, held)) == 0
    counts = _class_counts(labels, subset, 10)
    assert counts.sum() == 10_007 and counts.max() - counts.min() <= 1
    assert not np.array_equal(subset, stratified_sample(labels, 10_007, seed=4, exclude=held))


@pytest.mark.timeout(10)
def test_sample_represents_every_class_and_fills_up_from_larger_classes() -> None:
    labels = np.repeat(np.arange(10), 20)
    assert len(np.unique(labels[stratified_sample(labels, 10, seed=0)])) == 10
    assert len(np.unique(labels[stratified_sample(labels, 7, seed=0)])) == 7
    uneven = np.repeat([0, 1, 2], [3, 100, 100])
    assert _class_counts(uneven, stratified_sample(uneven, 51, seed=0), 3).tolist() == [3, 24, 24]
    assert _class_counts(uneven, stratified_sample(uneven, 203, seed=0), 3).tolist() == [3, 100, 100]
    assert len(stratified_sample(uneven, 0, seed=0)) == 0


@pytest.mark.timeout(10)
def test_sample_rejects_more_than_available() -> None:
    labels = np.repeat(np.arange(4), 5)
    with pytest.raises(DataError, match="Asked for 21 samples but only 20"):
        stratified_sample(labels, 21, seed=0)
    with pytest.raises(DataError, match="only 15"):
        stratified_sample(labels, 16, seed=0, exclude=np.arange(5))
    with pytest.raises(DataError, match="outside"):
        stratified_sample(labels, 1, seed=0, exclude=[20])
    with pytest.raises(DataError, match="1-d"):
        stratified_sample(np.zeros((2, 2), dtype=int), 1, seed=0)
