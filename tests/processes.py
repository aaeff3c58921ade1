"""Watching a run from outside and killing its processes, as a crash or a lost node would (tests only)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from laasp_dist.storage import Storage
from laasp_dist.training.checkpoint import checkpoint_index, checkpoint_names


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


def kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def checkpoints_reported(run: str | Path) -> int:
    """Index of the newest checkpoint directory of a run folder (0 if none)."""
    return max((checkpoint_index(n) for n in checkpoint_names(Storage(run))), default=0)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.2)
