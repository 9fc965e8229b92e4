#!/usr/bin/env bash
# One prepared GPU call for the fused factorized-embedding kernel (csrc/), under 5 minutes:
# build the extension in place through setup.py (CPTRON_BUILD_CUDA=1), check it against the
# float64 reference, then time forward+backward against eager and torch.compile
# (benchmarks/gpu_kernel.py; its table comes last). If the setup.py build fails, its log tail is
# printed and the script goes on with the JIT build of the same sources.
# Usage: bash benchmarks/gpu_kernel.sh [gpu_kernel.py args, e.g. --ranks 400 --iters 100]
# Exit: 0 checks passed, 1 a check or the build failed, 2 no GPU.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "error: no CUDA GPU visible to $PY (or torch is missing); benchmarks/gpu_kernel.sh needs one GPU" >&2
  exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

log=${OUT:-/tmp}/gpu_kernel_build.log
start=$(date +%s)
build_rc=0
if CPTRON_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} $PY setup.py -q build_ext --inplace >"$log" 2>&1; then
  echo "setup.py build_ext: built in $(( $(date +%s) - start )) s"
else
  echo "setup.py build_ext FAILED after $(( $(date +%s) - start )) s (log: $log); last lines:"
  tail -15 "$log"
  build_rc=1
fi
$PY benchmarks/gpu_kernel.py "$@"
rc=$?
(( rc == 0 && build_rc != 0 )) && rc=1
exit $rc
