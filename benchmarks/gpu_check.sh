#!/usr/bin/env bash
# One prepared GPU check: install cptron into the machine's own Python (no network:
# no deps, no build isolation), report the device, check torch's APIs (cptron.torch_apis),
# run the gpu-marked tests (cptron vs transformers on CUDA, fp32 and bf16, packed
# documents) and then the whole suite.
# Usage: bash benchmarks/gpu_check.sh   (on a machine with CUDA; prints everything)
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
# The console-script test needs an installed `cptron`; without network the editable
# install can fail on the machine's setuptools, so that one test is skipped then.
extra=()
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/cptron-install.log 2>&1; then
  echo "editable install failed (see /tmp/cptron-install.log); running from the source tree"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  extra=(--deselect tests/integration/test_cli.py::test_console_script_is_installed)
fi
$PY - <<'PY'
import torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
PY
echo "== torch APIs cptron uses"
$PY -m cptron.torch_apis
echo "== gpu-marked tests"
$PY -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -5
gpu_rc=${PIPESTATUS[0]}
echo "== whole suite on this machine's torch"
$PY -m pytest -q -p no:cacheprovider "${extra[@]}" 2>&1 | tail -8
all_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$gpu_rc, whole suite rc=$all_rc"
exit $(( gpu_rc || all_rc ))
