"""What the user asked an engine to do with a file, and its fingerprint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Style = Literal["blur", "opaque", "pixelate"]
STYLES: tuple[str, ...] = ("blur", "opaque", "pixelate")


@dataclass(frozen=True)
class Area:
    """Region to process, as fractions of width/height: absolute edge positions."""

    left: float = 0.0
    top: float = 0.0
    right: float = 1.0
    bottom: float = 1.0

    def is_full(self) -> bool:
        return (self.left, self.top, self.right, self.bottom) == (0.0, 0.0, 1.0, 1.0)


@dataclass(frozen=True)
class Options:
    """Anonymization options of one watch (DESIGN.md section 4)."""

    faces: bool = True
    plates: bool = True
    detections: bool = True
    style: Style = "blur"
    color: str = "#000000"
    pixels: int = 10
    padding: int = 0
    area: Area = field(default_factory=Area)
    # what of the input's metadata the output carries (blurd.metadata.policy); blurd applies
    # it, not the engine, but it changes the output, so it is part of the fingerprint
    metadata: str = "strip"

    def fingerprint(self, engine: str) -> str:
        """A stable digest of everything that changes an engine's output."""
        payload = {"engine": engine, **asdict(self)}
        text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:32]
