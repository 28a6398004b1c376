"""The ``metadata`` setting: which of an input's metadata its anonymized output carries.

Whatever the setting, an output never carries the engine's own metadata (the cloud API copies
the input's EXIF, GPS included; the local engine writes none): the output's metadata is
rebuilt from the input's, filtered here. The input's metadata is sorted into categories, and
each setting carries a fixed set of them:

===============  =============================================================  =====  ====  ====
category         what it is                                                     strip  safe  keep
===============  =============================================================  =====  ====  ====
``icc``          ICC colour profile (JPEG APP2, PNG iCCP, WEBP ICCP)            yes    yes   yes
``colour``       PNG colour chunks: sRGB, gAMA, cHRM, cICP, mDCv, cLLI          yes    yes   yes
``orientation``  EXIF Orientation (1 when the engine already turned the pixels) yes    yes   yes
``time``         DateTime, DateTimeOriginal, DateTimeDigitized, OffsetTime*,    no     yes   yes
                 SubSecTime*; PNG tIME and "Creation Time" text
``camera``       Make, Model, LensSpecification, LensMake, LensModel            no     yes   yes
``technical``    exposure (ExposureTime, FNumber, ISO, FocalLength, Flash,      no     yes   yes
                 metering, white balance...), ExifVersion, ColorSpace, Interop
``gps``          the GPS IFD                                                    no     no    yes
``serial``       BodySerialNumber, LensSerialNumber, CameraSerialNumber,        no     no    yes
                 ImageUniqueID
``owner``        Artist, Copyright, CameraOwnerName, XPAuthor                   no     no    yes
``comment``      ImageDescription, UserComment, XP* text, JPEG COM, PNG text    no     no    yes
``makernote``    the camera maker's private MakerNote                           no     no    yes
``exif-other``   every other EXIF tag (Software, resolution, pixel size...)     no     no    yes
``xmp``          the XMP packet (it can hold a location, so never in ``safe``)  no     no    yes
``iptc``         IPTC and Photoshop resources (JPEG APP13, EXIF IPTC-NAA)       no     no    yes
===============  =============================================================  =====  ====  ====

Never carried, whatever the setting, because they are pictures of the un-blurred image or
may hold one: ``thumbnail`` (the EXIF IFD1 thumbnail, strip or tile image data referenced
from EXIF, Photoshop thumbnail resources), ``mpf`` (JPEG multi-picture segments: secondary
images, depth and gain maps), ``extended-xmp`` (JPEG extended XMP, where phones keep the
original image and depth map), ``xmp-picture`` (an XMP packet declaring an embedded-image
namespace: xmpGImg thumbnails, Google GImage/GDepth), ``makernote-preview`` (a MakerNote
holding a JPEG preview), ``nested-metadata`` (EXIF, XMP or Photoshop blobs nested inside
other metadata: PNG "Raw profile type ..." text, Photoshop's EXIF copies, XMP or Photoshop
resources inside EXIF),
``app-other`` (other JPEG application segments: JUMBF/C2PA manifests, FlashPix, vendor
blobs), and anything after the end of the image. Metadata too large to parse (over 1 MiB)
or to fit its container (an EXIF segment over 64 KiB in JPEG) is dropped as ``oversized``;
an ICC profile for another colour model than the output's pixels (a GRAY profile on an RGB
result) as ``icc-mismatch``. An input whose metadata is broken carries nothing at all.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

from blurd.errors import BlurdError


class Policy(enum.Enum):
    """The ``metadata`` setting."""

    STRIP = "strip"
    SAFE = "safe"
    KEEP = "keep"


DEFAULT_POLICY = Policy.STRIP


def parse(value: str) -> Policy:
    """The policy named ``value``; ``ValueError`` naming the allowed values otherwise."""
    try:
        return Policy(value)
    except ValueError:
        allowed = ", ".join(repr(p.value) for p in Policy)
        raise ValueError(f"metadata must be one of {allowed}, not {value!r}") from None


_DISPLAY = frozenset({"icc", "colour", "orientation"})
_SAFE = _DISPLAY | {"time", "camera", "technical"}
_KEEP = _SAFE | {
    "gps",
    "serial",
    "owner",
    "comment",
    "makernote",
    "exif-other",
    "xmp",
    "iptc",
}
CARRIED: dict[Policy, frozenset[str]] = {
    Policy.STRIP: _DISPLAY,
    Policy.SAFE: frozenset(_SAFE),
    Policy.KEEP: frozenset(_KEEP),
}


class MetadataError(BlurdError, ValueError):
    """An engine's output is not a well-formed JPEG, PNG or WEBP file, so it cannot be
    published. (A broken input only loses its metadata; see ``Carried.note``.)"""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}".replace("\n", " "))


@dataclass(frozen=True)
class Carried:
    """What happened to an input's metadata, for one log line.

    ``kept`` and ``dropped`` are sorted names of what the input had: categories (see the table
    above) for photos, tag names for videos (stream tags prefixed by their stream, as in
    ``audio0:language``). ``note`` says what else happened: a broken input, an output in
    another format, tags a container could not hold, streams left out.
    """

    kept: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    note: str | None = None

    def __str__(self) -> str:
        text = f"kept={','.join(self.kept) or '-'} dropped={','.join(self.dropped) or '-'}"
        if self.note:
            text += f" note={self.note!r}"
        return text


@dataclass
class Tally:
    """Collects, while a file is read, which categories the policy lets through."""

    policy: Policy
    kept: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)

    def allows(self, category: str) -> bool:
        """Whether ``category`` is carried; records the answer either way."""
        if category in CARRIED[self.policy]:
            self.kept.add(category)
            return True
        self.dropped.add(category)
        return False

    def drop(self, category: str) -> None:
        """Records something left out whatever the policy (a picture, an oversized value)."""
        self.dropped.add(category)

    def result(self, note: str | None = None) -> Carried:
        return Carried(tuple(sorted(self.kept)), tuple(sorted(self.dropped)), note)
