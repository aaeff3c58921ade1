"""ImageNet-style folders (<split>/<class>/<image>) scanned and validated up front, then read through NVIDIA DALI."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torchvision.io

from data_pipelines.splits import stratified_split
from laasp_dist.errors import DataError

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


@dataclass(frozen=True, eq=False)
class ImageFolder:
    """A scanned folder: sorted class names (label = position), image paths and their int64 labels."""

    root: Path
    classes: tuple[str, ...]
    files: tuple[str, ...]
    labels: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, indices: np.ndarray | Sequence[int]) -> ImageFolder:
        """The images at `indices`, with the same classes."""
        idx = np.asarray(indices, dtype=np.int64)
        return ImageFolder(self.root, self.classes, tuple(self.files[i] for i in idx), self.labels[idx])


def _problem(path: str, verify: bool) -> str | None:
    """Why `path` is not a usable image, or None: magic bytes always, a full decode when `verify`."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head.startswith(_MAGIC):
        return "is not a JPEG or PNG image"
    if verify:
        try:
            torchvision.io.decode_image(torchvision.io.read_file(path))
        except (RuntimeError, ValueError):
            return "is a corrupt or truncated image"
    return None


def _listing(paths: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def scan_image_folder(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    skip_bad: bool = False,
    verify: bool = False,
    num_workers: int = 8,
) -> ImageFolder:
    """Scan `root`/<class>/<image> into an ImageFolder, checking every file before any training starts.

    Classes are the sorted sub-folder names (hidden entries and loose files in `root` are ignored), or
    `classes` when given (e.g. the train split's, so val uses the same ids; other folders are then an
    error). Files are sorted within a class. Each file's first bytes must be a JPEG or PNG signature;
    `verify=True` also decodes it fully (slower, catches truncated files). A bad file, and a class
    with no usable file, raise DataError naming it; with `skip_bad=True` they give one warning each
    instead: bad files are left out, and an empty class (a given class without a folder too) keeps
    its name and id, so ids stay stable across splits, but has no images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist or is not a folder.")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = tuple(classes) if classes is not None else tuple(found)
    if not names:
        raise DataError(f"Image folder {root} has no class folders (expected {root}/<class>/<image>).")
    if len(set(names)) != len(names):
        raise DataError(f"Class names given for {root} repeat a name.")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(f"Image folder {root} has class folders not in the given classes: {_listing(unknown)}.")
    per_class = []
    for name in names:
        folder = root / name
        entries = list(os.scandir(folder)) if folder.is_dir() else []
        per_class.append(sorted(e.path for e in entries if e.is_file() and not e.name.startswith(".")))
    candidates = [f for files in per_class for f in files]
    with ThreadPoolExecutor(max(1, num_workers)) as pool:
        problems = dict(zip(candidates, pool.map(_problem, candidates, [verify] * len(candidates))))
    bad = [f"{f} {why}" for f, why in problems.items() if why]
    if bad and not skip_bad:
        raise DataError(f"{bad[0]}; remove it or scan with skip_bad=True.")
    if bad:
        warnings.warn(f"Skipped {len(bad)} unusable file(s) under {root}: {_listing(bad)}.", stacklevel=2)
    kept = [[f for f in files if not problems[f]] for files in per_class]
    empty = [str(root / n) for n, files in zip(names, kept) if not files]
    if empty and (not skip_bad or len(empty) == len(names)):
        raise DataError(f"Class folder {empty[0]} has no usable images.")
    if empty:
        warnings.warn(
            f"{len(empty)} class folder(s) under {root} have no usable images: {_listing(empty)}.", stacklevel=2
        )
    files = tuple(f for fs in kept for f in fs)
    labels = np.concatenate([np.full(len(fs), i, dtype=np.int64) for i, fs in enumerate(kept)])
    return ImageFolder(root, names, files, labels)


def split_image_folder(folder: ImageFolder, holdout: int | float, seed: int) -> tuple[ImageFolder, ImageFolder]:
    """Carve a class-stratified held-out validation split from `folder`: (train, holdout)."""
    train_idx, holdout_idx = stratified_split(folder.labels, holdout, seed)
    return folder.subset(train_idx), folder.subset(holdout_idx)


def _require_dali() -> None:
    """Fail with an install hint when NVIDIA DALI (the optional `dali` extra) is missing."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        raise ModuleNotFoundError(
            "NVIDIA DALI is needed to read image folders: pip install 'laasp-dist[dali]'."
        ) from exc


def default_device_id() -> int | None:
    """The current CUDA device for GPU ("mixed") decoding, or None for DALI's CPU pipeline."""
    return torch.cuda.current_device() if torch.cuda.is_available() else None


def build_dali_pipeline(
    files: Sequence[str],
    labels: Sequence[int],
    batch_size: int,
    train: bool,
    image_size: int,
    shard_id: int,
    num_shards: int,
    device_id: int | None,
    seed: int,
    num_threads: int,
) -> Pipeline:
    """A DALI pipeline yielding (float32 CHW ImageNet-normalised images, int32 labels) for one shard.

    Train: random-resized crop to `image_size` and a random horizontal flip; the file list is first
    permuted with `seed` (the same on every rank, so shards stay disjoint yet class-mixed) and the
    reader shuffles within its shard, moving to the next shard every epoch. Eval: shorter side resized
    to image_size*256/224, centre crop, files in the given order, each rank always on its own shard.
    The reader pads its shard's last batch (`pad_last_batch`) so epochs start on shard boundaries.
    Decoding runs on the GPU ("mixed") when `device_id` is an int, on the CPU when it is None.
    """
    _require_dali()
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    files, labels = list(files), [int(v) for v in labels]
    if train:
        order = np.random.default_rng(seed).permutation(len(files))
        files, labels = [files[i] for i in order], [labels[i] for i in order]
    aug_seed = int(np.random.SeedSequence([seed, shard_id]).generate_state(1)[0] & 0x7FFFFFFF)
    pipe = Pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=aug_seed)
    with pipe:
        encoded, label = fn.readers.file(
            files=files,
            labels=labels,
            shard_id=shard_id,
            num_shards=num_shards,
            random_shuffle=train,
            stick_to_shard=not train,
            pad_last_batch=True,
            name="Reader",
        )
        images = fn.decoders.image(encoded, device="mixed" if device_id is not None else "cpu", output_type=types.RGB)
        normalise = dict(
            dtype=types.FLOAT,
            output_layout="CHW",
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
        )
        if train:
            images = fn.random_resized_crop(images, size=(image_size, image_size))
            images = fn.crop_mirror_normalize(images, mirror=fn.random.coin_flip(), **normalise)
        else:
            images = fn.resize(images, resize_shorter=round(image_size * EVAL_RESIZE_RATIO))
            images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), **normalise)
        pipe.set_outputs(images, label)
    return pipe


def _decode_failure(exc: RuntimeError) -> DataError | None:
    """A DataError naming the file when DALI failed to decode one, else None."""
    m = re.search(r"Failed to decode sample #\d+ : (.+)", str(exc))
    if not m:
        return None
    return DataError(
        f"DALI could not decode {m.group(1).strip()}: scan the folder with verify=True to find such files."
    )


class DaliImageIterator:
    """One rank's shard of an ImageFolder as (float32 NCHW images, int64 labels) batches through DALI.

    Each `iter()` is one whole epoch (an epoch abandoned early is drained first, as DALI cannot
    restart mid-epoch). Train drops the last incomplete batch, so all ranks run the same number of
    steps; eval keeps it (partial), and the ranks' shards cover the folder exactly once.
    `device_id="auto"` decodes on the current GPU when CUDA is available, else on the CPU.
    Images and labels come on the GPU with mixed decoding, on the CPU otherwise.
    """

    def __init__(
        self,
        folder: ImageFolder,
        batch_size: int,
        *,
        train: bool,
        image_size: int = 224,
        shard_id: int = 0,
        num_shards: int = 1,
        device_id: int | None | Literal["auto"] = "auto",
        seed: int = 0,
        num_threads: int | None = None,
    ) -> None:
        _require_dali()
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise DataError(f"shard_id must lie in [0, num_shards), got {shard_id} of {num_shards}.")
        if len(folder) < num_shards or (train and len(folder) // num_shards < batch_size):
            raise DataError(
                f"{len(folder)} images under {folder.root} are too few for {num_shards} shard(s)"
                + (f" of at least one batch of {batch_size}." if train else ".")
            )
        self.device_id = default_device_id() if device_id == "auto" else device_id
        self.pipeline = build_dali_pipeline(
            folder.files,
            folder.labels.tolist(),
            batch_size,
            train,
            image_size,
            shard_id,
            num_shards,
            self.device_id,
            seed,
            num_threads or min(4, os.cpu_count() or 1),
        )
        policy = LastBatchPolicy.DROP if train else LastBatchPolicy.PARTIAL
        try:
            self._dali = DALIGenericIterator(
                self.pipeline, ["images", "labels"], reader_name="Reader", last_batch_policy=policy
            )
        except RuntimeError as exc:
            if (error := _decode_failure(exc)) is None:
                raise
            raise error from exc
        self._unfinished = False

    def __len__(self) -> int:
        """Batches per epoch on this shard."""
        return len(self._dali)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            out = next(self._dali)[0]
        except StopIteration:
            return None
        except RuntimeError as exc:
            if (error := _decode_failure(exc)) is None:
                raise
            raise error from exc
        images = out["images"]
        return images, out["labels"].view(-1).to(device=images.device, dtype=torch.int64)

    def reset(self) -> None:
        """End the current epoch (draining what is left of it) so the next batch starts a new one."""
        if self._unfinished:
            while self._next() is not None:
                pass
            self._dali.reset()
            self._unfinished = False

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.reset()
        self._unfinished = True
        while (batch := self._next()) is not None:
            yield batch
        self._dali.reset()
        self._unfinished = False
