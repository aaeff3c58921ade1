"""Carry wheels and data to the GPU machine in pieces, and put them back together there (standard library only).

    python benchmarks/gpu/stage.py pack    --stage .gpu-stage --limit-mib 58 FILE...   # here
    python3 benchmarks/gpu/stage.py install --stage .gpu-stage [--cross]              # on the device

`pack` cuts every file larger than the limit into pieces and deals whole files and pieces,
in the order given, into chunk folders ``c1, c2, …`` of at most ``--limit-mib`` each; every
chunk folder also holds ``manifest.json`` (names, sizes, SHA-256 of whole files, where each
piece is), so that whatever arrived can be checked on its own.

`install` runs at the start of every device call: it joins the files whose pieces have all
arrived (``ready/``, checked against their SHA-256), unpacks data tarballs into ``data/``, and
installs each *install group* of wheels (``--no-index --no-deps --target site/``) once all of
its wheels are ready. One group is one pip call: wheels that share a top-level folder (the
``nvidia/`` namespace of DALI and its codecs) must be installed together, as pip ``--target``
does not merge folders. It prints one status line; what is missing tells which chunk to send.
``--cross`` installs for the device's Python 3.12 from another Python (the dry run here).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MIB = 1 << 20
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def distribution(wheel: str) -> str:
    """A wheel file's normalised distribution name (its file name's first field, lower case, '_' for '-' and '.')."""
    return wheel.split("-")[0].lower().replace(".", "_")


def group_of(name: str, groups: dict[str, list[str]]) -> str:
    """The install group of a wheel: the group listing its distribution name."""
    for group, names in groups.items():
        if distribution(name) in names:
            return group
    raise SystemExit(f"stage: {name} is in no install group")


def pack(files: list[Path], stage: Path, limit: int, groups: dict[str, list[str]]) -> dict:
    """Lay the files end to end, in order, and cut that stream every `limit` bytes into chunk folders.

    A file that crosses a cut becomes pieces (``NAME.part-000``, …), so the chunks are as few as the
    total size allows and a file's pieces arrive in consecutive calls. Returns the manifest.
    """
    for old in stage.glob("c[0-9]*"):
        shutil.rmtree(old)
    entries, position = [], 0
    for path in files:
        size = path.stat().st_size
        spans = []  # (chunk, offset in file, length)
        offset = 0
        while offset < size or not spans:
            chunk = position // limit + 1
            n = min(size - offset, chunk * limit - position)
            spans.append((chunk, offset, n))
            offset, position = offset + n, position + n
        names = [path.name] if len(spans) == 1 else [f"{path.name}.part-{i:03d}" for i in range(len(spans))]
        for name, (chunk, offset_, n) in zip(names, spans):
            folder = stage / f"c{chunk}"
            folder.mkdir(parents=True, exist_ok=True)
            with path.open("rb") as src, (folder / name).open("wb") as dst:
                src.seek(offset_)
                dst.write(src.read(n))
        entries.append({"name": path.name, "size": size, "sha256": sha256(path), "pieces": names,
                        "chunks": [c for c, _, _ in spans],
                        "group": "data" if path.name.endswith(".tar") else group_of(path.name, groups)})
    chunks = (position - 1) // limit + 1
    manifest = {"limit_bytes": limit, "chunks": chunks, "files": entries, "groups": list(groups) + ["data"]}
    for k in range(1, chunks + 1):
        (stage / f"c{k}").mkdir(exist_ok=True)
        (stage / f"c{k}" / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def install(stage: Path, cross: bool) -> int:
    """Join, check, unpack and install whatever is complete; print one status line."""
    manifests = sorted(stage.glob("c[0-9]*/manifest.json"))
    if not manifests:
        print(f"stage: no chunk has arrived under {stage}")
        return 1
    manifest = json.loads(manifests[0].read_text())
    ready, site, data = stage / "ready", stage / "site", stage / "data"
    ready.mkdir(exist_ok=True)
    done_file = stage / "installed.json"
    done = set(json.loads(done_file.read_text())) if done_file.is_file() else set()
    waiting: set[int] = set()
    for e in manifest["files"]:
        target = ready / e["name"]
        if target.is_file():
            continue
        found = [next(stage.glob(f"c[0-9]*/{p}"), None) for p in e["pieces"]]
        if any(f is None for f in found):
            waiting.update(c for c, f in zip(e["chunks"], found) if f is None)
            continue
        with target.with_suffix(".tmp").open("wb") as out:
            for f in found:
                with f.open("rb") as src:
                    shutil.copyfileobj(src, out, 1 << 22)
        target.with_suffix(".tmp").rename(target)
        if sha256(target) != e["sha256"]:
            target.unlink()
            print(f"stage: {e['name']} does not match its SHA-256: send chunk(s) {e['chunks']} again")
            return 1
    by_group: dict[str, list[dict]] = {}
    for e in manifest["files"]:
        by_group.setdefault(e["group"], []).append(e)
    for group, entries in by_group.items():
        if group in done or not all((ready / e["name"]).is_file() for e in entries):
            continue
        if group == "data":
            for e in entries:
                with tarfile.open(ready / e["name"]) as tar:
                    tar.extractall(data, filter="data")
        else:
            cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                   "--no-cache-dir", "--disable-pip-version-check", "--target", str(site)]
            if cross:
                cmd += ["--python-version", "3.12", "--implementation", "cp", "--only-binary=:all:"]
                cmd += [x for p in PLATFORMS for x in ("--platform", p)]
            subprocess.run(cmd + [str(ready / e["name"]) for e in entries], check=True)
        done.add(group)
        done_file.write_text(json.dumps(sorted(done)))
    missing = [g for g in manifest["groups"] if g in by_group and g not in done]
    print(f"stage: {len(done)}/{len(by_group)} groups in place ({', '.join(sorted(done)) or 'none'})"
          + (f"; waiting for chunk(s) {sorted(waiting)} ({', '.join(missing)})" if missing else "; complete"))
    return 0


# Measurement steps of benchmarks/gpu/run.py, in the order they should run, with the install groups each needs.
STEPS = (("latency", {"early"}), ("search", {"early", "data"}), ("smoke", {"early", "data", "ray"}),
         ("plain", {"early"}), ("project", {"early", "ray"}), ("tests", {"early", "data", "ray", "dali"}),
         ("dali", {"early", "ray", "dali"}))


# The evidence sweep (docs/gpu.md): the GPU tests that need neither Ray nor DALI ride with the first chunk.
EVIDENCE_STEPS = (("tests", {"early", "data"}), ("evidence", {"early", "data", "ray"}))
PLANS = {"gpu": STEPS, "evidence": EVIDENCE_STEPS}


def plan(manifest: dict, steps: tuple[tuple[str, set[str]], ...] = STEPS) -> list[tuple[str | None, str]]:
    """(chunk folder carried or None, step) per device call: every chunk call also runs the first step
    whose groups are complete by then; the steps left over follow as calls that carry nothing."""
    complete_after = {g: max(c for e in manifest["files"] if e["group"] == g for c in e["chunks"])
                      for g in {e["group"] for e in manifest["files"]}}
    queue, calls = list(steps), []
    for k in range(1, manifest["chunks"] + 1):
        ready = {g for g, last in complete_after.items() if last <= k}
        pick = next((st for st in queue if st[1] <= ready), None)
        if pick is not None:
            queue.remove(pick)
        calls.append((f"c{k}", pick[0] if pick else "wheels"))
    return calls + [(None, name) for name, _ in queue]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack")
    p.add_argument("--stage", type=Path, required=True)
    p.add_argument("--limit-mib", type=float, default=58)
    p.add_argument("--groups", required=True, help="JSON {group: [distribution names]}, in install order")
    p.add_argument("--plan", choices=sorted(PLANS), default="gpu", help="which device steps the calls run")
    p.add_argument("files", type=Path, nargs="+")
    i = sub.add_parser("install")
    i.add_argument("--stage", type=Path, required=True)
    i.add_argument("--cross", action="store_true", help="install for CPython 3.12 manylinux from another Python")
    args = parser.parse_args()
    if args.command == "pack":
        manifest = pack(args.files, args.stage, int(args.limit_mib * MIB), json.loads(args.groups))
        for k in range(1, manifest["chunks"] + 1):
            size = sum(f.stat().st_size for f in (args.stage / f"c{k}").iterdir())
            print(f"c{k}: {size / MIB:6.1f} MiB  {', '.join(sorted(p.name for p in (args.stage / f'c{k}').iterdir()))}")
        print("\nDevice calls (docs/gpu.md), back to back, timeout_s 600 each (the machine goes back after 30 s idle):")
        for i, (chunk, step) in enumerate(plan(manifest, PLANS[args.plan]), 1):
            carry = f'["{args.stage}/{chunk}"]' if chunk else "nothing"
            print(f"  call {i}: carry {carry:24s} command: bash benchmarks/gpu/device.sh {step}")
        return 0
    return install(args.stage, args.cross)


if __name__ == "__main__":
    sys.exit(main())
