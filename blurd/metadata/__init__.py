"""Metadata in blurd's outputs: what of an input's metadata reaches its anonymized copy.

An engine's own metadata is never trusted. An output is the engine's pixels with all of the
engine's metadata removed, plus the input's metadata filtered by the ``metadata`` setting
(``strip``, ``safe`` or ``keep``; see ``blurd.metadata.policy`` for what each carries).
``blurd.metadata.images.carry_image_metadata`` does this for JPEG, PNG and WEBP stills.
"""

from blurd.metadata.policy import Carried, MetadataError, Policy, parse

__all__ = ["Carried", "MetadataError", "Policy", "parse"]
