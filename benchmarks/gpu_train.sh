#!/usr/bin/env bash
# One prepared GPU benchmark: tokens/s and MFU of cptron's Trainer on one GPU for the
# llama3.2-1b shape at seq 4096 in bf16, {compile off, on} x {activation checkpointing
# none, full}, in under 5 minutes (benchmarks/gpu_train.py --budget). Random weights and
# random tokens from an in-memory source: no network, no files, no install needed.
# Usage: bash benchmarks/gpu_train.sh [extra gpu_train.py args, e.g. --steps 10]
#        bash benchmarks/gpu_train.sh --dry-run     # anywhere: validate the four configs
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Long sequences allocate activations of many sizes; expandable segments keep the
# caching allocator from fragmenting (and from reserving far more than it uses).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}

dry=0
for a in "$@"; do [[ "$a" == "--dry-run" ]] && dry=1; done
if ! $PY -c "import torch" 2>/dev/null; then
  echo "error: $PY cannot import torch (set PYTHON=/path/to/python with torch installed)" >&2
  exit 2
fi
if (( ! dry )); then
  if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "error: no CUDA GPU visible to $PY (torch.cuda.is_available() is False); this benchmark needs one GPU." >&2
    echo "       bash benchmarks/gpu_train.sh --dry-run checks the configurations without one." >&2
    exit 2
  fi
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
    --format=csv,noheader
fi
exec $PY benchmarks/gpu_train.py "$@"
