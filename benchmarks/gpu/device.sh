#!/usr/bin/env bash
# The device side of docs/gpu.md, one call each:  bash benchmarks/gpu/device.sh STEP [--dry-run]
#
# Every call first joins and installs whatever wheel groups are complete under .gpu-stage/ (the chunk
# folders carried so far; benchmarks/gpu/stage.py) into .gpu-stage/site, puts the carried Fashion-MNIST
# where the tests and the smoke run read it, then runs benchmarks/gpu/run.py STEP, which writes its
# results under $OUT and prints a short table last. --dry-run: the same step on this machine's CPU at
# tiny sizes, with the packages of the current Python (no staging).
set -uo pipefail
cd "$(dirname "$0")/../.."
STEP=${1:?usage: device.sh STEP [--dry-run]}
DRY=${2:-}
STAGE=${STAGE:-.gpu-stage}
PY=${PY:-python3}
export OUT=${OUT:-$STAGE/out}
export PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=0.1
mkdir -p "$OUT" "$STAGE"

if [[ "$DRY" == "--dry-run" ]]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  exec "$PY" benchmarks/gpu/run.py "$STEP" --dry-run --stage "$STAGE"
fi

"$PY" benchmarks/gpu/stage.py install --stage "$STAGE" 2>&1 | tee -a "$OUT/stage.txt" | grep -v "already exists"
export PYTHONPATH=$PWD/$STAGE/site:$PWD
FASHION=/usr/share/datasets/fashion-mnist
if [[ ! -e $FASHION/train-images-idx3-ubyte.gz && -d $STAGE/data/fashion-mnist ]]; then
  mkdir -p "$(dirname $FASHION)" && cp -r "$STAGE/data/fashion-mnist" "$FASHION"
fi
if [[ ! -e $STAGE/results/machine.txt ]]; then   # once per lease: what the machine is
  mkdir -p "$STAGE/results"
  { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv; nproc; free -g | head -2;
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; } > "$STAGE/results/machine.txt" 2>&1
  cp "$STAGE/results/machine.txt" "$OUT/"
fi
"$PY" - <<'PYEOF' 2>&1 | tee "$OUT/imports.txt"
for name in ("pydantic", "torch_pruning", "ray", "nvidia.dali"):
    try:
        module = __import__(name, fromlist=["__version__"])
        print(f"import {name}: {getattr(module, '__version__', 'ok')}")
    except Exception as exc:  # noqa: BLE001
        print(f"import {name}: not yet ({type(exc).__name__}: {str(exc)[:120]})")
PYEOF
exec "$PY" benchmarks/gpu/run.py "$STEP" --stage "$STAGE"
