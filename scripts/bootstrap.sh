#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: Debian data packages, a venv, pinned Python deps.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

VENV=${LAASP_VENV:-.venv}
stamp="$VENV/.laasp-installed"
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade "pip>=24"
"$VENV/bin/python" -m pip install -q -c requirements.lock -e ".[dali,export,test]"
# foolbox only carries real sample JPEGs for tests; its own deps are not needed.
"$VENV/bin/python" -m pip install -q --no-deps -c requirements.lock foolbox
echo "$want" > "$stamp"
