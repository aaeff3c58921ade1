"""`laasp-dist evaluate RUN_DIR [--data ROOT]`: re-measure a run's final slim model from `final/` alone."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import LaaspError


class UnfinishedRunError(LaaspError):
    """The run has no final model yet."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a run's final model on its val and test data")
    p.add_argument("run_dir", help="a finished run folder")
    p.add_argument("--data", default=None, help="where the run's data set is now, if not at its data.root "
                   "(image folders: the run's data index is read with its paths under ROOT)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..training import measure_slim_model

    run_dir = Path(args.run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise UnfinishedRunError(f"{run_dir} is not a laasp-dist run folder (no config.yaml)")
    if not (run_dir / "final" / "spec.json").is_file():
        raise UnfinishedRunError(f"{run_dir} has no final model yet (final/spec.json): the run has not finished")
    overrides = [f"data.root={args.data}"] if args.data else []
    config = load_config(run_dir / "config.yaml", overrides)
    measured = measure_slim_model(run_dir / "final", config, args.device, run_dir=run_dir)
    print(json.dumps({"run": str(run_dir), **measured}, indent=1))
    return 0
