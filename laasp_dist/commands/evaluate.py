"""`laasp-dist evaluate RUN_DIR [--data ROOT] [--device D] [--precision P]`: re-measure a run's final slim model
from `final/` alone.

By default it measures the way the run measured its final numbers (summary.json's
``final_metrics``: device, precision, memory format), so that the figures can be re-checked
exactly; on a machine without the run's device it stops with one line naming the flag to use.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..errors import DeviceError, UnfinishedRunError

if TYPE_CHECKING:
    from ..storage import Storage


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a run's final model on its val and test data")
    p.add_argument("run_dir", help="a finished run folder (a local path or a URI such as s3://bucket/run)")
    p.add_argument("--data", default=None, help="where the run's data set is now, if not at its data.root "
                   "(image folders: the run's data index is read with its paths under ROOT)")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: the device of the run's final measurement (summary.json)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: the precision of the run's final measurement (summary.json)")
    p.set_defaults(func=run)


def recorded_measurement(run: Storage) -> dict[str, Any]:
    """How the run measured its final numbers: {device, precision, channels_last} from summary.json (may be empty)."""
    from ..storage import StorageError

    try:
        final = run.read_json("summary.json").get("final_metrics") or {}
    except (FileNotFoundError, StorageError):
        return {}
    return {k: final[k] for k in ("device", "precision", "channels_last") if k in final}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..precision import Numerics, train_numerics
    from ..storage import Storage
    from ..training import measure_slim_model

    run = Storage(args.run_dir)
    if not run.is_file("config.yaml"):
        raise UnfinishedRunError(f"{run} is not a laasp-dist run folder (no config.yaml)")
    if not run.is_file("final/spec.json"):
        raise UnfinishedRunError(f"{run} has no final model yet (final/spec.json): the run has not finished")
    overrides = [f"data.root={args.data}"] if args.data else []
    config = load_config(run.child("config.yaml"), overrides)
    recorded = recorded_measurement(run)
    device = args.device or recorded.get("device", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        why = "the run measured its final numbers on cuda" if args.device is None else "--device cuda was given"
        slow = (", where --precision fp32 is much faster than the run's bf16 unless the CPU has native bf16"
                if (args.precision or recorded.get("precision")) == "bf16" else "")
        raise DeviceError(f"{why}, but there is no CUDA device here: pass --device cpu to re-measure on the CPU"
                          f"{slow} (expect close, not identical, figures: decoding and kernels differ)")
    default = train_numerics(config, device)
    numerics = Numerics(args.precision or recorded.get("precision", default.precision),
                        recorded.get("channels_last", default.channels_last), device)
    measured = measure_slim_model(run.child("final"), config, device, numerics, run_dir=run)
    print(json.dumps({"run": run.location, **measured}, indent=1))
    return 0
