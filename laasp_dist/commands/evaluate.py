"""`laasp-dist evaluate RUN_DIR [--data ROOT] [--device D] [--precision P]`: re-measure a run's final slim model
from `final/` alone.

By default it measures the way the run measured its final numbers (summary.json's
``final_metrics``: device, precision, memory format), so that the figures can be re-checked
exactly; on a machine without the run's device it stops with one line naming the flag to use.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import DeviceError, LaaspError


class UnfinishedRunError(LaaspError):
    """The run has no final model yet."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a run's final model on its val and test data")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--data", default=None, help="data root to evaluate on instead of the run's data.root")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"],
                   help="default: the device of the run's final measurement (summary.json)")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: the precision of the run's final measurement (summary.json)")
    p.set_defaults(func=run)


def recorded_measurement(run_dir: Path) -> dict[str, Any]:
    """How the run measured its final numbers: {device, precision, channels_last} from summary.json (may be empty)."""
    try:
        final = json.loads((run_dir / "summary.json").read_text()).get("final_metrics") or {}
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return {k: final[k] for k in ("device", "precision", "channels_last") if k in final}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..config import load_config
    from ..precision import Numerics, train_numerics
    from ..training import measure_slim_model

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UnfinishedRunError(f"{run_dir} is not a laasp-dist run folder (no config.yaml)")
    if not (run_dir / "final" / "spec.json").is_file():
        raise UnfinishedRunError(f"{run_dir} has no final model yet (final/spec.json): the run has not finished")
    overrides = [f"data.root={args.data}"] if args.data else []
    config = load_config(run_dir / "config.yaml", overrides)
    recorded = recorded_measurement(run_dir)
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
    print(json.dumps({"run": str(run_dir), **measure_slim_model(run_dir / "final", config, device, numerics)},
                     indent=1))
    return 0
