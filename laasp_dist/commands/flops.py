"""`laasp-dist flops MODEL`: MACs, FLOPs (= 2 × MACs) and parameters at the model's input size."""

from __future__ import annotations

import argparse
import json

from ..pruning import count_cost
from ..models import create_model
from .common import add_model_args, arch_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("flops", help="count MACs/FLOPs/params of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    arch = arch_from_args(args)
    cost = count_cost(create_model(arch.model, arch.num_classes, arch.in_channels), arch.input_shape)
    result = {"model": arch.model, **cost.as_dict()}
    if args.json:
        print(json.dumps(result))
    else:
        c, h, w = arch.input_shape
        print(f"{arch.model} @ {c}x{h}x{w}: {cost.macs / 1e9:.3f} G MACs = {cost.flops / 1e9:.3f} GFLOPs, "
              f"{cost.params / 1e6:.3f} M params")
    return 0
