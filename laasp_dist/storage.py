"""Where a run lives: a folder on a local disk, a shared mount, or an object store (``s3://``, ``gs://``, …).

`Storage` is the one way the project reads and writes a run folder (config, summary,
history, subset shards, the final model, TensorBoard logs, reports). It goes through
``pyarrow.fs`` — the same filesystem layer Ray Train's checkpoint storage uses — so a
run folder given as a URI is written by whichever node holds the coordinator and read
back from any machine with access; nobody needs the driver's disk.

Writes are atomic per file: a local file is written to a temporary sibling and renamed;
an object-store object becomes visible only when its upload completes. Reads of a
missing file raise `FileNotFoundError`; every other storage failure (unreachable
endpoint, no permission, no such bucket) is a `StorageError` with one line.

Object-store credentials and endpoints come from the usual environment of the
filesystem (e.g. ``AWS_ACCESS_KEY_ID``, ``AWS_ENDPOINT_URL``), which Ray workers inherit
on a local Ray and get from the node's instance role or runtime env on a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs

from .errors import LaaspError

T = TypeVar("T")


# ---------------------------------------------------------------- local atomic writes


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp_path)` then move tmp_path onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_dir(path: str | Path, fill: Callable[[Path], None]) -> None:
    """Build a directory in a temp sibling with `fill(tmp_dir)`, then swap it in for `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        fill(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class StorageError(LaaspError):
    """A run folder's storage cannot be reached, read or written."""


def _one_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def _guarded(op: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn pyarrow/OS failures of a storage operation into one-line StorageErrors (not-found passes)."""

    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def inner(self: "Storage", rel: str = "", *args: Any, **kwargs: Any) -> T:
            try:
                return fn(self, rel, *args, **kwargs)
            except (FileNotFoundError, StorageError):
                raise
            except (OSError, pa.ArrowException) as exc:
                raise StorageError(f"cannot {op} {self.uri_of(rel)}: {_one_line(exc)}") from None

        return inner

    return wrap


def is_uri(location: str | Path) -> bool:
    """Whether `location` names an object store or other non-local filesystem (``scheme://…``)."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


class Storage:
    """A folder, addressed by a local path or a URI; paths given to its methods are relative to it.

    `uri` is the address as given (it rebuilds the same Storage in another process, query
    options included); `location` is its display form.
    """

    def __init__(self, location: str | Path) -> None:
        text = str(location)
        if is_uri(text):
            try:
                self.fs, path = pafs.FileSystem.from_uri(text)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise StorageError(f"cannot use {text} as a run location: {_one_line(exc)}") from None
            self.root = path.rstrip("/")
            self.location = text.split("?", 1)[0].rstrip("/")
            self.uri = text
        else:
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            self.fs, self.root, self.location = pafs.LocalFileSystem(), path.as_posix(), str(path)
            self.uri = self.location

    def __repr__(self) -> str:
        return f"Storage({self.location!r})"

    def __str__(self) -> str:
        return self.location

    @property
    def is_local(self) -> bool:
        """True for a local disk or a mount (files have a path on this machine)."""
        return isinstance(self.fs, pafs.LocalFileSystem)

    def local_path(self, rel: str = "") -> Path:
        """The local path of `rel` (local storage only)."""
        if not self.is_local:
            raise StorageError(f"{self.location} is not on a local filesystem")
        return Path(self._path(rel))

    def child(self, rel: str) -> "Storage":
        """The sub-folder `rel` as a Storage of its own."""
        if self.is_local:
            return Storage(self._path(rel))
        base, _, query = self.uri.partition("?")
        return Storage(f"{base.rstrip('/')}/{rel.strip('/')}" + (f"?{query}" if query else ""))

    def uri_of(self, rel: str = "") -> str:
        """`rel` as the user would write it (for messages)."""
        return self.location if not rel else f"{self.location}/{rel.strip('/')}"

    def _path(self, rel: str) -> str:
        return (PurePosixPath(self.root) / rel.strip("/")).as_posix() if rel else self.root

    # ---------------------------------------------------------------- queries

    @_guarded("look up")
    def exists(self, rel: str = "") -> bool:
        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    @_guarded("look up")
    def is_file(self, rel: str) -> bool:
        return self.fs.get_file_info(self._path(rel)).type == pafs.FileType.File

    @_guarded("list")
    def listdir(self, rel: str = "") -> list[str]:
        """Names directly inside `rel`, sorted ([] when it does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return sorted(PurePosixPath(i.path).name for i in infos)

    def is_empty(self) -> bool:
        """True when the folder does not exist or holds nothing."""
        return not self.listdir()

    # ---------------------------------------------------------------- reading

    @_guarded("read")
    def read_bytes(self, rel: str) -> bytes:
        path = self._path(rel)
        if self.fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(self.uri_of(rel))
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        """Parsed JSON; a damaged file is a StorageError naming it."""
        try:
            return json.loads(self.read_bytes(rel))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StorageError(f"{self.uri_of(rel)} is not valid JSON ({exc})") from None

    @contextmanager
    def local_copy(self, rel: str = "") -> Iterator[Path]:
        """A local path holding `rel` (a file or a folder): the file itself when local, a downloaded copy otherwise."""
        if self.is_local:
            yield self.local_path(rel)
            return
        tmp = Path(tempfile.mkdtemp(prefix="laasp-storage-"))
        try:
            yield self._download(rel, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @_guarded("download")
    def _download(self, rel: str, into: Path) -> Path:
        src = self._path(rel)
        info = self.fs.get_file_info(src)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(self.uri_of(rel))
        target = into / (PurePosixPath(src).name or "root")
        if info.type == pafs.FileType.File:
            pafs.copy_files(src, str(target), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        else:
            target.mkdir(parents=True)
            if self.listdir(rel):
                pafs.copy_files(src, str(target), source_filesystem=self.fs,
                                destination_filesystem=pafs.LocalFileSystem())
        return target

    # ---------------------------------------------------------------- writing

    @_guarded("write")
    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one file atomically (replacing it)."""
        if self.is_local:
            atomic_write(self._path(rel), lambda p: p.write_bytes(data))
            return
        path = self._path(rel)
        self.fs.create_dir(PurePosixPath(path).parent.as_posix(), recursive=True)
        with self.fs.open_output_stream(path) as f:
            f.write(data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, data: Any) -> None:
        """Pretty JSON, written atomically."""
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=False) + "\n")

    def write_with(self, rel: str, write: Callable[[Path], None]) -> None:
        """`write(local_tmp_path)` produces the file's content (matplotlib, Parquet, torch.save …); then stored atomically."""
        if self.is_local:
            self._local_write(rel, write)
            return
        with tempfile.TemporaryDirectory(prefix="laasp-storage-") as tmp:
            path = Path(tmp) / "file"
            write(path)
            self.write_bytes(rel, path.read_bytes())

    @_guarded("write")
    def _local_write(self, rel: str, write: Callable[[Path], None]) -> None:
        atomic_write(self._path(rel), write)

    @_guarded("write")
    def write_dir(self, rel: str, fill: Callable[[Path], None], last: str | None = None) -> None:
        """A whole folder: `fill(local_dir)` writes it, then it replaces `rel`.

        Local: swapped in by one rename. Object stores: files are uploaded one by one, `last`
        (e.g. the file readers look for first) after all the others.
        """
        if self.is_local:
            replace_dir(self._path(rel), fill)
            return
        with tempfile.TemporaryDirectory(prefix="laasp-storage-") as tmp:
            fill(Path(tmp))
            self.upload(Path(tmp), rel, last=last)

    def upload(self, local_dir: Path, rel: str, last: str | None = None) -> None:
        """Copy every file under `local_dir` to `rel` (each atomically), `last` after the others."""
        files = sorted(p for p in Path(local_dir).rglob("*") if p.is_file())
        files.sort(key=lambda p: p.relative_to(local_dir).as_posix() == last)
        for f in files:
            self.write_bytes(f"{rel.strip('/')}/{f.relative_to(local_dir).as_posix()}", f.read_bytes())

    @_guarded("delete")
    def delete(self, rel: str = "") -> None:
        """Remove a file or a whole folder (nothing happens if it does not exist)."""
        info = self.fs.get_file_info(self._path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self._path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self._path(rel))

    @_guarded("write to")
    def check_writable(self, rel: str = "") -> None:
        """Create the folder and write and delete a probe file: a StorageError now rather than after hours."""
        probe = self._path(f"{rel.strip('/')}/.laasp-write-probe" if rel else ".laasp-write-probe")
        self.fs.create_dir(PurePosixPath(probe).parent.as_posix(), recursive=True)
        with self.fs.open_output_stream(probe) as f:
            f.write(b"ok")
        self.fs.delete_file(probe)

    def ray_storage(self) -> dict[str, Any]:
        """`storage_path` / `storage_filesystem` for Ray Train's RunConfig pointing at this folder."""
        if self.is_local:
            return {"storage_path": self.root}
        return {"storage_path": self.root, "storage_filesystem": self.fs}


def as_storage(location: "str | Path | Storage") -> Storage:
    """A Storage for a location given as a path, a URI or already a Storage.

    A location may name a folder or a single file (then use ``rel=""`` with its methods).
    """
    return location if isinstance(location, Storage) else Storage(location)
