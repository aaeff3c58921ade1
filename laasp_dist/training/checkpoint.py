"""Run checkpoints, persisted through Ray Train: one plain-container dict per checkpoint, read with weights_only=True.

Every epoch and every round the coordinator writes ``state.pt`` into a fresh local
directory and reports it with ``ray.train.report(checkpoint=Checkpoint.from_directory(…))``;
Ray Train copies it to ``<run>/checkpoints/checkpoint_NNNNNN/`` on the run's storage (a
local folder, a shared mount or an object store) and keeps the newest `KEEP` of them. A
worker group that Ray restarts after a failure, and a driver started again with
``--resume`` (same run folder, so Ray Train finds its own snapshot there), get the
newest one from ``ray.train.get_checkpoint()``.

``state.pt`` holds everything a resume needs: the slim-model spec, the model's state
dict, the momentum buffers by parameter name, the schedule state (phase, epoch, round and
recovery counters, wall time per phase), the search history so far, the per-epoch log,
the metrics before pruning, the best post-pruning model (by held-out val top-1), the
rank-identity checks, the restarts so far and the torch RNG state. Only dicts, lists,
strings, numbers, booleans, None and tensors go in, so ``torch.load(…, weights_only=True)``
reads it and no code is unpickled.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LaaspError
from ..storage import Storage

FORMAT = "laasp-dist/checkpoint"
VERSION = 2
CHECKPOINT_DIR = "checkpoints"  # Ray Train's run folder (its `RunConfig.name`) inside the run folder
STATE_FILE = "state.pt"
PREFIX = "checkpoint_"
KEEP = 2  # checkpoints kept on storage (the newest; each holds the best model too)


class CheckpointError(LaaspError):
    """A checkpoint is missing, unreadable or from another format."""


def plain(obj: Any) -> Any:
    """numpy scalars/arrays, tuples and the like → plain Python containers (for weights_only loading and JSON)."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.ndim == 0:
        return obj.item()
    return obj


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached, contiguous CPU copy of a model's state dict (what checkpoints and broadcasts carry)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def checkpoint_name(index: int) -> str:
    """Directory name of the `index`-th checkpoint of a run (sorts in report order)."""
    return f"{PREFIX}{index:06d}"


def write_state(directory: str | Path, payload: dict[str, Any]) -> Path:
    """Write `payload` (plus format/version) as `directory/state.pt`."""
    path = Path(directory) / STATE_FILE
    torch.save({"format": FORMAT, "version": VERSION, **payload}, path)
    return path


def parse_state(data: bytes, where: str) -> dict[str, Any]:
    """A state.pt's bytes → the payload dict; CheckpointError when damaged or of another format/version."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise CheckpointError(f"{where} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a {FORMAT} file")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{where} has checkpoint version {state.get('version')}, this build reads {VERSION}")
    return state


def read_reported(checkpoint: Any) -> dict[str, Any]:
    """The state of a `ray.train.Checkpoint` (downloaded first when it lives on an object store)."""
    with checkpoint.as_directory() as directory:
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise CheckpointError(f"checkpoint {checkpoint.path} has no {STATE_FILE}")
        return parse_state(path.read_bytes(), f"{checkpoint.path}/{STATE_FILE}")


def checkpoint_index(name: str) -> int | None:
    """N of a ``checkpoint_NNNNNN`` directory name; None for anything else (Ray keeps its own files beside them)."""
    digits = name[len(PREFIX):]
    return int(digits) if name.startswith(PREFIX) and digits.isdigit() else None


def checkpoint_names(storage: Storage) -> list[str]:
    """The run's checkpoint directories, oldest first."""
    return sorted((n for n in storage.listdir(CHECKPOINT_DIR) if checkpoint_index(n) is not None),
                  key=checkpoint_index)


def latest_state(storage: Storage) -> dict[str, Any]:
    """The newest readable checkpoint of a run folder (for the driver's checks before a resume).

    A checkpoint whose upload was cut off is skipped, as Ray Train skips it; CheckpointError
    when there is none.
    """
    names = checkpoint_names(storage)
    if not names:
        raise CheckpointError(f"cannot resume: no checkpoint in {storage.uri_of(CHECKPOINT_DIR)}")
    problem = None
    for name in reversed(names):
        rel = f"{CHECKPOINT_DIR}/{name}/{STATE_FILE}"
        try:
            return parse_state(storage.read_bytes(rel), storage.uri_of(rel))
        except FileNotFoundError:
            continue
        except CheckpointError as exc:
            problem = problem or exc
    raise problem or CheckpointError(f"cannot resume: no complete checkpoint in {storage.uri_of(CHECKPOINT_DIR)}")
