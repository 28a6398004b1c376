"""structlog set-up, done once at the entry point (DESIGN.md section 7).

JSON lines when the stream is not a terminal (journald keeps them), readable lines otherwise.
Values under keys that look secret are replaced before anything is rendered.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRET_KEYS = ("token", "secret", "password", "authorization", "refresh")


def _redact(_logger: Any, _name: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if any(part in key.lower() for part in _SECRET_KEYS) and key != "event":
            event[key] = "[redacted]"
    return event


def configure(
    stream: TextIO | None = None, *, json: bool | None = None, verbose: bool = False
) -> None:
    stream = stream or sys.stdout
    as_json = json if json is not None else not stream.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.DEBUG if verbose else logging.INFO
        ),
        # WriteLogger: one write and flush per line, without print()'s extra work.
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=True,
    )
    # Libraries' own logging: warnings only, on stderr.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
