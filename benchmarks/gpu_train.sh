#!/usr/bin/env bash
# One prepared GPU benchmark, at most 8 minutes (benchmarks/gpu_train.py --budget): prints
# the device and torch/CUDA versions, checks that torch has every API cptron uses (stops
# there, naming the missing ones), then trains the llama3.2-1b shape at seq 4096 in bf16:
# cptron compiled, compiled with packed documents masked (FlexAttention), eager, and
# transformers' LlamaForCausalLM (SDPA, fused AdamW, plain loop) as the baseline. One table:
# tokens/s, MFU, peak memory, and the ratios cptron/transformers and masked/unmasked.
# Random weights and random tokens held in memory: no network, no files, no install needed.
# Usage: bash benchmarks/gpu_train.sh [extra gpu_train.py args, e.g. --steps 10 --configs all]
#        bash benchmarks/gpu_train.sh --dry-run     # anywhere: API check, validate the configs
# Each configuration's full log goes to $OUT (or --log-dir) when set.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
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
