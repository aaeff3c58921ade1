"""The data of a run: splits (train / held-out val / test / scoring subset) and one rank's loaders.

- small images (``fashion_mnist``, ``cifar10``): the splits are pure functions of the
  config (data set, ``val_size``, ``train_limit``, ``test_limit``, ``seed``), so every
  rank, the driver and a test that re-measures ``final/`` compute the same ones; whole
  splits in memory (``data_pipelines.ImageArrays``), served by ``ArrayLoader`` (sharded
  by rank, CIFAR augmentation for training);
- ``synthetic``: random uint8 images at ``data.image_size`` (fixed seed), labels cycling over
  the classes, served like the small images: the training loop's throughput without any
  decoding, and smoke runs on machines without data;
- ``image_folder`` (``root/train/<class>/*``, ``root/val/<class>/*``): the driver lists
  and checks the folders once (``build_data_index``, ``data.verify``) and writes the
  index with the split of every image into the run folder (``write_data_index``).
  Ranks, resumes, the final measurement and ``laasp-dist evaluate`` read that index
  (``read_data_index``) and never list or open the folders themselves; DALI reads the
  images (GPU decoding when the rank has a GPU, DALI's CPU pipeline otherwise) through
  pipelines built once per run, whose batches are a pure function of (seed, epoch,
  rank), so a resumed run reads the same batches as an uninterrupted one.

The held-out validation split is carved from the training data (stratified); the
scoring subset is drawn from what remains (never from val); the test split
(Fashion-MNIST/CIFAR test, or the folder's ``val/``) is only ever reported.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import torch

from ..config import RunConfig
from ..errors import DataError
from ..storage import Storage, as_storage

if TYPE_CHECKING:
    from data_pipelines.folder_index import FolderIndex

SUBSET_SEED_OFFSET = 1  # the scoring subset uses seed + 1, the val split seed, train_limit seed + 2
LIMIT_SEED_OFFSET = 2
INDEX_FILE = "data_index.parquet"  # image_folder runs: the data index, beside subset/
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


def _limit_indices(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Positions of a stratified sample of `limit` of `labels` (``train_limit``/``test_limit``), or all of them."""
    from data_pipelines.splits import stratified_sample

    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    return stratified_sample(labels, limit, seed)


def _limit(data: Any, limit: int | None, seed: int) -> Any:
    if limit is None or limit >= len(data):
        return data
    return data.subset(_limit_indices(np.asarray(data.labels), limit, seed))


def load_splits(config: RunConfig, run_dir: str | Path | Storage | None = None, *, index: FolderIndex | None = None
                ) -> Splits:
    """The train / val / test splits the config describes (DataError when the data is missing or too small).

    image_folder: from `index`, else from the data index in `run_dir` (never from the folders).
    """
    d = config.data
    if d.dataset == "image_folder":
        if index is None:
            if run_dir is None:
                raise DataError("image_folder splits come from a run's data index, and no run folder was given")
            index = read_data_index(run_dir)
        return _folder_splits(config, index)
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



def _folder_root(config: RunConfig) -> Path:
    if config.data.root is None:
        raise DataError("data.dataset=image_folder needs data.root (a folder holding train/ and val/)")
    return Path(config.data.root)


def build_data_index(config: RunConfig) -> FolderIndex:
    """List and check ``data.root``'s train/ and val/ (``data.verify``, ``data.skip_bad``) and assign every
    image its split: held-out val carved from train/ (``val_size``), train (``train_limit``), test = val/
    (``test_limit``). Done once per run, by the driver."""
    from data_pipelines.folder_index import FolderIndex
    from data_pipelines.image_folder import scan_image_folder
    from data_pipelines.splits import stratified_split

    d = config.data
    root = _folder_root(config)
    full = scan_image_folder(root / "train", skip_bad=d.skip_bad, verify=d.verify)
    test = scan_image_folder(root / "val", classes=full.classes, skip_bad=d.skip_bad, verify=d.verify)
    train_idx, val_idx = stratified_split(full.labels, holdout_amount(d.val_size), config.seed)
    train_idx = train_idx[_limit_indices(full.labels[train_idx], d.train_limit, config.seed + LIMIT_SEED_OFFSET)]
    test_idx = _limit_indices(test.labels, d.test_limit, config.seed + LIMIT_SEED_OFFSET)
    return FolderIndex.from_folders(root, [(full, {"train": train_idx, "val": val_idx}), (test, {"test": test_idx})],
                                    {"verify": d.verify, "skip_bad": d.skip_bad, "indexed_root": str(root)})


def write_data_index(run: str | Path | Storage, index: FolderIndex) -> str:
    """Store the data index in the run folder (atomically); returns where."""
    import pyarrow.parquet as pq

    run = as_storage(run)
    table = index.to_table()
    run.write_with(INDEX_FILE, lambda p: pq.write_table(table, p, compression="zstd"))
    return run.uri_of(INDEX_FILE)


def read_data_index(run: str | Path | Storage) -> FolderIndex:
    """The data index stored in the run folder (DataError when it is missing or unreadable)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipelines.folder_index import FolderIndex

    run = as_storage(run)
    where = run.uri_of(INDEX_FILE)
    try:
        table = pq.read_table(pa.BufferReader(run.read_bytes(INDEX_FILE)))
    except FileNotFoundError:
        raise DataError(f"{run.location} has no data index ({INDEX_FILE}): image_folder runs read their images "
                        f"from the index the run wrote when it started") from None
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"{where} is not a readable data index ({type(exc).__name__})") from None
    return FolderIndex.from_table(table, where)


def _folder_splits(config: RunConfig, index: FolderIndex) -> Splits:
    root = _folder_root(config)
    train, val, test = (index.folder(split, root) for split in ("train", "val", "test"))
    return Splits("folder", train, val, test, len(index.classes), config.data.image_size, 3, train, None)


def decode_eval_images(files: Iterable[str], image_size: int, num_workers: int | None = None) -> torch.Tensor:
    """JPEG/PNG files → uint8 N×3×S×S with the eval transform (shorter side to S·256/224, centre crop S),
    decoded in parallel (`num_workers` threads; torchvision's codecs release the GIL)."""
    files = [str(f) for f in files]
    with ThreadPoolExecutor(num_workers) as pool:
        out = list(pool.map(_decode_eval_image, files, [image_size] * len(files)))
    return torch.stack(out) if out else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8)


def _decode_eval_image(path: str, image_size: int) -> torch.Tensor:
    import torchvision.io
    from torchvision.transforms.v2 import functional as TF

    from data_pipelines.image_folder import EVAL_RESIZE_RATIO

    try:
        img = torchvision.io.decode_image(torchvision.io.read_file(path), mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, ValueError) as exc:
        raise DataError(f"cannot decode {path} ({str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}): "
                        f"set data.verify=decode to find such files before training") from None
    img = TF.resize(img, round(image_size * EVAL_RESIZE_RATIO), antialias=True)
    return TF.center_crop(img, [image_size, image_size])


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
    """One rank's view of the splits: a training iterable per epoch and sharded eval iterables.

    Image folders: each DALI pipeline (train, val, test) is built once, at its first use, and serves
    every later epoch; what a training epoch reads depends only on (seed, epoch, rank).
    """

    def __init__(self, splits: Splits, config: RunConfig, rank: int, world_size: int, device: torch.device) -> None:
        self.splits, self.config, self.rank, self.world, self.device = splits, config, rank, world_size, device
        d = config.data
        self.batch_size = max(1, d.batch_size // world_size)
        self.eval_batch_size = max(1, d.eval_batch_size // world_size)
        self._iterators: dict[tuple[str, bool], Any] = {}
        if splits.kind == "arrays":
            from data_pipelines.loaders import ArrayLoader

            self._train = ArrayLoader(splits.train, self.batch_size, train=True, rank=rank, world_size=world_size,
                                      seed=config.seed, drop_last=True, device=device)
            if len(self._train) == 0:
                raise DataError(f"{len(splits.train)} training images are too few for {world_size} worker(s) "
                                f"with batches of {self.batch_size}")

    def train_batches(self, epoch: int) -> Any:
        """The batches of one training epoch (capped at ``train.steps_per_epoch``)."""
        cap = self.config.train.steps_per_epoch
        if self.splits.kind == "arrays":
            self._train.set_epoch(epoch)
            return _Capped(self._train, cap)
        it = self._iterators.get(("train", True))
        if it is None:
            from data_pipelines.image_folder import DaliImageIterator

            dtype, channels_last = batch_format(self.config, self.device)
            it = self._iterators["train", True] = DaliImageIterator(
                self.splits.train, self.batch_size, train=True, image_size=self.splits.input_size,
                shard_id=self.rank, num_shards=self.world, seed=self.config.seed, epoch=epoch, max_batches=cap,
                num_threads=self.config.data.num_threads, device_id=_dali_device(self.device), dtype=dtype,
                channels_last=channels_last)
        it.set_epoch(epoch)
        return it

    def eval_batches(self, split: str, *, sharded: bool = True) -> Any:
        """Eval-transform batches of ``val`` or ``test``: this rank's shard, or everything (``sharded=False``)."""
        key = (split, sharded)
        if key not in self._iterators:
            rank, world = (self.rank, self.world) if sharded else (0, 1)
            bs = self.eval_batch_size if sharded else self.config.data.eval_batch_size
            self._iterators[key] = eval_loader(getattr(self.splits, split), self.splits, self.config, bs, rank,
                                               world, self.device)
        return self._iterators[key]


def batch_format(config: RunConfig, device: torch.device | str) -> tuple[torch.dtype, bool]:
    """The (dtype, channels_last) in which DALI hands image batches to a model on `device`.

    On a GPU, the format training runs in (`laasp_dist.precision.train_numerics`): channels_last as NHWC
    viewed as NCHW, and float16 under bf16 autocast — DALI has no bfloat16; autocast casts the float16
    batch to bfloat16 at the first convolution. On the CPU, float32 NCHW.
    """
    from ..precision import train_numerics

    if torch.device(device).type != "cuda":
        return torch.float32, False
    numerics = train_numerics(config, device)
    return (torch.float16 if numerics.precision == "bf16" else torch.float32), numerics.channels_last


def _dali_device(device: torch.device | str) -> int | None:
    device = torch.device(device)
    return (device.index or 0) if device.type == "cuda" else None


def eval_loader(data: Any, splits: Splits, config: RunConfig, batch_size: int, rank: int = 0, world: int = 1,
                device: torch.device | str = "cpu") -> Any:
    """Batches of `data` with the eval transform, shard `rank` of `world` (each image exactly once overall)."""
    if splits.kind == "arrays":
        from data_pipelines.loaders import ArrayLoader

        return ArrayLoader(data, batch_size, train=False, rank=rank, world_size=world, seed=config.seed, device=device)
    from data_pipelines.image_folder import DaliImageIterator

    dtype, channels_last = batch_format(config, device)
    return DaliImageIterator(data, batch_size, train=False, image_size=splits.input_size, shard_id=rank,
                             num_shards=world, seed=config.seed, num_threads=config.data.num_threads,
                             device_id=_dali_device(device), dtype=dtype, channels_last=channels_last)
