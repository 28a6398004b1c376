"""Carrying an input photo's metadata, filtered by policy, onto the engine's result.

``carry_image_metadata(source, output, dest, policy, upright=...)`` writes ``dest``: the
engine's ``output`` with all of its own metadata removed, plus what ``policy`` carries of the
``source``'s metadata. The compressed image data is copied through unchanged and in chunks,
never decoded, so memory stays small whatever the file's size.

- ``output`` must be a well-formed JPEG, PNG or WEBP file, or ``MetadataError`` is raised and
  ``dest`` is removed: a file blurd cannot vouch for is not published.
- A ``source`` whose metadata is broken (truncated segments, bad TIFF offsets, IFD loops, bad
  CRCs) gives nothing at all: ``dest`` is the stripped output, and the returned ``Carried``
  says why in its ``note``. So does a ``source`` in another format than ``output`` (a JPEG
  input with a PNG result): metadata is only carried within one format, and such an output
  loses even the input's colour profile and orientation.
- ``upright``: the engine already applied the input's EXIF orientation to the pixels, so the
  carried Orientation is 1; otherwise the input's Orientation is carried as it is.

``dest`` is created with O_EXCL (an existing file raises ``FileExistsError``); temp names,
fsync and renaming are the caller's business. Other I/O failures are ``OSError``.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import BinaryIO, Protocol

from blurd.metadata import jpeg, png, webp
from blurd.metadata.policy import Carried, MetadataError, Policy, Tally
from blurd.metadata.streams import Items, Malformed


class ImageFormat(enum.Enum):
    JPEG = "JPEG"
    PNG = "PNG"
    WEBP = "WEBP"


class _Container(Protocol):
    def pixel_space(self, path: Path) -> str | None: ...

    def collect(self, path: Path, tally: Tally, *, upright: bool, space: str | None) -> Items: ...

    def rewrite(self, path: Path, dst: BinaryIO, items: Items) -> None: ...


_CONTAINERS: dict[ImageFormat, _Container] = {
    ImageFormat.JPEG: jpeg,
    ImageFormat.PNG: png,
    ImageFormat.WEBP: webp,
}


def sniff(head: bytes) -> ImageFormat | None:
    """The format the first 12 bytes of a file announce, if it is one blurd handles."""
    if head.startswith(b"\xff\xd8\xff"):
        return ImageFormat.JPEG
    if head.startswith(png.SIGNATURE):
        return ImageFormat.PNG
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ImageFormat.WEBP
    return None


def carry_image_metadata(
    source: Path, output: Path, dest: Path, policy: Policy, *, upright: bool
) -> Carried:
    """Writes ``dest`` from ``output``'s image and ``source``'s metadata as ``policy`` allows;
    returns what was carried. See the module docstring for the failure modes."""
    output_format = _sniff_file(output)
    if output_format is None:
        raise MetadataError(output, "not a JPEG, PNG or WEBP file")
    container = _CONTAINERS[output_format]
    try:
        space = container.pixel_space(output)
    except Malformed as exc:
        raise MetadataError(output, str(exc)) from exc

    tally = Tally(policy)
    note = None
    items: Items = ()
    source_format = _sniff_file(source)
    if source_format is not output_format:
        found = source_format.value if source_format else "not a JPEG, PNG or WEBP file"
        note = f"input is {found}, output is {output_format.value}: no metadata carried"
    else:
        try:
            items = container.collect(source, tally, upright=upright, space=space)
        except Malformed as exc:
            tally = Tally(policy)
            note = f"input metadata unreadable, none carried: {exc}"

    with open(dest, "xb") as dst:
        try:
            container.rewrite(output, dst, items)
        except BaseException as exc:
            dst.close()
            dest.unlink(missing_ok=True)
            if isinstance(exc, Malformed):
                raise MetadataError(output, str(exc)) from exc
            raise
    return tally.result(note)


def _sniff_file(path: Path) -> ImageFormat | None:
    with open(path, "rb") as fh:
        return sniff(fh.read(12))
