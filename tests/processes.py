"""Watching a run from outside and killing its processes, as a crash or a lost node would (tests only)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from laasp_dist.storage import Storage, StorageError
from laasp_dist.training.checkpoint import CHECKPOINT_DIR, checkpoint_index

SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of the checkpoints it has registered


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # gone, or not ours to read
        return b""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree."""
    children: dict[int, list[int]] = {}
    for pid in _pids():
        stat = _proc(pid, "stat").decode(errors="replace")
        if stat:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def command(pid: int) -> str:
    return _proc(pid, "cmdline").replace(b"\0", b" ").decode(errors="replace").strip()


def train_worker_pids(root: int) -> list[int]:
    """Ray Train worker processes below `root` (Ray names them ``ray::RayTrainWorker…``)."""
    return sorted(p for p in descendants(root) if command(p).startswith("ray::RayTrainWorker"))


def pids_with_env(key: str, value: str) -> list[int]:
    """Processes whose environment holds KEY=value: a driver and everything Ray started for it."""
    needle = f"{key}={value}".encode()
    return [p for p in _pids() if needle in _proc(p, "environ").split(b"\0")]


def cpu_ticks(pid: int) -> int:
    """User + system CPU time a process has used, in clock ticks (0 once it is gone)."""
    stat = _proc(pid, "stat").decode(errors="replace")
    if not stat:
        return 0
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def checkpoints_reported(run: str | Path) -> int:
    """Index of the newest checkpoint Ray Train's controller has registered for a run (0 if none).

    That is the one a restarted worker group gets from ``get_checkpoint()``; a checkpoint folder can be on
    disk a moment before the controller has taken it in, so the folders alone are not the signal."""
    storage = Storage(run).child(CHECKPOINT_DIR)
    if not storage.is_file(SNAPSHOT):
        return 0
    try:
        snapshot = storage.read_json(SNAPSHOT)
    except StorageError:  # the controller rewrites it in place: caught mid-write (seen on S3), read it next poll
        return 0
    latest = snapshot.get("latest_checkpoint_result") or {}
    return checkpoint_index(latest.get("checkpoint_dir_name", "")) or 0


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.2)
