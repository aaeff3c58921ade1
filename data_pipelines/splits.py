"""Seeded, class-stratified index selection: the held-out validation split and the LAASP scoring subset."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from data_pipelines.errors import DataError

LabelsLike = np.ndarray | torch.Tensor | Sequence[int]


def _as_labels(labels: LabelsLike) -> np.ndarray:
    """Labels as a 1-d int64 numpy array."""
    arr = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"labels must be a 1-d sequence of integers, got dtype {arr.dtype} and shape {arr.shape}.")
    return arr.astype(np.int64, copy=False)


def _equal_counts(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many to take from each class so that counts are as equal as the class sizes allow (water-filling).

    Classes too small for an equal share give all they have; the rest is shared out evenly, and the
    remainder of an uneven division goes to randomly chosen classes (one extra each).
    """
    counts = np.zeros_like(sizes)
    left = np.arange(len(sizes))
    while n:
        share = n // len(left)
        small = sizes[left] <= share
        if small.any():
            counts[left[small]] = sizes[left[small]]
            n -= int(sizes[left[small]].sum())
            left = left[~small]
            continue
        counts[left] = share
        counts[rng.choice(left, n - share * len(left), replace=False)] += 1
        n = 0
    return counts


def _proportional_counts(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """How many to take from each class, in proportion to its size (largest remainder; ties broken at random)."""
    quota = sizes * n / sizes.sum()
    counts = np.floor(quota).astype(np.int64)
    remainder = quota - counts
    tiebreak = rng.permutation(len(sizes))
    order = np.lexsort((tiebreak, -remainder))
    counts[order[: n - int(counts.sum())]] += 1
    return counts


def _draw(labels: np.ndarray, candidates: np.ndarray, n: int, seed: int, equal: bool) -> np.ndarray:
    """n sorted indices out of `candidates`, stratified by label: equal per class, or proportional to class size."""
    if n < 0:
        raise DataError(f"Cannot draw a negative number of samples ({n}).")
    if n > len(candidates):
        raise DataError(f"Asked for {n} samples but only {len(candidates)} are available.")
    rng = np.random.default_rng(seed)
    by_class = candidates[np.argsort(labels[candidates], kind="stable")]
    _, sizes = np.unique(labels[by_class], return_counts=True)
    counts = (_equal_counts if equal else _proportional_counts)(sizes, n, rng) if n else np.zeros_like(sizes)
    chosen = [rng.permutation(members)[:k] for members, k in zip(np.split(by_class, np.cumsum(sizes)[:-1]), counts)]
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def stratified_sample(labels: LabelsLike, n: int, seed: int, exclude: LabelsLike | None = None) -> np.ndarray:
    """Sorted int64 indices of n samples, classes as equal in number as possible.

    Every class that has samples available is represented when n is at least the number of such classes.

    `exclude` lists indices that may not be drawn (e.g. the held-out split). Raises DataError when fewer
    than n samples are available. The same labels, n, seed and exclude always give the same indices.
    """
    lab = _as_labels(labels)
    available = np.ones(len(lab), dtype=bool)
    if exclude is not None:
        ex = _as_labels(exclude)
        if ex.size and (ex.min() < 0 or ex.max() >= len(lab)):
            raise DataError(f"exclude holds indices outside [0, {len(lab)}).")
        available[ex] = False
    return _draw(lab, np.flatnonzero(available), n, seed, equal=True)


def stratified_split(labels: LabelsLike, holdout: int | float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, holdout), both sorted int64; the holdout keeps each class's share of the data.

    `holdout` is a count (int) or a fraction in [0, 1) of all samples (float). Deterministic for a seed.
    """
    lab = _as_labels(labels)
    if isinstance(holdout, (bool, np.bool_)) or not isinstance(holdout, (int, float, np.integer, np.floating)):
        raise DataError(f"holdout must be a count (int) or a fraction (float), got {holdout!r}.")
    if isinstance(holdout, (float, np.floating)):
        if not 0.0 <= holdout < 1.0:
            raise DataError(f"A holdout fraction must lie in [0, 1), got {holdout}.")
        holdout = round(holdout * len(lab))
    if not 0 <= holdout < len(lab):
        raise DataError(f"A holdout of {holdout} samples leaves no training data out of {len(lab)}.")
    held = _draw(lab, np.arange(len(lab)), int(holdout), seed, equal=False)
    keep = np.ones(len(lab), dtype=bool)
    keep[held] = False
    return np.flatnonzero(keep).astype(np.int64), held


def epoch_shard(n: int, rank: int, world_size: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """One rank's sample indices for one epoch, in the order they are served (DistributedSampler-like).

    Shuffled: every rank draws the same permutation of range(n) from (seed, epoch), cut to a multiple of
    `world_size` (fewer than `world_size` samples, different ones each epoch, sit out), and takes every
    `world_size`-th one starting at `rank`: shards are disjoint and equal in size. Not shuffled: range(n)
    from `rank` in steps of `world_size`: the shards cover every sample once (sizes may differ by one).
    A pure function of its arguments, so any process can compute any epoch's shard.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must lie in [0, world_size), got rank {rank} of {world_size}.")
    if not shuffle:
        return np.arange(rank, n, world_size, dtype=np.int64)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[: n - n % world_size][rank::world_size]
