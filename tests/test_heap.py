"""blurd.heap: large buffers stay in mmap, so freeing them gives the memory back."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest

# In a child process, so that the test's own heap settings are not changed: allocate and free
# a 1 MiB buffer (as a C block), then allocate another and count glibc's mmapped blocks.
PROBE = """
import ctypes, sys
from blurd import heap
if sys.argv[1] == "fixed":
    assert heap.fix_mmap_threshold()
libc = ctypes.CDLL(None)
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(1 << 20))  # glibc raises its threshold here, unless it is fixed
block = libc.malloc(1 << 20)
print(libc.mallinfo2().hblks)
"""


def mmapped_blocks(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                          timeout=60, check=True)  # fmt: skip
    return int(done.stdout.strip())


def test_a_large_block_freed_does_not_move_the_next_ones_to_the_heap() -> None:
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("not glibc 2.33 or newer")
    assert mmapped_blocks("default") < mmapped_blocks("fixed")
