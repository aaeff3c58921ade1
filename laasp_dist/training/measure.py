"""`measure_slim_model`: a slim model re-measured from its folder alone on the run's val and test splits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import RunConfig
from ..precision import Numerics, train_numerics
from ..pruning import load_slim_model
from ..storage import Storage
from .data import load_splits
from .evaluate import evaluate


def measure_slim_model(model_dir: str | Path | Storage, config: RunConfig, device: torch.device | str = "cpu",
                       numerics: Numerics | None = None, *, run_dir: str | Path | Storage | None = None
                       ) -> dict[str, Any]:
    """Load a slim model from its folder alone and measure it on the run's val and test splits (one process).

    This is how summary.json's final accuracy is produced, and how anyone can re-check it. `numerics`
    defaults to the run's training arithmetic on `device`; the device (cpu or cuda: also where DALI
    decodes), precision and memory format used are part of the result. Image folders: the splits come
    from the data index of the run folder `run_dir`.
    """
    from .data import eval_loader

    device = torch.device(device)
    numerics = numerics or train_numerics(config, device)
    net = load_slim_model(model_dir)
    model = numerics.model(net.model.to(device))
    splits = load_splits(config, run_dir)
    out: dict[str, Any] = {"macs": net.cost.macs, "params": net.cost.params, "device": device.type,
                           **numerics.describe()}
    for split in ("val", "test"):
        loader = eval_loader(getattr(splits, split), splits, config, config.data.eval_batch_size, device=device)
        m = evaluate(model, loader, device, numerics=numerics)
        out.update({f"{split}_loss": m["loss"], f"{split}_top1": m["top1"], f"{split}_top5": m["top5"],
                    f"{split}_images": m["images"]})
    return out
