"""The S3 servers of the tests. moto's standalone server (`moto[server]`), started once per pytest
process in its own process on 127.0.0.1 and a free port (bench/s3server.py), stopped at exit, is the default: every test
that calls new_bucket() without choosing a server runs on it. Tests that take the `s3_server` fixture
(tests/conftest.py) run twice, on moto and on a real Ceph RGW (bench/cephrgw.py): point_at().

moto is an emulator, not a real object store: it speaks the S3 API over real HTTP (multipart uploads,
ranged GETs, If-None-Match/If-Match on PUT and DELETE, listings), but its conditional PUT is
check-then-write, not atomic (two racing PUTs to one key can both succeed), it accepts any
credentials and has no consistency or durability model of its own. So these tests prove that pyckpt
drives the protocol right, not that a server enforces it under a real race; Ceph does that."""
from __future__ import annotations

import atexit
import os
import subprocess
import uuid
from dataclasses import dataclass

import pytest

from bench import s3server
from tests.conftest import free_port

_server: tuple[subprocess.Popen, str] | None = None
ENV = s3server.ENV


def endpoint() -> str:
    """The server's URL; the AWS_* variables of this process (and so of its children) point at it."""
    global _server
    if _server is None or _server[0].poll() is not None:
        _server = s3server.start(free_port())
        atexit.register(s3server.stop, _server[0])
    return _server[1]


def _running() -> set[str]:
    """The endpoints of the servers this process started that still run."""
    from bench import cephrgw
    moto = _server[1] if _server is not None and _server[0].poll() is None else None
    return {url for url in (moto, cephrgw.running_endpoint()) if url}


@dataclass(frozen=True)
class Server:
    name: str                 # "moto" or "ceph"
    env: dict[str, str]       # the AWS_* settings that point an S3 client at it

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]


def point_at(name: str, monkeypatch) -> Server:
    """Start the named server if needed and point this process's AWS_* variables (and so its
    children's) at it until the test ends (monkeypatch restores them)."""
    if name == "moto":
        server = Server(name, {**ENV, "AWS_ENDPOINT_URL": endpoint()})
    else:
        from bench import cephrgw
        if cephrgw.missing():
            message = f"Ceph is not installed (no {', '.join(cephrgw.missing())}): run `make setup-ceph`"
            if os.environ.get("CI"):
                pytest.fail(message)    # CI installs it in the Makefile: missing means a broken setup
            pytest.skip(message)
        server = Server(name, cephrgw.cluster().env)
    for key, value in server.env.items():
        monkeypatch.setenv(key, value)
    return server


def new_bucket() -> str:
    """A fresh, empty bucket (one per test) on the server the AWS_* variables point at (moto unless
    the test chose another with point_at)."""
    if os.environ.get("AWS_ENDPOINT_URL") not in _running():
        endpoint()
    from pyckpt.s3_store import client

    name = f"t-{uuid.uuid4().hex[:16]}"
    client().create_bucket(Bucket=name)
    return name
