"""Measured speed-up vs. the FLOPs promise of one-shot pruning at several `round_to` values, interleaved.

    python benchmarks/round_to_speedup.py --model resnet56 --criterion l1 --flops-reduction 0.5 \
        --round-to 1,8,16 --batch 256 --repeats 15 --warmup 3

Each slim model is pruned as `laasp-dist prune MODEL --criterion C --flops-reduction R --round-to N`
does (fresh initialisation, seed 0), then the unpruned original and every slim model are timed in
one `latency.pass_times_ms` call: they take turns pass by pass, so a change of machine load hits
all of them alike and the ratios stay comparable. Prints one JSON object (load average before and
after included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from laasp_dist.latency import pass_times_ms
from laasp_dist.pruning import Arch, PrunableNetwork
from laasp_dist.pruning.baseline import prune_by_criterion


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet56")
    p.add_argument("--criterion", default="l1")
    p.add_argument("--flops-reduction", type=float, default=0.5)
    p.add_argument("--round-to", default="1,8,16")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    arch = Arch(args.model, 10, 3, None)
    torch.manual_seed(0)
    original = PrunableNetwork.create(arch)
    models, info = {"original": original.model.eval()}, {}
    for n in (int(v) for v in args.round_to.split(",")):
        torch.manual_seed(0)
        net = PrunableNetwork.create(arch)
        prune_by_criterion(net, args.criterion, args.flops_reduction, round_to=n)
        models[f"round_to={n}"] = net.model.eval()
        info[f"round_to={n}"] = {"macs_ratio": net.cost.macs / net.base_macs, "widths": sorted(set(net.widths().values()))}
    x = torch.randn(args.batch, *arch.input_shape)
    times = pass_times_ms(models, x, args.repeats, args.warmup, bf16=False)
    base = statistics.median(times["original"])
    rows = {}
    for name, t in times.items():
        ms = statistics.median(t)
        row = {"median_ms": round(ms, 2), "min_ms": round(min(t), 2), "speedup": round(base / ms, 3)}
        if name in info:
            promise = 1 / info[name]["macs_ratio"]
            row |= {"flops_promise": round(promise, 3), "speedup_over_promise": round(base / ms / promise, 3),
                    "distinct_widths": info[name]["widths"]}
        rows[name] = row
    print(json.dumps({"model": args.model, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
                      "threads": torch.get_num_threads(), "load_avg_1m": [round(load_before, 2),
                                                                          round(os.getloadavg()[0], 2)],
                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
