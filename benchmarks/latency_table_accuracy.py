"""How well a latency table estimates slim networks' latency on this machine (sets the test's tolerance).

    python benchmarks/latency_table_accuracy.py --model resnet20 --batch 8 --threads 1 --round-to 8

Measures a table (`latency_table.measure_table`), prunes several slim networks one-shot (criteria,
FLOPs reductions and round_to values below), then times the unpruned original and every slim network
in one `latency.pass_times_ms` call (they take turns pass by pass). For each slim network it compares
the measured speed-up (original / slim, medians) with the table's estimate under both calibrations:
`scale` (the layer sum scaled so the original's estimate equals its measured latency; what
LatencyModel uses) and `offset` (the difference added as a constant). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from laasp_dist.latency import pass_times_ms, torch_threads
from laasp_dist.latency_table import LatencyModel, measure_table
from laasp_dist.pruning import Arch, PrunableNetwork
from laasp_dist.pruning.baseline import prune_by_criterion

SLIM = [("l1", 0.3), ("l1", 0.5), ("fpgm", 0.6), ("random", 0.4), ("l2", 0.7)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--round-to", default="8", help="comma-separated: slim networks are made at each")
    p.add_argument("--table-round-to", type=int, default=None, help="the table's grid step (default: the first)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--table-repeats", type=int, default=10)
    args = p.parse_args()
    rounds = [int(v) for v in args.round_to.split(",")]
    load_before = os.getloadavg()[0]
    arch = Arch(args.model, 10, 3, None)
    table = measure_table(arch, batch=args.batch, round_to=args.table_round_to or rounds[0],
                          repeats=args.table_repeats, threads=args.threads)
    model = LatencyModel(table)
    torch.manual_seed(0)
    original = PrunableNetwork.create(arch)
    nets = {"original": original}
    for n in rounds:
        for criterion, target in SLIM:
            torch.manual_seed(0)
            net = PrunableNetwork.create(arch)
            prune_by_criterion(net, criterion, target, round_to=n)
            nets[f"{criterion}@{target}/round_to={n}"] = net
    x = torch.randn(args.batch, *arch.input_shape)
    with torch_threads(args.threads):
        times = pass_times_ms({k: v.model.eval() for k, v in nets.items()}, x, args.repeats, args.warmup, False)
    ms = {k: statistics.median(t) for k, t in times.items()}
    base_layers = model.layers_ms(original)
    rows, errors = {}, {"scale": [], "offset": []}
    for name, net in nets.items():
        if name == "original":
            continue
        measured = ms["original"] / ms[name]
        layers = model.layers_ms(net)
        est = {"scale": base_layers / layers,
               "offset": model.original_ms / (layers + model.original_ms - base_layers)}
        row = {"macs_ratio": round(net.cost.macs / net.base_macs, 4), "measured_speedup": round(measured, 4)}
        for cal, value in est.items():
            err = value / measured - 1
            errors[cal].append(abs(err))
            row[f"estimated_speedup_{cal}"] = round(value, 4)
            row[f"error_{cal}"] = round(err, 4)
        rows[name] = row
    print(json.dumps({
        "model": args.model, "batch": args.batch, "threads": table["device"]["threads"],
        "device": table["device"]["name"], "table_round_to": table["round_to"], "table_seconds": table["seconds"],
        "table_network_ms": round(table["network_ms"], 3), "network_ms_now": round(ms["original"], 3),
        "repeats": args.repeats, "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "max_abs_error": {k: round(max(v), 4) for k, v in errors.items()},
        "median_abs_error": {k: round(statistics.median(v), 4) for k, v in errors.items()},
        "slim": rows}, indent=1))


if __name__ == "__main__":
    main()
