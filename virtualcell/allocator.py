"""Large tensors without page faults: glibc's malloc kept from handing big blocks back to the kernel during a run.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and gives it
back with ``munmap`` when the tensor dies, so the next step's tensor of the same size starts
again from untouched pages: the kernel faults in and zeroes every 4 KiB page. A training step
allocates several ``rows x positions x vocabulary`` float tensors (logits, their masks and
gradients: 117 MB each at 9,000 genes), so much of its time went to the kernel: on 9,015 genes,
16.7 million minor page faults and 38% of the CPU time in 60 steps. Kept on the heap: 0.3
million and 7%, and 2.3x the steps per minute; 1.05-1.12x on panels of 300 to 2,000 genes
(``experiments/bench_allocator.py``).

:func:`large_blocks_on_heap` raises the mmap and trim thresholds for the duration of a run, so
freed blocks stay in the process's heap and are reused, then sets them where glibc's own rule
settles after large frees and returns the free memory to the system (``malloc_trim``). Resident memory stays near the run's
peak while it lasts (measured at 9,015 genes: 2.0 GB through 600 steps and the verdict, against
1.0 GB, for 238 s against 497 s; 0.7 GB once the run ended). A heap can also fragment: blocks that live long, made between
the large ones, keep freed large blocks from being reused whole, and the heap grows instead (seen
under ``torch.profiler`` with ``record_shapes``: 24 GB in 30 steps). So a watcher thread reads the
process's resident memory twice a second and, past :data:`RESIDENT_SHARE` of what the process could
reach when the run began (its resident memory plus what is free to it: the machine's available memory, or less
where its cgroup's limit leaves less: a Slurm ``--mem`` job, a container), hands large blocks back to ``mmap`` for
the rest of the run (logged).
Elsewhere than glibc on Linux (macOS, musl) it does nothing, as it does when the user has tuned
malloc through ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` themselves.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["large_blocks_on_heap", "HeapRun", "HEAP_THRESHOLD", "RESIDENT_SHARE"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
# on the way out: where glibc's own rule settles once large blocks have been freed (it raises the mmap threshold to the
# size of each freed mmapped block, up to 32 MiB on 64-bit systems, and keeps trim at twice that). Any mallopt ends
# that rule for the process, so restoring the 128 KiB start would send every later block above it to mmap again
# (measured: a screen in such a process 8.8 / 12.4 s against 7.0 / 7.5 s with these values;
# experiments/results/attempts/allocator_steps/screen_after_heap.py)
_AFTER_MMAP_THRESHOLD = 32 * 2**20
_AFTER_TRIM_THRESHOLD = 2 * _AFTER_MMAP_THRESHOLD
HEAP_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): blocks up to 2 GiB come from the heap
RESIDENT_SHARE = 0.6  # of (resident + available memory) at the start: past it, large blocks go back to mmap
_WATCH_S = 0.5
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_depth = 0
_watch: _Watch | None = None


@dataclass
class HeapRun:
    """What :func:`large_blocks_on_heap` did: ``applied`` (the thresholds were raised) and ``released``
    (the watcher handed large blocks back to mmap when resident memory passed ``max_resident`` bytes)."""

    applied: bool
    max_resident: int | None = None
    released: bool = False


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc on Linux (``/proc`` for the watcher), else ``None``."""
    if not os.path.exists("/proc/self/statm"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def _resident() -> int:
    """This process's resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _available() -> int:
    """The memory free to this process in bytes: the machine's available memory (``MemAvailable``), or what its
    cgroup's limit leaves (:func:`_cgroup_free`) where that is less."""
    machine = None
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                machine = int(line.split()[1]) * 1024
                break
    if machine is None:
        machine = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    cgroup = _cgroup_free()
    return machine if cgroup is None else min(machine, cgroup)


# where the kernel shows this process's cgroups (module constants, so that a test can point them at a fake tree)
CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
_NO_LIMIT = 2**62  # cgroup v1 writes "no limit" as the largest page-aligned 63-bit number
# (limit, usage, memory.stat key of the file cache the kernel reclaims before an OOM kill) for cgroup v2 and v1
_V2 = ("memory.max", "memory.current", "inactive_file")
_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _read_int(path: Path) -> int | None:
    """A cgroup file's number; ``None`` where it is absent, unreadable or ``max`` (no limit)."""
    try:
        text = path.read_text().strip()
    except (OSError, ValueError):  # (ValueError: bytes that are not text)
        return None
    return int(text) if text.isdigit() else None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _cgroup_free() -> int | None:
    """Bytes this process's cgroups still let it take: the least, over its memory cgroup and each above it that has
    a limit, of the limit minus the usage (the inactive file cache counted free, as the kernel reclaims it before an
    OOM kill). cgroup v2 (``memory.max``, ``memory.current``) and v1's memory controller (``memory.limit_in_bytes``,
    ``memory.usage_in_bytes``); ``None`` where no cgroup limits memory ("max", no such files: not Linux)."""
    try:
        lines = Path(PROC_CGROUP).read_text().splitlines()
    except (OSError, ValueError):  # (ValueError: bytes that are not text: read as no limit)
        return None
    root = Path(CGROUP_ROOT)
    free: list[int] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, where = parts
        if controllers == "":
            base, files = root, _V2
        elif "memory" in controllers.split(","):
            base, files = root / "memory", _V1
        else:
            continue
        # the process's own cgroup and those above it up to the mount's root (in a container the mount's root is the
        # container's own cgroup, and the path /proc names may not exist below it: the root is still read)
        folder = base / where.strip("/")
        for d in (folder, *folder.parents):
            limit = _read_int(d / files[0])
            if limit is not None and limit < _NO_LIMIT:
                used = (_read_int(d / files[1]) or 0) - _stat(d / "memory.stat", files[2])
                free.append(max(0, limit - max(0, used)))
            if d == base:
                break
    return min(free) if free else None


def _restore(libc: ctypes.CDLL) -> None:
    libc.mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
    libc.malloc_trim(0)


class _Watch(threading.Thread):
    """Hands large blocks back to mmap once the process's resident memory passes ``heap.max_resident``."""

    def __init__(self, libc: ctypes.CDLL, run: HeapRun) -> None:
        super().__init__(name="virtualcell-heap-watch", daemon=True)
        self.libc, self.heap, self.stop = libc, run, threading.Event()

    def run(self) -> None:  # noqa: D102
        while not self.stop.wait(_WATCH_S):
            resident = _resident()
            if resident > self.heap.max_resident:
                with _lock:
                    _restore(self.libc)
                    self.heap.released = True
                log.warning("resident memory reached %.1f GB (limit %.1f GB): large tensors go back to mmap for the "
                            "rest of this run (slower steps on large gene panels, but the heap stops growing)",
                            resident / 1e9, self.heap.max_resident / 1e9)
                return


@contextlib.contextmanager
def large_blocks_on_heap(max_resident: int | None = None) -> Iterator[HeapRun]:
    """Within the block, freed large blocks stay in the heap for the next allocation; yields a :class:`HeapRun`.

    ``max_resident``: bytes of resident memory past which the watcher hands large blocks back to
    mmap (default: :data:`RESIDENT_SHARE` of this process's resident memory plus the memory free to it
    now: the machine's available memory, or what its cgroup's limit leaves where that is less). Nested and concurrent uses share the outermost's setting and watcher; it sets the
    thresholds where glibc's own rule settles after large frees (mmap 32 MiB, trim 64 MiB) and trims the
    heap on the way out.
    """
    global _depth, _watch
    libc = _glibc()
    if libc is None or any(os.environ.get(k) for k in _ENV):
        yield HeapRun(applied=False)
        return
    with _lock:
        if _depth == 0:
            limit = max_resident if max_resident is not None else int(RESIDENT_SHARE * (_resident() + _available()))
            run = HeapRun(applied=bool(libc.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD)
                                       and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD)), max_resident=limit)
            if run.applied:
                _watch = _Watch(libc, run)
                _watch.start()
            else:
                log.debug("mallopt refused the heap thresholds; large tensors keep glibc's mmap")
        else:
            run = _watch.heap if _watch is not None else HeapRun(applied=False)
        _depth += 1
    try:
        yield run
    finally:
        with _lock:
            _depth -= 1
            watch = _watch if _depth == 0 else None
            if _depth == 0:
                _watch = None
        if watch is not None:  # (stopped outside the lock: a watcher that is releasing takes it)
            watch.stop.set()
            watch.join()
        with _lock:
            if _depth == 0:  # (unless another run began meanwhile: its own exit restores)
                _restore(libc)
