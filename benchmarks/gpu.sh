#!/usr/bin/env bash
# GPU training benchmark at the real llava-v1.6-mistral-7b shapes, on one CUDA GPU, offline.
#
# Builds random-weight models at the real shapes (nothing is downloaded) and measures, per configuration
# (LoRA bf16 sdpa / flash-attn, packing, compile, Liger, checkpointing): real tokens/s, MFU, peak memory
# (next to `llava plan`'s estimate when that command exists), and the DataLoader wait share. Rows whose
# package is missing (flash-attn, liger-kernel, triton) are reported as skipped with the reason. The
# whole run stays under 10 minutes (rows not started by then are reported as out of budget).
#
#   bash benchmarks/gpu.sh --dry-run          # the plan of measurements (works on CPU)
#   bash benchmarks/gpu.sh                    # writes benchmarks/results/gpu.json and prints a table
#   bash benchmarks/gpu.sh --only lora_bf16_sdpa,checkpointing --batch-size 4
#
# Environment: PYTHON (default: .venv/bin/python if present, else python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="python3"; fi
fi

dry_run=0
for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then dry_run=1; fi
done

# No network on the benchmark machine: never let a library try the hub.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false

if [[ "$dry_run" -eq 0 ]]; then
  if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu.sh: no NVIDIA GPU visible (nvidia-smi -L failed); use --dry-run for the plan" >&2
    exit 2
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

cd "$repo"
exec timeout --kill-after=20 660 "$python" "$here/gpu_bench.py" "$@"
