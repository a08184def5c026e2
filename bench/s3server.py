"""moto's standalone S3 server (`moto[server]`) in its own process on 127.0.0.1: started by the S3
bench (bench/s3.py) and by the tests (tests/s3server.py). Its own process, because in the client's
process the server's request handling competes with the client for the GIL (uploads drop by half)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_REGION": "us-east-1",
       "AWS_EC2_METADATA_DISABLED": "true"}     # never ask a cloud metadata address for credentials


def start(port: int, log: str | None = None, host: str = "127.0.0.1") -> tuple[subprocess.Popen, str]:
    """Start the server on host:port (its request log and errors to the file `log`, if given),
    point this process's AWS_* variables (and so its children's) at it, and return once it answers:
    (the process, its URL)."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()
    url = f"http://{host}:{port}"
    os.environ.update(ENV, AWS_ENDPOINT_URL=url)
    try:
        _wait_ready(proc)
    except BaseException:
        stop(proc)
        raise
    return proc, url


def _wait_ready(proc: subprocess.Popen) -> None:
    import botocore.exceptions

    from pyckpt.s3_store import client

    deadline = time.monotonic() + 60
    while True:
        try:
            client().list_buckets()
            return
        except botocore.exceptions.EndpointConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start (is moto[server] installed? "
                                   "pip install -r requirements-dev.txt)") from None
            time.sleep(0.1)


def stop(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
