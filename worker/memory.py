"""Keep a long-running worker's heap from growing with the jobs it has run.

glibc serves allocations below its mmap threshold from the heap and, by default, raises that
threshold (up to 32 MB) each time a large mmapped block is freed. A worker frees large
activation and canvas blocks all the time, so after a few forward passes its mid-sized tensors
(4–32 MB) come from a heap that fragments and never shrinks: measured on a 4096² result with the
compact model, the process's peak grew by 50 MB per batch of tiles, to 1.95 GB, against 1.42 GB
with a fixed threshold (``benchmarks/worker_memory.py``). A fixed threshold also turns off the
adaptation, so blocks from that size up always go back to the system when freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


def fix_mmap_threshold(megabytes: int) -> bool:
    """Make glibc mmap every allocation of ``megabytes`` or more (0: leave glibc's default).
    True if applied; False where the C library is not glibc (musl, macOS): nothing to do there."""
    if megabytes <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    size = megabytes << 20
    applied = bool(mallopt(M_MMAP_THRESHOLD, size)) and bool(mallopt(M_TRIM_THRESHOLD, size))
    if not applied:
        log.warning("could not fix glibc's mmap threshold at %d MB", megabytes)
    return applied
