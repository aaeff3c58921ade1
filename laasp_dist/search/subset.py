"""The scoring subset: class-stratified, seeded, fixed for a run, split into shards, stored as Parquet.

A subset is drawn once from the *training* split (eval transforms only: the
images are already decoded, resized/cropped and stored as uint8), dealt into
class-balanced shards, and written as one Parquet file per shard plus a
`manifest.json`. Workers read decoded uint8 pixels and normalise on their own
device; no JPEG is decoded during a search.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from data_pipelines.normalise import Normalise

from ..errors import DataError
from ..storage import Storage, StorageError, as_storage

FORMAT = "laasp-dist/search-subset"
VERSION = 1
MANIFEST = "manifest.json"


@dataclass(frozen=True, eq=False)
class Shard:
    """One shard of the subset: uint8 images N×C×H×W, int64 labels, and their indices in the source split."""

    index: int
    images: torch.Tensor
    labels: torch.Tensor
    sample_ids: torch.Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def inputs(self, device: torch.device | str = "cpu", start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Normalised float32 images [start:stop] on `device` (the eval transform's last step)."""
        x = self.images[start:stop].to(device, non_blocking=True)
        return Normalise(self.mean, self.std, x.device)(x)

    def to(self, device: torch.device | str) -> "Shard":
        """This shard with its images and labels held on `device` (sample ids stay on the host)."""
        return Shard(self.index, self.images.to(device), self.labels.to(device), self.sample_ids, self.mean,
                     self.std)

    def to_table(self) -> pa.Table:
        """The shard as an Arrow table (one row per image; pixels as fixed-size binary)."""
        n, c, h, w = self.images.shape
        flat = self.images.contiguous().view(n, c * h * w).numpy()
        pixels = pa.FixedSizeBinaryArray.from_buffers(pa.binary(c * h * w), n, [None, pa.py_buffer(flat.tobytes())])
        meta = {"shard": self.index, "shape": [c, h, w], "mean": list(self.mean), "std": list(self.std)}
        return pa.table(
            {"sample_id": pa.array(self.sample_ids.numpy()), "label": pa.array(self.labels.numpy()), "image": pixels},
        ).replace_schema_metadata({"laasp": json.dumps(meta)})

    @classmethod
    def from_table(cls, table: pa.Table, where: str = "shard") -> "Shard":
        """Inverse of `to_table`."""
        try:
            meta = json.loads((table.schema.metadata or {})[b"laasp"])
            c, h, w = meta["shape"]
            n = table.num_rows
            raw = table.column("image").combine_chunks()
            buf = np.frombuffer(raw.buffers()[1], dtype=np.uint8, count=n * c * h * w, offset=raw.offset * c * h * w)
            images = torch.from_numpy(buf.copy()).view(n, c, h, w)
            labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
            ids = torch.from_numpy(table.column("sample_id").to_numpy().astype(np.int64))
        except (KeyError, ValueError, TypeError) as exc:
            raise DataError(f"{where} is not a search-subset shard ({type(exc).__name__}: {exc})") from None
        return cls(int(meta["shard"]), images, labels, ids, tuple(meta["mean"]), tuple(meta["std"]))


@dataclass(frozen=True, eq=False)
class SearchSubset:
    """The fixed scoring subset of a run, as an ordered tuple of shards."""

    shards: tuple[Shard, ...]
    num_classes: int
    seed: int

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def to(self, device: torch.device | str) -> "SearchSubset":
        """The subset with every shard held on `device` (decoded once, no host-to-device copy per chunk)."""
        return SearchSubset(tuple(s.to(device) for s in self.shards), self.num_classes, self.seed)

    @property
    def sample_ids(self) -> np.ndarray:
        """Sorted source-split indices of every image in the subset."""
        return np.sort(np.concatenate([s.sample_ids.numpy() for s in self.shards]))

    def head(self, n: int) -> list[tuple[Shard, int]]:
        """The first `n` images of the subset, walking the shards in order: [(shard, count)]."""
        out, left = [], n
        for s in self.shards:
            if left <= 0:
                break
            take = min(left, len(s))
            out.append((s, take))
            left -= take
        return out


def build_subset(data: Any, size: int, num_shards: int, seed: int, exclude: Sequence[int] | np.ndarray | None = None
                 ) -> SearchSubset:
    """Draw `size` class-stratified images from `data` (an ImageArrays) and deal them into class-balanced shards.

    `exclude` lists indices that may not be drawn (the held-out validation split).
    Same data, size, shards, seed and exclude → the same subset, shard by shard.
    """
    from data_pipelines.splits import stratified_sample

    available = len(data) - (len(np.unique(np.asarray(exclude))) if exclude is not None else 0)
    if size < 1 or num_shards < 1:
        raise DataError(f"subset size and shard count must be >= 1 (got {size} and {num_shards})")
    if size > available:
        raise DataError(f"a scoring subset of {size} images was asked for, but the training data "
                        f"has only {available} images to draw from")
    if num_shards > size:
        raise DataError(f"cannot split a subset of {size} images into {num_shards} shards")
    idx = stratified_sample(data.labels, size, seed, exclude=exclude)
    labels = data.labels.numpy()[idx]
    # Deal class by class, in a seeded order, round-robin over the shards: every shard is stratified too.
    rng = np.random.default_rng(seed + 1)
    order = np.lexsort((rng.permutation(len(idx)), labels))
    assignment = np.empty(len(idx), dtype=np.int64)
    assignment[order] = np.arange(len(idx)) % num_shards
    shards = []
    for s in range(num_shards):
        ids = torch.from_numpy(np.sort(idx[assignment == s]).astype(np.int64))
        shards.append(Shard(s, data.images[ids].contiguous(), data.labels[ids].clone(), ids,
                            tuple(float(v) for v in data.mean), tuple(float(v) for v in data.std)))
    return SearchSubset(tuple(shards), int(data.num_classes), int(seed))


def shard_file(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_subset(subset: SearchSubset, location: str | Path | Storage) -> Storage:
    """Write every shard as Parquet plus the manifest, into a folder (local path or URI); each file atomic."""
    folder = as_storage(location)
    for shard in subset.shards:
        table = shard.to_table()
        folder.write_with(shard_file(shard.index), lambda p, t=table: pq.write_table(t, p))
    folder.write_json(MANIFEST, {
        "format": FORMAT, "version": VERSION, "num_classes": subset.num_classes, "seed": subset.seed,
        "shards": [{"file": shard_file(s.index), "images": len(s)} for s in subset.shards],
    })
    return folder


def read_subset(location: str | Path | Storage) -> SearchSubset:
    """Read a subset written by `write_subset`; a missing or damaged shard is a DataError before any work."""
    folder = as_storage(location)
    try:
        manifest = folder.read_json(MANIFEST)
    except FileNotFoundError:
        raise DataError(f"no search subset at {folder} ({MANIFEST} is missing)") from None
    except StorageError as exc:
        raise DataError(str(exc)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise DataError(f"{folder.uri_of(MANIFEST)} is not a {FORMAT} v{VERSION} manifest")
    entries = manifest.get("shards") or []
    missing = [e["file"] for e in entries if not folder.is_file(e["file"])]
    if not entries or missing:
        raise DataError(f"search subset at {folder} is missing shard file(s): {', '.join(missing) or 'all'} "
                        f"(the manifest lists {len(entries)})")
    shards = []
    for i, entry in enumerate(entries):
        where = folder.uri_of(entry["file"])
        try:
            table = pq.read_table(pa.BufferReader(folder.read_bytes(entry["file"])))
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"shard {where} is not a readable Parquet file ({exc})") from None
        shard = Shard.from_table(table, where)
        if len(shard) != entry["images"] or shard.index != i:
            raise DataError(f"shard {where} holds {len(shard)} images as shard {shard.index}; "
                            f"the manifest says {entry['images']} as shard {i}")
        shards.append(shard)
    return SearchSubset(tuple(shards), int(manifest["num_classes"]), int(manifest["seed"]))


def calibration_shard(subset: SearchSubset, n: int) -> Shard | None:
    """The first `n` images of the subset as one shard (index -1), for BN recalibration; None when n is 0."""
    if n <= 0:
        return None
    if n > len(subset):
        raise DataError(f"bn_recalibration asks for {n} images, the scoring subset has only {len(subset)}")
    parts = subset.head(n)
    first = parts[0][0]
    return Shard(-1, torch.cat([s.images[:k] for s, k in parts]), torch.cat([s.labels[:k] for s, k in parts]),
                 torch.cat([s.sample_ids[:k] for s, k in parts]), first.mean, first.std)
