"""An S3 server for the tests: moto's standalone server (`moto[server]`), started once per pytest
process in its own process on 127.0.0.1 and a free port (bench/s3server.py), stopped at exit.

moto is an emulator, not a real object store: it speaks the S3 API over real HTTP (multipart uploads,
ranged GETs, If-None-Match/If-Match on PUT and DELETE, listings), but its conditional PUT is
check-then-write, not atomic (two racing PUTs to one key can both succeed), it accepts any
credentials and has no consistency or durability model of its own. So these tests prove that pyckpt
drives the protocol right, not that a server enforces it under a real race."""
from __future__ import annotations

import atexit
import subprocess
import uuid

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


def new_bucket() -> str:
    """A fresh, empty bucket (one per test)."""
    endpoint()
    from pyckpt.s3_store import client

    name = f"t-{uuid.uuid4().hex[:16]}"
    client().create_bucket(Bucket=name)
    return name
