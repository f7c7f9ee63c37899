"""Structured logging: JSON lines on stderr, one event name per line, numbers as fields.

Every process of the pipeline calls :func:`configure` once, right after it starts, with its own
name; that name is bound to every line it writes, so the merged journal of the service tells
which process said what.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured_for: str | None = None


class StderrLogger:
    """Writes each line to the current ``sys.stderr`` in one call.

    One call per line: with several processes on one stderr pipe (the pipeline's children,
    the journal) a line never interleaves with another's, as it can with ``print``, which
    writes the newline apart. The current stream: one replaced after :func:`configure` (a
    test's captured stderr) is the one written to.
    """

    def __init__(self, *args: object) -> None:
        pass

    def msg(self, message: str) -> None:
        stream = sys.stderr
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = err = error = critical = exception = fatal = msg


def configure(process: str = "edge", level: str | None = None) -> None:
    """Send structlog events of this process to stderr as JSON lines.

    Args:
        process: name bound to every event (``grabber``, ``engine``, ``publisher``, ...).
        level: minimum level; defaults to ``$EDGE_LOG_LEVEL`` or ``info``.
    """
    global _configured_for
    level_name = (level or os.environ.get("EDGE_LOG_LEVEL", "info")).upper()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(sort_keys=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level_name)),
        logger_factory=StderrLogger,
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(process=process, pid=os.getpid())
    _configured_for = process


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """The module logger; configures a default ``edge`` process logger on first use."""
    if _configured_for is None:
        configure()
    return structlog.get_logger(module=name)
