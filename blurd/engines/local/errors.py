"""The one error a local job raises on purpose: the input cannot be anonymized."""

from __future__ import annotations


class MediaError(Exception):
    """The file cannot be processed (corrupt, no video stream...); one sentence, no trace.

    Raised in a pool process and pickled back, so it carries nothing but its message.
    """


class Cancelled(Exception):
    """The job was released or the engine closed while the job ran."""
