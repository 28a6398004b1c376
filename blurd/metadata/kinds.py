"""Which rewrite an output gets, by its extension: one table for single outputs and for the
entries of an archive."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blurd.metadata.images import carry_image_metadata
from blurd.metadata.policy import Carried, Policy

PHOTO_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".m4v", ".3gp", ".mkv", ".webm", ".avi", ".ts",
                              ".mts", ".m2ts", ".mpg", ".mpeg"})  # fmt: skip

Rewrite = Callable[[Path, Path, Path], Carried]  # (source, output, dest) -> what was carried


def rewriter(suffix: str, policy: Policy, *, upright: bool) -> Rewrite | None:
    """How a photo or video with this extension is rewritten; None for anything else."""
    suffix = suffix.lower()
    if suffix in PHOTO_EXTENSIONS:
        return lambda s, o, d: carry_image_metadata(s, o, d, policy, upright=upright)
    if suffix in VIDEO_EXTENSIONS:
        # imported here: PyAV (FFmpeg) is 15 MiB of the daemon's memory, for videos only
        from blurd.metadata.video import carry_video_metadata

        return lambda s, o, d: carry_video_metadata(s, o, d, policy)
    return None
