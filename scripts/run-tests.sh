#!/usr/bin/env bash
# The pytest part of `make test` (what CI runs). Three pytest sessions instead of one:
#   1. tests/e2e (the container clusters) in the background, logged to .cache/e2e-pytest.log: they
#      spend most of their time waiting (systemd boots, rendezvous timeouts, training steps of 1 s);
#   2. meanwhile every test that needs no container (unit, cli, ansible, multiproc, reliability, bench);
#   3. as soon as those end, tests/molecule (its scenarios run three at a time), beside the rest of tests/e2e.
# One session after another took 65 min on 2 cores; this order overlaps them. CI keeps both cores busy
# (93% in a run of 2026-12-02), so the order gains only the CPU that tests/e2e leaves idle: Molecule
# after tests/e2e took 3189 s of pytest on a VM where this order took 3164 s.
# Exit status: non-zero when any session failed; each session's summary is printed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=1
mkdir -p .cache
e2e_log=.cache/e2e-pytest.log
started=$SECONDS

"$PY" -m pytest -ra --durations=15 -p no:cacheprovider tests/e2e >"$e2e_log" 2>&1 &
e2e_pid=$!
echo "tests/e2e running in the background (pid $e2e_pid, log $e2e_log)"

"$PY" -m pytest -ra --durations=25 -p no:cacheprovider --ignore=tests/e2e --ignore=tests/molecule tests
rest=$?
echo "tests without containers: exit $rest after $((SECONDS - started)) s; tests/molecule next, beside tests/e2e"

"$PY" -m pytest -ra --durations=10 -p no:cacheprovider tests/molecule
molecule=$?
echo "tests/molecule: exit $molecule after $((SECONDS - started)) s; waiting for tests/e2e"
wait "$e2e_pid"
e2e=$?
echo "===== tests/e2e (exit $e2e, ran beside the tests above): $e2e_log ====="
cat "$e2e_log"
echo "pytest sessions: no containers exit $rest, e2e exit $e2e, molecule exit $molecule; $((SECONDS - started)) s in all"
[ "$rest" -eq 0 ] && [ "$e2e" -eq 0 ] && [ "$molecule" -eq 0 ]
