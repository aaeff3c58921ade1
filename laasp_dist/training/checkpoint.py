"""Run checkpoints: one plain-container dict per file, written atomically, read with weights_only=True.

``checkpoints/last.pt`` holds everything a resume needs: the slim-model spec, the
model's state dict, the momentum buffers by parameter name, the schedule state
(phase, epoch, round and recovery counters, wall time per phase), the seed, the
search history so far, the per-epoch log, the metrics before pruning, the best
post-pruning model (by held-out val top-1) and the rank-identity checks. Only
dicts, lists, strings, numbers, booleans, None and tensors go in, so
``torch.load(..., weights_only=True)`` reads it and no code is unpickled.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LaaspError
from ..io import torch_save

FORMAT = "laasp-dist/checkpoint"
VERSION = 1
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"


class CheckpointError(LaaspError):
    """A checkpoint is missing, unreadable or from another format."""


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR / LAST


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


def save_checkpoint(run_dir: str | Path, payload: dict[str, Any]) -> Path:
    """Atomically write `payload` (plus format/version) as checkpoints/last.pt."""
    path = checkpoint_path(run_dir)
    torch_save(path, {"format": FORMAT, "version": VERSION, **payload})
    return path


def load_checkpoint(run_dir: str | Path) -> dict[str, Any]:
    """Read checkpoints/last.pt of a run folder; CheckpointError when there is none or it is damaged."""
    path = checkpoint_path(run_dir)
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (no checkpoint in {run_dir})")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files raise many types
        raise CheckpointError(f"{path} is not a readable checkpoint ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file")
    if data.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {data.get('version')}, this build reads {VERSION}")
    return data
