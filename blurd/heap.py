"""Keeping the daemon's heap from creeping up over days of work (glibc only).

glibc serves blocks of 128 KiB and more with mmap, but raises that threshold each time such a
block is freed (up to 32 MiB). From then on the 1 MiB buffers of hashing, copying and
downloading come from the per-thread heaps, whose free space fragments: in ``scripts/soak``
the daemon's RSS kept growing by about 0.5 MiB per 1,000 files after its statements and
caches had settled (60 → 65 MiB over 10,000 files). With the threshold fixed at 128 KiB it
stayed flat after the second thousand (60, 62, 62, 62, 62, 63 MiB over 6,000 files); each
large buffer then costs an mmap and a munmap, microseconds against the I/O it serves.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value


def fix_mmap_threshold() -> bool:
    """Pin glibc's mmap threshold; False where the C library is not glibc (musl, say)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
