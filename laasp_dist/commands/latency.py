"""`laasp-dist latency RUN_DIR|MODEL_DIR`: slim vs. unpruned latency and throughput, beside the FLOPs ratio
and, where there is a latency table, beside the table's estimate."""

from __future__ import annotations

import argparse
import json

from ..errors import ConfigError
from ..export import resolve_model_dir
from ..latency import benchmark, format_report


def _batches(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--batch must be a comma-separated list of integers, e.g. 1,256 (got {text!r})") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="measure slim vs. original latency/throughput (benchmark)")
    p.add_argument("path", help="run folder with final/, or a slim-model folder with spec.json")
    p.add_argument("--batch", default="1,256", help="comma-separated batch sizes (default 1,256)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format (default: on for cuda, off for cpu)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per model and batch; the median is kept")
    p.add_argument("--warmup", type=int, default=3, help="untimed runs first")
    p.add_argument("--table", default=None, help="a latency table for the table's estimate (default: the run "
                   "folder's latency_table.json, if it has one)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..latency_table import RUN_TABLE_FILE, table_estimate
    from ..storage import Storage

    run_folder = Storage(args.path)
    table = args.table or (run_folder.child(RUN_TABLE_FILE) if run_folder.is_file(RUN_TABLE_FILE) else None)
    estimate = table_estimate(table, resolve_model_dir(args.path)) if table else None  # a bad table: before timing
    report = benchmark(args.path, _batches(args.batch), device=args.device, bf16=args.bf16,
                       repeats=args.repeats, warmup=args.warmup, channels_last=args.channels_last)
    if estimate is not None:
        report["table_estimate"] = estimate
    print(json.dumps(report) if args.json else format_report(report))
    return 0
