"""`laasp-dist` command line: one subcommand per module in `laasp_dist.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LaaspError

# Each module defines `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
COMMANDS = ["models", "flops", "groups", "prune", "run", "evaluate", "report", "sweep", "export", "latency", "latency-table",
            "bench-search"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="laasp-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name.replace('-', '_')}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors become one line on stderr and exit code 2."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LaaspError as exc:
        print(f"laasp-dist: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("laasp-dist: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
