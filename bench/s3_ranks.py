"""One rank count of the S3 bench: N gloo ranks (spawned processes) with the same replicated state.

Each round, on every rank at once (the slowest rank's time is the figure): the server's limit on this
rank's 1/N of the state's bytes (upload, then download), pyckpt's snapshot, async snapshot and
restore, DCP's save (1 and 4 threads) and load through fsspec/s3fs. Rank 0 also records the moto
server's CPU seconds during each figure, and writes {"runs", "values"} to job["out"].
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import torch
import torch.distributed as dist

from . import libs
from . import state as st
from .measure import pack
from .sharded_ranks import Meter

DCP_THREADS = (1, 4)


class S3Meter(Meter):
    """Meter.step, plus the server's CPU seconds during the step (rank 0; the server is local)."""

    def __init__(self, rank: int, server_pids: list[int], collect: list[str]):
        super().__init__(rank)
        self.stats = [f"/proc/{pid}/stat" for pid in server_pids]   # moto's process; Ceph's osd and radosgw
        self.collect = collect

    def server_cpu(self) -> float:
        ticks = 0
        for stat in self.stats:
            with open(stat) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])      # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")

    def step(self, key: str, fn) -> float:
        if self.collect and self.rank == 0:     # Ceph: free what earlier figures deleted, before this one
            subprocess.run(self.collect, check=True, capture_output=True, timeout=600)
        before = self.server_cpu() if self.rank == 0 else 0.0
        seconds = super().step(key, fn)
        if self.rank == 0:
            self.values.setdefault(f"{key}.server_cpu", []).append(self.server_cpu() - before)
        return seconds


class DCPFsspec(libs.DCP):
    """DCP through fsspec: FsspecWriter/FsspecReader on s3:// paths (s3fs), `threads` writer threads.
    No listing cache: every rank must see the .metadata another rank just wrote."""

    def __init__(self, model, optimizer, threads: int):
        super().__init__(model, optimizer)
        self.threads = threads

    def save(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
        dcp.save(self._state(), storage_writer=FsspecWriter(path, thread_count=self.threads,
                                                            use_listings_cache=False))

    def restore(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
        from torch.distributed.checkpoint.state_dict import set_state_dict
        sd = self._state()
        dcp.load(sd, storage_reader=FsspecReader(path, use_listings_cache=False))
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class Limit:
    """The server's limit with pyckpt's client on this rank's share of the state's bytes: s3transfer's
    multipart upload (pyckpt's part size and parts in flight), and ranged GETs of part-sized ranges,
    as many at once as pyckpt's reader threads, read into a buffer."""

    def __init__(self, bucket: str, key: str, share: torch.Tensor):
        from boto3.s3.transfer import TransferConfig

        from pyckpt.s3_store import PART_SIZE, UPLOADS_IN_FLIGHT, client
        self.s3, self.bucket, self.key, self.share = client(), bucket, key, share
        self.part, self.threads = PART_SIZE, UPLOADS_IN_FLIGHT
        self.config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE,
                                     max_concurrency=UPLOADS_IN_FLIGHT, use_threads=True,
                                     preferred_transfer_client="classic")
        self.into = torch.empty_like(share)

    def upload(self, body: io.BytesIO) -> None:
        self.s3.upload_fileobj(body, self.bucket, self.key, Config=self.config)

    def download(self) -> None:
        view = memoryview(self.into.numpy())

        def get(start: int) -> None:
            end = min(start + self.part, len(view))
            body = self.s3.get_object(Bucket=self.bucket, Key=self.key, Range=f"bytes={start}-{end - 1}")["Body"]
            pos = start
            while pos < end:
                got = body.readinto(view[pos:end])
                if not got:
                    raise RuntimeError(f"s3://{self.bucket}/{self.key}: short read at {pos} of {end}")
                pos += got
        with ThreadPoolExecutor(self.threads) as pool:
            list(pool.map(get, range(0, len(view), self.part)))

    def check(self) -> None:
        if not torch.equal(self.into, self.share):
            raise AssertionError(f"s3://{self.bucket}/{self.key}: downloaded bytes differ from the uploaded ones")


def _share(model, optimizer, rank: int, world: int) -> torch.Tensor:
    """This rank's 1/world of the state's bytes (packed in one buffer, as pyckpt's data file has them)."""
    everything = torch.empty(st.state_bytes(model, optimizer), dtype=torch.uint8)
    pack(st.state_tensors(model, optimizer), everything)
    per = -(-everything.numel() // world)
    return everything[rank * per: (rank + 1) * per].clone()


class Round:
    """The figures of one round, in order, on this rank's state (checked after every restore)."""

    def __init__(self, meter: S3Meter, job: dict, world: int):
        self.meter, self.bucket, self.who = meter, job["bucket"], f"{world} rank(s)"
        self.model, self.optimizer = st.build("large", job["size"])       # same seed: replicated (DDP) state
        self.ref = st.fingerprint(self.model, self.optimizer)
        share = _share(self.model, self.optimizer, meter.rank, world)
        self.limit = Limit(self.bucket, f"limit/n{world}-rank{meter.rank}.bin", share)
        self.body = io.BytesIO(share.numpy().tobytes())       # s3transfer reads the parts from a file object
        self.pyckpt = libs.Pyckpt(self.model, self.optimizer)
        self.dcps = [DCPFsspec(self.model, self.optimizer, threads) for threads in DCP_THREADS]

    def run(self) -> None:
        self.limits()
        self.snapshots()
        for lib in self.dcps:
            self.dcp(lib)

    def limits(self) -> None:
        self.body.seek(0)
        self.meter.step("limit.upload", lambda: self.limit.upload(self.body))
        self.meter.step("limit.download", self.limit.download)
        self.limit.check()

    def snapshots(self) -> None:
        """pyckpt: a blocking snapshot; an async one (the stall, and the time until committed); a restore."""
        path, lib, blocked = f"s3://{self.bucket}/pyckpt/checkpoint.bin", self.pyckpt, []
        self.meter.step("pyckpt.save", lambda: lib.save(path))
        lib.settle()                  # the deletion of the version it dropped: not part of the next figure

        def snapshot_async() -> None:
            start = time.perf_counter()
            wait = lib.async_save(path)
            blocked.append(time.perf_counter() - start)
            wait()
        self.meter.step("pyckpt.async_durable", snapshot_async)
        self.meter.slowest("pyckpt.async_blocked", blocked[0])
        st.scramble(self.model, self.optimizer)
        lib.settle()
        self.meter.step("pyckpt.restore", lambda: lib.restore(path))
        st.assert_equal(self.model, self.optimizer, self.ref, f"{self.who}: pyckpt restore")

    def dcp(self, lib: DCPFsspec) -> None:
        where = f"s3://{self.bucket}/dcp-t{lib.threads}"
        _clear_prefix(self.meter.rank, where)
        self.meter.step(f"dcp.save_t{lib.threads}", lambda: lib.save(where))
        st.scramble(self.model, self.optimizer)
        self.meter.step(f"dcp.restore_t{lib.threads}", lambda: lib.restore(where))
        st.assert_equal(self.model, self.optimizer, self.ref, f"{self.who}: DCP ({lib.threads} threads) load")


def _clear_prefix(rank: int, url: str) -> None:
    """Rank 0 deletes a previous DCP checkpoint (DCP overwrites, but 1 and 4 threads write other files)."""
    dist.barrier()
    if rank == 0:
        import s3fs
        fs = s3fs.S3FileSystem(use_listings_cache=False)
        if fs.exists(url):
            fs.rm(url, recursive=True)
    dist.barrier()


def worker(rank: int, world: int, port: int, job: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    meter = S3Meter(rank, job["server_pids"], job.get("collect", []))
    bench = Round(meter, job, world)
    meter.values["state_bytes"] = st.state_bytes(bench.model, bench.optimizer)
    for _ in range(job["repeat"]):
        bench.run()
    mine = {"limit": bench.limit.share.numel(), "pyckpt": bench.pyckpt.last_info.bytes_written}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, mine)
    bench.pyckpt.close()
    meter.rss.stop.set()
    dist.destroy_process_group()
    if rank == 0:
        meter.values["bytes_per_rank"] = {name: [g[name] for g in gathered] for name in mine}
        with open(job["out"], "w") as f:
            json.dump({"runs": meter.runs, "values": meter.values}, f)
