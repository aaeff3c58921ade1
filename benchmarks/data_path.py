"""Benchmarks of the image-folder data path (issue 10): indexing, the tiny job at 4 vs 128 images per class, DALI.

Sub-commands (run from the repository root; the code measured is the `laasp_dist`/`data_pipelines` on
PYTHONPATH, so "before" and "after" are two checkouts measured in one sitting, interleaved):

  make-tiny OUT --classes 1000 --per-class 128      1 000 class folders of tiny JPEGs (ImageNet layout)
  make-photos OUT --count 512                       real-sized JPEGs (~500 x 375) made from the foolbox photos
  index ROOT --verify none,header,default           time to list and check ROOT/train + ROOT/val
  index-io ROOT                                     build + write the run's data index, read it back (after only)
  dali ROOT --threads 1                             training images/s of DaliImageIterator on the CPU (224 px)
  job ROOT OUT                                      wall time of a tiny `laasp-dist run` on ROOT
  compare-dali ROOT --before DIR --after DIR        `dali` of two checkouts, interleaved, medians
  compare-jobs SMALL LARGE --before DIR --after DIR `job` on both folders with both checkouts, interleaved

Every measuring command prints one JSON line, with the 1-minute load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def make_tiny(out: Path, classes: int, per_class: int, val_per_class: int, size: int) -> None:
    """`classes` folders under train/ (`per_class` JPEGs each) and val/ (`val_per_class`): size x size noise
    images, 64 distinct encodings reused (only the number of files matters here)."""
    import torch
    import torchvision.io

    g = torch.Generator().manual_seed(0)
    blobs = [torchvision.io.encode_jpeg(torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
                                        quality=90).numpy().tobytes() for _ in range(64)]
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = out / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                (folder / f"{split}_{c:04d}_{i:04d}.JPEG").write_bytes(blobs[(c + i) % len(blobs)])


def make_photos(out: Path, count: int, classes: int) -> None:
    """`count` JPEGs of 500 x 375 (a quarter of them 375 x 500), cut at random from the 20 foolbox ImageNet
    photographs (512 x 512), randomly flipped, quality 90, dealt into `classes` class folders of train/."""
    import torch
    import torchvision.io

    from data_pipelines.make_folder import foolbox_data_dir

    photos = [torchvision.io.decode_image(torchvision.io.read_file(str(f)))
              for f in sorted(foolbox_data_dir().glob("imagenet_*.jpg"))]
    g = torch.Generator().manual_seed(0)
    for i in range(count):
        image = photos[i % len(photos)]
        h, w = (500, 375) if i % 4 == 3 else (375, 500)
        y, x = (int(torch.randint(0, 512 - d + 1, (1,), generator=g)) for d in (h, w))
        crop = image[:, y:y + h, x:x + w]
        if torch.rand(1, generator=g) < 0.5:
            crop = crop.flip(-1)
        folder = out / "train" / f"c{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:05d}.jpg").write_bytes(torchvision.io.encode_jpeg(crop.contiguous(), quality=90)
                                              .numpy().tobytes())


def bench_index(root: Path, levels: list[str], repeats: int) -> dict:
    """Seconds to list and check root/train and root/val, per verify level (median of `repeats`)."""
    from data_pipelines.image_folder import scan_image_folder

    out: dict = {"root": str(root), "load_before": _load()}
    for level in levels:
        times, files = [], 0
        for _ in range(repeats):
            start = time.perf_counter()
            kw = {} if level == "default" else {"verify": level}  # "default": the checkout's own default check
            train = scan_image_folder(root / "train", **kw)
            test = scan_image_folder(root / "val", classes=train.classes, **kw)
            times.append(time.perf_counter() - start)
            files = len(train) + len(test)
        out[level] = {"files": files, "seconds": [round(t, 3) for t in times],
                      "median_s": round(statistics.median(times), 3),
                      "per_1_28M_files_s": round(statistics.median(times) * 1_281_167 / files, 1)}
    out["load_after"] = _load()
    return out


def bench_index_io(root: Path, repeats: int) -> dict:
    """This checkout's driver and rank work for an index: build it (header check), write it to a run
    folder, and what every rank and the final measurement do: read it and form the splits."""
    from laasp_dist.config import build_config
    from laasp_dist.training.data import INDEX_FILE, build_data_index, load_splits, read_data_index, write_data_index

    config = build_config({**{k: v for k, v in JOB.items() if k != "data"}, "data": {**JOB["data"], "root": str(root)}})
    times: dict[str, list[float]] = {"build": [], "write": [], "read_and_split": []}
    load = _load()
    with tempfile.TemporaryDirectory() as run_dir:
        for _ in range(repeats):
            start = time.perf_counter()
            index = build_data_index(config)
            times["build"].append(time.perf_counter() - start)
            start = time.perf_counter()
            write_data_index(run_dir, index)
            times["write"].append(time.perf_counter() - start)
            start = time.perf_counter()
            load_splits(config, run_dir=run_dir, index=read_data_index(run_dir))
            times["read_and_split"].append(time.perf_counter() - start)
        size = (Path(run_dir) / INDEX_FILE).stat().st_size
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    return {"root": str(root), "files": len(index), "median_s": med, "seconds": times, "index_bytes": size,
            "per_1_28M_files": {k: round(v * 1_281_167 / len(index), 1) for k, v in med.items()},
            "load_before": load, "load_after": _load()}


def bench_dali(root: Path, threads: int, batch: int, epochs: int, image_size: int) -> dict:
    """Training images/s of one CPU DaliImageIterator over root/train (the first epoch is warm-up)."""
    from data_pipelines.image_folder import DaliImageIterator, scan_image_folder

    folder = scan_image_folder(root / "train")
    it = DaliImageIterator(folder, batch, train=True, image_size=image_size, device_id=None, num_threads=threads,
                           seed=0)
    rates, cpu_rates = [], []
    for epoch in range(epochs + 1):
        start, cpu, images = time.perf_counter(), time.process_time(), 0
        for x, _ in it:
            images += len(x)
        if epoch:
            rates.append(images / (time.perf_counter() - start))
            cpu_rates.append(images / (time.process_time() - cpu))
    # images per CPU-second of this process (DALI's threads and the feeding thread): per core, and
    # barely affected by other processes on a loaded machine, unlike the wall-clock rate
    return {"images_per_cpu_s": round(statistics.median(cpu_rates), 1), "images_per_s": round(statistics.median(rates), 1),
            "epochs_cpu": [round(r, 1) for r in cpu_rates], "threads": threads, "batch": batch, "files": len(folder),
            "image_size": image_size}


JOB = {
    "name": "tiny", "seed": 0, "model": {"name": "resnet20"},
    "data": {"dataset": "image_folder", "image_size": 32, "val_size": 1000, "batch_size": 32,
             "eval_batch_size": 500, "num_threads": 1},
    "train": {"total_epochs": 2, "lr": 0.05, "milestones": [], "steps_per_epoch": 2, "progress_bar": False},
    "prune": {"start_epoch": 1, "target_flops_reduction": 0.05, "step_flops": 0.05, "recover_flops": 0.1,
              "recover_epochs": 1, "subset_size": 1000, "subset_shards": 2, "criteria": ["l1"]},
    "ray": {"num_workers": 2, "search_workers": 1},
}


def bench_job(root: Path, out: Path) -> dict:
    """Wall time of `laasp-dist run` (a new process, as a user runs it) of the tiny job on `root`."""
    import yaml

    config = out.parent / f"{out.name}.yaml"
    config.write_text(yaml.safe_dump({**JOB, "data": {**JOB["data"], "root": str(root)}}))
    load = _load()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "laasp_dist.cli", "run", str(config), "--out", str(out)],
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"the job failed: {proc.stderr.strip().splitlines()[-1:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"root": str(root), "wall_s": round(wall, 1), "phase_seconds": summary["phase_seconds"],
            "load_before": load, "load_after": _load()}


def _run_with(checkout: Path, *args: str) -> dict:
    """One sub-command of this script in a fresh process, with `checkout` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}
    for attempt in range(2):  # on a saturated box Ray can time out while starting; one retry
        proc = subprocess.run([sys.executable, str(HERE), *args], env=env, capture_output=True, text=True,
                              cwd=checkout)
        if not proc.returncode:
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "attempts": attempt + 1}
    raise SystemExit(f"{checkout}: {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")


def compare_dali(root: Path, before: Path, after: Path, repeats: int, threads: int) -> dict:
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    load = _load()
    for _ in range(repeats):
        for name, checkout in (("before", before), ("after", after)):
            runs[name].append(_run_with(checkout, "dali", str(root), "--threads", str(threads)))
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("images_per_cpu_s", "images_per_s")}
           for k, v in runs.items()}
    return {"threads": threads, "runs": runs, "median": med,
            "after_over_before_cpu": round(med["after"]["images_per_cpu_s"] / med["before"]["images_per_cpu_s"], 3),
            "load_before": load, "load_after": _load()}


def compare_jobs(small: Path, large: Path, before: Path, after: Path, repeats: int) -> dict:
    walls: dict[str, list[float]] = {f"{v}_{s}": [] for v in ("before", "after") for s in ("small", "large")}
    load = _load()
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            for size, root in (("small", small), ("large", large)):
                for name, checkout in (("before", before), ("after", after)):
                    out = Path(tmp) / f"{name}-{size}-{r}"
                    walls[f"{name}_{size}"].append(_run_with(checkout, "job", str(root), str(out))["wall_s"])
    med = {k: statistics.median(v) for k, v in walls.items()}
    return {"wall_s": walls, "median_s": med,
            "extra_files_cost_s": {v: round(med[f"{v}_large"] - med[f"{v}_small"], 1) for v in ("before", "after")},
            "load_before": load, "load_after": _load()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("make-tiny")
    p.add_argument("out", type=Path)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--per-class", type=int, default=128)
    p.add_argument("--val-per-class", type=int, default=2)
    p.add_argument("--size", type=int, default=32)
    p = sub.add_parser("make-photos")
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=512)
    p.add_argument("--classes", type=int, default=8)
    p = sub.add_parser("index")
    p.add_argument("root", type=Path)
    p.add_argument("--verify", default="none,header")
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("index-io")
    p.add_argument("root", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p = sub.add_parser("dali")
    p.add_argument("root", type=Path)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--image-size", type=int, default=224)
    p = sub.add_parser("job")
    p.add_argument("root", type=Path)
    p.add_argument("out", type=Path)
    p = sub.add_parser("compare-dali")
    p.add_argument("root", type=Path)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p = sub.add_parser("compare-jobs")
    p.add_argument("small", type=Path)
    p.add_argument("large", type=Path)
    p.add_argument("--before", type=Path, required=True)
    p.add_argument("--after", type=Path, required=True)
    p.add_argument("--repeats", type=int, default=2)
    a = parser.parse_args(argv)
    if a.cmd == "make-tiny":
        make_tiny(a.out, a.classes, a.per_class, a.val_per_class, a.size)
        return 0
    if a.cmd == "make-photos":
        make_photos(a.out, a.count, a.classes)
        return 0
    if a.cmd == "index":
        result = bench_index(a.root, a.verify.split(","), a.repeats)
    elif a.cmd == "index-io":
        result = bench_index_io(a.root, a.repeats)
    elif a.cmd == "dali":
        result = bench_dali(a.root, a.threads, a.batch, a.epochs, a.image_size)
    elif a.cmd == "job":
        result = bench_job(a.root, a.out)
        shutil.rmtree(a.out, ignore_errors=True)
    elif a.cmd == "compare-dali":
        result = compare_dali(a.root, a.before.resolve(), a.after.resolve(), a.repeats, a.threads)
    else:
        result = compare_jobs(a.small, a.large, a.before.resolve(), a.after.resolve(), a.repeats)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
