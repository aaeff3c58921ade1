"""`laasp-dist report RUN_DIR`: PNG figures of a run (accuracy/FLOPs, widths, criterion wins)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write PNG figures of a run folder")
    p.add_argument("run_dir", help="a run folder written by `laasp-dist run`")
    p.add_argument("--out", default=None, help="where to write the figures (default RUN_DIR/report)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..monitoring.report import write_report

    for path in write_report(args.run_dir, args.out):
        print(path)
    return 0
