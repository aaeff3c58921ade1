"""`laasp-dist run CONFIG.yaml [--set key=value ...] [--out DIR] [--resume]`: the whole LAASP schedule."""

from __future__ import annotations

import argparse
import json

from ..config import load_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="train and prune a network by loss-aware search (Ray Train)")
    p.add_argument("config", help="run config (YAML); see jobs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set prune.step_flops=0.02 (repeatable)")
    p.add_argument("--out", default=None, help="run folder (default: runs/<name>); must be new or empty")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from its last checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.overrides)
    from ..training import run_job

    summary = run_job(config, args.out, resume=args.resume)
    if args.json:
        print(json.dumps(summary, indent=1))
    return 0
