"""The index of an ImageNet-style data root: every image of train/ and val/, its label and the split it serves.

Made once by listing (and checking) the folders; afterwards the splits are read from it, never from the
folders. Paths are relative to the data root ("train/<class>/<file>", "val/<class>/<file>"), so the
same index serves the data set mounted anywhere. As an Arrow table: columns `path` (string), `label`
(int32), `split` (dictionary: train / val / test / unused), and in the schema metadata the class names
(label = position) and how the index was made.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_pipelines.image_folder import ImageFolder
from data_pipelines.errors import DataError

FORMAT = "laasp-dist/data-index"
VERSION = 1
SPLITS = ("train", "val", "test", "unused")
FOLDER_OF_SPLIT = {"train": "train", "val": "train", "test": "val"}  # val = held out of root/train; test = root/val


@dataclass(frozen=True, eq=False)
class FolderIndex:
    """Class names, relative image paths, int64 labels and the split code (position in SPLITS) of each image."""

    classes: tuple[str, ...]
    paths: tuple[str, ...]
    labels: np.ndarray
    splits: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_folders(cls, root: str | Path, parts: list[tuple[ImageFolder, dict[str, np.ndarray]]],
                     info: dict[str, Any] | None = None) -> FolderIndex:
        """Index the images of scanned folders under `root`, each with {split: indices into it}; images no
        split claims are kept as "unused". Every folder must use the same classes."""
        prefix = str(Path(root)) + "/"
        paths: list[str] = []
        labels, codes = [], []
        for folder, assignment in parts:
            if folder.classes != parts[0][0].classes:
                raise DataError(f"{folder.root} does not use the classes of {parts[0][0].root}.")
            if folder.files and not folder.files[0].startswith(prefix):
                raise DataError(f"{folder.root} is not under the data root {root}.")
            code = np.full(len(folder), SPLITS.index("unused"), dtype=np.int8)
            for split, idx in assignment.items():
                code[idx] = SPLITS.index(split)
            paths += [f[len(prefix):] for f in folder.files]
            labels.append(folder.labels)
            codes.append(code)
        return cls(parts[0][0].classes, tuple(paths), np.concatenate(labels).astype(np.int64),
                   np.concatenate(codes), dict(info or {}))

    def __len__(self) -> int:
        return len(self.paths)

    def folder(self, split: str, root: str | Path) -> ImageFolder:
        """The images of `split` (in index order) as an ImageFolder with absolute paths under `root`."""
        code = SPLITS.index(split)
        rows = np.flatnonzero(self.splits == code)
        prefix = str(Path(root)) + "/"
        return ImageFolder(Path(root) / FOLDER_OF_SPLIT[split], self.classes,
                           tuple(prefix + self.paths[i] for i in rows), self.labels[rows])

    def to_table(self) -> pa.Table:
        """The index as an Arrow table (see the module docstring)."""
        meta = {"format": FORMAT, "version": VERSION, "classes": list(self.classes), "info": self.info}
        split = pa.DictionaryArray.from_arrays(pa.array(self.splits, pa.int8()), pa.array(SPLITS))
        return pa.table({"path": pa.array(self.paths, pa.string()), "label": pa.array(self.labels, pa.int32()),
                         "split": split}).replace_schema_metadata({"laasp": json.dumps(meta)})

    @classmethod
    def from_table(cls, table: pa.Table, where: str = "data index") -> FolderIndex:
        """Inverse of `to_table`; DataError naming `where` when the table is not a data index."""
        try:
            meta = json.loads((table.schema.metadata or {})[b"laasp"])
            if meta.get("format") != FORMAT or meta.get("version") != VERSION:
                raise ValueError(f"format {meta.get('format')} version {meta.get('version')}")
            split = table.column("split").combine_chunks()
            names = split.dictionary.to_pylist()
            remap = np.array([SPLITS.index(n) for n in names], dtype=np.int8)
            codes = remap[split.indices.to_numpy(zero_copy_only=False)] if len(split) else np.zeros(0, np.int8)
            labels = table.column("label").to_numpy().astype(np.int64)
            paths = tuple(table.column("path").to_pylist())
            classes = tuple(meta["classes"])
        except (KeyError, ValueError, TypeError, AttributeError, pa.ArrowInvalid) as exc:
            raise DataError(f"{where} is not a laasp-dist data index ({type(exc).__name__}: {exc})") from None
        if len(labels) and not 0 <= labels.min() <= labels.max() < len(classes):
            raise DataError(f"{where} has labels outside its {len(classes)} classes")
        return cls(classes, paths, labels, codes, dict(meta.get("info") or {}))
