"""Duration and size strings as written in the TOML file ("500ms", "2GiB")."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BeforeValidator, PlainSerializer, WithJsonSchema

__all__ = [
    "DURATION_PATTERN",
    "SIZE_PATTERN",
    "ByteSize",
    "Duration",
    "NonNegativeDuration",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_non_negative_duration",
    "parse_size",
]

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS: dict[str, int] = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "TB": 1000**4,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "TiB": 1024**4,
}
DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$"
"""Regular expression of a duration as written in the file, also used in the JSON Schema."""
SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)\s*$"
"""Regular expression of a size as written in the file, also used in the JSON Schema."""
_DURATION_RE = re.compile(DURATION_PATTERN)
_SIZE_RE = re.compile(SIZE_PATTERN)


def _describe(value: object) -> str:
    """Show a rejected value as TOML writes it where that differs from Python (true, false)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def parse_duration(value: Any) -> float:
    """Convert a duration string such as "500ms", "1s" or "5m" to seconds, greater than zero."""
    seconds = _parse_seconds(value)
    if seconds <= 0:
        msg = f"invalid duration {value!r}: must be greater than zero"
        raise ValueError(msg)
    return seconds


def parse_non_negative_duration(value: Any) -> float:
    """Convert a duration string to seconds, accepting zero ("0ms") to turn a wait off."""
    return _parse_seconds(value)


def _parse_seconds(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        msg = (
            f"invalid duration {value}: a number needs a unit, written in quotes, "
            f'such as "{value}s" or "{value}ms"'
        )
        raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
    if not isinstance(value, str):
        example = 'such as "500ms" or "5m"'
        msg = f"expected a duration string with a unit, {example}, got {_describe(value)}"
        raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
    match = _DURATION_RE.match(value)
    if match is None:
        msg = (
            f'invalid duration {value!r}: write a number and one of ms, s, m, h, d, such as "500ms"'
        )
        raise ValueError(msg)
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: Any) -> int:
    """Convert a size string such as "512MiB" or "2GiB" to bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        msg = (
            f"invalid size {value}: a number needs a unit, written in quotes, "
            f'such as "{value}MiB" or "{value}B"'
        )
        raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
    if not isinstance(value, str):
        example = 'such as "512MiB" or "2GiB"'
        msg = f"expected a size string with a unit, {example}, got {_describe(value)}"
        raise ValueError(msg)  # noqa: TRY004 - pydantic reports ValueError as a field error
    match = _SIZE_RE.match(value)
    if match is None:
        msg = (
            f"invalid size {value!r}: write a number and one of "
            "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
        raise ValueError(msg)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])


def format_duration(seconds: float) -> str:
    """Format seconds the way a config file would write them."""
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{seconds:g}s"


def format_size(size: int) -> str:
    """Format bytes as a config file would write them, in the largest unit that divides exactly."""
    for unit in ("TiB", "TB", "GiB", "GB", "MiB", "MB", "KiB", "KB"):
        factor = _SIZE_UNITS[unit]
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return f"{size}B"


_DURATION_SCHEMA = WithJsonSchema(
    {
        "type": "string",
        "pattern": _DURATION_RE.pattern,
        "description": 'A number and a unit of ms, s, m, h or d, such as "500ms" or "5m".',
    },
    mode="validation",
)

Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    _DURATION_SCHEMA,
]
"""Seconds, greater than zero, written in TOML as a string with a unit."""

NonNegativeDuration = Annotated[
    float,
    BeforeValidator(parse_non_negative_duration),
    PlainSerializer(format_duration, return_type=str),
    _DURATION_SCHEMA,
]
"""Seconds, zero or more, written in TOML as a string with a unit ("0ms" turns a wait off)."""

ByteSize = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "type": "string",
            "pattern": _SIZE_RE.pattern,
            "description": (
                'A number and a unit of B, KB, MB, GB, TB, KiB, MiB, GiB or TiB, such as "2GiB".'
            ),
        },
        mode="validation",
    ),
]
"""Bytes, written in TOML as a string with a unit."""
