"""The GPU measurements of docs/gpu.md, one step per device call: `python3 benchmarks/gpu/run.py STEP [--dry-run]`.

Steps (each writes STEP.json under $OUT and keeps a copy in .gpu-stage/results/, then prints its
own short table and, last, the table of everything measured so far in this lease):

- ``latency``: the machine, then a one-shot ResNet-50 at -50 % FLOPs (`laasp-dist prune`, l1) against
  the unpruned one (`laasp-dist latency`, bf16, channels_last): latency at batch 1, throughput at
  64 and 256, beside the FLOPs promise.
- ``search``: one ResNet-50 candidate round at 224 px on the GPU (`laasp-dist bench-search`, every
  group x 4 criteria, a 5 000-image subset in 8 shards): exact fp32 and bf16, adaptive bf16, and the
  reference on 8 evenly spread candidates (extrapolated); the cost of 40 and 60 rounds.
- ``smoke``: a one-GPU `laasp-dist run` of a short ResNet-20 / Fashion-MNIST job in bf16 +
  channels_last (NCCL, GPU search actors, broadcasts after prunes, checkpoint, summary), then
  `laasp-dist evaluate` on the GPU (the default: the run's own device and precision) and on the CPU.
- ``plain``: ResNet-50 training images/s of a plain PyTorch loop on synthetic GPU tensors
  (channels_last; bf16 eager, bf16 torch.compile, fp32 eager), and the JPEG folder the ``dali``
  step reads.
- ``project``: the same through the project's Ray Train loop (`laasp-dist run` on ``data.dataset:
  synthetic``), images/s of its training epochs.
- ``tests``: ``pytest -m gpu``.
- ``dali``: both loops again, fed by DALI ``mixed`` decoding of the JPEG folder.
- ``wheels``: nothing (a call that only carries a chunk).

`--dry-run` runs a step on this machine's CPU at tiny sizes (ResNet-18 at 64 px, a few steps).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
IMAGENET_TRAIN = 1_281_167
GOAL_IMAGES_PER_S = 4000


@dataclass(frozen=True)
class Sizes:
    device: str
    model: str
    image: int
    batch: int
    warmup: int
    steps: int
    subset: int
    shards: int
    chunk: int
    reference_candidates: int
    latency_batches: str
    latency_repeats: int
    jpeg_classes: int
    jpeg_train: int
    jpeg_val: int
    smoke_epochs: int
    project_epochs: int
    threads: int
    compile_backend: str
    criteria: str


FULL = Sizes("cuda", "resnet50", 224, 256, 15, 60, 5000, 8, 250, 8, "1,64,256", 50, 100, 30, 3, 6, 5, 8, "inductor",
             "l1,l2,fpgm,cosine")
DRY = Sizes("cpu", "resnet18", 64, 8, 1, 3, 32, 2, 16, 2, "1,2", 2, 4, 6, 2, 3, 3, 1, "aot_eager", "l1,fpgm")


class Step:
    def __init__(self, name: str, sizes: Sizes, out: Path, stage: Path, dry: bool) -> None:
        self.name, self.sizes, self.out, self.stage, self.dry = name, sizes, out, stage, dry
        self.results = stage / "results"
        self.work = stage / "work"
        self.results.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self.record: dict[str, Any] = {"step": name, "dry_run": dry, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                       "load_avg_1m": round(os.getloadavg()[0], 2)}

    def cli(self, *args: object, timeout: float = 540) -> dict[str, Any] | None:
        """Run `laasp-dist ARGS`; its stdout's last JSON object, or None (the failure is recorded).

        The timeout keeps a device call inside its 10 minutes; a dry run on a busy CPU may take longer.
        """
        timeout = 6 * timeout if self.dry else timeout
        cmd = [sys.executable, "-m", "laasp_dist.cli", *map(str, args)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            self.record.setdefault("failures", []).append(f"timed out after {timeout:.0f} s: {' '.join(cmd[3:])}")
            return None
        log = self.out / f"{self.name}.log"
        with log.open("a") as f:
            f.write(f"$ laasp-dist {' '.join(map(str, args))}  ({time.perf_counter() - start:.1f} s, rc "
                    f"{proc.returncode})\n{proc.stdout[-20000:]}\n{proc.stderr[-20000:]}\n")
        if proc.returncode != 0:
            self.record.setdefault("failures", []).append(
                f"rc {proc.returncode}: laasp-dist {' '.join(map(str, args))}: {proc.stderr.strip()[-500:]}")
            return None
        text = proc.stdout.strip()
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return json.loads(text[text.rfind("\n{") + 1:]) if "\n{" in text else {"stdout": text[-2000:]}

    def save(self) -> None:
        self.record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        text = json.dumps(self.record, indent=1, default=str)
        (self.out / f"{self.name}.json").write_text(text)
        (self.results / f"{self.name}.json").write_text(text)


# ----------------------------------------------------------------------------------------------- steps


def environment() -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version(), "cpus": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("ray", "nvidia.dali", "torch_pruning", "pydantic"):
        try:
            env[name] = __import__(name, fromlist=["__version__"]).__version__
        except ImportError:
            env[name] = None
    return env


def step_latency(s: Step) -> None:
    z = s.sizes
    s.record["environment"] = environment()
    slim = s.work / f"{z.model}-l1-50"
    if not (slim / "spec.json").is_file():  # kept while the machine is warm: a repeated call skips it
        s.record["prune"] = s.cli("prune", z.model, "--criterion", "l1", "--flops-reduction", "0.5", "--step-flops",
                                  "0.1", "--input", f"3x{z.image}x{z.image}", "--out", slim)
    for precision in ("bf16", "fp32") if z.device == "cuda" else ("fp32",):  # CPU bf16 is too slow for a dry run
        flags = ["--bf16"] if precision == "bf16" else []
        s.record[f"latency_{precision}"] = s.cli("latency", slim, "--device", z.device, "--batch", z.latency_batches,
                                                 "--repeats", z.latency_repeats, "--warmup", min(5, z.warmup), *flags,
                                                 "--json")


def step_search(s: Step) -> None:
    z = s.sizes
    common = ["bench-search", "--model", z.model, "--image-size", z.image, "--train-steps", 0, "--subset", z.subset,
              "--shards", z.shards, "--chunk", z.chunk, "--criteria", z.criteria, "--workers", "",
              "--device", z.device, "--channels-last", "--threads", z.threads, "--json"]
    s.record["fp32"] = s.cli(*common, "--precision", "fp32", "--evaluators", "exact")
    s.record["bf16"] = s.cli(*common, "--precision", "bf16", "--evaluators", "reference,exact,adaptive",
                             "--reference-candidates", z.reference_candidates)


def _smoke_overrides(z: Sizes) -> list[str]:
    sets = {"ray.use_gpu": z.device == "cuda", "ray.num_workers": 1, "ray.search_workers": 1,
            "ray.cpus_per_worker": z.threads, "train.precision": "bf16", "train.channels_last": True,
            "train.total_epochs": z.smoke_epochs, "prune.start_epoch": 2, "prune.target_flops_reduction": 0.16,
            "train.progress_bar": False, "data.test_limit": 2000}
    if z.device == "cpu":  # the dry run: a few tiny steps
        sets.update({"train.steps_per_epoch": 2, "prune.subset_size": 32, "data.val_size": 40,
                     "data.test_limit": 40, "data.train_limit": 400, "prune.step_flops": 0.08})
    return [x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]


def step_smoke(s: Step) -> None:
    z = s.sizes
    run = s.work / f"smoke-{time.strftime('%H%M%S')}"
    start = time.perf_counter()
    summary = s.cli("run", REPO / "jobs" / "demo.yaml", *_smoke_overrides(z), "--out", run, "--json")
    s.record["run_seconds"] = round(time.perf_counter() - start, 1)
    if summary is not None:
        s.record["summary"] = summary
        s.record["checks"] = {
            "rounds": summary["rounds"], "flops_reduction": summary["flops_reduction"],
            "ranks_identical_after_every_install": all(len(set(c["digests"])) == 1 for c in summary["sync_checks"]),
            "checkpoint": (run / "checkpoints" / "last.pt").is_file(), "training": summary.get("training"),
            "final": {k: summary["final_metrics"].get(k) for k in ("device", "precision", "channels_last",
                                                                   "test_top1", "test_loss")}}
        again = s.cli("evaluate", run)
        s.record["evaluate_default"] = again
        s.record["evaluate_cpu"] = s.cli("evaluate", run, "--device", "cpu", timeout=240)


def _plain_train(model: Any, batches: Callable[[], Any], steps: int, warmup: int, device: str,
                 bf16: bool = True) -> float:
    """Images/s of a plain SGD loop (bf16 autocast or fp32, channels_last) over `batches()`; warm-up untimed."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    it = batches()
    seen, start = 0, 0.0
    for i in range(warmup + steps):
        if i == warmup:
            sync()
            start, seen = time.perf_counter(), 0
        try:
            x, y = next(it)
        except StopIteration:
            it = batches()
            x, y = next(it)
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    sync()
    return seen / (time.perf_counter() - start)


def _model(z: Sizes, compiled: bool = False) -> Any:
    import torch

    from laasp_dist.models import create_model

    torch.manual_seed(0)
    model = create_model(z.model, 1000).to(z.device).to(memory_format=torch.channels_last).train()
    return torch.compile(model, backend=z.compile_backend) if compiled else model


def step_plain(s: Step) -> None:
    import torch

    z = s.sizes
    if z.device == "cuda":
        torch.backends.cudnn.benchmark = True
    folder = s.stage / "jpegs"
    start = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "make_jpegs.py"), "--out", str(folder),
                    "--classes", str(z.jpeg_classes), "--train", str(z.jpeg_train), "--val", str(z.jpeg_val)],
                   check=True)
    s.record["jpeg_folder_seconds"] = round(time.perf_counter() - start, 1)
    g = torch.Generator(device=z.device).manual_seed(0)
    x = torch.randn(z.batch, 3, z.image, z.image, device=z.device, generator=g)
    y = torch.randint(0, 1000, (z.batch,), device=z.device, generator=g)
    rows = {}
    for name, compiled, bf16 in (("eager", False, True), ("fp32 eager", False, False), ("torch.compile", True, True)):
        t0 = time.perf_counter()
        try:
            rows[name] = round(_plain_train(_model(z, compiled), lambda: iter([(x, y)] * (z.steps + z.warmup)),
                                            z.steps, z.warmup, z.device, bf16), 1)
        except Exception as exc:  # noqa: BLE001 — a failed variant is a result too
            rows[name] = f"failed: {type(exc).__name__}: {str(exc)[:300]}"
        s.record[f"{name}_seconds"] = round(time.perf_counter() - t0, 1)
    s.record["synthetic_images_per_s"] = rows
    s.record["batch"], s.record["model"], s.record["image"] = z.batch, z.model, z.image


def _project_config(z: Sizes, dataset: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": f"throughput-{dataset['dataset']}", "seed": 0, "model": {"name": z.model, "num_classes": 1000},
        "data": {"image_size": z.image, "val_size": 2 * z.batch if z.device == "cuda" else 8, "test_limit": z.batch,
                 "batch_size": z.batch, "eval_batch_size": z.batch, "num_threads": z.threads, **dataset},
        "train": {"total_epochs": z.project_epochs, "lr": 0.1, "milestones": [], "progress_bar": False,
                  "steps_per_epoch": None if z.device == "cuda" else 2},
        "prune": {"start_epoch": z.project_epochs - 1, "target_flops_reduction": 0.01, "step_flops": 0.01,
                  "recover_flops": 0.01, "recover_epochs": 0, "subset_size": 64 if z.device == "cuda" else 4, "subset_shards": 1,
                  "shard_batch_size": z.batch, "criteria": ["l1"]},
        "ray": {"num_workers": 1, "use_gpu": z.device == "cuda", "search_workers": 1, "cpus_per_worker": z.threads},
    }


def _project(s: Step, dataset: dict[str, Any]) -> dict[str, Any] | None:
    """Images/s of the training epochs of a short `laasp-dist run` (epoch 0 — autotuning — left out)."""
    import yaml

    z = s.sizes
    cfg_file = s.work / f"{dataset['dataset']}.yaml"
    cfg_file.write_text(yaml.safe_dump(_project_config(z, dataset)))
    run = s.work / f"project-{dataset['dataset']}-{time.strftime('%H%M%S')}"
    summary = s.cli("run", cfg_file, "--out", run, "--json")
    if summary is None:
        return None
    import torch

    epochs = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epochs"]
    speeds = [e["train_images_per_s"] for e in epochs if e["phase"] == "pretrain"][1:] or \
        [e["train_images_per_s"] for e in epochs]
    return {"images_per_s_median": round(statistics.median(speeds), 1), "per_epoch": speeds,
            "training": summary.get("training"), "wall_seconds": summary.get("wall_seconds")}


def step_project(s: Step) -> None:
    s.record["synthetic"] = _project(s, {"dataset": "synthetic"})


def step_dali(s: Step) -> None:
    import torch

    from data_pipelines.image_folder import DaliImageIterator, scan_image_folder

    z = s.sizes
    folder = s.stage / "jpegs"
    train = scan_image_folder(folder / "train")
    device_id = 0 if z.device == "cuda" else None
    if z.device == "cuda":
        torch.backends.cudnn.benchmark = True

    def batches():
        return iter(DaliImageIterator(train, z.batch, train=True, image_size=z.image, device_id=device_id,
                                      num_threads=z.threads))
    decode_only = DaliImageIterator(train, z.batch, train=True, image_size=z.image, device_id=device_id,
                                    num_threads=z.threads)
    start, seen = time.perf_counter(), 0
    for _ in range(2):
        for x, _y in decode_only:
            seen += len(x)
    if z.device == "cuda":
        torch.cuda.synchronize()
    s.record["dali_decode_only_images_per_s"] = round(seen / (time.perf_counter() - start), 1)
    s.record["plain_dali_images_per_s"] = round(_plain_train(_model(z), batches, z.steps, z.warmup, z.device), 1)
    s.record["project_folder"] = _project(s, {"dataset": "image_folder", "root": str(folder)})
    s.record["folder_images"] = len(train)


def step_tests(s: Step) -> None:
    import importlib.util

    def importable(module: str) -> bool:
        try:
            return importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is missing
            return False

    # the tests of the packages that have arrived: a call before Ray's or DALI's last chunk runs the others
    absent = [k for k, module in (("actors", "ray"), ("dali", "nvidia.dali")) if not importable(module)]
    s.record["deselected_for_missing_packages"] = absent
    select = ["-k", " and ".join(f"not {k}" for k in absent)] if absent else []
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider", "--timeout", "400",
           f"--junitxml={s.out / 'tests.xml'}", *select, "tests/test_gpu.py"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=540)
    (s.out / "tests.log").write_text(proc.stdout[-60000:] + proc.stderr[-20000:])
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASSED", "FAILED", "SKIPPED", "ERROR"))]
    s.record["rc"], s.record["results"] = proc.returncode, lines
    s.record["summary_line"] = (proc.stdout.strip().splitlines() or [""])[-1]


# The comparison of docs/controls.md (jobs/evidence_fashion.yaml): the criteria pool, each criterion alone, random,
# importance selection, and the ~unpruned reference, every one for each seed.
EVIDENCE_PRUNE = ("[{criteria: [l1,l2,fpgm,cosine]}, {criteria: [l1]}, {criteria: [l2]}, {criteria: [fpgm]}, "
                  "{criteria: [cosine]}, {criteria: [taylor]}, {criteria: [random]}, "
                  "{criteria: [l1], selection: importance}, "
                  "{target_flops_reduction: 0.002, step_flops: 0.002, recover_flops: 0.002}]")
EVIDENCE_REFERENCE = "prune=criteria=l1+l2+fpgm+cosine"


def step_evidence(s: Step) -> None:
    """jobs/evidence_fashion.yaml's multi-seed sweep on one GPU: every trial one training worker on a share of
    the GPU (ray.gpu_share), its candidates scored on that worker (ray.search_executor=ranks), EVIDENCE_TRIALS
    at a time, seed by seed, until EVIDENCE_DEADLINE_S; then the sweep's tables from the finished trials and
    one tarball of the sweep folder without its checkpoints."""
    import signal
    import tarfile

    import yaml

    from laasp_dist.sweep import SWEEP_FILE, TRIALS_DIR, format_paired, format_summary, trial_grid, write_results

    z = s.sizes
    concurrent = int(os.environ.get("EVIDENCE_TRIALS", 14 if z.device == "cuda" else 1))
    seeds = os.environ.get("EVIDENCE_SEEDS", "0,1,2,3,4" if z.device == "cuda" else "0,1")
    deadline = float(os.environ.get("EVIDENCE_DEADLINE_S", 480 if z.device == "cuda" else 3000))
    sets = {"ray.use_gpu": z.device == "cuda", "ray.num_workers": 1, "ray.search_workers": 1,
            "ray.search_executor": "ranks", "ray.gpu_share": round(1 / concurrent, 4)}
    prune = EVIDENCE_PRUNE
    if s.dry:  # two configurations, a few tiny steps
        sets.update({"train.total_epochs": 3, "train.steps_per_epoch": 2, "prune.start_epoch": 1,
                     "prune.subset_size": 32, "prune.subset_shards": 1, "data.val_size": 40, "data.test_limit": 40,
                     "data.train_limit": 400, "prune.target_flops_reduction": 0.1, "prune.step_flops": 0.05})
        prune = "[{criteria: [l1,fpgm]}, {criteria: [l1]}]"
    reference = "prune=criteria=l1+fpgm" if s.dry else EVIDENCE_REFERENCE
    sweep = s.work / f"evidence-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, "-m", "laasp_dist.cli", "sweep", str(REPO / "jobs" / "evidence_fashion.yaml"),
           "--param", f"prune={prune}", "--seeds", seeds, "--reference", reference,
           "--max-concurrent", str(concurrent), "--out", str(sweep),
           *[x for k, v in sets.items() for x in ("--set", f"{k}={json.dumps(v)}")]]
    s.record.update(command=" ".join(cmd[3:]), concurrent=concurrent, seeds=seeds, deadline_s=deadline)
    gpu_log = (s.out / "evidence_gpu.csv").open("w")
    sampler = (subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,utilization.gpu,memory.used",
                                 "--format=csv", "-l", "15"], stdout=gpu_log, stderr=subprocess.DEVNULL)
               if z.device == "cuda" else None)
    start = time.perf_counter()
    with (s.out / "evidence.log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            s.record["rc"] = proc.wait(timeout=deadline)
        except subprocess.TimeoutExpired:  # Tune stops its trials on SIGINT; unfinished ones stay "not finished"
            proc.send_signal(signal.SIGINT)
            try:
                s.record["rc"] = proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                proc.kill()
                s.record["rc"] = proc.wait()
            s.record["stopped_at_deadline"] = True
    s.record["sweep_seconds"] = round(time.perf_counter() - start, 1)
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
    gpu_log.close()
    saved = yaml.safe_load((sweep / SWEEP_FILE).read_text())
    grid = trial_grid(saved["base"], saved["params"], saved["seeds"])
    tables = write_results(sweep, grid, {}, reference)  # the finished trials, also after a stop at the deadline
    s.record["trials_done"] = int((tables.results["status"] == "done").sum())
    s.record["trials"] = len(grid)
    s.record["trial_wall_seconds"] = [round(float(w), 1) for w in tables.results.get("wall_seconds", [])
                                      if w is not None and w == w]
    with tarfile.open(s.out / "evidence_sweep.tar.gz", "w:gz") as tar:
        for path in sorted(sweep.rglob("*")):
            rel = path.relative_to(sweep)
            keep = (rel.parts[0] != TRIALS_DIR or (len(rel.parts) == 3 and rel.name in
                                                   ("summary.json", "config.yaml", "history.parquet")))
            if path.is_file() and keep and rel.parts[0] != "tune":
                tar.add(path, arcname=str(Path(sweep.name) / rel))
    text = format_summary(tables.summary) + "\n\n" + format_paired(tables.paired, reference)
    (s.out / "evidence_summary.txt").write_text(text + "\n")
    print(text)


STEPS: dict[str, Callable[[Step], None]] = {"latency": step_latency, "search": step_search, "smoke": step_smoke,
                                            "plain": step_plain, "project": step_project, "tests": step_tests,
                                            "dali": step_dali, "evidence": step_evidence,
                                            "wheels": lambda s: None}


# ----------------------------------------------------------------------------------------------- tables


def _fmt(v: Any, spec: str = ".1f") -> str:
    return format(v, spec) if isinstance(v, (int, float)) else ("-" if v is None else str(v))


def report(results: Path) -> str:
    """The short table of every figure measured so far in this lease."""
    r = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}
    lines = ["== GPU measurements so far =="]
    env = (r.get("latency") or {}).get("environment")
    if env:
        lines.append(f"machine: {env.get('gpu', 'cpu')} | torch {env['torch']} CUDA {env['cuda']} | ray "
                     f"{env['ray']} | DALI {env['nvidia.dali']}")
    train_speed = None
    if "plain" in r:
        p = r["plain"]["synthetic_images_per_s"]
        lines.append(f"train img/s, plain loop, synthetic, bf16: eager {_fmt(p.get('eager'))}, torch.compile "
                     f"{_fmt(p.get('torch.compile'))}; fp32 eager {_fmt(p.get('fp32 eager'))}   (goal >= "
                     f"{GOAL_IMAGES_PER_S}; 798 TFLOP/s / 24.5 GFLOP = 32 k)")
        train_speed = p.get("eager") if isinstance(p.get("eager"), (int, float)) else None
    if "project" in r and r["project"].get("synthetic"):
        lines.append(f"train img/s, project loop (Ray Train), synthetic: "
                     f"{_fmt(r['project']['synthetic']['images_per_s_median'])}")
    if "dali" in r:
        d = r["dali"]
        lines.append(f"DALI mixed, {d.get('folder_images')} JPEGs: decode only {_fmt(d.get('dali_decode_only_images_per_s'))}"
                     f" img/s, plain loop {_fmt(d.get('plain_dali_images_per_s'))}, project loop "
                     f"{_fmt((d.get('project_folder') or {}).get('images_per_s_median'))}")
    if "search" in r:
        for precision in ("fp32", "bf16"):
            b = r["search"].get(precision) or {}
            for row in b.get("rows", []):
                lines.append(f"search {precision:4s} {row['method'][:22]:22s} {row['seconds']:8.1f} s/round "
                             f"({row['candidates']} candidates){' extrapolated' if row.get('extrapolated') else ''}")
        exact = next((row for row in (r["search"].get("bf16") or {}).get("rows", []) if row["method"] == "exact"), None)
        if exact:
            epoch_h = IMAGENET_TRAIN / (train_speed or GOAL_IMAGES_PER_S) / 3600
            lines.append(f"  40 / 60 rounds at the first round's cost: {40 * exact['seconds'] / 3600:.2f} / "
                         f"{60 * exact['seconds'] / 3600:.2f} h vs 100 ImageNet epochs on one GPU: "
                         f"{100 * epoch_h:.1f} h (at {train_speed or GOAL_IMAGES_PER_S:.0f} img/s)")
    if "latency" in r:
        lat = r["latency"].get("latency_bf16") or r["latency"].get("latency_fp32") or {}
        for row in lat.get("batches", []):
            lines.append(f"one-shot -50% FLOPs, {lat['dtype'][:8]}, batch {row['batch']:3d}: {row['original_ms']:.2f} -> "
                         f"{row['slim_ms']:.2f} ms, {row['slim_images_per_s']:.0f} img/s, speed-up "
                         f"{row['speedup']:.2f}x (FLOPs promise {1 / lat['macs']['ratio']:.2f}x)")
    if "smoke" in r:
        c = r["smoke"].get("checks") or {}
        final = c.get("final") or {}
        ev = r["smoke"].get("evaluate_default") or {}
        lines.append(f"smoke run: {c.get('rounds')} rounds, FLOPs -{_fmt(100 * c['flops_reduction']) if c else '-'} %, "
                     f"ranks identical {c.get('ranks_identical_after_every_install')}, final {final.get('device')}/"
                     f"{final.get('precision')} test top1 {_fmt(final.get('test_top1'), '.4f')}, evaluate again "
                     f"{_fmt(ev.get('test_top1'), '.4f')}")
    if "tests" in r:
        lines.append(f"pytest -m gpu: {r['tests'].get('summary_line')}")
    if "evidence" in r:
        e = r["evidence"]
        lines.append(f"evidence sweep: {e.get('trials_done')}/{e.get('trials')} trials in {e.get('sweep_seconds')} s, "
                     f"{e.get('concurrent')} at a time (rc {e.get('rc')}, stopped at the deadline: "
                     f"{e.get('stopped_at_deadline', False)})")
    for name, rec in r.items():
        for failure in rec.get("failures", []):
            lines.append(f"FAILED in {name}: {failure[:300]}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on this machine's CPU")
    parser.add_argument("--stage", type=Path, default=REPO / ".gpu-stage")
    args = parser.parse_args()
    out = Path(os.environ.get("OUT") or args.stage / "out")
    out.mkdir(parents=True, exist_ok=True)
    step = Step(args.step, DRY if args.dry_run else FULL, out, args.stage, args.dry_run)
    start = time.perf_counter()
    try:
        STEPS[args.step](step)
    except Exception as exc:  # noqa: BLE001 — record it and still print what was measured
        step.record.setdefault("failures", []).append(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        step.record["seconds"] = round(time.perf_counter() - start, 1)
        step.save()
        print(json.dumps({k: v for k, v in step.record.items() if k not in ("summary",)}, default=str)[:3000])
        print(report(step.results))
    return 1 if step.record.get("failures") else 0


if __name__ == "__main__":
    sys.exit(main())
