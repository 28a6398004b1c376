"""Looking inside metadata blobs: the pictures hidden there, and what an ICC profile is for.

Even ``keep`` never carries these. Besides the obvious containers (EXIF IFD1, JPEG MPF
segments, data after the end of the image), pictures hide in:

- XMP packets: Adobe's ``xmpGImg`` thumbnails, Google's ``GImage`` (the original photo of a
  portrait-mode shot) and ``GDepth`` (its depth map), base64-encoded. A packet that declares
  one of these namespaces is dropped whole: editing XML is not worth the risk.
- MakerNotes: several makers store a JPEG preview inside; a MakerNote that contains a JPEG
  start-of-image sequence is dropped whole.
- Photoshop image resources (JPEG APP13): thumbnails (0x0409, 0x040C) and copies of the EXIF
  and XMP (0x0422, 0x0423, 0x0424), which can hold their own thumbnails. The other resources
  (IPTC, captions, ...) are kept by ``keep``.

An ICC profile is only carried onto an output whose pixels it can describe: a greyscale
input's GRAY profile on an engine's RGB output would make colour-managed viewers refuse it.
"""

from __future__ import annotations

from blurd.metadata.policy import Tally
from blurd.metadata.streams import Malformed, be16, be32

_PICTURE_NAMESPACES = (
    b"http://ns.adobe.com/xap/1.0/g/img/",
    b"http://ns.google.com/photos/1.0/image/",
    b"http://ns.google.com/photos/1.0/depthmap/",
)
_JPEG_START = b"\xff\xd8\xff"

_PHOTOSHOP_THUMBNAILS = frozenset({0x0409, 0x040C})
_PHOTOSHOP_NESTED = frozenset({0x0422, 0x0423, 0x0424})
_PHOTOSHOP_SIGNATURES = frozenset({b"8BIM", b"MeSa", b"PHUT", b"AgHg", b"DCSR"})
_RESOURCE_HEAD_BYTES = 4 + 2 + 2 + 4  # signature, id, shortest padded name, size


def xmp_holds_picture(packet: bytes) -> bool:
    """Whether an XMP packet declares a namespace for embedded images."""
    return any(namespace in packet for namespace in _PICTURE_NAMESPACES)


def holds_jpeg(blob: bytes) -> bool:
    """Whether ``blob`` contains what looks like the start of a JPEG image."""
    return _JPEG_START in blob


def icc_fits(profile: bytes, space: str | None) -> bool:
    """Whether ``profile``'s data colour space (``"RGB"``, ``"GRAY"``, ``"CMYK"``...) is
    ``space``; any profile fits when the output's space is unknown."""
    if space is None:
        return True
    return profile[16:20].decode("latin-1").strip() == space


def filter_photoshop(resources: bytes, tally: Tally) -> bytes:
    """Photoshop image resource blocks (big-endian, as in JPEG APP13 after its
    "Photoshop 3.0" header) without those that hold pictures; ``Malformed`` if broken."""
    kept: list[bytes] = []
    at = 0
    while at < len(resources):
        if len(resources) - at < _RESOURCE_HEAD_BYTES:
            if resources[at:].strip(b"\x00"):
                raise Malformed(f"Photoshop resources end with junk at byte {at}")
            break
        if resources[at : at + 4] not in _PHOTOSHOP_SIGNATURES:
            raise Malformed(f"Photoshop resource at byte {at} has no signature")
        resource_id = be16(resources, at + 4)
        name_bytes = 1 + resources[at + 6]
        name_bytes += name_bytes & 1  # the Pascal-string name is padded to an even length
        size_at = at + 6 + name_bytes
        if size_at + 4 > len(resources):
            raise Malformed(f"Photoshop resource 0x{resource_id:04X} is truncated")
        size = be32(resources, size_at)
        end = size_at + 4 + size
        if end > len(resources):
            raise Malformed(f"Photoshop resource 0x{resource_id:04X} runs past its segment")
        if resource_id in _PHOTOSHOP_THUMBNAILS:
            tally.drop("thumbnail")
        elif resource_id in _PHOTOSHOP_NESTED:
            tally.drop("nested-metadata")
        else:
            kept.append(resources[at:end] + b"\x00" * (size & 1))
        at = end + (size & 1)
    return b"".join(kept)
