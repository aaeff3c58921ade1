"""`laasp-dist sweep CONFIG --param step_flops=0.005,0.01,0.02 [--seeds 0,1,2] ...`: a Ray Tune grid of LAASP runs."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="run a Ray Tune grid of LAASP runs and compare accuracy vs FLOPs")
    p.add_argument("config", help="base run config (YAML)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a swept key and its values, e.g. step_flops=0.005,0.01 or criteria=[[l1,l2],[l1]], or a "
                        "section and partial settings of it, e.g. 'prune=[{criteria: [l1]}, {selection: importance}]' "
                        "(repeatable; grid product)")
    p.add_argument("--seeds", default=None, metavar="S1,S2,...",
                   help="run every configuration once per seed (the config's top-level seed); summary.parquet has "
                        "mean, sample sd and n per configuration")
    p.add_argument("--reference", default=None, metavar="CONFIGURATION",
                   help="a configuration's name (as in the results' `configuration` column): print and save "
                        "(paired.parquet) every other configuration's difference to it, paired by seed")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a base config key (repeatable)")
    p.add_argument("--out", required=True, help="sweep folder (new or empty, or an earlier sweep with --resume)")
    p.add_argument("--resume", action="store_true",
                   help="continue a crashed sweep (same grid and seeds): finished trials are kept")
    p.add_argument("--max-concurrent", type=int, default=1, help="trials at a time (each has its own workers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from ..errors import ConfigError
    from ..sweep import RESULTS_FILE, SUMMARY_FILE, format_paired, format_summary, parse_seeds, run_sweep

    if args.max_concurrent < 1:
        raise ConfigError("--max-concurrent must be >= 1")
    seeds = parse_seeds(args.seeds)
    tables = run_sweep(args.config, args.overrides, args.param, args.out, args.resume, args.max_concurrent, seeds,
                       args.reference)
    with pd.option_context("display.width", 200, "display.max_columns", 30):
        print(tables.results.to_string(index=False))
    print()
    print("per configuration: mean ± sample sd (ddof=1) over the finished trials, n = finished/trials")
    print(format_summary(tables.summary))
    if tables.paired is not None:
        print()
        print(format_paired(tables.paired, args.reference))
    print(f"results: {args.out}/{RESULTS_FILE}, {args.out}/{SUMMARY_FILE}")
    return 0 if (tables.results["status"] == "done").all() else 1
