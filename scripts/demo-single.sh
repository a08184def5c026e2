#!/usr/bin/env bash
# The README's first command (`make demo`): single mode on this machine.
# Trains train.py with a snapshot every 20 steps, kills it mid-run (SIGKILL, as a crash would),
# resumes from the last snapshot, and checks the result is bit-identical to an uninterrupted run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} DISTRIBUTED_MODE=single
snapshots=runs/shared/snapshots             # SHARED_FS_PATH in config/distributed.single.env
rm -rf "$snapshots" runs/reference
args=(--steps 200 --checkpoint-interval 20 --log-every 20)

echo "== 1. train, interrupted by a crash at step 110 (last snapshot: step 100)"
if "$PY" train.py "${args[@]}" --crash-at-step 110; then
  echo "expected the run to be killed" >&2; exit 1
fi
echo "== 2. what is on disk"
.venv/bin/pyckpt ls "$snapshots/checkpoint.bin"
echo "== 3. resume: continues at step 100 and finishes"
resumed=$("$PY" train.py "${args[@]}" | tee /dev/stderr | grep '^FINAL')
echo "== 4. reference: the same run without interruption"
reference=$("$PY" train.py "${args[@]}" --snapshot-path runs/reference/checkpoint.bin --log-every 1000 | grep '^FINAL')
echo "resumed:   $resumed"
echo "reference: $reference"
if [ "${resumed%% seconds=*}" != "${reference%% seconds=*}" ]; then
  echo "MISMATCH: the resumed run differs from the uninterrupted one" >&2; exit 1
fi
.venv/bin/pyckpt verify "$snapshots/checkpoint.bin"
echo "OK: the interrupted-and-resumed run is bit-identical to the uninterrupted one."
