"""What the local engine accepts, and the names of the files in a job's folder.

Kept free of heavy imports: the daemon process reads it without loading any media library.
"""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
# Each one is a row of containers.CONTAINERS, which says how it is written (the tests check
# that both lists agree; that module imports PyAV, which the daemon process does not load).
VIDEO_EXTENSIONS = frozenset(
    {".mp4", ".mov", ".mkv", ".avi", ".m4v", ".3gp", ".webm"}
    | {".ts", ".mts", ".m2ts"}  # MPEG transport streams
    | {".mpg", ".mpeg"}  # MPEG program streams
)

MEDIA_STEM = "result"  # result.<input extension>
DETECTIONS_NAME = "result.json"
PROGRESS_NAME = "progress"  # e.g. "120/300 frames", rewritten while a video runs
CANCEL_NAME = "cancel"  # created by the engine: a running job stops at the next frame
INPUT_STEM = "input"  # a hard link to the submitted file, where the filesystem allows


def media_name(ext: str) -> str:
    return f"{MEDIA_STEM}{ext}"
