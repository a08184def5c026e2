"""One job of the sharded bench: N gloo ranks (spawned processes), each measuring on its FSDP2 shards.

A job builds every state kind, then (saves=True) measures the limits on each rank's bytes, pyckpt
and DCP saves, async stalls and cold restores on the same N, and keeps the snapshots; it also restores
every snapshot of another rank count listed in `sources` (resharded, N -> this job's M). Each figure is
the slowest rank's (max over ranks); per-rank bytes read/written (/proc/self/io) and peak extra RSS
of the last run of each figure are kept. Rank 0 writes {"runs", "values"} to `out`.
"""
from __future__ import annotations

import json
import os
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from . import sharded_state as ss
from .measure import aligned_buffer, clear, drop_cache, pack, read_direct_limit, read_limit, write_direct_limit, \
    write_limit


def proc_io() -> dict[str, int]:
    out = {}
    with open("/proc/self/io") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("rchar", "wchar", "read_bytes", "write_bytes"):
                out[name] = int(value)
    return out


class Peak:
    """Peak RSS of this process, sampled every 5 ms on a thread (from /proc/self/statm)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.base = self.rss()
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.rss())

    def reset(self) -> None:
        self.peak = self.base = self.rss()

    def extra(self) -> int:
        return max(self.peak, self.rss()) - self.base


class Meter:
    """Times one operation on every rank at once: barrier, run, slowest rank; per-rank counters."""

    def __init__(self, rank: int, settle: float = 0.0):
        self.rank, self.settle = rank, settle
        self.runs: dict[str, list[float]] = {}
        self.values: dict[str, object] = {}
        self.rss = Peak()
        self.shard_read = [0]

    def step(self, key: str, fn) -> float:
        dist.barrier()
        io, self.shard_read[0] = proc_io(), 0
        self.rss.reset()
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        after = proc_io()
        mine = {name: after[name] - io[name] for name in after}
        mine["rss_extra"] = self.rss.extra()
        mine["shard_read_bytes"] = self.shard_read[0]
        slowest = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.runs.setdefault(key, []).append(float(slowest.item()))
        self.values[f"{key}.per_rank"] = gathered
        return seconds

    def slowest(self, key: str, seconds: float) -> None:
        """A figure measured inside an operation (DCP's planning): the slowest rank's."""
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        self.runs.setdefault(key, []).append(float(t.item()))

    def cold(self, *paths: str) -> None:
        """Page cache dropped for these files (rank 0, then everyone waits; measure.drop_cache says
        why it then waits `settle` seconds)."""
        dist.barrier()
        if self.rank == 0:
            self.values["cache_drop_method"] = drop_cache(*paths, settle=self.settle)
        dist.barrier()


def count_shard_reads(meter: Meter) -> None:
    """pyckpt's own count of the bytes each sharded read reads (whole pieces), per step."""
    import pyckpt.reader
    real = pyckpt.reader.ShardRead.start   # (run() starts and waits)

    def counted(self, *args, **kwargs):
        meter.shard_read[0] += self.bytes_read
        return real(self, *args, **kwargs)
    pyckpt.reader.ShardRead.start = counted


def limits(meter: Meter, prefix: str, model, optimizer, workdir: str) -> None:
    """The same bytes as this rank's state, by the same number of ranks at once: one copy into a
    preallocated buffer, O_DIRECT and buffered write+fdatasync, cold buffered and O_DIRECT reads."""
    tensors = ss.local_tensors(model, optimizer)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    aligned = aligned_buffer(nbytes)
    buffer = aligned[:nbytes]
    path = os.path.join(workdir, f"limit-{meter.rank}.bin")
    meter.step(f"{prefix}.limit.copy", lambda: pack(tensors, buffer))
    clear(path)
    meter.step(f"{prefix}.limit.write_fdatasync", lambda: write_limit(path, buffer))
    clear(path)
    ok = [False]
    meter.step(f"{prefix}.limit.write_direct", lambda: ok.__setitem__(0, write_direct_limit(path, aligned)))
    if not ok[0]:
        meter.runs.pop(f"{prefix}.limit.write_direct")
        write_limit(path, aligned)
    meter.cold(*[os.path.join(workdir, f"limit-{r}.bin") for r in range(dist.get_world_size())])
    meter.step(f"{prefix}.limit.read_cold", lambda: read_limit(path, buffer))
    meter.cold(*[os.path.join(workdir, f"limit-{r}.bin") for r in range(dist.get_world_size())])
    meter.step(f"{prefix}.limit.read_direct", lambda: ok.__setitem__(0, read_direct_limit(path, aligned)))
    if not ok[0]:
        meter.runs.pop(f"{prefix}.limit.read_direct")
    dist.barrier()
    clear(path)


class Libs:
    """pyckpt and DCP on one (model, optimizer)."""

    def __init__(self, model, optimizer, coordinator):
        import pyckpt
        self.model, self.optimizer, self.coordinator = model, optimizer, coordinator
        self.runtime = pyckpt.TrainingRuntime()
        self.runtime.register_model(model)
        self.runtime.register_optimizer(optimizer)
        self.plan_seconds = 0.0
        self.async_group = None

    def state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def planner(self):
        """DCP's default save planner (plan caching on where this torch has it), timing its planning."""
        import inspect

        from torch.distributed.checkpoint import DefaultSavePlanner
        owner = self

        class Timed(DefaultSavePlanner):
            pass
        for name in ("create_local_plan", "create_global_plan", "finish_plan"):
            def timed(self, *args, _name=name, **kwargs):
                start = time.perf_counter()
                try:
                    return getattr(DefaultSavePlanner, _name)(self, *args, **kwargs)
                finally:
                    owner.plan_seconds += time.perf_counter() - start
            setattr(Timed, name, timed)
        caching = "enable_plan_caching" in inspect.signature(DefaultSavePlanner.__init__).parameters
        return Timed(enable_plan_caching=True) if caching else Timed()

    def dcp_save(self, path: str, threads: int) -> None:
        import torch.distributed.checkpoint as dcp
        writer = dcp.FileSystemWriter(path, sync_files=True, thread_count=threads)
        dcp.save(self.state(), storage_writer=writer, planner=self.planner())

    def dcp_async(self, path: str):
        """dcp.async_save on a group of its own: its background collectives would otherwise mix with
        the bench's (and a training loop's) on the default group."""
        import torch.distributed.checkpoint as dcp
        if self.async_group is None:
            self.async_group = dist.new_group(backend="gloo")
        response = dcp.async_save(self.state(), storage_writer=dcp.FileSystemWriter(path, sync_files=True),
                                  process_group=self.async_group)
        return getattr(response, "upload_completion", response)

    def dcp_load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        sd = self.state()
        dcp.load(sd, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def check(model, optimizer, ref: list[str], who: str) -> None:
    """Bit-exact on every rank (local shards vs this rank's build; builds agree on full tensors)."""
    ok = torch.tensor([int(ss.local_digests(model, optimizer) == ref)])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not ok.item():
        raise AssertionError(f"{who}: restored state differs from the saved state")


def same_n(meter: Meter, prefix: str, libs: Libs, ref: list[str], base: str, repeat: int) -> None:
    """Saves (pyckpt, DCP with 1 and 4 writer threads), async stalls and cold restores on this N."""
    path, dcp_path = f"{base}/ck.bin", f"{base}-dcp"
    first = time.perf_counter()   # the first async snapshot pays one-time set-up (staging buffer)
    libs.coordinator.snapshot(path, libs.runtime, blocking=False).result()
    meter.values[f"{prefix}.pyckpt.async_blocked_first"] = time.perf_counter() - first
    for _ in range(repeat):
        libs.coordinator.wait()
        meter.step(f"{prefix}.pyckpt.save", lambda: libs.coordinator.snapshot(path, libs.runtime))
        libs.coordinator.wait()
        pending = []
        meter.step(f"{prefix}.pyckpt.async_blocked",
                   lambda: pending.append(libs.coordinator.snapshot(path, libs.runtime, blocking=False)))
        pending[0].result()
        libs.coordinator.wait()
        for threads in (1, 4):
            if meter.rank == 0:
                clear(dcp_path)
            libs.plan_seconds = 0.0
            meter.step(f"{prefix}.dcp.save_t{threads}", lambda: libs.dcp_save(dcp_path, threads))
            meter.slowest(f"{prefix}.dcp.plan_t{threads}", libs.plan_seconds)
        meter.step(f"{prefix}.dcp.get_state_dict", libs.state)
        pending = []
        meter.step(f"{prefix}.dcp.async_blocked", lambda: pending.append(libs.dcp_async(dcp_path + "-async")))
        pending[0].result()
        dist.barrier()
        if meter.rank == 0:
            clear(dcp_path + "-async")
        restores(meter, prefix, libs, ref, base, f"{prefix}.")
    dist.barrier()


def restores(meter: Meter, prefix: str, libs: Libs, ref: list[str], base: str, key: str) -> None:
    """One cold pyckpt restore and one cold DCP load of the snapshots at base, each checked."""
    model, optimizer = libs.model, libs.optimizer
    ss.scramble(model, optimizer)
    meter.cold(f"{base}/ck.bin.pyckpt")
    meter.step(f"{key}pyckpt.restore_cold", lambda: libs.coordinator.restore(f"{base}/ck.bin", libs.runtime))
    check(model, optimizer, ref, f"{key}pyckpt cold restore")
    ss.scramble(model, optimizer)
    meter.cold(f"{base}-dcp")
    meter.step(f"{key}dcp.restore_cold", lambda: libs.dcp_load(f"{base}-dcp"))
    check(model, optimizer, ref, f"{key}dcp cold restore")


def edge_allowance(model, optimizer, saved_world: int) -> int:
    """What a resharded read may read beyond this rank's bytes: pieces are read whole (checksums
    cover whole pieces), so at most one piece at each of the two edges of each local shard, a piece
    being at most pyckpt's SHARD_PIECE and at most the saved chunk (a tensor's bytes / saved ranks)."""
    from pyckpt.shards import SHARD_PIECE
    from torch.distributed.tensor import DTensor
    total = 0
    for t in ss.named_state(model, optimizer).values():
        if isinstance(t, DTensor) and t.to_local().numel():
            chunk = -(-t.numel() * t.element_size() // saved_world)
            total += 2 * min(SHARD_PIECE, chunk)
    return total


def worker(rank: int, world: int, port: int, job: dict) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import pyckpt
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=600))
    mesh = init_device_mesh("cpu", (world,))
    meter = Meter(rank, job["settle"])
    count_shard_reads(meter)
    coordinator = pyckpt.DistributedCoordinator(pyckpt.load_config(environ={}), keep_last=1).initialize()
    workdir, repeat = job["workdir"], job["repeat"]
    for kind in job["kinds"]:
        model, optimizer = ss.build(kind, job["size"], mesh, job["small_tensors"])
        ref, libs = ss.local_digests(model, optimizer), Libs(model, optimizer, coordinator)
        prefix = f"{kind}.n{world}"
        full = ss.full_digests(model, optimizer)
        mine = {"local_bytes": ss.local_bytes(model, optimizer)}
        gathered: list = [None] * world
        dist.all_gather_object(gathered, mine)
        meter.values[f"{prefix}.local_bytes"] = [g["local_bytes"] for g in gathered]
        meter.values[f"{kind}.full_digests.n{world}"] = full
        meter.values[f"{kind}.tensors"] = len(full)
        if job["saves"]:
            for _ in range(repeat):
                limits(meter, prefix, model, optimizer, workdir)
            same_n(meter, prefix, libs, ref, os.path.join(workdir, f"{kind}-n{world}"), repeat)
        for source in job["sources"]:
            allowance: list = [None] * world
            dist.all_gather_object(allowance, edge_allowance(model, optimizer, source))
            meter.values[f"{kind}.n{source}to{world}.edge_allowance"] = allowance
            for _ in range(repeat):
                restores(meter, prefix, libs, ref, os.path.join(workdir, f"{kind}-n{source}"),
                         f"{kind}.n{source}to{world}.")
        del model, optimizer, libs
    coordinator.shutdown()
    meter.rss.stop.set()
    dist.destroy_process_group()
    if rank == 0:
        with open(job["out"], "w") as f:
            json.dump({"runs": meter.runs, "values": meter.values}, f)
