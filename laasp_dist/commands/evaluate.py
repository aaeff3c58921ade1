"""`laasp-dist evaluate RUN_DIR [--data ROOT]`: re-measure a run's final slim model from `final/` alone."""

from __future__ import annotations

import argparse
import json
from ..errors import LaaspError


class UnfinishedRunError(LaaspError):
    """The run has no final model yet."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="measure a run's final model on its val and test data")
    p.add_argument("run_dir", help="a finished run folder (a local path or a URI such as s3://bucket/run)")
    p.add_argument("--data", default=None, help="where the run's data set is now, if not at its data.root "
                   "(image folders: the run's data index is read with its paths under ROOT)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..storage import Storage
    from ..training import measure_slim_model

    run = Storage(args.run_dir)
    if not run.is_file("config.yaml"):
        raise UnfinishedRunError(f"{run} is not a laasp-dist run folder (no config.yaml)")
    if not run.is_file("final/spec.json"):
        raise UnfinishedRunError(f"{run} has no final model yet (final/spec.json): the run has not finished")
    overrides = [f"data.root={args.data}"] if args.data else []
    config = load_config(run.child("config.yaml"), overrides)
    measured = measure_slim_model(run.child("final"), config, args.device, run_dir=run)
    print(json.dumps({"run": run.location, **measured}, indent=1))
    return 0
