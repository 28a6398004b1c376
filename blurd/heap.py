"""Keeping the daemon's heap from creeping up over days of work (glibc only).

glibc serves blocks of 128 KiB and more with mmap, but raises that threshold each time such a
block is freed (up to 32 MiB). From then on the 1 MiB buffers of hashing, copying and
downloading come from the per-thread heaps, whose free space fragments: in ``scripts/soak``
the daemon's RSS kept growing by about 0.5 MiB per 1,000 files after its statements and
caches had settled (60 → 65 MiB over 10,000 files). With the threshold fixed at 128 KiB it
stayed flat after the second thousand (60, 62, 62, 62, 62, 63 MiB over 6,000 files); each
large buffer then costs an mmap and a munmap, microseconds against the I/O it serves.

That holds only while a buffer is no larger than what it is filled with: a 1 MiB read of a
16 KiB file still maps (and unmaps) the whole mebibyte. ``read_size`` sizes each read to what
is left of the file; hashing a 16 KiB file took 145 µs with 1 MiB reads and 31 µs with sized
ones (timeit, threshold pinned).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterator
from typing import BinaryIO

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


def read_size(fh: BinaryIO, limit: int) -> int:
    """The size of read that takes what is left of ``fh`` in one go (one byte more, to see the
    end), at most ``limit``; a file that grows meanwhile is still read to its end."""
    left = os.fstat(fh.fileno()).st_size - fh.tell()
    return max(1, min(limit, left + 1))


def chunks(fh: BinaryIO, limit: int) -> Iterator[bytes]:
    """``fh``'s bytes from where it stands to its end, in reads sized by ``read_size``."""
    size = read_size(fh, limit)
    while chunk := fh.read(size):
        yield chunk
