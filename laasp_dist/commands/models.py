"""`laasp-dist models`: the registered models and pruning criteria."""

from __future__ import annotations

import argparse

from ..models import list_models, model_entry
from ..pruning import get_criterion, list_criteria


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list registered models and criteria")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("models:")
    for name in list_models():
        e = model_entry(name)
        print(f"  {name:14s} {e.input_size:>3d}×{e.input_size:<3d} {e.description}")
    print("criteria:")
    for name in list_criteria():
        print(f"  {name:14s} {get_criterion(name).description}")
    return 0
