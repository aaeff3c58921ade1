"""`laasp-dist bench-search`: time one candidate-search round with every evaluator and backend.

A benchmark, not a test. The network is first trained briefly on Fashion-MNIST
(or loaded with --weights), because on a random-init network the winner is
arbitrary. Then the same round is scored by the reference evaluator (copy, trace,
prune, forward), exact fast, adaptive, and the Ray executor with each --workers
count (one torch thread per worker). Reported: seconds per round, candidates/s,
speed-up vs reference, whether the winner is the reference's, and the largest
relative loss difference to the reference. `--agreement TARGET` also runs a whole
pruning run (exact fp32 winners applied) and scores every round a second way as well
(`--agreement-with`: adaptively, or exact under bf16 autocast), counting the rounds where
the second way picks the same winner. `--device cuda --image-size 224 --precision bf16`
time an ImageNet-sized round on a GPU (the Fashion-MNIST subset images resized; with
`--train-steps 0` the network keeps its random initialisation: timing only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from data_pipelines.normalise import Normalise

from ..config import PruneConfig
from ..errors import ConfigError
from ..pruning import Arch, PrunableNetwork, load_slim_model, save_slim_model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-search", help="benchmark one candidate-search round (reference/exact/adaptive/Ray)")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--subset", type=int, default=1000, help="scoring subset size (Fashion-MNIST train)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--criteria", default="l1,l2,fpgm,cosine")
    p.add_argument("--step-flops", type=float, default=0.01)
    p.add_argument("--workers", default="1,2", help="Ray worker counts to time ('' for none)")
    p.add_argument("--evaluators", default="reference,exact,adaptive")
    p.add_argument("--reference-candidates", type=int, default=0,
                   help="time the reference on this many evenly spread candidates and extrapolate (0: all)")
    p.add_argument("--train-steps", type=int, default=200, help="warm-up SGD steps (batch 128) before the round")
    p.add_argument("--weights", default=None, help="slim-model dir to start from instead of training")
    p.add_argument("--save-weights", default=None, help="write the warmed-up network here (slim-model dir)")
    p.add_argument("--chunk", type=int, default=500, help="images per data chunk")
    p.add_argument("--max-batch", type=int, default=None, help="images per forward (default: --chunk)")
    p.add_argument("--confidence", type=float, default=0.999, help="adaptive: one-sided confidence")
    p.add_argument("--agreement", type=float, default=None,
                   help="also prune to this FLOPs reduction and count rounds where the --agreement-with scoring "
                   "picks exact fp32's winner")
    p.add_argument("--agreement-with", default="adaptive", choices=["adaptive", "bf16"],
                   help="what --agreement compares with exact fp32 scoring: adaptive rounds, or exact scoring under "
                   "bf16 autocast (prune.score_precision=bf16)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads of the in-process evaluators (1: 'one CPU'; Ray workers use 1 each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the in-process evaluators score")
    p.add_argument("--image-size", type=int, default=32, help="subset images resized to this size (model input)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="scoring arithmetic")
    p.add_argument("--channels-last", action="store_true", help="model and inputs in channels_last")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def _warm_up(net: PrunableNetwork, data: Any, steps: int, seed: int) -> float:
    """A few SGD steps (batch 128) of the training loop's step on Fashion-MNIST train, fp32 on the CPU."""
    from ..precision import Numerics
    from ..training.trainer import sgd_step

    if steps <= 0:
        return 0.0
    g = torch.Generator().manual_seed(seed)
    model = net.model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    normalise, numerics = Normalise(data.mean, data.std), Numerics("fp32", False, "cpu")
    loss = torch.tensor(0.0)
    for _ in range(steps):
        idx = torch.randint(0, len(data), (128,), generator=g)
        _, loss = sgd_step(model, opt, numerics, normalise(data.images[idx]), data.labels[idx])
    model.eval()
    return float(loss)


def _resized(subset: Any, size: int) -> Any:
    """The subset with every shard's images resized (bilinear) to size x size."""
    if size == subset.shards[0].images.shape[-1]:
        return subset
    from ..search.subset import SearchSubset, Shard

    def resize(images: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=False)
        return x.round().clamp_(0, 255).to(torch.uint8)

    shards = tuple(Shard(s.index, resize(s.images), s.labels, s.sample_ids, s.mean, s.std) for s in subset.shards)
    return SearchSubset(shards, subset.num_classes, subset.seed)


def _row(name: str, result: Any, ref: Any, ref_seconds: float | None, ref_name: str = "reference",
         ref_forward: float | None = None) -> dict[str, Any]:
    n = len(result.table)
    row = {"method": name, "seconds": round(result.seconds, 2), "candidates": n,
           "candidates_per_s": round(n / result.seconds, 3),
           "winner": f"{result.winner.group}/{result.winner.criterion}/k={result.winner.k}", "loss": result.loss,
           "image_evaluations": result.image_evaluations}
    if ref is not None:
        full = np.array([r["shards_seen"] for r in result.table]) == max(r["shards_seen"] for r in result.table)
        rel = np.abs(result.losses - ref.losses) / np.abs(ref.losses)
        row["same_winner"] = result.winner == ref.winner
        row["compared_to"] = ref_name
        row["max_rel_loss_diff"] = float(rel[full & ~np.isnan(rel)].max()) if (full & ~np.isnan(rel)).any() else None
    if ref_seconds:
        row["speedup_vs_reference"] = round(ref_seconds / result.seconds, 2)
    if ref_forward:
        row["speedup_vs_reference_forward_only"] = round(ref_forward / result.seconds, 2)
    return row


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from data_pipelines.small_images import load_small_dataset

    from ..search import LocalExecutor, ScoreOptions, build_subset, search_round
    from ..search.round import RoundResult, round_candidates
    from ..search.scoring import REFERENCE_TIMINGS, score_reference

    criteria = [c for c in args.criteria.split(",") if c]
    evaluators = [e for e in args.evaluators.split(",") if e]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    if any(e not in ("reference", "exact", "adaptive") for e in evaluators):
        raise ConfigError(f"--evaluators takes reference, exact, adaptive (got {args.evaluators})")
    if args.device == "cuda" and (workers or not torch.cuda.is_available()):
        raise ConfigError("--device cuda needs a CUDA device and --workers '' (Ray rows time CPU actors)")
    if args.image_size != 32 and args.train_steps and not args.weights:
        raise ConfigError("--image-size other than 32 needs --train-steps 0 (warm-up trains on 32x32 images)")
    load_before = os.getloadavg()[0]
    data = load_small_dataset("fashion_mnist", "train")
    torch.manual_seed(args.seed)
    if args.weights:
        net = load_slim_model(args.weights)
        train_loss = None
    else:
        net = PrunableNetwork.create(Arch(args.model, data.num_classes, 3, args.image_size))
        train_loss = _warm_up(net, data, args.train_steps, args.seed)
    if args.save_weights:
        save_slim_model(net, args.save_weights)
    net.model.eval().to(args.device)
    torch.set_num_threads(args.threads)
    subset = _resized(build_subset(data, args.subset, args.shards, args.seed), args.image_size).to(args.device)
    options = ScoreOptions(args.chunk, args.max_batch or args.chunk, args.precision, args.channels_last)

    def cfg(search: str, target: float = 0.9) -> PruneConfig:
        return PruneConfig(criteria=criteria, step_flops=args.step_flops, search=search, subset_size=args.subset,
                           subset_shards=args.shards, shard_batch_size=args.chunk, target_flops_reduction=target,
                           adaptive_confidence=args.confidence, max_prune_ratio=0.75,
                           round_to=1)  # the search benchmark times unrounded steps

    rows: list[dict[str, Any]] = []
    results: dict[str, RoundResult] = {}
    ref, ref_seconds, ref_forward = None, None, None
    if "reference" in evaluators:
        REFERENCE_TIMINGS.update(setup=0.0, forward=0.0)
        if args.reference_candidates:
            cands = round_candidates(net, cfg("reference"), subset, seed=args.seed)
            pick = np.linspace(0, len(cands) - 1, min(args.reference_candidates, len(cands))).round().astype(int)
            start = time.perf_counter()
            score_reference(net, [cands[i] for i in pick], subset.shards, options)
            ref_seconds = (time.perf_counter() - start) * len(cands) / len(pick)
            rows.append({"method": "reference", "seconds": round(ref_seconds, 2), "candidates": len(cands),
                         "candidates_per_s": round(len(cands) / ref_seconds, 3), "extrapolated": True,
                         "measured_candidates": int(len(pick)), "speedup_vs_reference": 1.0})
        else:
            ref = search_round(net, subset, cfg("reference"), executor=LocalExecutor(subset, options), seed=args.seed)
            ref_seconds = ref.seconds
            rows.append(_row("reference", ref, ref, ref_seconds))
            results["reference"] = ref
        share = REFERENCE_TIMINGS["setup"] / max(sum(REFERENCE_TIMINGS.values()), 1e-9)
        rows[-1]["copy_trace_prune_share"] = round(share, 3)
        rows[-1]["forward_only_seconds"] = round(ref_seconds * (1 - share), 2)
        ref_forward = ref_seconds * (1 - share)
    for name in ("exact", "adaptive"):
        if name in evaluators:
            r = search_round(net, subset, cfg(name), executor=LocalExecutor(subset, options), seed=args.seed)
            results[name] = r
            rows.append(_row(name, r, ref or results.get("exact"), ref_seconds, "reference" if ref else "exact",
                                 ref_forward))
    ray_seconds = {}
    if workers:
        import ray

        from ..runtime import ensure_ray
        from ..search.ray_executor import RayExecutor

        started = ensure_ray(None, max(max(workers), os.cpu_count() or 1))
        try:
            for w in workers:
                with RayExecutor(subset, w, options=options, threads_per_worker=1) as ex:
                    r = search_round(net, subset, cfg("exact"), executor=ex, seed=args.seed)
                ray_seconds[w] = r.seconds
                rows.append(_row(f"ray exact, {w} worker{'s' if w > 1 else ''}", r, ref or results.get("exact"),
                                 ref_seconds, "reference" if ref else "exact",
                                 ref_forward))
        finally:
            if started:
                ray.shutdown()
    summary: dict[str, Any] = {
        "model": args.model, "subset": args.subset, "shards": args.shards, "criteria": criteria,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "image_size": args.image_size,
        "precision": args.precision, "channels_last": args.channels_last,
        "step_flops": args.step_flops, "train_steps": 0 if args.weights else args.train_steps,
        "warm_up_loss": train_loss, "macs": net.cost.macs, "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.machine(), "rows": rows,
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other work on the box
    }
    if 1 in ray_seconds and len(ray_seconds) > 1:
        summary["parallel_efficiency"] = {w: round(ray_seconds[1] / (w * s), 3) for w, s in ray_seconds.items() if w > 1}
    if args.agreement:
        summary["agreement"] = _agreement(net, subset, cfg, args.agreement, options, args.seed, args.agreement_with)
    if args.json:
        print(json.dumps(summary))
    else:
        _print(summary)
    return 0


def _agreement(net: PrunableNetwork, subset: Any, cfg: Any, target: float, options: Any, seed: int,
               against: str = "adaptive") -> dict[str, Any]:
    """Prune to `target` applying exact fp32 winners; score every round `against` (adaptive | bf16) too and compare.

    Regret = the exact fp32 loss of the other way's winner minus exact's best loss. For bf16 the
    per-candidate relative loss differences to fp32 (candidates that saw the whole subset) are reported too.
    """
    from ..search import LocalExecutor, search_round

    ex = LocalExecutor(subset, replace(options, precision="fp32"))
    other = LocalExecutor(subset, replace(options, precision="bf16")) if against == "bf16" else ex
    evaluator = "adaptive" if against == "adaptive" else "exact"
    rounds, agree, t_exact, t_other, regret, rel, per_round = 0, 0, 0.0, 0.0, [], [], []
    while net.macs_reduction < target - 1e-12:
        e = search_round(net, subset, cfg("exact", target), len(net.prunes), ex, seed=seed)
        a = search_round(net, subset, cfg(evaluator, target), len(net.prunes), other, seed=seed)
        rounds += 1
        agree += a.winner == e.winner
        t_exact += e.seconds
        t_other += a.seconds
        chosen = e.candidates.index(a.winner)
        regret.append(float(e.losses[chosen] - e.loss))
        full = np.array([r["shards_seen"] for r in a.table]) == subset.num_shards
        diff = np.abs(a.losses - e.losses)[full] / np.abs(e.losses)[full]
        rel.append(diff)
        per_round.append({"round": rounds, "same_winner": a.winner == e.winner, "regret": regret[-1],
                          "fp32_loss": e.loss, "max_rel_loss_diff": float(diff.max()) if len(diff) else None})
        net.apply(e.winner)
    out = {"against": against, "target": target, "rounds": rounds, "same_winner": agree,
           "rate": round(agree / max(rounds, 1), 4), "max_loss_regret": max(regret, default=0.0),
           "max_relative_regret": max((r["regret"] / r["fp32_loss"] for r in per_round), default=0.0),
           "exact_seconds": round(t_exact, 1), f"{against}_seconds": round(t_other, 1),
           f"{against}_speedup": round(t_exact / max(t_other, 1e-9), 2)}
    if against == "bf16":
        every = np.concatenate(rel) if rel else np.zeros(0)
        out.update({"max_rel_loss_diff": float(every.max(initial=0.0)),
                    "median_rel_loss_diff": float(np.median(every)) if len(every) else 0.0,
                    "p99_rel_loss_diff": float(np.quantile(every, 0.99)) if len(every) else 0.0,
                    "per_round": per_round})
    return out


def _print(s: dict[str, Any]) -> None:
    print(f"{s['model']} @ {s['image_size']}px: {s['macs'] / 1e6:.1f} M MACs, subset {s['subset']} in {s['shards']} "
          f"shards, criteria {','.join(s['criteria'])}, warm-up {s['train_steps']} steps, on {s['device']} "
          f"({s['precision']}{', channels_last' if s['channels_last'] else ''})")
    print(f"{'method':24s} {'s/round':>9s} {'cand/s':>8s} {'speed-up':>9s} {'same winner':>13s} {'max rel diff':>13s}")
    for r in s["rows"]:
        same = r.get("same_winner")
        same = None if same is None else f"{same} ({r['compared_to'][:3]})"
        diff = r.get("max_rel_loss_diff")
        print(f"{r['method'] + (' (extrap.)' if r.get('extrapolated') else ''):24s} {r['seconds']:9.1f} "
              f"{r['candidates_per_s']:8.2f} {r.get('speedup_vs_reference', float('nan')):9.2f} "
              f"{same or '':>13s} {'' if diff is None else f'{diff:.1e}':>13s}")
    if "parallel_efficiency" in s:
        print("parallel efficiency (Ray, vs 1 worker):", s["parallel_efficiency"])
    if "agreement" in s:
        a = {k: v for k, v in s["agreement"].items() if k != "per_round"}
        print(f"{a['against']} vs exact fp32 over a pruning run:", a)
