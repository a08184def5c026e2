"""Test hooks, inert unless a test sets their environment variable.

crash_point(name): the crash harness (tests/reliability/crash_harness.py) sets
PYCKPT_TEST_CRASH_AT=name[:n] to SIGKILL the process the n-th time it reaches the phase `name` of the
commit protocol, to prove that a crash at any phase leaves the previous or the new snapshot.
"""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("PYCKPT_TEST_CRASH_AT")
    if not wanted or wanted.partition(":")[0] != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] == int(wanted.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)
