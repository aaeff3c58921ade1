"""`laasp-dist prune MODEL --criterion C --flops-reduction R --out DIR`: one-shot criterion-only pruning."""

from __future__ import annotations

import argparse
import json

import torch

from ..errors import ConfigError
from ..latency import resolve_round_to
from ..pruning import PrunableNetwork, get_criterion, load_slim_model, save_slim_model
from ..pruning.baseline import prune_by_criterion
from .common import add_model_args, arch_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prune", help="one-shot prune by a single criterion to a FLOPs target (baseline)")
    add_model_args(p)
    p.add_argument("--criterion", required=True, help="criterion name (see `laasp-dist models`)")
    p.add_argument("--flops-reduction", type=float, required=True, help="fraction of FLOPs to remove, in (0, 1)")
    p.add_argument("--out", required=True, help="directory for the slim model (spec.json + weights.pt)")
    p.add_argument("--weights", default=None, help="start from this slim-model directory instead of a fresh model")
    p.add_argument("--step-flops", type=float, default=0.01, help="FLOPs removed per step (fraction of original)")
    p.add_argument("--max-prune-ratio", type=float, default=0.75, help="most of a group's channels that may go")
    p.add_argument("--aggregation", choices=["group", "root"], default="group")
    p.add_argument("--round-to", default="auto", metavar="N|auto",
                   help="keep every group's width a multiple of N (auto: this machine's CPU default, see "
                        "docs/latency.md; 1: no rounding)")
    p.add_argument("--seed", type=int, default=0, help="seeds a fresh model's initialisation and `random`")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for name, value in (("--flops-reduction", args.flops_reduction), ("--step-flops", args.step_flops),
                        ("--max-prune-ratio", args.max_prune_ratio)):
        if not 0.0 < value < 1.0:
            raise ConfigError(f"{name} must be in (0, 1), got {value}")
    if get_criterion(args.criterion).source == "activation":
        raise ConfigError(f"--criterion {args.criterion} is measured on training data (activation gradients), which "
                          f"the prune command does not read: use it in a run's prune.criteria")
    round_to = resolve_round_to(args.round_to, "cpu")
    torch.manual_seed(args.seed)  # a fresh model's initialisation decides the criterion's ranking
    net = load_slim_model(args.weights) if args.weights else PrunableNetwork.create(arch_from_args(args))
    before = net.cost
    prune_by_criterion(net, args.criterion, args.flops_reduction, step_fraction=args.step_flops,
                       max_prune_ratio=args.max_prune_ratio, aggregation=args.aggregation, seed=args.seed,
                       round_to=round_to)
    save_slim_model(net, args.out)
    print(json.dumps({
        "model": net.arch.model, "criterion": args.criterion, "out": args.out,
        "macs_before": before.macs, "macs_after": net.cost.macs,
        "params_before": before.params, "params_after": net.cost.params,
        "flops_reduction": round(net.macs_reduction, 6), "steps": len(net.prunes), "round_to": round_to,
    }))
    return 0
