"""Large tensors without page faults: glibc's malloc kept from handing big blocks back to the kernel during a run.

PyTorch's CPU tensors come from the C library's ``malloc``. glibc serves every block above its
mmap threshold (128 KiB, rising with use to at most 32 MiB) with a fresh ``mmap`` and gives it
back with ``munmap`` when the tensor dies, so the next step's tensor of the same size starts
again from untouched pages: the kernel faults in and zeroes every 4 KiB page. A training step
allocates several ``rows x positions x vocabulary`` float tensors (logits, their masks and
gradients: 117 MB each at 9,000 genes), so much of its time went to the kernel: on 9,015 genes,
16.5 million minor page faults and 36% of the CPU time in 60 steps. Kept on the heap: 0.3
million and 6%, and 2.1x the steps per minute; about 1.06x on panels of 300 to 2,000 genes
(``experiments/bench_allocator.py``).

:func:`large_blocks_on_heap` raises the mmap and trim thresholds for the duration of a run, so
freed blocks stay in the process's heap and are reused, then restores glibc's defaults and
returns the free memory to the system (``malloc_trim``). Resident memory stays at the run's peak
while it lasts. Elsewhere than glibc (macOS, musl) it does nothing, as it does when the user has
tuned malloc through ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` themselves.
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

__all__ = ["large_blocks_on_heap", "HEAP_THRESHOLD"]

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h> parameter numbers
_M_MMAP_THRESHOLD = -3
_DEFAULT_THRESHOLD = 128 * 1024  # glibc's default for both
HEAP_THRESHOLD = 2**31 - 1  # the largest value mallopt takes (an int): blocks up to 2 GiB come from the heap
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_lock = threading.Lock()
_depth = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``gnu_get_libc_version``), else ``None``."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 (glibc only)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def large_blocks_on_heap() -> Iterator[bool]:
    """Within the block, freed large blocks stay in the heap for the next allocation; yields whether it applied.

    Nested and concurrent uses share one setting: the outermost restores glibc's defaults
    (128 KiB for both thresholds) and trims the heap on the way out.
    """
    global _depth
    libc = _glibc()
    if libc is None or any(os.environ.get(k) for k in _ENV):
        yield False
        return
    with _lock:
        if _depth == 0:
            ok = libc.mallopt(_M_MMAP_THRESHOLD, HEAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_THRESHOLD)
            if not ok:
                log.debug("mallopt refused the heap thresholds; large tensors keep glibc's mmap")
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
                libc.malloc_trim(0)
