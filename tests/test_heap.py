"""blurd.heap: large buffers stay in mmap, so freeing them gives the memory back; reads are
no larger than what they read."""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest

from blurd import heap

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


def test_reads_are_sized_to_what_is_left_of_the_file(tmp_path: Path) -> None:
    """A small file is read in one read of its size (plus one byte, to see the end), not in a
    1 MiB buffer; a file that grows while it is read is still read to its end."""
    small = tmp_path / "small"
    small.write_bytes(b"x" * 1000)
    with small.open("rb") as fh:
        assert heap.read_size(fh, 1 << 20) == 1001
        fh.read(400)
        assert heap.read_size(fh, 1 << 20) == 601
        assert heap.read_size(fh, 100) == 100
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with empty.open("rb") as fh:
        assert heap.read_size(fh, 1 << 20) == 1 and list(heap.chunks(fh, 1 << 20)) == []
    growing = tmp_path / "growing"
    growing.write_bytes(b"a" * 10)
    with growing.open("rb") as fh, growing.open("ab") as writer:
        pieces = []
        for piece in heap.chunks(fh, 1 << 20):
            pieces.append(piece)
            if len(pieces) == 1:
                writer.write(b"b" * 25)
                writer.flush()
    assert [len(p) for p in pieces] == [10, 11, 11, 3]
    assert b"".join(pieces) == b"a" * 10 + b"b" * 25
