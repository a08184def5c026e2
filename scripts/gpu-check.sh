#!/usr/bin/env bash
# The GPU check of sharded state (tests/gpu/test_gpu_sharded.py), for a machine with a CUDA GPU:
# FSDP2 on one GPU with nccl (world size 1): AdamW step, snapshot, restore into a fresh model and
# optimizer, pyckpt.load in a plain process, and a 2-rank CPU/gloo snapshot restored into the 1-rank
# CUDA model. Stops after GPU_CHECK_TIMEOUT seconds (default 540). Exit 0 only if all of it ran and passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu-check: torch sees no CUDA GPU here; nothing checked" >&2
  exit 2
fi
"$PY" -c 'import torch; print("gpu-check: torch", torch.__version__, "on", torch.cuda.get_device_name(0),
      "nccl", ".".join(map(str, torch.cuda.nccl.version())))'
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-540}" \
  "$PY" -m pytest -p no:cacheprovider -m gpu -v -rs tests/gpu/test_gpu_sharded.py 2>&1 | tee "$log" || status=$?
echo "gpu-check: checked"
echo "  - an FSDP2 model on a 1-rank CUDA mesh (nccl): AdamW step, snapshot, restore into a fresh model and a"
echo "    fresh optimizer (CUDA DTensors, every full tensor bit-exact)"
echo "  - pyckpt.load of that snapshot in a plain process (full CPU tensors, bit-exact)"
echo "  - a 2-rank CPU/gloo FSDP2 snapshot restored into the 1-rank CUDA model (bit-exact)"
passed=$(grep -c ' PASSED' "$log" || true)
if [ "$status" -ne 0 ] || [ "$passed" -ne 3 ]; then
  echo "gpu-check: FAILED (pytest exit $status, $passed of 3 passed; 124 = the time limit)" >&2
  exit 1
fi
echo "gpu-check: OK, 3 of 3 passed"
