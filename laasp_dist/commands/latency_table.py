"""`laasp-dist latency-table MODEL --device cpu|cuda --out FILE`: measure a per-layer latency table."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError
from ..latency import resolve_round_to
from .common import add_model_args, arch_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency-table", help="measure a per-layer latency table for latency-targeted pruning")
    add_model_args(p)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--batch", type=int, default=256, help="images per measured pass (default 256)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="bf16: bfloat16 autocast")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for cuda, off for cpu)")
    p.add_argument("--round-to", default="auto", metavar="N|auto",
                   help="grid step in channels (auto: 8 on cuda, the CPU's float32 vector lanes on cpu)")
    p.add_argument("--max-prune-ratio", type=float, default=0.75, help="the narrowest widths covered (the run's cap)")
    p.add_argument("--points", type=int, default=8, help="most grid widths per axis (default 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed passes per width; the median is kept")
    p.add_argument("--warmup", type=int, default=3, help="untimed passes first")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--out", required=True, help="the table file (JSON) to write")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..latency_table import measure_table, write_table

    out = Path(args.out)
    if out.exists() and not args.force:
        raise ConfigError(f"{out} exists: pass --force to replace it, or choose another --out")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1 (got {args.threads})")
    table = measure_table(arch_from_args(args), device=args.device, batch=args.batch, precision=args.precision,
                          round_to=resolve_round_to(args.round_to, args.device),
                          max_prune_ratio=args.max_prune_ratio, points=args.points, repeats=args.repeats,
                          warmup=args.warmup, channels_last=args.channels_last, threads=args.threads,
                          progress=lambda line: print(line, file=sys.stderr, flush=True))
    write_table(table, out)
    points = sum(len(e["ms"]) * (len(e["ms"][0]) if isinstance(e["ms"][0], list) else 1)
                 for e in table["signatures"].values())
    print(json.dumps({"out": str(out), "model": table["model"], "device": table["device"]["name"],
                      "batch": table["batch"], "precision": table["precision"], "round_to": table["round_to"],
                      "layers": len(table["layers"]), "signatures": len(table["signatures"]), "points": points,
                      "network_ms": round(table["network_ms"], 3), "load_avg_1m": table["load_avg_1m"],
                      "seconds": table["seconds"]}))
    return 0
