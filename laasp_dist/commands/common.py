"""Argument helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from ..models import model_entry
from ..pruning import Arch


def parse_input(text: str) -> tuple[int, int, int]:
    """'3x32x32' → (3, 32, 32)."""
    try:
        c, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--input must look like CxHxW, e.g. 3x224x224 (got {text!r})") from None
    if min(c, h, w) < 1 or h != w:
        raise ConfigError(f"--input must be positive and square (got {text!r})")
    return c, h, w


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL plus --input and --classes."""
    p.add_argument("model", help="registered model name (see `laasp-dist models`)")
    p.add_argument("--input", default=None, help="input shape CxHxW (default: the model's own, 3 channels)")
    p.add_argument("--classes", type=int, default=None, help="number of classes (default: 10 for 32×32 models, 1000 otherwise)")


def arch_from_args(args: argparse.Namespace) -> Arch:
    """The Arch the model arguments describe."""
    entry = model_entry(args.model)
    c, size = 3, entry.input_size
    if args.input:
        c, size, _ = parse_input(args.input)
    classes = args.classes if args.classes is not None else (10 if entry.input_size <= 32 else 1000)
    if classes < 1:
        raise ConfigError(f"--classes must be >= 1 (got {classes})")
    return Arch(args.model, classes, c, size)
