"""Logging setup: JSON lines when stdout is not a terminal, a readable console otherwise."""

from __future__ import annotations

import logging
import sys
from typing import Literal, TextIO

import structlog

__all__ = ["configure_logging"]

LogFormat = Literal["auto", "json", "console"]

# structlog's default dict_tracebacks includes every frame's local variables, which
# can hold a password or a token; tracebacks here carry code locations only.
_DICT_TRACEBACKS = structlog.processors.ExceptionRenderer(
    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
)


_threshold = logging.INFO
"""Minimum level written. A module variable, so that a reload reaches bound loggers too."""


def _drop_below_threshold(
    _logger: object, method_name: str, event_dict: structlog.types.EventDict
) -> structlog.types.EventDict:
    """Drop an event less severe than the current level.

    structlog's filtering loggers fix the level when a logger is bound, and
    sinks and drivers bind theirs when they are built, so a level changed by
    a config reload would not reach them. This processor reads the level at
    each call instead.
    """
    level = logging.getLevelNamesMapping().get(method_name.upper(), logging.INFO)
    if method_name == "exception":
        level = logging.ERROR
    if level < _threshold:
        raise structlog.DropEvent
    return event_dict


def configure_logging(
    level: str = "info", log_format: LogFormat = "auto", stream: TextIO | None = None
) -> None:
    """Configure structlog and route stdlib loggers (pymodbus, paho) through the same renderer.

    `stream` defaults to stdout; `auto` picks JSON lines unless it is a terminal.
    """
    out = stream if stream is not None else sys.stdout
    as_json = not out.isatty() if log_format == "auto" else log_format == "json"
    global _threshold
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    _threshold = numeric_level
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if as_json:
        renderer = structlog.processors.JSONRenderer()
        exception_processors: list[structlog.types.Processor] = [_DICT_TRACEBACKS]
    else:
        renderer = structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        exception_processors = [structlog.dev.set_exc_info]

    structlog.configure(
        processors=[_drop_below_threshold, *shared, *exception_processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )

    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([_DICT_TRACEBACKS] if as_json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric_level)
    # pymodbus logs every failed request at ERROR. The driver reports failures itself,
    # rate-limited, so the library's own lines are shown only at debug level.
    library_level = logging.DEBUG if numeric_level <= logging.DEBUG else logging.CRITICAL
    logging.getLogger("pymodbus").setLevel(library_level)
