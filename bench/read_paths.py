"""What a cold read of one data file can reach on this machine, by read pattern: the limit a restore's
read is measured against, pyckpt's reader's pattern, and the patterns it was chosen over.

    python -m bench.read_paths --size-gib 1.5 --repeat 3 --workdir /var/tmp

pyckpt's reader (pyckpt/reader.py) reads a data file on its helper threads in jobs of up to 16 MiB, each
in 4 MiB O_DIRECT windows into that thread's huge-page buffer, and copies each window's bytes into the
tensors they belong to. The patterns, on one file of --size-gib bytes, its page cache dropped before
each read (bench.measure.drop_cache, --settle seconds after):

  limit         one thread, 64 MiB O_DIRECT reads into a huge-page buffer (bench.sharded's limit.read_direct)
  windows       the reader's I/O alone: its threads, its jobs, its windows, nothing copied
  windows_copy  the reader's pattern: as windows, each window copied into ordinary memory
  into_pages    the reader's threads and jobs, 4 MiB O_DIRECT reads straight into ordinary memory: what a
                reader could do without the windows, were each tensor's memory aligned to its bytes in
                the file (torch's allocator puts a large tensor 64 bytes past a page boundary)
  into_scattered  as into_pages, into memory whose pages were first touched in a random order
  buffered      one thread, 16 MiB buffered reads into ordinary memory (bench.sharded's limit.read_cold)

"Ordinary memory" is a touched anonymous mapping without huge-page advice, as torch's allocator hands
out a large tensor. Touched in order, its pages are mostly neighbours in physical memory. Touched in a
random order (into_scattered) they are not, and a direct read into them is cut into more, smaller
disk requests (at most max_segments pages each); the pages of tensors that have lived a while lie
between the two (docs/PERFORMANCE.md, "Stop 42"). The `req KiB` column, the disk's mean request size
during each pattern (from /sys/dev/block/<the file's device>/stat; "-" where there is none), shows
it. Every pattern that fills memory is checked against the file's checksum. Where the filesystem
refuses O_DIRECT only `buffered` runs.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash

from pyckpt.posix_store import PosixSource
from pyckpt.reader import _DIRECT_WINDOW
from pyckpt.sysio import aligned_buffers

from .measure import drop_cache, median, spread

LIMIT_REQUEST = 64 << 20     # bench.measure.read_direct_limit's request size
BUFFERED_REQUEST = 16 << 20  # bench.measure.read_limit's
PATTERNS = ("limit", "windows", "windows_copy", "into_pages", "into_scattered", "buffered")


def ordinary_memory(nbytes: int, scattered: bool = False) -> memoryview:
    """Touched anonymous memory without huge-page advice, as a large torch tensor gets it; `scattered`:
    its pages touched in a random order, so that neighbours in it are seldom neighbours in physical memory."""
    region = mmap.mmap(-1, max(nbytes, 1))
    data = np.frombuffer(region, dtype=np.uint8)
    if scattered:
        data[np.random.default_rng(1).permutation(len(data) // mmap.PAGESIZE) * mmap.PAGESIZE] = 0
    data.fill(0)
    return memoryview(region)[:nbytes]


class Reads:
    """The patterns on one file; the memory each reads into is allocated and touched once, up front."""

    def __init__(self, path: str, threads: int, job: int, window: int):
        self.path, self.threads, self.job, self.window = path, threads, job, window
        self.size = os.path.getsize(path)
        self.huge = aligned_buffers(1, self.size)[0]
        self.dest = ordinary_memory(self.size)
        self.scattered = ordinary_memory(self.size, scattered=True)
        self.windows = aligned_buffers(threads, window)

    def wipe(self) -> None:
        """Overwrite the memory the patterns fill (untimed): each read's check then sees only its own bytes."""
        for view in (self.huge, self.dest, self.scattered):
            np.frombuffer(view, dtype=np.uint8).fill(0)

    def run(self, pattern: str) -> memoryview | None:
        """Read the file once with `pattern`; the memory it filled (None: nothing is kept)."""
        fd = os.open(self.path, os.O_RDONLY if pattern == "buffered" else os.O_RDONLY | os.O_DIRECT)
        try:
            if pattern in ("limit", "buffered"):
                into, request = (self.huge, LIMIT_REQUEST) if pattern == "limit" else (self.dest, BUFFERED_REQUEST)
                for pos in range(0, self.size, request):
                    self._read(fd, pos, into[pos: pos + request])
                return into
            into = self.scattered if pattern == "into_scattered" else self.dest
            mine = threading.local()   # each thread's window, kept across its jobs as the reader's threads do
            windows = iter(self.windows)

            def job(start: int) -> None:
                for pos in range(start, min(start + self.job, self.size), self.window):
                    if pattern in ("into_pages", "into_scattered"):
                        self._read(fd, pos, into[pos: pos + self.window])
                        continue
                    if not hasattr(mine, "window"):
                        mine.window = next(windows)
                    got = self._read(fd, pos, mine.window)
                    if pattern == "windows_copy":
                        np.frombuffer(self.dest, dtype=np.uint8)[pos: pos + got] = \
                            np.frombuffer(mine.window, dtype=np.uint8, count=got)

            with ThreadPoolExecutor(self.threads) as pool:
                list(pool.map(job, range(0, self.size, self.job)))
            return None if pattern == "windows" else into
        finally:
            os.close(fd)

    def _read(self, fd: int, pos: int, view: memoryview) -> int:
        """Read into `view` from `pos` until it is full or the file ends; the bytes read (the file's size
        is a whole number of 4 KiB blocks, so every O_DIRECT request is too)."""
        want, got = min(len(view), self.size - pos), 0
        while got < want:
            more = os.preadv(fd, [view[got:]], pos + got)
            if more <= 0:
                raise OSError(f"{self.path}: read {got} of {want} bytes at {pos}")
            got += more
        return got


def disk_counters(path: str):
    """A function giving (reads completed, sectors read) of the device holding `path`, or None where the
    kernel does not show its block statistics (a tmpfs, a container without /sys)."""
    dev = os.stat(path).st_dev
    stat = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat"
    if not os.path.exists(stat):
        return None

    def read() -> tuple[int, int]:
        with open(stat) as f:
            fields = f.read().split()
        return int(fields[0]), int(fields[2])
    return read


def write_file(path: str, nbytes: int) -> str:
    """A file of nbytes of random bytes (64 MiB repeated), fsynced; its xxh3 checksum."""
    block = np.random.default_rng(0).integers(0, 256, size=min(nbytes, 64 << 20), dtype=np.uint8).tobytes()
    digest = xxhash.xxh3_64()
    with open(path, "wb") as f:
        left = nbytes
        while left:
            part = block[: min(left, len(block))]
            f.write(part)
            digest.update(part)
            left -= len(part)
        f.flush()
        os.fsync(f.fileno())
    return digest.hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.read_paths", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=1.5, help="size of the file read")
    p.add_argument("--repeat", type=int, default=3, help="reads per pattern (medians are reported)")
    p.add_argument("--settle", type=float, default=4.0, help="seconds between a cache drop and a read")
    p.add_argument("--workdir", default=None, help="where the file is written (a real disk, not tmpfs)")
    p.add_argument("--out", default=None, help="JSON file of every read's seconds")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.size_gib <= 0 or args.settle < 0:
        p.error(f"--repeat must be at least 1 (got {args.repeat}), --size-gib above 0 (got {args.size_gib:g}) "
                f"and --settle at least 0 (got {args.settle:g})")

    nbytes = max(int(args.size_gib * (1 << 30)) // 4096 * 4096, 4096)
    threads = 4    # pyckpt.sysio.helper_pool's
    workdir = tempfile.mkdtemp(prefix="pyckpt-readpaths-", dir=args.workdir)
    path = os.path.join(workdir, "data.bin")
    try:
        digest = write_file(path, nbytes)
        reads = Reads(path, threads, PosixSource.job_bytes, _DIRECT_WINDOW)
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
            patterns = PATTERNS
        except OSError:   # tmpfs and some others
            patterns = ("buffered",)
        seconds: dict[str, list[float]] = {name: [] for name in patterns}
        requests = {name: [0, 0] for name in patterns}   # reads completed, sectors: summed over the rounds
        counters = disk_counters(path)
        for _ in range(args.repeat):   # the patterns interleaved: the disk's speed drifts over minutes
            for name in patterns:
                reads.wipe()
                drop_cache(path, settle=args.settle)
                before = counters() if counters else (0, 0)
                start = time.perf_counter()
                filled = reads.run(name)
                seconds[name].append(time.perf_counter() - start)
                after = counters() if counters else (0, 0)
                requests[name][0] += after[0] - before[0]
                requests[name][1] += after[1] - before[1]
                if filled is not None and xxhash.xxh3_64_hexdigest(filled[:nbytes]) != digest:
                    raise AssertionError(f"{name}: the bytes read differ from the file's")
    finally:
        shutil.rmtree(workdir)
    print(f"# python -m bench.read_paths {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"# {nbytes / 2**30:.2f} GiB file; {threads} threads, {PosixSource.job_bytes >> 20} MiB jobs, "
          f"{_DIRECT_WINDOW >> 20} MiB windows; medians of {args.repeat}, cache dropped + {args.settle:g} s before each")
    base = median(seconds["limit"]) if "limit" in seconds else None
    print(f"{'pattern':14} {'median s':>9} {'spread':>7} {'GB/s':>6} {'x limit':>8} {'req KiB':>8}  runs")
    request_kib = {name: sectors * 512 / count / 1024 if count else None for name, (count, sectors) in requests.items()}
    for name, values in seconds.items():
        m = median(values)
        ratio = f"{m / base:8.2f}" if base else f"{'-':>8}"
        kib = f"{request_kib[name]:8.0f}" if request_kib[name] else f"{'-':>8}"
        print(f"{name:14} {m:9.3f} {spread(values):6.0%} {nbytes / m / 1e9:6.2f} {ratio} {kib}  "
              + " ".join(f"{v:.3f}" for v in values))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bytes": nbytes, "threads": threads, "seconds": seconds, "request_kib": request_kib}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
