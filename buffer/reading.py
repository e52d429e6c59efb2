"""The reading record that drivers produce, the buffer stores and sinks deliver."""

from __future__ import annotations

import datetime as dt
import enum
import functools
import math
import time
from typing import NamedTuple

__all__ = ["Quality", "Reading", "StoredReading", "format_ts", "now_us", "reading_to_json"]


class Quality(enum.StrEnum):
    """OPC-style quality of one reading."""

    GOOD = "good"
    UNCERTAIN = "uncertain"
    BAD = "bad"


class Reading(NamedTuple):
    """One value of one channel, timestamped when the device was read.

    `ts_us` is UTC in microseconds since the Unix epoch. `value` is None only
    for a `bad` reading that marks the start of an outage of that channel.

    Readings are named tuples rather than frozen dataclasses because the agent
    makes one per value read, and a frozen dataclass takes about three times
    as long to construct.
    """

    ts_us: int
    source: str
    channel: str
    value: float | None
    unit: str
    quality: Quality = Quality.GOOD


class StoredReading(NamedTuple):
    """A reading as read back from the buffer, with the `seq` the buffer gave it."""

    seq: int
    ts_us: int
    source: str
    channel: str
    value: float | None
    unit: str
    quality: Quality


def now_us() -> int:
    """Return the current UTC time in microseconds since the Unix epoch."""
    return time.time_ns() // 1000


@functools.lru_cache(maxsize=64)
def _second_text(seconds: int) -> str:
    """Return "YYYY-MM-DDTHH:MM:SS" of a whole second, cached because readings share seconds."""
    return f"{dt.datetime.fromtimestamp(seconds, tz=dt.UTC):%Y-%m-%dT%H:%M:%S}"


_last_formatted: tuple[int, str] = (-1, "")
"""The newest time format_ts formatted and its text, swapped as one tuple so that threads
never see a time with another time's text."""


def format_ts(ts_us: int) -> str:
    """Format microseconds since the epoch as RFC 3339 UTC with microseconds."""
    global _last_formatted
    last = _last_formatted
    if last[0] == ts_us:
        # The readings of one Modbus request, or one WITS0 record, share their time.
        return last[1]
    seconds, micros = divmod(ts_us, 1_000_000)
    text = f"{_second_text(seconds)}.{micros:06d}Z"
    _last_formatted = (ts_us, text)
    return text


def reading_to_json(reading: StoredReading) -> dict[str, object]:
    """Return a stored reading as the JSON object both uplinks send.

    JSON has no NaN or infinity, so such a value, like the value of a bad
    reading, is sent as null with its quality unchanged. The quality stays a
    `Quality`, which is a str, so both `json` and `orjson` write it as text.
    """
    value = reading.value
    quality = reading.quality
    if quality is Quality.BAD or value is None or not math.isfinite(value):
        value = None
    return {
        "seq": reading.seq,
        "ts": format_ts(reading.ts_us),
        "channel": reading.channel,
        "value": value,
        "unit": reading.unit,
        "quality": quality,
    }
