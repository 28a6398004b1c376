"""Bounded reading of image files: exact reads, skips, chunked copies, nothing read whole.

Image data (JPEG scans, PNG IDAT, WEBP bitstreams) can be gigabytes; it is only ever copied
through in chunks of ``COPY_CHUNK_BYTES``. Metadata is read into memory, but never more than
``MAX_METADATA_BYTES`` of any one item: bigger items are skipped, not parsed.
"""

from __future__ import annotations

import os
import zlib
from typing import BinaryIO

MAX_METADATA_BYTES = 1024 * 1024
COPY_CHUNK_BYTES = 256 * 1024


# What a container module collects from an input and inserts into an output: (kind, payload)
# pairs in the container's own terms (a JPEG marker, a PNG chunk type, a WEBP FourCC).
Items = tuple[tuple[bytes, bytes], ...]


class Malformed(ValueError):
    """A file's structure is broken; the message says what and where, in one line."""


class Reader:
    """Reads a file front to back with exact reads, skips (seeks) and a push-back buffer,
    keeping track of the position so that errors can say where they happened."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._pending = b""
        self._size = os.fstat(fh.fileno()).st_size

    @property
    def position(self) -> int:
        return self._fh.tell() - len(self._pending)

    @property
    def size(self) -> int:
        return self._size

    @property
    def remaining(self) -> int:
        return max(0, self._size - self.position)

    def read_some(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (at least one unless at the end of the file)."""
        if self._pending:
            data, self._pending = self._pending[:limit], self._pending[limit:]
            return data
        # never a buffer larger than what is left (see heap.read_size)
        return self._fh.read(max(1, min(limit, self.remaining + 1)))

    def read_exact(self, count: int, what: str) -> bytes:
        """Exactly ``count`` bytes, or ``Malformed`` naming ``what`` was cut short."""
        if count > self.remaining:
            raise Malformed(f"truncated {what} at byte {self.position}")
        parts = []
        needed = count
        while needed:
            part = self.read_some(needed)
            if not part:
                raise Malformed(f"truncated {what} at byte {self.position}")
            parts.append(part)
            needed -= len(part)
        return b"".join(parts)

    def skip(self, count: int, what: str) -> None:
        """Moves past ``count`` bytes without reading them."""
        if count > self.remaining:
            raise Malformed(f"truncated {what} at byte {self.position}")
        dropped = min(count, len(self._pending))
        self._pending = self._pending[dropped:]
        if count > dropped:
            self._fh.seek(count - dropped, os.SEEK_CUR)

    def seek(self, position: int) -> None:
        self._pending = b""
        self._fh.seek(position)

    def unread(self, data: bytes) -> None:
        """Puts ``data`` (just read) back in front of the stream."""
        self._pending = data + self._pending

    def copy(self, dst: BinaryIO, count: int, what: str, crc: int = 0) -> int:
        """Copies exactly ``count`` bytes to ``dst`` in chunks; returns the CRC-32 of what was
        copied, continued from ``crc``."""
        if count > self.remaining:
            raise Malformed(f"truncated {what} at byte {self.position}")
        while count:
            part = self.read_some(min(count, COPY_CHUNK_BYTES))
            if not part:
                raise Malformed(f"truncated {what} at byte {self.position}")
            crc = zlib.crc32(part, crc)
            dst.write(part)
            count -= len(part)
        return crc


def inflate_bounded(data: bytes, limit: int = MAX_METADATA_BYTES) -> bytes | None:
    """``data`` decompressed with zlib, or None when it is broken or inflates past ``limit``."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        return None
    if len(out) > limit or not inflater.eof:
        return None
    return out


def be16(data: bytes, at: int = 0) -> int:
    return int.from_bytes(data[at : at + 2], "big")


def be32(data: bytes, at: int = 0) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def le32(data: bytes, at: int = 0) -> int:
    return int.from_bytes(data[at : at + 4], "little")
