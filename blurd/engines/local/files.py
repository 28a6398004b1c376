"""What the local engine accepts, and the names of the files in a job's folder.

Kept free of heavy imports: the daemon process reads it without loading any media library.
"""

from __future__ import annotations

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mov", ".mkv", ".avi"})

MEDIA_STEM = "result"  # result.<input extension>
DETECTIONS_NAME = "result.json"
PROGRESS_NAME = "progress"  # e.g. "120/300 frames", rewritten while a video runs
CANCEL_NAME = "cancel"  # created by the engine: a running job stops at the next frame
INPUT_STEM = "input"  # a hard link to the submitted file, where the filesystem allows


def media_name(ext: str) -> str:
    return f"{MEDIA_STEM}{ext}"
