"""ImageNet-style folders (<split>/<class>/<image>): listed and checked once, then read through NVIDIA DALI.

`scan_image_folder` lists a folder (one thread per class folder) and checks each file as asked
(`verify`: none, header = JPEG/PNG signature, decode = a full decode). `DaliImageIterator` serves one
rank's shard of an `ImageFolder` through a DALI pipeline built once: the files of every batch are fed
by `fn.external_source` from a pure function of (seed, epoch, rank), so any process can serve any epoch
and a pipeline built for epoch e reads exactly what a pipeline running since epoch 0 reads there.
"""

from __future__ import annotations

import itertools
import os
import re
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torchvision.io

from data_pipelines.splits import epoch_shard, stratified_split
from data_pipelines.errors import DataError
from data_pipelines.normalise import pixel_scale

if TYPE_CHECKING:
    from nvidia.dali.pipeline import Pipeline

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_RESIZE_RATIO = 256 / 224
VERIFY_LEVELS = ("none", "header", "decode")
Verify = Literal["none", "header", "decode"]
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")
# RandomResizedCrop as torchvision and DALI define it: area fraction, aspect ratio (w/h), tries
CROP_AREA = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
# nvJPEG buffer sizes NVIDIA's ResNet-50 recipes preallocate for full-size ImageNet (no reallocation)
_GPU_DECODER_PADDING = {"device_memory_padding": 211025920, "host_memory_padding": 140544512}


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


def check_image_file(path: str, verify: Verify) -> str | None:
    """Why `path` is not a usable image, or None: nothing checked for "none", the JPEG/PNG signature
    for "header", a full decode with torchvision for "decode"."""
    if verify == "none":
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            head = os.read(fd, 8)
        finally:
            os.close(fd)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if not head.startswith(_MAGIC):
        return "is not a JPEG or PNG image"
    if verify == "decode":
        try:
            torchvision.io.decode_image(torchvision.io.read_file(path))
        except (RuntimeError, ValueError):
            return "is a corrupt or truncated image"
    return None


def _scan_class(folder: str, verify: Verify) -> tuple[list[str], list[str]]:
    """One class folder's usable files (sorted; hidden entries and sub-folders left out) and a
    "<path> <problem>" line for each unusable one."""
    try:
        with os.scandir(folder) as entries:
            files = sorted(e.path for e in entries if not e.name.startswith(".") and e.is_file())
    except (FileNotFoundError, NotADirectoryError):
        return [], []
    if verify == "none":
        return files, []
    kept, bad = [], []
    for f in files:
        why = check_image_file(f, verify)
        if why:
            bad.append(f"{f} {why}")
        else:
            kept.append(f)
    return kept, bad


def _listing(paths: Sequence[str], limit: int = 5) -> str:
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def scan_image_folder(
    root: str | Path,
    *,
    classes: Sequence[str] | None = None,
    skip_bad: bool = False,
    verify: Verify = "header",
    num_workers: int | None = None,
) -> ImageFolder:
    """List `root`/<class>/<image> into an ImageFolder, checking every file before any training starts.

    Classes are the sorted sub-folder names (hidden entries and loose files in `root` are ignored), or
    `classes` when given (e.g. the train split's, so val uses the same ids; other folders are then an
    error). Files are sorted within a class. Class folders are listed and checked in parallel
    (`num_workers` threads, default Python's choice for I/O). Each file is checked as `verify` says:
    "none" (listing only), "header" (JPEG/PNG signature, one small read per file), "decode" (a full
    decode; slow, catches truncated files). A bad file, and a class with no usable file, raise DataError
    naming it; with `skip_bad=True` they give one warning each instead: bad files are left out, and an
    empty class (a given class without a folder too) keeps its name and id, so ids stay stable across
    splits, but has no images.
    """
    if verify not in VERIFY_LEVELS:
        raise DataError(f"verify must be one of {', '.join(VERIFY_LEVELS)}, got {verify!r}.")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"Image folder {root} does not exist or is not a folder.")
    with os.scandir(root) as entries:
        found = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    names = tuple(classes) if classes is not None else tuple(found)
    if not names:
        raise DataError(f"Image folder {root} has no class folders (expected {root}/<class>/<image>).")
    if len(set(names)) != len(names):
        raise DataError(f"Class names given for {root} repeat a name.")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DataError(
            f"Image folder {root} has class folders unknown to the training classes: {_listing(unknown)}."
        )
    with ThreadPoolExecutor(num_workers) as pool:
        scanned = list(pool.map(_scan_class, [str(root / n) for n in names], [verify] * len(names)))
    bad = [line for _, lines in scanned for line in lines]
    if bad and not skip_bad:
        raise DataError(f"{bad[0]}; remove it, or set data.skip_bad=true to leave such files out.")
    if bad:
        warnings.warn(f"Skipped {len(bad)} unusable file(s) under {root}: {_listing(bad)}.", stacklevel=2)
    kept = [files for files, _ in scanned]
    empty = [str(root / n) for n, files in zip(names, kept) if not files]
    if empty and (not skip_bad or len(empty) == len(names)):
        raise DataError(f"Class folder {empty[0]} has no usable images.")
    if empty:
        warnings.warn(
            f"{len(empty)} class folder(s) under {root} have no usable images: {_listing(empty)}.", stacklevel=2
        )
    files = tuple(itertools.chain.from_iterable(kept))
    labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(fs) for fs in kept])
    return ImageFolder(root, names, files, labels)


def split_image_folder(folder: ImageFolder, holdout: int | float, seed: int) -> tuple[ImageFolder, ImageFolder]:
    """Carve a class-stratified held-out validation split from `folder`: (train, holdout)."""
    train_idx, holdout_idx = stratified_split(folder.labels, holdout, seed)
    return folder.subset(train_idx), folder.subset(holdout_idx)


def random_resized_crop_windows(
    sizes: np.ndarray, draws: np.ndarray, area: tuple[float, float] = CROP_AREA,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """RandomResizedCrop windows, as torchvision defines them, from given uniform draws (vectorised).

    `sizes` is N x 2 (image height, width); `draws` is N x (2k + 2) uniforms in [0, 1): k area fractions,
    k log-aspect-ratios, then the window's row and column. Attempt j takes area·U(area) and
    exp(U(log ratio)) as target area and aspect ratio (w/h), rounds w and h, and is kept if it fits;
    the first fitting attempt wins and its top-left corner is drawn uniformly over the valid positions.
    If none fits, the centre crop of the largest window whose aspect ratio lies in `ratio`.
    Returns (anchors, shapes), both int32 N x 2 in (row, column) / (height, width) order.
    """
    hw = np.asarray(sizes, dtype=np.float64).reshape(-1, 2)
    u = np.asarray(draws, dtype=np.float64).reshape(len(hw), -1)
    k = (u.shape[1] - 2) // 2
    height, width = hw[:, :1], hw[:, 1:]
    target = height * width * (area[0] + (area[1] - area[0]) * u[:, :k])
    log_lo, log_hi = np.log(ratio[0]), np.log(ratio[1])
    aspect = np.exp(log_lo + (log_hi - log_lo) * u[:, k : 2 * k])
    w, h = np.round(np.sqrt(target * aspect)), np.round(np.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first, found = fits.argmax(axis=1), fits.any(axis=1)
    rows = np.arange(len(hw))
    height, width = height[:, 0], width[:, 0]
    in_ratio = width / height
    fallback_w = np.where(in_ratio > ratio[1], np.round(height * ratio[1]), width)
    fallback_h = np.where(in_ratio < ratio[0], np.round(width / ratio[0]), height)
    h = np.where(found, h[rows, first], fallback_h)
    w = np.where(found, w[rows, first], fallback_w)
    y = np.where(found, np.floor(u[:, 2 * k] * (height - h + 1)), (height - h) // 2)
    x = np.where(found, np.floor(u[:, 2 * k + 1] * (width - w + 1)), (width - w) // 2)
    return np.stack([y, x], 1).astype(np.int32), np.stack([h, w], 1).astype(np.int32)


def _crop_windows_batch(shapes: list[np.ndarray], draws: list[np.ndarray]) -> tuple[list, list]:
    """`fn.python_function` body: decoded-image shapes (H, W, C) and draws of a batch → crop anchors, shapes."""
    anchors, sizes = random_resized_crop_windows(np.stack([s[:2] for s in shapes]), np.stack(draws))
    return list(anchors), list(sizes)


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


class _EpochFeed:
    """`fn.external_source` callback: file paths and labels (training: crop and flip draws too) of one
    rank's batches, epoch after epoch from `first_epoch` on. Every batch is a pure function of
    (seed, epoch, shard, batch index), and it keeps the last batches it handed out so that a decoding
    error can be traced to its file. It must not refer to the pipeline (DALI would never free it)."""

    def __init__(self, folder: ImageFolder, batch_size: int, train: bool, shard_id: int, num_shards: int,
                 seed: int, first_epoch: int, max_batches: int | None) -> None:
        self.files, self.labels = folder.files, folder.labels.astype(np.int32)
        self.batch_size, self.train, self.shard_id, self.num_shards = batch_size, train, shard_id, num_shards
        self.seed, self.first_epoch = seed, first_epoch
        n = len(epoch_shard(len(self.files), shard_id, num_shards, seed=seed, epoch=0, shuffle=train))
        full = n // batch_size if train else -(-n // batch_size)
        self.batches = full if max_batches is None else min(full, max_batches)
        self.recent: deque[list[str]] = deque(maxlen=4)
        self._order: tuple[int, np.ndarray] | None = None

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's file indices for `epoch`, in serving order (whole batches only when training)."""
        if self._order is None or self._order[0] != epoch:
            order = epoch_shard(len(self.files), self.shard_id, self.num_shards, seed=self.seed, epoch=epoch,
                                shuffle=self.train)
            self._order = (epoch, order[: self.batches * self.batch_size])
        return self._order[1]

    def __call__(self, info) -> tuple[list[np.ndarray], ...]:
        epoch = self.first_epoch + info.epoch_idx
        if info.iteration >= self.batches:
            raise StopIteration
        start = info.iteration * self.batch_size
        idx = self.indices(epoch)[start : start + self.batch_size]
        paths = [self.files[i] for i in idx]
        self.recent.append(paths)
        encoded = [np.frombuffer(os.fsencode(p), dtype=np.uint8) for p in paths]
        labels = self.labels[idx].reshape(-1, 1)  # dense arrays: one batch, one copy
        if not self.train:
            return encoded, labels
        rng = np.random.default_rng([self.seed, epoch, self.shard_id, info.iteration])
        draws = rng.random((len(idx), 2 * CROP_ATTEMPTS + 3), dtype=np.float32)
        return encoded, labels, draws[:, :-1].copy(), (draws[:, -1:] < 0.5).astype(np.int32)


def _build_pipeline(feed: _EpochFeed, image_size: int, device_id: int | None, num_threads: int,
                    dtype: torch.dtype, channels_last: bool) -> Pipeline:
    """The DALI graph for `feed`: (ImageNet-normalised images, int32 labels).

    Train, as NVIDIA's ResNet-50 recipes: a fused decode + random-resized crop (only the window is
    decoded; on the GPU by nvJPEG, "mixed"), resize to image_size², random horizontal flip, normalise.
    The window comes from `random_resized_crop_windows` on the feed's draws and the image's header
    shape, so it is reproducible. Eval: decode, shorter side to image_size·256/224, centre crop.
    Output dtype float32 or float16, CHW, or HWC (`channels_last`: a view as NCHW has channels_last
    strides).
    """
    _require_dali()
    from nvidia.dali import fn, types
    from nvidia.dali.pipeline import Pipeline

    out_types = {torch.float32: types.FLOAT, torch.float16: types.FLOAT16}
    if dtype not in out_types:
        raise ValueError(f"DALI batches can be float32 or float16, not {dtype}")
    gpu = device_id is not None
    pipe = Pipeline(batch_size=feed.batch_size, num_threads=num_threads, device_id=device_id,
                    prefetch_queue_depth=2)
    mean, std = pixel_scale(IMAGENET_MEAN, IMAGENET_STD)
    normalise = dict(dtype=out_types[dtype], output_layout="HWC" if channels_last else "CHW", mean=mean, std=std)
    with pipe:
        if feed.train:
            path, label, draws, mirror = fn.external_source(
                source=feed, num_outputs=4, batch=True, batch_info=True,
                dtype=[types.UINT8, types.INT32, types.FLOAT, types.INT32])
            encoded = fn.io.file.read(path)
            anchor, shape = fn.python_function(fn.peek_image_shape(encoded), draws, function=_crop_windows_batch,
                                               num_outputs=2, batch_processing=True)
            images = fn.decoders.image_slice(encoded, anchor, shape, axes=[0, 1], output_type=types.RGB,
                                             device="mixed" if gpu else "cpu",
                                             **(_GPU_DECODER_PADDING if gpu else {}))
            images = fn.resize(images, size=(image_size, image_size))
            images = fn.crop_mirror_normalize(images, mirror=mirror, **normalise)
        else:
            path, label = fn.external_source(source=feed, num_outputs=2, batch=True, batch_info=True,
                                             dtype=[types.UINT8, types.INT32])
            images = fn.decoders.image(fn.io.file.read(path), device="mixed" if gpu else "cpu",
                                       output_type=types.RGB)
            images = fn.resize(images, resize_shorter=round(image_size * EVAL_RESIZE_RATIO))
            images = fn.crop_mirror_normalize(images, crop=(image_size, image_size), **normalise)
        pipe.set_outputs(images, label)
    return pipe


def _dali_failure(exc: RuntimeError, feed: _EpochFeed) -> DataError | None:
    """A one-line DataError naming the file when DALI could not read or decode one, else None.

    DALI names the sample's position in its batch at best ("Failed to decode sample #i"; not at all for a
    file that is no image), so the files of the last batches fed are decoded again to find the culprit.
    """
    text = str(exc)
    if m := re.search(r"File mapping failed: (.+)", text):
        return DataError(f"DALI could not read {m.group(1).strip()}: is data.root the data set the run indexed?")
    if not re.search(r"fn\.(decoders\.|peek_image_shape)", text):
        return None
    m = re.search(r"Failed to decode sample #(\d+)", text)
    at = int(m.group(1)) if m else None
    suspects = list(dict.fromkeys(p for paths in feed.recent for i, p in enumerate(paths) if at in (None, i)))
    culprits = [p for p in suspects if check_image_file(p, "decode")]
    what = _listing(culprits) if culprits else f"one of {_listing(suspects)}"
    return DataError(f"DALI could not decode {what}: set data.verify=decode to find every such file before "
                     "training (and data.skip_bad=true to leave them out).")


class DaliImageIterator:
    """One rank's shard of an ImageFolder as (normalised NCHW images, int64 labels) batches through DALI.

    The pipeline is built once; each `iter()` serves one epoch, then the next epoch (prefetched by DALI
    meanwhile). Training: a permutation of all files from (seed, epoch), dealt to ranks as
    `splits.epoch_shard` does, whole batches only (every rank runs the same number of steps; at most
    `max_batches`), crops and flips drawn from (seed, epoch, shard, batch). `set_epoch(e)` serves epoch
    e next: the batches are the same whether the pipeline has run since epoch 0 or was built for e.
    Eval: the files in order, shards interleaved, the last batch partial: the shards cover the folder
    exactly once, every epoch. `device_id="auto"` decodes on the current GPU when CUDA is available, else
    on the CPU; images and labels come on that device. `dtype` (float32/float16) and `channels_last`
    (HWC output seen as NCHW) set the image format, as training wants it.
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
        max_batches: int | None = None,
        epoch: int = 0,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        _require_dali()
        if batch_size < 1:
            raise DataError(f"batch_size must be at least 1, got {batch_size}.")
        if num_shards < 1 or not 0 <= shard_id < num_shards:
            raise DataError(f"shard_id must lie in [0, num_shards), got {shard_id} of {num_shards}.")
        if len(folder) < num_shards or (train and len(folder) // num_shards < batch_size):
            raise DataError(
                f"{len(folder)} images under {folder.root} are too few for {num_shards} shard(s)"
                + (f" of at least one batch of {batch_size}." if train else ".")
            )
        self.folder, self.batch_size, self.train, self.image_size = folder, batch_size, train, image_size
        self.shard_id, self.num_shards, self.seed, self.max_batches = shard_id, num_shards, seed, max_batches
        self.device_id = default_device_id() if device_id == "auto" else device_id
        self.num_threads = num_threads or min(4, os.cpu_count() or 1)
        self.dtype, self.channels_last = dtype, channels_last
        self._build(epoch)

    def _build(self, epoch: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._dali = None  # free the previous pipeline first
        self._feed = _EpochFeed(self.folder, self.batch_size, self.train, self.shard_id, self.num_shards,
                                self.seed, epoch, self.max_batches)
        pipe = _build_pipeline(self._feed, self.image_size, self.device_id, self.num_threads, self.dtype,
                               self.channels_last)
        try:  # DALI runs the first batches right away
            self._dali = DALIGenericIterator([pipe], ["images", "labels"], auto_reset=True)
        except RuntimeError as exc:
            if (error := _dali_failure(exc, self._feed)) is None:
                raise
            raise error from None
        self.epoch = epoch  # the epoch the next iteration serves
        self._started = False

    def __len__(self) -> int:
        """Batches per epoch on this shard."""
        return self._feed.batches

    def set_epoch(self, epoch: int) -> None:
        """Serve `epoch` next. The pipeline goes on to the next epoch by itself; any other epoch (or an
        epoch abandoned midway) rebuilds it positioned there."""
        if epoch != self.epoch or self._started:
            self._build(epoch)

    def _next(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            out = next(self._dali)[0]
        except StopIteration:
            return None
        except RuntimeError as exc:
            if (error := _dali_failure(exc, self._feed)) is None:
                raise
            raise error from None
        images = out["images"]
        if self.channels_last:
            images = images.permute(0, 3, 1, 2)
        return images, out["labels"].view(-1).to(device=images.device, dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._started:  # the previous epoch was abandoned midway: go on with the next one
            self._build(self.epoch + 1)
        self._started = True
        while (batch := self._next()) is not None:
            yield batch
        self.epoch += 1
        self._started = False
