#!/usr/bin/env bash
# Stage what the GPU machine lacks (docs/gpu.md): the cp312 manylinux wheels of Ray, DALI, Torch-Pruning,
# pydantic and their missing dependencies, plus a few MB of data, cut into chunk folders of at most
# LIMIT_MIB (one device call carries at most 64 MiB, the working tree included).
#
#   bash benchmarks/gpu/pack_wheels.sh            # -> .gpu-stage/c1 ... cN and the list of device calls
#   bash benchmarks/gpu/pack_wheels.sh --dry-run  # the same, then the device side replayed here, chunk by
#                                                 # chunk, into a throwaway folder (pip --target for cp312)
#   bash benchmarks/gpu/pack_wheels.sh --evidence # only what the evidence sweep needs (no DALI, all 60 000
#                                                 # Fashion-MNIST training images): two calls (docs/gpu.md)
#
# Runs from the repository root with a Python that has pip and this project's data (Fashion-MNIST at
# /usr/share/datasets/fashion-mnist, the foolbox photos come as a wheel). Nothing here is committed:
# .gpu-stage/ is ignored. Wheels never go into git.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-python3}
STAGE=${STAGE:-.gpu-stage}
LIMIT_MIB=${LIMIT_MIB:-58}   # + the working tree (< 6 MiB) stays under the 64 MiB a call carries
DRY_RUN=0
PLAN=gpu
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --evidence) PLAN=evidence ;;
    *) echo "usage: pack_wheels.sh [--dry-run] [--evidence]" >&2; exit 2 ;;
  esac
done

# Install groups, in the order they are packed (and so become complete on the device): each group is
# one pip call there. early: what laasp_dist needs without Ray or DALI (so the first calls can already
# measure); ray: Ray and the dependencies the device lacks; dali: DALI and its codecs (one group: they
# share the nvidia/ folder, which pip --target cannot merge across calls).
EARLY="pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
       typing_extensions==4.16.0 packaging==26.3 torch-pruning==1.6.1 foolbox==3.3.4"
RAY="ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
     tensorboardX==2.6.5"
DALI="astunparse==1.6.3 gast==0.7.0 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 libcst==1.9.0
      nvidia-nvjpeg==13.3.2.43 nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82
      nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-libnvcomp-cu13==5.3.0.16 nvidia-dali-cuda130==2.4.0"
TRAIN_IMAGES=12000
if [[ $PLAN == evidence ]]; then DALI=""; TRAIN_IMAGES=60000; fi
GROUPS_JSON=$("$PY" - "$EARLY" "$RAY" "$DALI" <<'EOF'
import json, re, sys
def names(specs):
    return [re.sub(r"[-.]", "_", s.split("==")[0].lower()) for s in specs.split()]
print(json.dumps({"early": names(sys.argv[1]), "ray": names(sys.argv[2]), "dali": names(sys.argv[3])}))
EOF
)

mkdir -p "$STAGE/wheels" "$STAGE/build"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# shellcheck disable=SC2086
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp $PLATFORMS -d "$STAGE/wheels" $EARLY $RAY $DALI

# Data: Fashion-MNIST's first 12 000 training images and its test set (the GPU tests' fixtures and the
# smoke run read /usr/share/datasets/fashion-mnist, where device.sh puts them).
"$PY" - "$STAGE/build" "$TRAIN_IMAGES" <<'EOF'
import gzip, struct, sys, tarfile
from pathlib import Path
src, build = Path("/usr/share/datasets/fashion-mnist"), Path(sys.argv[1])
out = build / "fashion-mnist"
out.mkdir(parents=True, exist_ok=True)
keep = {"train": int(sys.argv[2]), "t10k": None}
for prefix, n in keep.items():
    for kind, dims in (("images-idx3", 3), ("labels-idx1", 1)):
        raw = gzip.decompress((src / f"{prefix}-{kind}-ubyte.gz").read_bytes())
        header = list(struct.unpack(f">{1 + dims}I", raw[: 4 * (1 + dims)]))
        per_item = 1
        for d in header[2:]:
            per_item *= d
        count = header[1] if n is None else min(n, header[1])
        header[1] = count
        body = raw[4 * (1 + dims): 4 * (1 + dims) + count * per_item]
        (out / f"{prefix}-{kind}-ubyte.gz").write_bytes(gzip.compress(struct.pack(f">{1 + dims}I", *header) + body, 6))
with tarfile.open(build / "data.tar", "w") as tar:
    tar.add(out, arcname="fashion-mnist")
EOF

order=()
for spec in $EARLY $RAY $DALI; do
  name=$(echo "${spec%%==*}" | tr 'A-Z-.' 'a-z__')
  version=${spec##*==}
  file=$(ls "$STAGE/wheels" | awk -v n="$name" -v v="$version" '{ split($0, a, "-"); d = tolower(a[1]); gsub(/\./, "_", d); if (d == n && a[2] == v) print }')
  [[ -n "$file" ]] || { echo "pack_wheels: no wheel downloaded for $spec" >&2; exit 1; }
  order+=("$STAGE/wheels/$file")
  [[ "$spec" == "foolbox==3.3.4" ]] && order+=("$STAGE/build/data.tar")   # data rides with the early group
done
"$PY" benchmarks/gpu/stage.py pack --stage "$STAGE" --limit-mib "$LIMIT_MIB" --groups "$GROUPS_JSON" --plan "$PLAN" \
    "${order[@]}"

N=$(ls -d "$STAGE"/c[0-9]* | wc -l)

if (( DRY_RUN )); then
  # The device side, replayed here: chunks arrive one per call into a fresh folder; install groups are
  # installed for CPython 3.12 (pip --target with --python-version) as soon as they are complete.
  fake=$(mktemp -d /tmp/gpu-stage-dry.XXXXXX)
  trap 'rm -rf "$fake"' EXIT
  for k in $(seq 1 "$N"); do
    cp -r "$STAGE/c$k" "$fake/c$k"
    echo "-- dry run, after call $k:"
    "$PY" benchmarks/gpu/stage.py install --stage "$fake" --cross
  done
  "$PY" - "$fake" <<'EOF'
import json, sys
from pathlib import Path
stage = Path(sys.argv[1])
manifest = json.loads(next(stage.glob("c1/manifest.json")).read_text())
wheels = [e["name"] for e in manifest["files"] if e["name"].endswith(".whl")]
infos = {p.name.split("-")[0].lower().replace(".", "_") for p in (stage / "site").glob("*.dist-info")}
missing = [w for w in wheels if w.split("-")[0].lower().replace(".", "_") not in infos]
assert not missing, f"not installed: {missing}"
assert (stage / "data" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()
print(f"dry run: {len(wheels)} wheels installed into {stage / 'site'}, data unpacked; "
      f"{sum(p.stat().st_size for p in (stage / 'site').rglob('*') if p.is_file()) / 2**20:.0f} MiB installed")
EOF
  # cp312 extensions do not import here: check the layout the device will import from instead (DALI and its
  # codecs under one regular nvidia/ package of the target, which comes first on the device's PYTHONPATH).
  expect="ray/__init__.py pydantic_core/__init__.py torch_pruning/__init__.py foolbox/data"
  [[ -n "$DALI" ]] && expect+=" nvidia/__init__.py nvidia/dali/__init__.py nvidia/nvimgcodec/__init__.py"
  for f in $expect; do
    [[ -e "$fake/site/$f" ]] || { echo "dry run: $f missing from the target" >&2; exit 1; }
  done
  [[ -z "$DALI" ]] || ls "$fake"/site/nvidia/cu13/lib/libnvjpeg.so.* > /dev/null
  echo "dry run: layout checked; the device's first call imports them (device.sh)"
fi
