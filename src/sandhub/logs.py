"""structlog setup: JSON lines when not on a terminal, readable lines on one."""

from __future__ import annotations

import logging
import sys

import structlog

from sandhub.errors import clip

EXC_VALUE_CHARS = 1024
"""Characters kept of a logged exception's message."""
MAX_FRAMES = 20
"""Frames kept of a logged traceback (the innermost and outermost halves)."""


def _clip_exception_values(
    logger: structlog.typing.WrappedLogger, name: str, event: structlog.typing.EventDict
) -> structlog.typing.EventDict:
    """An exception's text may repeat a caller's input: cut it short."""
    for exc in event.get("exception", ()) if isinstance(event.get("exception"), list) else ():
        if isinstance(exc, dict) and isinstance(exc.get("exc_value"), str):
            exc["exc_value"] = clip(exc["exc_value"], EXC_VALUE_CHARS)
    return event


def configure(*, level: str = "info", json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    # Tracebacks without frame locals: locals hold callers' requests (paths,
    # file data, keys) and made each logged error kilobytes long.
    tracebacks = structlog.processors.ExceptionRenderer(
        structlog.tracebacks.ExceptionDictTransformer(show_locals=False, max_frames=MAX_FRAMES, use_rich=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            tracebacks if json else structlog.dev.set_exc_info,
            _clip_exception_values,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
