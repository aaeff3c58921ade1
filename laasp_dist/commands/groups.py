"""`laasp-dist groups MODEL`: the prunable channel groups, their widths and FLOPs share."""

from __future__ import annotations

import argparse
import json

from ..pruning import PrunableNetwork
from ..pruning.steps import macs_removed
from .common import add_model_args, arch_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("groups", help="list the prunable channel groups of a model")
    add_model_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    net = PrunableNetwork.create(arch_from_args(args))
    rows = []
    for g in net.groups:
        share = macs_removed(g, g.width, net.cost.layer_macs) / net.cost.macs
        rows.append({"group": g.name, "width": g.width, "members": len(g.members),
                     "macs_share": round(share, 6),
                     "layers": sorted({m.name for m in g.members if m.dim == "out"})})
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(f"{'group':28s} {'width':>6s} {'FLOPs share':>11s}  coupled outputs")
    for r in rows:
        print(f"{r['group']:28s} {r['width']:6d} {100 * r['macs_share']:10.2f}%  {len(r['layers'])}")
    print(f"{len(rows)} groups; total {net.cost.macs / 1e6:.1f} M MACs")
    return 0
