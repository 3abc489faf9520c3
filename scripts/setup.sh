#!/usr/bin/env bash
# Creates .venv and installs llava-train with everything it needs; safe to re-run (no-op when current).
# torch: the CPU build (torch==2.13.0) on machines without an NVIDIA GPU, the default CUDA build otherwise;
# set TORCH_SPEC to choose yourself (e.g. TORCH_SPEC="torch==2.14.1 torchvision==0.29.1" for the
# torchvision image-processor backend). DeepSpeed builds against the installed torch, so it is
# installed after torch without build isolation (with isolation pip fetches a multi-GB torch).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ -z "${TORCH_SPEC:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    TORCH_SPEC="torch"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi
stamp="$VENV/.llava-train-installed"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" --disable-pip-version-check --quiet; }
echo "setup: installing $TORCH_SPEC"
# shellcheck disable=SC2086
pip install $TORCH_SPEC
echo "setup: installing deepspeed (built against that torch)"
pip install --no-build-isolation "deepspeed>=0.16"
echo "setup: installing llava-train and its dependencies"
pip install -e ".[dev]"
echo "$want" > "$stamp"
echo "setup: done ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
