"""Keep a long-running worker's memory bounded without paying for fresh pages on every tensor.

glibc serves allocations below its mmap threshold from the heap and, by default, raises that
threshold (up to 32 MB) each time a large mmapped block is freed. A worker frees large
activation and canvas blocks all the time, so with the default its heap fragments and grows job
by job: on a 4096² result with the compact model the process's peak grew by 50 MB per batch of
tiles, to 1.95 GB, against 1.42 GB with a fixed 4 MB threshold (``benchmarks/worker_memory.py``).

A low threshold has a price, though: every tensor above it is a fresh mapping that the kernel
faults in page by page, and one forward pass makes hundreds of them. At 4 MB the default rrdb
model took 5.4–5.7 s per 128² tile instead of 3.8–4.2 s. So the worker fixes the threshold at 32 MB
(the most glibc accepts: tile-sized activations come from the heap and are reused within a pass)
and, after every forward pass that leaves more than ``TRIM_ABOVE_MB`` free in the heap, returns
the free pages to the system (``malloc_trim``), which is what stops the growth from one pass to
the next. The bar is there because trimmed pages are faulted in again by the next pass: a
one-tile compact pass leaves ~30 MB free and keeps it, a batch of 8 leaves ~100 MB and gives it
back (``malloc_trim`` itself took 3 and 15 ms after them).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from typing import Any

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
#: Free heap memory a worker may keep between forward passes before it is given back.
TRIM_ABOVE_MB = 64


_MALLINFO2_FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"


class _MallInfo2(ctypes.Structure):
    """glibc's ``struct mallinfo2``: ``fordblks`` is the heap's free bytes, all arenas together."""

    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS.split()]


@functools.cache
def _glibc() -> Any:
    """The C library if it is glibc (has mallopt and malloc_trim); None elsewhere (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not (hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")):
            return None
    except OSError:
        return None
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    if hasattr(libc, "mallinfo2"):  # glibc >= 2.33
        libc.mallinfo2.restype = _MallInfo2
    return libc


def fix_mmap_threshold(megabytes: int) -> bool:
    """Make glibc mmap every allocation of ``megabytes`` or more (0: leave glibc's default).
    True if applied; False where the C library is not glibc: nothing to do there."""
    libc = _glibc()
    if megabytes <= 0 or libc is None:
        return False
    size = megabytes << 20
    applied = bool(libc.mallopt(M_MMAP_THRESHOLD, size)) and bool(libc.mallopt(M_TRIM_THRESHOLD, size))
    if not applied:
        log.warning("could not fix glibc's mmap threshold at %d MB", megabytes)
    return applied


def release_free_memory(above_mb: int = 0) -> bool:
    """Give the heap's free pages back to the system (glibc's ``malloc_trim``) if it holds more
    than ``above_mb`` free (where glibc cannot tell, always). True if memory went back."""
    libc = _glibc()
    if libc is None:
        return False
    if above_mb and hasattr(libc, "mallinfo2") and libc.mallinfo2().fordblks <= above_mb << 20:
        return False
    return bool(libc.malloc_trim(0))
