"""One entry point for every output: the engine's result rewritten with the input's metadata,
as the watch's ``metadata`` policy allows (photos: ``images``, videos: ``video``).

The input is given as an open file of the version that was processed (``blurd.versions``),
or None when that version is gone or changed: then nothing of it is carried, and the output
is still stripped of the engine's own metadata.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import BinaryIO

from blurd.metadata.archive import carry_zip_metadata
from blurd.metadata.kinds import PHOTO_EXTENSIONS, VIDEO_EXTENSIONS, rewriter
from blurd.metadata.policy import Carried, MetadataError, Policy


def rewrites(output_suffix: str) -> bool:
    """Whether outputs with this extension get their metadata rewritten (others are placed as
    the engine sent them)."""
    suffix = output_suffix.lower()
    return suffix in PHOTO_EXTENSIONS or suffix in VIDEO_EXTENSIONS or suffix == ".zip"


def carry(
    source: BinaryIO | None,
    output: Path,
    dest: Path,
    policy: Policy,
    *,
    upright: bool,
    why_none: str = "the input changed or is gone since it was processed",
) -> Carried:
    """Write ``dest`` (a new file) from ``output`` and what ``policy`` carries of ``source``.

    Raises ``MetadataError`` when ``output`` is not a well-formed file of its kind (nothing is
    left at ``dest`` then), ``OSError`` when ``dest`` cannot be written.
    """
    # The open file is read through its /proc name, so the version checked when it was opened
    # is the one read, whatever happens at its path meanwhile (Linux only, like blurd).
    with open(os.devnull, "rb") as nothing:
        given = source if source is not None else nothing
        source_path = Path(f"/proc/self/fd/{given.fileno()}")
        if dest.suffix.lower() == ".zip":
            carried = carry_zip_metadata(source_path, output, dest, policy, upright=upright)
        else:
            rewrite = rewriter(dest.suffix, policy, upright=upright)
            if rewrite is None:
                raise MetadataError(output, f"blurd does not rewrite {dest.suffix} files")
            carried = rewrite(source_path, output, dest)
    if source is None:
        return dataclasses.replace(carried, kept=(), note=why_none)
    return carried
