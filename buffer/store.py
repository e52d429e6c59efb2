"""The SQLite buffer: one dedicated thread owns the connection; asyncio calls into it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import fcntl
import functools
import itertools
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self, TextIO, TypeVar, cast

import structlog

from buffer.ranges import RangeSet
from buffer.reading import Quality, Reading, StoredReading, now_us

__all__ = [
    "DB_FILENAME",
    "MIN_MAX_BYTES",
    "Buffer",
    "BufferDatabaseError",
    "BufferInUseError",
    "BufferStats",
    "ChannelValue",
    "CorruptDatabaseError",
    "ForeignDatabaseError",
    "LaneState",
    "QuarantinedReading",
    "SinkBacklog",
    "SinkStats",
    "check_reading",
    "check_readings",
    "read_stats",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

DB_FILENAME = "buffer.sqlite3"
SCHEMA_VERSION = 1
"""Stored in `PRAGMA user_version`."""
APPLICATION_ID = 0x52474142
"""Stored in `PRAGMA application_id` ("RGAB" in ASCII) to tell a buffer from other SQLite files."""
BUSY_TIMEOUT_MS = 5000
JOURNAL_SIZE_LIMIT = 64 * 1024**2
"""Bytes the WAL file is truncated to after a checkpoint resets it."""
CHECKPOINT_BUSY_TIMEOUT_MS = 200
"""How long a TRUNCATE checkpoint may wait for readers, so it never stalls appends for long."""
DELETE_CHUNK_ROWS = 50_000
"""Rows deleted per call on the SQLite thread, so appends can run between chunks."""
CLEANUP_INTERVAL = 1.0
"""Seconds between checks for acknowledged rows to delete."""
COMPACT_INTERVAL = 60.0
"""Seconds between returning free pages to the filesystem and truncating the WAL."""
DIR_MODE = 0o750
MIN_MAX_BYTES = 1024**2
"""Smallest accepted `max_bytes`: a smaller buffer would hold only seconds of readings."""
ESTIMATED_ROW_BYTES = 64
"""Disk bytes one reading is assumed to take in a commit; about 26 were measured per row."""
DROP_LOG_INTERVAL = 60.0
"""Seconds between two warnings about dropped readings of the same kind."""
CAP_DELETE_ROUNDS = 20
"""Most delete rounds one size check runs before it leaves the rest to the next commit."""
SET_ASIDE_PREFIX = "buffer-corrupt-"
"""Name prefix of a corrupt database file moved aside at open."""
SET_ASIDE_LISTED = 10
"""Newest set-aside paths included in `stats()` and `read_stats()`."""
RECENT_READINGS = 20_000
"""Newest committed readings kept in memory, so sinks that keep up read them without SQLite."""
LAST_VALUES_INTERVAL = 1.0
"""Seconds between writes of the channels' last values: writing them in every commit
took a third of the append time at high rates."""

_QUALITY_CODES: dict[Quality, int] = {Quality.GOOD: 0, Quality.UNCERTAIN: 1, Quality.BAD: 2}
_QUALITY_BY_CODE: dict[int, Quality] = {code: q for q, code in _QUALITY_CODES.items()}
_AS_QUALITY: dict[Quality | str, Quality] = {q: q for q in Quality}
"""Each Quality, also found by its text: check_reading accepts "good" for Quality.GOOD."""
_CORRUPTION_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_DISK_ERROR_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR})

# auto_vacuum must be set before journal_mode=WAL and before the first table is created,
# otherwise SQLite silently keeps it off.
_PRAGMAS = (
    "PRAGMA auto_vacuum = INCREMENTAL",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}",
    f"PRAGMA journal_size_limit = {JOURNAL_SIZE_LIMIT}",
)
_SCHEMA = (
    # AUTOINCREMENT keeps seq from being reused after rows are deleted: sinks compare
    # seq against their cursor, so a reused seq would be skipped.
    """CREATE TABLE readings (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        ts_us INTEGER NOT NULL,
        channel_id INTEGER NOT NULL,
        value REAL,
        quality INTEGER NOT NULL
    )""",
    """CREATE TABLE channels (
        id INTEGER PRIMARY KEY,
        source TEXT,
        channel TEXT,
        unit TEXT,
        last_ts_us,
        last_value,
        last_quality,
        UNIQUE (source, channel)
    )""",
    "CREATE TABLE cursors (sink TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
    "CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    "INSERT INTO counters (name, value) VALUES ('dropped_rows', 0)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)

_INSERT_READING = "INSERT INTO readings (ts_us, channel_id, value, quality) VALUES (?, ?, ?, ?)"
_ROWS_PER_INSERT = 200
"""Rows per multi-row INSERT: 800 parameters, under the 999 that SQLite before 3.32 allows."""
_INSERT_READINGS = _INSERT_READING.replace(
    "(?, ?, ?, ?)", ", ".join(["(?, ?, ?, ?)"] * _ROWS_PER_INSERT)
)
"""One statement for _ROWS_PER_INSERT rows, which SQLite inserts in the order given. It takes
about a third of the time of executemany, which steps once per row."""
_INSERT_CHANNEL = "INSERT INTO channels (source, channel, unit) VALUES (?, ?, ?)"
# NOTE: the unit belongs to the channel row, so after a unit change in the config the
# readings still buffered from before the change are read back with the new unit.
_UPDATE_CHANNEL_UNIT = "UPDATE channels SET unit = ? WHERE id = ?"
_SELECT_CHANNEL_IDS = "SELECT source, channel, id, unit FROM channels"
_SELECT_LAST_SEQ = "SELECT seq FROM sqlite_sequence WHERE name = 'readings'"
_SELECT_SEQ_RANGE = "SELECT (SELECT min(seq) FROM readings), (SELECT max(seq) FROM readings)"
"""Two scalar subqueries, because SQLite reads each from the primary key, while a single
SELECT min(seq), max(seq) scans the whole table."""
_SELECT_BATCH = """
    SELECT r.seq, r.ts_us, c.source, c.channel, r.value, c.unit, r.quality
    FROM readings AS r JOIN channels AS c ON c.id = r.channel_id
    WHERE r.seq > ? ORDER BY r.seq LIMIT ?
"""
_SELECT_RANGE = """
    SELECT r.seq, r.ts_us, c.source, c.channel, r.value, c.unit, r.quality
    FROM readings AS r JOIN channels AS c ON c.id = r.channel_id
    WHERE r.seq >= ? AND r.seq <= ? ORDER BY r.seq LIMIT ?
"""
_SELECT_FIRST_TS = "SELECT ts_us FROM readings WHERE seq >= ? AND seq <= ? ORDER BY seq LIMIT 1"
_UPSERT_CURSOR = """
    INSERT INTO cursors (sink, seq) VALUES (?, ?)
    ON CONFLICT (sink) DO UPDATE SET seq = max(seq, excluded.seq)
"""
_SELECT_CURSORS = "SELECT sink, seq FROM cursors"
_DELETE_UP_TO = "DELETE FROM readings WHERE seq <= ?"
_DELETE_BETWEEN = "DELETE FROM readings WHERE seq >= ? AND seq <= ?"
_SELECT_COUNTERS = "SELECT name, value FROM counters"
_ADD_TO_COUNTER = """
    INSERT INTO counters (name, value) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET value = value + excluded.value
"""
DROPPED_ROWS = "dropped_rows"
"""Counter of rows deleted by the size cap before every enabled sink acknowledged them."""
DROPPED_DISK_FULL = "dropped_disk_full"
"""Counter of readings never written because the filesystem was full or failing."""
LAST_DISK_FULL_US = "last_dropped_disk_full_us"
"""Time of the newest drop counted in DROPPED_DISK_FULL, in microseconds since the epoch."""
_RAISE_COUNTER_TO = """
    INSERT INTO counters (name, value) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)
"""
_DROPPED_ROWS_OF_SINK = "dropped_rows:{sink}"
"""Counter, per sink, of rows above that sink's cursor deleted by the size cap."""
_LAST_VALUES_SEQ = "last_values_seq"
"""Counter: the seq up to which the channels table contains the newest value of each channel."""
# Bare columns next to max() come from the row with the maximum, so the subquery gives the
# newest reading of each channel above the seq. Readings of one channel are stored in the
# order they were read, so that is the newest even if the clock stepped back.
_NEWEST_ABOVE = """
    SELECT channel_id, ts_us, value, quality, max(seq) FROM readings
    WHERE seq > ? GROUP BY channel_id
"""
_UPDATE_LAST_VALUES = """
    UPDATE channels SET last_ts_us = r.ts_us, last_value = r.value, last_quality = r.quality
    FROM (
        SELECT channel_id, ts_us, value, quality, max(seq) FROM readings
        WHERE seq > ? GROUP BY channel_id
    ) AS r
    WHERE channels.id = r.channel_id
"""
"""UPDATE FROM, which SQLite has since 3.33.0."""
_UPDATE_CHANNEL_NEWEST = (
    "UPDATE channels SET last_ts_us = ?, last_value = ?, last_quality = ? WHERE id = ?"
)
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
_SELECT_CHANNEL_VALUES = """
    SELECT source, channel, unit, last_ts_us, last_value, last_quality
    FROM channels WHERE last_ts_us IS NOT NULL ORDER BY source, channel
"""
_SELECT_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"
# Added after schema version 1 without a version bump: it is created when missing, so a
# buffer made by an older agent gains it at the next start and still opens in older agents.
_CREATE_QUARANTINE = """
    CREATE TABLE IF NOT EXISTS quarantine (
        id INTEGER PRIMARY KEY,
        sink TEXT NOT NULL,
        seq INTEGER NOT NULL,
        ts_us INTEGER NOT NULL,
        source TEXT NOT NULL,
        channel TEXT NOT NULL,
        value REAL,
        unit TEXT NOT NULL,
        quality INTEGER NOT NULL,
        status INTEGER NOT NULL,
        reason TEXT NOT NULL,
        quarantined_us INTEGER NOT NULL
    )
"""
_INSERT_QUARANTINE = """
    INSERT INTO quarantine
        (sink, seq, ts_us, source, channel, value, unit, quality, status, reason, quarantined_us)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""
_CREATE_SET_ASIDE = """
    CREATE TABLE IF NOT EXISTS set_aside (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL,
        reason TEXT NOT NULL,
        set_aside_us INTEGER NOT NULL
    )
"""
_INSERT_SET_ASIDE = "INSERT INTO set_aside (path, reason, set_aside_us) VALUES (?, ?, ?)"
# The three lane tables are added like quarantine: created when missing, no version bump.
# A sink that sends a live lane ahead of its backlog acknowledges ranges above its cursor.
# acked_ranges keeps them, each range starting at least two above the sink's cursor,
# so that a gap of unacknowledged readings separates it from the cursor.
_CREATE_ACKED_RANGES = """
    CREATE TABLE IF NOT EXISTS acked_ranges (
        sink TEXT NOT NULL,
        first_seq INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (sink, first_seq)
    ) WITHOUT ROWID
"""
_SELECT_ACKED_RANGES = "SELECT sink, first_seq, last_seq FROM acked_ranges ORDER BY sink, first_seq"
_DELETE_ACKED_RANGES_OF_SINK = "DELETE FROM acked_ranges WHERE sink = ?"
_INSERT_ACKED_RANGE = "INSERT INTO acked_ranges (sink, first_seq, last_seq) VALUES (?, ?, ?)"
# The split seq of a sink draining a backlog: readings up to it form the backlog lane.
# started_us and depth record when the split was set and the backlog it had then, from
# which the drain rate and the time left are estimated.
_CREATE_SPLITS = """
    CREATE TABLE IF NOT EXISTS splits (
        sink TEXT PRIMARY KEY,
        seq INTEGER NOT NULL,
        started_us INTEGER NOT NULL,
        depth INTEGER NOT NULL
    )
"""
_SELECT_SPLITS = "SELECT sink, seq, started_us, depth FROM splits"
_UPSERT_SPLIT = """
    INSERT INTO splits (sink, seq, started_us, depth) VALUES (?, ?, ?, ?)
    ON CONFLICT (sink) DO UPDATE
    SET seq = excluded.seq, started_us = excluded.started_us, depth = excluded.depth
"""
_DELETE_SPLIT = "DELETE FROM splits WHERE sink = ?"
# Ranges of rows deleted above the lowest remaining row, because every enabled sink had
# acknowledged them in its acked ranges. Kept so that row counts stay exact arithmetic.
_CREATE_DELETED_RANGES = """
    CREATE TABLE IF NOT EXISTS deleted_ranges (
        first_seq INTEGER PRIMARY KEY,
        last_seq INTEGER NOT NULL
    )
"""
_SELECT_DELETED_RANGES = "SELECT first_seq, last_seq FROM deleted_ranges ORDER BY first_seq"
_DELETE_DELETED_RANGES = "DELETE FROM deleted_ranges"
_INSERT_DELETED_RANGE = "INSERT INTO deleted_ranges (first_seq, last_seq) VALUES (?, ?)"
_COUNT_SET_ASIDE = "SELECT count(*) FROM set_aside"
_SELECT_SET_ASIDE_NEWEST = "SELECT path FROM set_aside ORDER BY id DESC LIMIT ?"
_SELECT_SET_ASIDE_ALL = "SELECT path, reason, set_aside_us FROM set_aside ORDER BY id"
_SEED_SEQUENCE = "INSERT INTO sqlite_sequence (name, seq) VALUES ('readings', ?)"
_SELECT_MAX_SEQ = "SELECT max(seq) FROM readings"
_COUNT_QUARANTINE = "SELECT count(*) FROM quarantine"
_COUNT_QUARANTINE_OF_SINK = "SELECT count(*) FROM quarantine WHERE sink = ?"
_SELECT_QUARANTINE_NEWEST = """
    SELECT sink, seq, ts_us, source, channel, value, unit, quality, status, reason, quarantined_us
    FROM quarantine ORDER BY id DESC LIMIT ?
"""
QUARANTINE_LISTED = 10
"""Newest quarantined readings included in `stats()` and `read_stats()`."""


class BufferDatabaseError(Exception):
    """The buffer database file cannot be opened or used."""

    def __init__(self, path: Path, message: str) -> None:
        self.path = path
        super().__init__(message)


class CorruptDatabaseError(BufferDatabaseError):
    """SQLite reports the buffer file as corrupt or as not a database at all.

    `Buffer.open` moves such a file aside and raises this only when that fails.
    """

    def __init__(self, path: Path, message: str, cause: str) -> None:
        self.cause = cause
        """What SQLite reported, without the advice of the message."""
        super().__init__(path, message)


class ForeignDatabaseError(BufferDatabaseError):
    """The file is a valid SQLite database but not a rig-agent buffer of a known schema."""


class BufferInUseError(BufferDatabaseError):
    """Another process holds the buffer's lock: two agents must not share one data_dir."""


@dataclass(frozen=True, slots=True)
class ChannelValue:
    """The newest reading of one channel."""

    source: str
    channel: str
    unit: str
    ts_us: int
    value: float | None
    quality: Quality


@dataclass(frozen=True, slots=True)
class SinkStats:
    """Delivery state of one sink."""

    name: str
    cursor: int
    depth: int
    """Readings in the buffer with `seq` above the cursor."""
    dropped_buffer_full: int = 0
    """Readings this sink had not acknowledged that the size cap deleted before delivery."""


@dataclass(frozen=True, slots=True)
class SinkBacklog:
    """Backlog of one sink that sends a live lane ahead of its backlog lane."""

    name: str
    split: int | None
    """Readings up to this seq form the backlog lane; None when the sink is not draining."""
    depth: int
    """Readings in the buffer that the backlog lane has still to send."""
    oldest_ts_us: int | None
    """Timestamp of the oldest of those readings, or None when there is none."""
    split_us: int | None = None
    """When the split was set, in microseconds since the epoch."""
    split_depth: int = 0
    """Readings the backlog lane had to send when the split was set."""

    def drain_seconds(self, now_us: int) -> float | None:
        """Estimate the seconds until the backlog is sent, from the average rate since the split.

        Returns 0.0 without a backlog, and None while the rate is unknown because
        nothing of the backlog has been acknowledged since the split was set.
        """
        if self.depth == 0:
            return 0.0
        if self.split_us is None:
            return None
        drained = self.split_depth - self.depth
        elapsed = (now_us - self.split_us) / 1e6
        if drained <= 0 or elapsed <= 0:
            return None
        return self.depth * elapsed / drained


@dataclass(frozen=True, slots=True)
class LaneState:
    """Positions of the live lane and the backlog lane of one sink, from `Buffer.backlog`.

    Every reading at or below `cursor` is acknowledged or gone. The live lane sends
    the readings above `live_position`. Every reading at or below `live_position`
    that the sink has not acknowledged, and that is still in the buffer, lies in
    `pending_ranges`: the backlog lane sends those.
    """

    cursor: int
    split: int | None
    """The durable split seq, or None when the sink is not draining a backlog."""
    live_position: int
    """The highest of the cursor, the split and the acknowledged seq values."""
    pending_ranges: tuple[tuple[int, int], ...]
    """Closed `(first_seq, last_seq)` ranges, in ascending order."""
    depth: int
    """Readings in `pending_ranges`."""
    oldest_ts_us: int | None
    """Timestamp of the first reading in `pending_ranges`, or None when they are empty."""


@dataclass(frozen=True, slots=True)
class QuarantinedReading:
    """A reading that a destination rejected on its own, kept with the status and reason."""

    sink: str
    seq: int
    ts_us: int
    source: str
    channel: str
    value: float | None
    unit: str
    quality: Quality
    status: int
    """HTTP status of the rejection, such as 422."""
    reason: str
    quarantined_us: int
    """When the reading was quarantined, in microseconds since the Unix epoch."""


@dataclass(frozen=True, slots=True)
class BufferStats:
    """A snapshot of the buffer for `status` and metrics."""

    last_seq: int
    rows: int
    dropped_rows: int
    """Readings the size cap deleted before every enabled sink had acknowledged them."""
    db_bytes: int
    """Size of the database file and its WAL file on disk."""
    sinks: list[SinkStats] = field(default_factory=list)
    channels: list[ChannelValue] = field(default_factory=list)
    quarantined: int = 0
    """Readings in the quarantine table, of every sink."""
    quarantine_newest: list[QuarantinedReading] = field(default_factory=list)
    """The newest quarantined readings, newest first."""
    dropped_disk_full: int = 0
    """Readings never written because the filesystem was full, short of space or failing."""
    last_disk_full_us: int | None = None
    """When the newest of those readings was dropped, in microseconds since the epoch."""
    corrupt_databases_set_aside: int = 0
    """Corrupt database files moved aside at open and replaced by a new database."""
    set_aside_paths: list[str] = field(default_factory=list)
    """Paths the files were moved to, newest first."""
    backlogs: list[SinkBacklog] = field(default_factory=list)
    """Backlog lane of each sink in `sinks`, in the same order."""


class _State(enum.Enum):
    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


_VALUE_TYPES = (float, int, type(None))
"""Types a reading's value may have: SQLite stores ints as REAL and None as NULL."""


def check_readings(readings: Sequence[Reading]) -> None:
    """Run `check_reading` on every reading, in C for a batch where every field is right.

    Raises the TypeError of the first reading with a field the buffer cannot store.
    """
    if readings and _columns_storable(readings):
        return
    for reading in readings:
        check_reading(reading)


def _columns_storable(readings: Sequence[Reading]) -> bool:
    """Return whether every field of every reading has a type the buffer can store."""
    try:
        ts_col, source_col, channel_col, value_col, unit_col, quality_col = zip(
            *readings, strict=True
        )
        return (
            all(map(isinstance, ts_col, itertools.repeat(int)))
            and all(map(isinstance, value_col, itertools.repeat(_VALUE_TYPES)))
            and set(quality_col) <= _QUALITY_CODES.keys()
            and all(map(isinstance, source_col, itertools.repeat(str)))
            and all(map(isinstance, channel_col, itertools.repeat(str)))
            and all(map(isinstance, unit_col, itertools.repeat(str)))
        )
    except (TypeError, ValueError):
        # Not six fields each, or an unhashable quality: check_reading names the field.
        return False


def check_reading(reading: Reading) -> None:
    """Raise TypeError unless every field of the reading has a type the buffer can store.

    A wrong type would fail the whole batch's transaction on every retry, so it is
    rejected before the reading is accepted. NaN is accepted: SQLite stores it as NULL,
    so it reads back as None.
    """
    value = reading.value
    if (
        isinstance(reading.ts_us, int)
        and (value is None or isinstance(value, float | int))
        and reading.quality in _QUALITY_CODES
        and isinstance(reading.source, str)
        and isinstance(reading.channel, str)
        and isinstance(reading.unit, str)
    ):
        return
    _raise_unstorable(reading)


def _raise_unstorable(reading: Reading) -> None:
    where = f"reading of {reading.source!r}/{reading.channel!r}"
    if not isinstance(reading.ts_us, int):
        message = f"{where} has ts_us {reading.ts_us!r}: expected int microseconds since the epoch"
        raise TypeError(message)
    if reading.value is not None and not isinstance(reading.value, int | float):
        message = f"{where} has value {reading.value!r}: expected a float or None"
        raise TypeError(message)
    if reading.quality not in _QUALITY_CODES:
        message = f"{where} has quality {reading.quality!r}: expected a buffer.reading.Quality"
        raise TypeError(message)
    for name in ("source", "channel", "unit"):
        if not isinstance(getattr(reading, name), str):
            message = f"{where} has {name} {getattr(reading, name)!r}: expected a str"
            raise TypeError(message)


@dataclass(frozen=True, slots=True)
class _SizeBudget:
    """Split of a `max_bytes` cap between the main database file and its WAL."""

    max_bytes: int
    wal_bytes: int
    """WAL size that `journal_size_limit` truncates to after a checkpoint resets the WAL."""
    data_bytes: int
    """Bytes of used pages in the main file above which the oldest rows are deleted."""
    low_water: int
    """Bytes of used pages that the deletes go down to, so they do not run on every commit."""
    checkpoint_pages: int
    """`wal_autocheckpoint`: WAL pages after which a commit copies the WAL into the main file."""

    @classmethod
    def for_cap(cls, max_bytes: int, page_size: int) -> _SizeBudget:
        # The WAL peaks at about checkpoint_pages plus one transaction before the next
        # commit resets it, so half of its share is left for that transaction.
        wal_bytes = min(JOURNAL_SIZE_LIMIT, max_bytes // 8)
        checkpoint_pages = max(1, min(1000, wal_bytes // (2 * page_size)))
        data_bytes = max_bytes - wal_bytes
        low_water = data_bytes - max(4 * page_size, data_bytes // 1024)
        return cls(max_bytes, wal_bytes, data_bytes, low_water, checkpoint_pages)


class _RepeatedEvent:
    """Counts a repeated event so that it is logged at once, then at most once per interval."""

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._last_logged = -math.inf
        self.unlogged = 0
        """Events counted since the last log line."""

    def count(self, events: int) -> bool:
        """Add events and return whether a log line is due now."""
        self.unlogged += events
        now = time.monotonic()
        if now - self._last_logged < self._interval:
            return False
        self._last_logged = now
        return True

    def take(self) -> int:
        """Return the events counted since the last log line and start counting again."""
        events, self.unlogged = self.unlogged, 0
        return events


@dataclass(frozen=True, slots=True)
class _SetAside:
    """A corrupt database file moved aside at open, to be recorded in the new database."""

    path: Path
    reason: str
    seq_floor: int
    """The new database hands out seq values above this one."""
    earlier: list[tuple[str, str, int]]
    """Rows of the set_aside table still readable in the corrupt file."""


@dataclass(slots=True)
class _LaneUpdate:
    """Bookkeeping that a delete transaction changed, applied in memory once it commits."""

    deleted_up_to: int
    deleted_ranges: RangeSet
    cursors: dict[str, int]
    acked: dict[str, RangeSet]
    """New acknowledged ranges of each sink in `cursors`."""


@dataclass(frozen=True, slots=True)
class _Split:
    """A row of the splits table."""

    seq: int
    started_us: int
    depth: int


@dataclass(frozen=True, slots=True)
class _Lanes:
    """The contents of the acked_ranges, splits and deleted_ranges tables."""

    acked: dict[str, RangeSet]
    splits: dict[str, _Split]
    deleted: RangeSet


def _settle_cursor(cursor: int, ranges: RangeSet, deleted_up_to: int, deleted: RangeSet) -> int:
    """Merge into the cursor every range that only deleted rows separate from it.

    Returns the new cursor and removes the merged ranges, and any part at or below
    the cursor, from `ranges`. A deleted row cannot be sent any more, whether the
    size cap deleted it (it is then counted as lost) or every sink had acknowledged it.
    """
    if cursor >= 1:
        ranges.remove(1, cursor)
    while ranges:
        first, last = next(iter(ranges))
        floor = max(cursor, deleted_up_to)
        if first > floor + 1 and not deleted.covers(floor + 1, first - 1):
            break
        cursor = last
        ranges.remove(first, last)
    return cursor


def _pending_ranges(
    cursor: int, split: int | None, acked: RangeSet, deleted_up_to: int, deleted: RangeSet
) -> tuple[int, RangeSet]:
    """Return a sink's live position and the unacknowledged stored readings up to it."""
    live_position = max(cursor, split or 0, acked.last() or 0)
    pending = acked.gaps(max(cursor, deleted_up_to) + 1, live_position)
    for first, last in deleted.within(max(cursor, deleted_up_to) + 1, live_position):
        pending.remove(first, last)
    return live_position, pending


def _first_ts(conn: sqlite3.Connection, ranges: RangeSet) -> int | None:
    """Return the ts_us of the lowest stored reading in `ranges`, or None."""
    for first, last in ranges:
        row = conn.execute(_SELECT_FIRST_TS, (first, last)).fetchone()
        if row is not None:
            return int(row[0])
    return None


def _write_deleted_ranges(conn: sqlite3.Connection, deleted: RangeSet) -> None:
    conn.execute(_DELETE_DELETED_RANGES)
    conn.executemany(_INSERT_DELETED_RANGE, deleted.ranges())


def _fetch_lanes(conn: sqlite3.Connection) -> _Lanes:
    """Read the lane tables; a buffer made before they existed reads as empty."""
    tables = {row[0] for row in conn.execute(_SELECT_TABLES)}
    acked: dict[str, RangeSet] = {}
    splits: dict[str, _Split] = {}
    deleted = RangeSet()
    if "acked_ranges" in tables:
        for sink, first, last in conn.execute(_SELECT_ACKED_RANGES):
            acked.setdefault(sink, RangeSet()).add(first, last)
    if "splits" in tables:
        splits = {
            sink: _Split(seq, started_us, depth)
            for sink, seq, started_us, depth in conn.execute(_SELECT_SPLITS)
        }
    if "deleted_ranges" in tables:
        deleted = RangeSet(conn.execute(_SELECT_DELETED_RANGES).fetchall())
    return _Lanes(acked, splits, deleted)


class Buffer:
    """Store-and-forward buffer in `data_dir/buffer.sqlite3`.

    `sinks` are the enabled sinks: rows acknowledged by all of them are
    deleted in the background. With no enabled sink nothing is deleted.
    Every database call runs on one dedicated thread that owns the connection.

    A sink acknowledges readings either by moving its cursor (`commit_cursor`),
    or by range (`ack_range`) when it sends a live lane ahead of a backlog lane.
    Ranges above the cursor are stored durably and merged, and the cursor
    moves up through them once the readings in between are acknowledged too.

    `max_bytes` caps the database file plus its WAL: past it, the oldest rows
    are deleted even if a sink has not acknowledged them, and each sink's
    loss is counted. A commit may overshoot the cap by about one batch.
    `min_free_bytes` is free space the buffer leaves on its filesystem: a
    batch that would cut into it is not written but counted as dropped, and
    so is a batch that fails with a full disk or an I/O error. With
    `min_free_bytes` 0, only the errors of SQLite drop a batch.

    At open, a corrupt database is moved aside as `buffer-corrupt-<UTC time>.db`
    and replaced by a new one, whose seq values continue above the old ones.
    """

    def __init__(
        self,
        data_dir: Path,
        sinks: Sequence[str],
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = 0,
        cleanup_interval: float = CLEANUP_INTERVAL,
        compact_interval: float = COMPACT_INTERVAL,
    ) -> None:
        if max_bytes is not None and max_bytes < MIN_MAX_BYTES:
            message = (
                f"buffer max_bytes is {max_bytes} bytes: expected at least {MIN_MAX_BYTES} "
                "(1 MiB), because a smaller buffer holds only seconds of readings. "
                "Raise buffer.max_bytes, or leave it out for the default"
            )
            raise ValueError(message)
        if min_free_bytes < 0:
            message = f"buffer min_free_bytes is {min_free_bytes}: expected 0 or more bytes"
            raise ValueError(message)
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_FILENAME
        self.sinks = tuple(sinks)
        self.max_bytes = max_bytes
        self.min_free_bytes = min_free_bytes
        self._cleanup_interval = cleanup_interval
        self._compact_interval = compact_interval
        self._state = _State.NEW
        self._executor: ThreadPoolExecutor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cleanup_task: asyncio.Task[None] | None = None
        self._data_event = asyncio.Event()

        # The SQLite thread writes these after each commit, and the event loop reads them.
        self._last_seq = 0
        self._cursors: dict[str, int] = {}
        # Only the SQLite thread uses these.
        # Acknowledged ranges above each sink's cursor, as in the acked_ranges table.
        self._acked: dict[str, RangeSet] = {}
        self._splits: dict[str, _Split] = {}
        # Deleted rows above _deleted_up_to, as in the deleted_ranges table.
        self._deleted_ranges = RangeSet()
        self._conn: sqlite3.Connection | None = None
        self._lock_file: TextIO | None = None
        self._channel_ids: dict[tuple[str, str], int] = {}
        self._channel_units: dict[int, str] = {}
        # Raised after each commit that changes a channel's unit, so that _read_recent
        # leaves batches committed before it to SQLite, which reads the current unit.
        self._units_version = 0
        self._deleted_up_to = 0
        self._page_size = 4096
        self._budget: _SizeBudget | None = None
        self._set_aside: _SetAside | None = None
        # Readings dropped for lack of disk space whose counter update has not been
        # written yet: it is added to the next transaction that succeeds.
        self._unsaved_disk_drops = 0
        self._last_disk_drop_us: int | None = None
        # Totals as stored in the counters table, kept for the log lines.
        self._dropped_rows = 0
        self._dropped_by_sink: dict[str, int] = {}
        self._dropped_disk_full = 0
        self._cap_log = _RepeatedEvent(DROP_LOG_INTERVAL)
        self._disk_log = _RepeatedEvent(DROP_LOG_INTERVAL)
        self._cap_error_log = _RepeatedEvent(DROP_LOG_INTERVAL)
        self._dropping_batches = False
        # The channels table contains the newest value of each channel up to this seq.
        self._last_values_seq = 0
        self._last_values_due = -math.inf
        # The newest committed batches as (first seq, readings), oldest first, at most
        # about RECENT_READINGS readings. Only the event loop uses them. The SQLite
        # thread raises _recent_floor before it deletes rows, so that no read serves
        # a deleted reading from memory.
        self._recent: deque[tuple[int, list[Reading]]] = deque()
        self._recent_count = 0
        self._recent_floor = 0
        # The _units_version of the batches held, all committed with the same units.
        self._recent_units_version = 0

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def open(self) -> None:
        """Create or open the database on the SQLite thread; check the schema."""
        if self._state is not _State.NEW:
            message = f"buffer {self.path} is {self._state.value}: a Buffer opens only once"
            raise RuntimeError(message)
        self._loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-buffer")
        try:
            await self._call(self._open_sync)
        except BaseException:
            # A cancelled open may still be running on the thread: close after it.
            self._executor.submit(self._close_sync)
            self._executor.shutdown(wait=False)
            self._executor = None
            raise
        self._state = _State.OPEN
        self._cleanup_task = asyncio.create_task(self._cleanup_loop(), name="buffer-cleanup")
        log.info(
            "buffer_opened",
            path=str(self.path),
            last_seq=self._last_seq,
            max_bytes=self.max_bytes,
            min_free_bytes=self.min_free_bytes,
        )

    async def aclose(self) -> None:
        """Finish background work, close the connection and stop the thread."""
        if self._state is not _State.OPEN:
            return
        self._state = _State.CLOSED
        if self._cleanup_task is not None:
            self._cleanup_task.cancel()
            await asyncio.wait([self._cleanup_task])
        executor = self._executor
        if executor is not None:
            try:
                await asyncio.get_running_loop().run_in_executor(executor, self._shutdown_sync)
            finally:
                executor.shutdown(wait=True)
                self._executor = None
        log.info("buffer_closed", path=str(self.path), last_seq=self._last_seq)

    @property
    def last_seq(self) -> int:
        """Highest `seq` committed so far (0 for an empty new database).

        After `aclose` it stays readable and keeps the last value.
        """
        return self._last_seq

    async def append(
        self, readings: Sequence[Reading], *, checked: bool = False
    ) -> tuple[int, int]:
        """Insert readings in one transaction; return the first and last `seq` given.

        An empty batch touches nothing and returns `(last_seq + 1, last_seq)`. So
        does a batch dropped for lack of disk space (below `min_free_bytes`, disk
        full or an I/O error): it is counted in `stats().dropped_disk_full` and
        logged, and does not raise. After the commit, rows over `max_bytes` are
        deleted oldest first. The transaction completes on the SQLite thread even
        if the caller is cancelled.

        Each reading goes through `check_reading` first, unless `checked` is True
        because the caller has done that already (as BufferWriter does).
        """
        self._require_open()
        if not readings:
            return self._last_seq + 1, self._last_seq
        append = functools.partial(self._append_sync, list(readings), checked=checked)
        return await self._call(append)

    async def wait_for_data(self, after_seq: int, timeout: float) -> bool:  # noqa: ASYNC109 - sinks use this signature
        """Wait until `last_seq > after_seq` or the timeout passes; return which."""
        self._require_open()
        try:
            async with asyncio.timeout(timeout):
                while self._last_seq <= after_seq:
                    await self._data_event.wait()
        except TimeoutError:
            return self._last_seq > after_seq
        return True

    async def cursor(self, sink: str) -> int:
        """Return the committed cursor of a sink (0 when it has none yet)."""
        self._require_open()
        return self._cursors.get(sink, 0)

    async def read_batch(
        self, sink: str, limit: int, after_seq: int | None = None
    ) -> list[StoredReading]:
        """Return up to `limit` readings with `seq` above `after_seq` (default: the cursor)."""
        self._require_open()
        if limit < 1:
            message = f"read_batch limit is {limit}: expected at least 1"
            raise ValueError(message)
        start = self._cursors.get(sink, 0) if after_seq is None else after_seq
        recent = self._read_recent(start, limit)
        if recent is not None:
            return recent
        return await self._call(functools.partial(self._read_batch_sync, start, limit))

    def _read_recent(self, after_seq: int, limit: int) -> list[StoredReading] | None:
        """Return the readings above `after_seq` from memory, or None when they are not all there.

        The readings come back as SQLite would return them: NaN as None, numbers as
        float, the quality as a Quality, and the channel's current unit. Batches
        committed before a unit change are not served, because their readings
        carry the old unit.
        """
        if after_seq >= self._last_seq:
            return []
        start = after_seq + 1
        if not self._recent or start < max(self._recent[0][0], self._recent_floor):
            return None
        if self._units_version != self._recent_units_version:
            return None
        as_quality = _AS_QUALITY
        # tuple.__new__ with all seven fields builds the same StoredReading as its
        # constructor in about half the time.
        new = tuple.__new__
        out: list[StoredReading] = []
        for first, readings in self._recent:
            end = first + len(readings)
            if end <= start:
                continue
            offset = start - first
            for seq, (ts_us, source, channel, value, unit, quality) in enumerate(
                readings[offset : offset + limit - len(out)], start
            ):
                if value is not None:
                    value = float(value) if value == value else None
                out.append(
                    new(
                        StoredReading,
                        (seq, ts_us, source, channel, value, unit, as_quality[quality]),
                    )
                )
            start = end
            if len(out) >= limit:
                break
        # Empty here means the newest commit has not reached the event loop yet.
        return out or None

    async def commit_cursor(self, sink: str, seq: int) -> None:
        """Durably move a sink's cursor forward to `seq`; a lower value is ignored.

        Raises ValueError for a `seq` above `last_seq`, because such a cursor would let
        the background cleanup delete readings that no sink has seen.
        """
        self._require_open()
        if seq < 0 or seq > self._last_seq:
            message = (
                f"cursor of sink {sink!r} cannot move to seq {seq}: "
                f"expected 0 to last_seq {self._last_seq}"
            )
            raise ValueError(message)
        if seq <= self._cursors.get(sink, 0):
            return
        await self._call(functools.partial(self._commit_cursor_sync, sink, seq))

    async def ack_range(self, sink: str, first_seq: int, last_seq: int) -> None:
        """Durably record that a sink's destination acknowledged `first_seq` to `last_seq`.

        The range is merged with the sink's other acknowledged ranges. When no
        unacknowledged reading is left between the cursor and the merged range,
        the cursor moves to the range's end in the same transaction. Readings the
        size cap deleted count as acknowledged for this purpose, because they
        cannot be sent any more. Raises ValueError for an empty range or one
        outside 1 to `last_seq`.
        """
        self._require_open()
        if not 1 <= first_seq <= last_seq <= self._last_seq:
            message = (
                f"sink {sink!r} cannot acknowledge seq {first_seq} to {last_seq}: "
                f"expected 1 <= first_seq <= last_seq <= last_seq of the buffer ({self._last_seq})"
            )
            raise ValueError(message)
        await self._call(functools.partial(self._ack_range_sync, sink, first_seq, last_seq))

    async def read_range(self, first_seq: int, last_seq: int, limit: int) -> list[StoredReading]:
        """Return up to `limit` readings with `first_seq <= seq <= last_seq`, in seq order."""
        self._require_open()
        if limit < 1:
            message = f"read_range limit is {limit}: expected at least 1"
            raise ValueError(message)
        call = functools.partial(self._read_range_sync, first_seq, last_seq, limit)
        return await self._call(call)

    async def backlog(self, sink: str) -> LaneState:
        """Return the cursor, split, live position and unacknowledged ranges of a sink."""
        self._require_open()
        return await self._call(functools.partial(self._backlog_sync, sink))

    async def start_split(self, sink: str, split_seq: int) -> None:
        """Durably set the seq that separates a sink's backlog lane from its live lane.

        Readings up to `split_seq` that the sink has not acknowledged belong to
        the backlog lane; the live lane sends the readings above it. Setting it
        again replaces the old split, as after a second outage during a drain.
        Raises ValueError for a `split_seq` outside 0 to `last_seq`.
        """
        self._require_open()
        if not 0 <= split_seq <= self._last_seq:
            message = (
                f"sink {sink!r} cannot split at seq {split_seq}: "
                f"expected 0 to last_seq {self._last_seq}"
            )
            raise ValueError(message)
        await self._call(functools.partial(self._set_split_sync, sink, split_seq))

    async def end_split(self, sink: str) -> None:
        """Durably clear a sink's split; its acknowledged ranges stay as they are."""
        self._require_open()
        await self._call(functools.partial(self._set_split_sync, sink, None))

    async def quarantine(
        self,
        sink: str,
        readings: Sequence[StoredReading],
        status: int,
        reason: str,
        *,
        as_range: bool = False,
    ) -> None:
        """Copy rejected readings to the quarantine table and acknowledge them for the sink.

        Both happen in one transaction, so after a crash the readings are either
        quarantined and acknowledged, or neither. By default the cursor moves to
        the highest seq of `readings`, so the caller must already have delivered
        or quarantined every reading of the sink below them. With `as_range`,
        the range from the lowest to the highest seq of `readings` is
        acknowledged as `ack_range` does, which is what a lane of a draining
        sink needs.
        """
        self._require_open()
        if not readings:
            return
        up_to = max(r.seq for r in readings)
        if up_to > self._last_seq:
            message = (
                f"cannot quarantine seq {up_to} for sink {sink!r}: "
                f"expected at most last_seq {self._last_seq}"
            )
            raise ValueError(message)
        from_seq = min(r.seq for r in readings) if as_range else None
        if from_seq is not None and from_seq < 1:
            message = f"cannot quarantine seq {from_seq} for sink {sink!r}: expected at least 1"
            raise ValueError(message)
        call = functools.partial(
            self._quarantine_sync, sink, list(readings), status, reason, from_seq
        )
        await self._call(call)

    async def quarantined_count(self, sink: str | None = None) -> int:
        """Return the number of quarantined readings of one sink, or of all sinks."""
        self._require_open()
        return await self._call(functools.partial(self._quarantined_count_sync, sink))

    async def stats(self) -> BufferStats:
        """Return a snapshot of depths, counters and the newest value per channel.

        `dropped_disk_full` includes drops whose counter could not be written yet.
        """
        self._require_open()
        return await self._call(self._stats_sync)

    async def delete_acknowledged(self) -> int:
        """Delete rows that every enabled sink has acknowledged and return their count.

        The background cleanup task calls this about once a second.
        """
        self._require_open()
        deleted = 0
        while True:
            count, more = await self._call(self._delete_chunk_sync)
            deleted += count
            if not more:
                return deleted

    async def compact(self) -> None:
        """Return free pages to the filesystem and truncate the WAL file."""
        self._require_open()
        await self._call(self._compact_sync)

    # Event-loop side helpers.

    def _require_open(self) -> None:
        if self._state is not _State.OPEN:
            message = f"buffer {self.path} is {self._state.value}: expected an open buffer"
            raise RuntimeError(message)

    async def _call(self, func: Callable[[], _T]) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, func)

    def _wake_waiters(self) -> None:
        self._data_event.set()
        self._data_event = asyncio.Event()

    def _on_commit(self, first_seq: int, readings: list[Reading], units_version: int) -> None:
        """Keep a committed batch in memory for `read_batch`, then wake the waiting sinks."""
        recent = self._recent
        contiguous = bool(recent) and recent[-1][0] + len(recent[-1][1]) == first_seq
        same_units = units_version == self._recent_units_version
        if not contiguous or not same_units or len(readings) > RECENT_READINGS:
            # A batch after a gap (never expected), after a unit change, or too large.
            recent.clear()
            self._recent_count = 0
            self._recent_units_version = units_version
        if len(readings) <= RECENT_READINGS:
            recent.append((first_seq, readings))
            self._recent_count += len(readings)
            while self._recent_count - len(recent[0][1]) >= RECENT_READINGS:
                self._recent_count -= len(recent.popleft()[1])
        self._wake_waiters()

    async def _cleanup_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_compact = loop.time() + self._compact_interval
        deleted_since_compact = 0
        failures = 0
        while True:
            await asyncio.sleep(self._cleanup_interval)
            try:
                deleted_since_compact += await self.delete_acknowledged()
                if deleted_since_compact and loop.time() >= next_compact:
                    await self.compact()
                    deleted_since_compact = 0
                    next_compact = loop.time() + self._compact_interval
            except Exception as exc:  # cleanup is retried next time and must not stop
                failures += 1
                level = log.warning if failures == 1 else log.debug
                level(
                    "buffer_cleanup_failed",
                    path=str(self.path),
                    error=str(exc),
                    error_type=type(exc).__name__,
                    count=failures,
                )
                continue
            if failures:
                log.info("buffer_cleanup_recovered", path=str(self.path), failures=failures)
                failures = 0

    # SQLite-thread side: everything below runs on the executor's single thread.

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            message = f"buffer {self.path} has no open connection"
            raise RuntimeError(message)
        return self._conn

    def _open_sync(self) -> None:
        self.data_dir.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        self._lock_file = _lock_data_dir(self.data_dir)
        try:
            try:
                self._open_database_sync()
            except CorruptDatabaseError as exc:
                self._open_replacement_sync(exc)
        except BaseException:
            self._close_sync()
            raise

    def _open_database_sync(self) -> None:
        try:
            self._conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from exc
        _open_schema(self._conn, self.path)
        try:
            if self._set_aside is not None:
                _record_set_aside(self._conn, self._set_aside)
            self._load_state(self._conn)
            self._apply_size_limits(self._conn)
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from exc
        self._enforce_size_cap(self._conn)

    def _open_replacement_sync(self, error: CorruptDatabaseError) -> None:
        """Move a corrupt database aside and open a new one in its place.

        Destinations remove duplicates by seq, so they would discard new readings
        that reused old seq values. The new database therefore starts above the
        highest seq still readable in the corrupt file. When none is readable, it
        starts above the current time in microseconds, which is above every old
        seq unless the old buffer stored more than one reading per microsecond
        on average since it was created.
        """
        # NOTE: with an unreadable file and a system clock set far back, seq values
        # of the old database can be handed out again.
        salvaged = self._salvage_last_seq()
        earlier = self._salvage_set_aside()
        self._close_connection()
        try:
            moved_to = _move_aside(self.path)
        except OSError as exc:
            message = (
                f"buffer database {self.path} is corrupt ({error.cause}), and moving it aside "
                f"failed: {exc}. Stop the agent, move the file and its -wal and -shm files "
                "aside by hand, and start again"
            )
            raise CorruptDatabaseError(self.path, message, error.cause) from exc
        seq_floor = now_us() if salvaged is None else salvaged
        self._set_aside = _SetAside(moved_to, error.cause, seq_floor, earlier)
        log.error(
            "buffer_corrupt_set_aside",
            path=str(self.path),
            moved_to=str(moved_to),
            error=error.cause,
            seq_floor=seq_floor,
            seq_floor_from="old database" if salvaged is not None else "clock",
        )
        self._open_database_sync()

    def _salvage_last_seq(self) -> int | None:
        """Return the highest seq that can still be read from the open corrupt file."""
        if self._conn is None:
            return None
        found: list[int] = []
        for query in (_SELECT_LAST_SEQ, _SELECT_MAX_SEQ):
            try:
                row = self._conn.execute(query).fetchone()
            except sqlite3.Error:
                continue
            # A corrupt page may hold any number. One near the 64-bit limit would make
            # every later insert fail, so such a value is not trusted.
            if row is not None and isinstance(row[0], int) and 0 <= row[0] < 2**62:
                found.append(row[0])
        return max(found, default=None)

    def _salvage_set_aside(self) -> list[tuple[str, str, int]]:
        """Return the set_aside rows of the open corrupt file, or [] when unreadable."""
        if self._conn is None:
            return []
        try:
            return [
                (str(path), str(reason), int(set_aside_us))
                for path, reason, set_aside_us in self._conn.execute(_SELECT_SET_ASIDE_ALL)
            ]
        except (sqlite3.Error, TypeError, ValueError):
            return []

    def _load_state(self, conn: sqlite3.Connection) -> None:
        self._last_seq = _fetch_last_seq(conn)
        self._cursors = dict(conn.execute(_SELECT_CURSORS).fetchall())
        self._channel_ids = {}
        self._channel_units = {}
        for source, channel, channel_id, unit in conn.execute(_SELECT_CHANNEL_IDS):
            self._channel_ids[source, channel] = channel_id
            self._channel_units[channel_id] = unit
        low, _high = conn.execute(_SELECT_SEQ_RANGE).fetchone()
        self._deleted_up_to = self._last_seq if low is None else low - 1
        lanes = _fetch_lanes(conn)
        self._acked = lanes.acked
        self._splits = lanes.splits
        self._deleted_ranges = lanes.deleted.within(self._deleted_up_to + 1, self._last_seq)
        counters: dict[str, int] = dict(conn.execute(_SELECT_COUNTERS).fetchall())
        self._dropped_rows = counters.get(DROPPED_ROWS, 0)
        self._dropped_disk_full = counters.get(DROPPED_DISK_FULL, 0)
        self._dropped_by_sink = {
            sink: counters.get(_DROPPED_ROWS_OF_SINK.format(sink=sink), 0) for sink in self.sinks
        }
        # A buffer without the counter comes from an agent that wrote the last values
        # in every commit.
        self._last_values_seq = counters.get(_LAST_VALUES_SEQ, self._last_seq)
        if self._last_values_seq < self._last_seq:
            # The readings of the last interval before a crash.
            self._save_last_values(conn)

    def _apply_size_limits(self, conn: sqlite3.Connection) -> None:
        self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        if self.max_bytes is None:
            return
        budget = _SizeBudget.for_cap(self.max_bytes, self._page_size)
        conn.execute(f"PRAGMA journal_size_limit = {budget.wal_bytes}")
        conn.execute(f"PRAGMA wal_autocheckpoint = {budget.checkpoint_pages}")
        self._budget = budget

    def _shutdown_sync(self) -> None:
        if self._conn is not None and self._last_values_seq < self._last_seq:
            self._save_last_values(self._conn)
        if self._conn is not None and self._unsaved_disk_drops:
            self._save_disk_drops(self._conn)
        if self._cap_log.unlogged:
            self._log_cap_drops()
        if self._disk_log.unlogged:
            self._log_disk_drops({})
        self._close_sync()

    def _close_connection(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    def _close_sync(self) -> None:
        self._close_connection()
        if self._lock_file is not None:
            # Closing the file releases the flock.
            self._lock_file.close()
            self._lock_file = None

    def _append_sync(self, readings: list[Reading], *, checked: bool = False) -> tuple[int, int]:
        if not checked:
            check_readings(readings)
        conn = self._connection()
        nothing = (self._last_seq + 1, self._last_seq)
        shortage = self._space_shortage(len(readings))
        if shortage is not None:
            self._drop_batch(conn, len(readings), shortage)
            return nothing
        try:
            first_last = self._insert_sync(conn, readings)
        except sqlite3.Error as exc:
            if not _is_disk_error(exc):
                raise
            self._drop_batch(conn, len(readings), {"error": str(exc)})
            return nothing
        if self._dropping_batches:
            self._dropping_batches = False
            log.info(
                "buffer_disk_space_recovered",
                path=str(self.path),
                dropped=self._disk_log.take(),
                dropped_total=self._dropped_disk_full + self._unsaved_disk_drops,
            )
        self._enforce_size_cap(conn)
        return first_last

    def _insert_sync(self, conn: sqlite3.Connection, readings: list[Reading]) -> tuple[int, int]:
        new_channels: dict[tuple[str, str], int] = {}
        new_units: dict[int, str] = {}
        unsaved_drops = self._unsaved_disk_drops
        channel_ids = self._channel_ids
        units = self._channel_units

        # The usual batch is of known channels with unchanged units. Its rows are built
        # column by column with zip and map, which loop in C.
        ts_col, source_col, channel_col, value_col, unit_col, quality_col = zip(
            *readings, strict=True
        )
        found = list(map(channel_ids.get, zip(source_col, channel_col, strict=True)))
        ids = cast(list[int], found)
        known = None not in found and tuple(map(units.__getitem__, ids)) == unit_col

        conn.execute("BEGIN IMMEDIATE")
        try:
            if known:
                codes_col = map(_QUALITY_CODES.__getitem__, quality_col)
                rows = list(zip(ts_col, ids, value_col, codes_col, strict=True))
            else:
                rows = self._rows_of_new_channels(conn, readings, new_channels, new_units)
            _insert_rows(conn, rows)
            if new_units:
                conn.executemany(_UPDATE_CHANNEL_UNIT, [(u, i) for i, u in new_units.items()])
                if any(channel_id in units for channel_id in new_units):
                    # Raised before the commit: from here on, reads go to SQLite.
                    self._units_version += 1
            last_seq = _fetch_last_seq(conn)
            # A new channel's value is written at once, so it shows in read_stats
            # without waiting for the next interval.
            save_last_values = bool(new_channels) or time.monotonic() >= self._last_values_due
            if save_last_values:
                _write_last_values(conn, self._last_values_seq, last_seq)
            if unsaved_drops:
                self._write_disk_drops(conn, unsaved_drops)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

        # Channel ids become visible only once committed: a rolled-back id may be reused.
        self._channel_ids.update(new_channels)
        units.update(new_units)
        self._last_seq = last_seq
        self._dropped_disk_full += unsaved_drops
        self._unsaved_disk_drops -= unsaved_drops
        self._notify_loop(last_seq - len(readings) + 1, readings)
        if save_last_values:
            self._last_values_saved()
        return last_seq - len(readings) + 1, last_seq

    def _rows_of_new_channels(
        self,
        conn: sqlite3.Connection,
        readings: list[Reading],
        new_channels: dict[tuple[str, str], int],
        new_units: dict[int, str],
    ) -> list[tuple[int, int, float | None, int]]:
        """Build the rows of a batch with new channels or changed units, one reading at a time.

        Inserts the new channels and fills `new_channels`, and `new_units` with the
        units of new channels and the changed units.
        """
        rows: list[tuple[int, int, float | None, int]] = []
        units = self._channel_units
        for ts_us, source, channel, value, unit, quality in readings:
            channel_id = self._channel_ids.get((source, channel))
            if channel_id is None:
                channel_id = self._new_channel_id(conn, source, channel, unit, new_channels)
                # Also the unit of a channel's later readings in this batch.
                new_units[channel_id] = unit
            elif units[channel_id] != unit:
                new_units[channel_id] = unit
            rows.append((ts_us, channel_id, value, _QUALITY_CODES[quality]))
        return rows

    def _save_last_values(self, conn: sqlite3.Connection) -> None:
        """Write the last values up to last_seq in a transaction of their own.

        A disk error leaves them unwritten; a later commit writes them, or the
        next open.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _write_last_values(conn, self._last_values_seq, self._last_seq)
                conn.execute("COMMIT")
            except BaseException:
                _rollback(conn)
                raise
        except sqlite3.Error as exc:
            if not _is_disk_error(exc):
                raise
            return
        self._last_values_saved()

    def _write_last_values_before_delete(self, conn: sqlite3.Connection, up_to: int) -> bool:
        """Write the last values before a delete of rows up to `up_to`; return whether it did.

        Runs within the caller's transaction, and only when some of those rows are
        above the last write, so that the size cap deletes no channel's newest
        reading before its value is copied.
        """
        if self._last_values_seq >= up_to:
            return False
        _write_last_values(conn, self._last_values_seq, self._last_seq)
        return True

    def _last_values_saved(self) -> None:
        """Record that the channels table now contains the last values up to last_seq."""
        self._last_values_seq = self._last_seq
        self._last_values_due = time.monotonic() + LAST_VALUES_INTERVAL

    # Free space on the filesystem.

    def _space_shortage(self, count: int) -> dict[str, object] | None:
        """Return log fields when a commit of `count` readings would cut into min_free_bytes."""
        if self.min_free_bytes == 0:
            return None
        try:
            fs = os.statvfs(self.data_dir)
        except OSError:
            # The commit is tried anyway: a full disk then shows as an SQLite error.
            return None
        free_bytes = fs.f_bavail * fs.f_frsize
        # NOTE: every batch is counted as new disk space, even though SQLite often
        # reuses free pages and WAL space, so batches are dropped as soon as free
        # space falls under min_free_bytes plus one batch.
        needed_bytes = _estimate_commit_bytes(count, self._page_size)
        if free_bytes - needed_bytes >= self.min_free_bytes:
            return None
        return {"free_bytes": free_bytes, "needed_bytes": needed_bytes}

    def _drop_batch(self, conn: sqlite3.Connection, count: int, fields: dict[str, object]) -> None:
        self._unsaved_disk_drops += count
        self._last_disk_drop_us = now_us()
        self._dropping_batches = True
        self._save_disk_drops(conn)
        if self._disk_log.count(count):
            self._log_disk_drops(fields)

    def _save_disk_drops(self, conn: sqlite3.Connection) -> None:
        """Add the unsaved disk-full drops to their counter, or keep them for later."""
        unsaved = self._unsaved_disk_drops
        try:
            # This small transaction often fits where a batch did not, as below min_free_bytes.
            conn.execute("BEGIN IMMEDIATE")
            self._write_disk_drops(conn, unsaved)
            conn.execute("COMMIT")
        except sqlite3.Error:
            _rollback(conn)
            return
        self._dropped_disk_full += unsaved
        self._unsaved_disk_drops = 0

    def _write_disk_drops(self, conn: sqlite3.Connection, count: int) -> None:
        conn.execute(_ADD_TO_COUNTER, (DROPPED_DISK_FULL, count))
        if self._last_disk_drop_us is not None:
            conn.execute(_RAISE_COUNTER_TO, (LAST_DISK_FULL_US, self._last_disk_drop_us))

    def _log_disk_drops(self, fields: dict[str, object]) -> None:
        log.warning(
            "buffer_disk_full_dropped",
            path=str(self.path),
            dropped=self._disk_log.take(),
            dropped_total=self._dropped_disk_full + self._unsaved_disk_drops,
            not_yet_counted_on_disk=self._unsaved_disk_drops,
            min_free_bytes=self.min_free_bytes,
            **fields,
        )

    # The size cap.

    def _enforce_size_cap(self, conn: sqlite3.Connection) -> None:
        """Delete the oldest rows while the database is over its cap; log SQLite errors."""
        budget = self._budget
        if budget is None:
            return
        try:
            if self._delete_over_cap(conn, budget):
                self._shrink_after_delete(conn, budget)
        except sqlite3.Error as exc:
            if self._cap_error_log.count(1):
                log.warning(
                    "buffer_size_cap_failed",
                    path=str(self.path),
                    error=str(exc),
                    error_type=type(exc).__name__,
                    count=self._cap_error_log.take(),
                )

    def _delete_over_cap(self, conn: sqlite3.Connection, budget: _SizeBudget) -> int:
        # Deleted rows leave free pages that later inserts reuse, so the used pages
        # measure what the file needs, not the file size.
        used = _used_bytes(conn, self._page_size)
        if used <= budget.data_bytes:
            return 0
        deleted = 0
        for _round in range(CAP_DELETE_ROUNDS):
            rows = self._row_count()
            excess = used - budget.low_water
            if rows <= 0 or excess <= 0:
                break
            # Channel and quarantine rows count in `used`, so this overestimates the
            # bytes per reading and the loop needs a few rounds rather than deleting too many.
            row_bytes = max(1, used // rows)
            count = min(rows, DELETE_CHUNK_ROWS, -(-excess // row_bytes))
            self._delete_oldest(conn, count)
            deleted += count
            used = _used_bytes(conn, self._page_size)
        nothing_left = self._row_count() == 0
        if used > budget.data_bytes and nothing_left and self._cap_error_log.count(1):
            log.warning(
                "buffer_size_cap_failed",
                path=str(self.path),
                error="no readings left to delete; quarantined readings take the space",
                used_bytes=used,
                allowed_bytes=budget.data_bytes,
                count=self._cap_error_log.take(),
            )
        return deleted

    def _delete_oldest(self, conn: sqlite3.Connection, count: int) -> None:
        """Delete the `count` oldest readings and count what each enabled sink loses.

        A sink loses a deleted reading that it had not acknowledged, by cursor or by range.
        """
        start = self._deleted_up_to
        up_to = self._seq_after_rows(start, count)
        deleted = RangeSet([(start + 1, up_to)]) if up_to > start else RangeSet()
        for first, last in self._deleted_ranges.within(start + 1, up_to):
            deleted.remove(first, last)
        lost = {}
        for sink in self.sinks:
            unacknowledged = deleted.total() - self._acknowledged(sink, start + 1, up_to).total()
            if unacknowledged > 0:
                lost[sink] = unacknowledged
        dropped = deleted.total() - self._acknowledged_by_all(start + 1, up_to).total()

        self._recent_floor = max(self._recent_floor, up_to + 1)
        conn.execute("BEGIN IMMEDIATE")
        try:
            saved_last_values = self._write_last_values_before_delete(conn, up_to)
            conn.execute(_DELETE_UP_TO, (up_to,))
            if dropped:
                conn.execute(_ADD_TO_COUNTER, (DROPPED_ROWS, dropped))
            for sink, rows in lost.items():
                conn.execute(_ADD_TO_COUNTER, (_DROPPED_ROWS_OF_SINK.format(sink=sink), rows))
            update = self._advance_deleted_up_to(conn, up_to)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

        if saved_last_values:
            self._last_values_saved()
        self._apply_lane_update(update)
        self._dropped_rows += dropped
        for sink, rows in lost.items():
            self._dropped_by_sink[sink] = self._dropped_by_sink.get(sink, 0) + rows
        if dropped and self._cap_log.count(dropped):
            self._log_cap_drops()

    def _seq_after_rows(self, start: int, count: int) -> int:
        """Return the seq up to which deleting from above `start` removes `count` stored rows."""
        position = start
        remaining = count
        # Rows in deleted ranges are gone already, so the deletion steps over them.
        for first, last in self._deleted_ranges.within(start + 1, self._last_seq):
            stored_before = first - 1 - position
            if remaining <= stored_before:
                break
            remaining -= stored_before
            position = last
        return min(position + remaining, self._last_seq)

    def _log_cap_drops(self) -> None:
        log.warning(
            "buffer_full_dropped_oldest",
            path=str(self.path),
            max_bytes=self.max_bytes,
            dropped=self._cap_log.take(),
            dropped_total=self._dropped_rows,
            dropped_by_sink=dict(self._dropped_by_sink),
            oldest_seq_kept=self._deleted_up_to + 1,
        )

    def _shrink_after_delete(self, conn: sqlite3.Connection, budget: _SizeBudget) -> None:
        """Shrink a main file that alone exceeds the cap, and a WAL over its share."""
        page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
        vacuumed = False
        # Only a cap lowered since the file grew leaves the main file above max_bytes.
        if page_count * self._page_size > budget.max_bytes:
            free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            pages = min(free_pages, page_count - budget.data_bytes // self._page_size)
            if pages > 0:
                conn.executescript(f"PRAGMA incremental_vacuum({pages});")
                vacuumed = True
        if vacuumed or _file_size(_wal_path(self.path)) > budget.wal_bytes:
            self._checkpoint(conn)

    def _new_channel_id(
        self,
        conn: sqlite3.Connection,
        source: str,
        channel: str,
        unit: str,
        new_channels: dict[tuple[str, str], int],
    ) -> int:
        """Return the id of a channel first seen in this transaction, inserting its row once."""
        key = (source, channel)
        channel_id = new_channels.get(key)
        if channel_id is None:
            inserted = conn.execute(_INSERT_CHANNEL, (source, channel, unit))
            channel_id = new_channels[key] = _require_rowid(inserted)
        return channel_id

    def _notify_loop(self, first_seq: int, readings: list[Reading]) -> None:
        if self._loop is None:
            return
        # The loop may already be closed when a transaction finishes during shutdown.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(
                self._on_commit, first_seq, readings, self._units_version
            )

    def _read_batch_sync(self, after_seq: int, limit: int) -> list[StoredReading]:
        rows = self._connection().execute(_SELECT_BATCH, (after_seq, limit)).fetchall()
        return [
            StoredReading(seq, ts_us, source, channel, value, unit, _QUALITY_BY_CODE[quality])
            for seq, ts_us, source, channel, value, unit, quality in rows
        ]

    def _read_range_sync(self, first_seq: int, last_seq: int, limit: int) -> list[StoredReading]:
        rows = self._connection().execute(_SELECT_RANGE, (first_seq, last_seq, limit)).fetchall()
        return [
            StoredReading(seq, ts_us, source, channel, value, unit, _QUALITY_BY_CODE[quality])
            for seq, ts_us, source, channel, value, unit, quality in rows
        ]

    def _commit_cursor_sync(self, sink: str, seq: int) -> None:
        conn = self._connection()
        if sink in self._acked:
            # Acknowledged ranges above the cursor may now join it.
            self._ack_range_sync(sink, 1, seq)
            return
        # In autocommit mode one statement is its own transaction. With synchronous=FULL,
        # it is on disk when execute() returns.
        conn.execute(_UPSERT_CURSOR, (sink, seq))
        self._cursors[sink] = max(seq, self._cursors.get(sink, 0))

    def _ack_range_sync(self, sink: str, first_seq: int, last_seq: int) -> None:
        plan = self._plan_ack(sink, first_seq, last_seq)
        if plan is None:
            return
        conn = self._connection()
        cursor, ranges = plan
        if not ranges and sink not in self._acked:
            # Only the cursor moves, so one statement does, as in commit_cursor.
            conn.execute(_UPSERT_CURSOR, (sink, cursor))
            self._cursors[sink] = max(cursor, self._cursors.get(sink, 0))
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._write_acknowledged(conn, sink, *plan)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._apply_acknowledged(sink, *plan)

    def _plan_ack(self, sink: str, first_seq: int, last_seq: int) -> tuple[int, RangeSet] | None:
        """Return the sink's cursor and ranges after acknowledging a range; None if no change."""
        cursor = self._cursors.get(sink, 0)
        ranges = self._acked.get(sink, RangeSet())
        first_seq = max(first_seq, cursor + 1)
        if first_seq > last_seq or ranges.covers(first_seq, last_seq):
            return None
        ranges = ranges.copy()
        ranges.add(first_seq, last_seq)
        cursor = _settle_cursor(cursor, ranges, self._deleted_up_to, self._deleted_ranges)
        return cursor, ranges

    def _write_acknowledged(
        self, conn: sqlite3.Connection, sink: str, cursor: int, ranges: RangeSet
    ) -> None:
        """Store a sink's cursor and acknowledged ranges, inside the caller's transaction."""
        conn.execute(_DELETE_ACKED_RANGES_OF_SINK, (sink,))
        conn.executemany(_INSERT_ACKED_RANGE, [(sink, first, last) for first, last in ranges])
        if cursor > self._cursors.get(sink, 0):
            conn.execute(_UPSERT_CURSOR, (sink, cursor))

    def _apply_acknowledged(self, sink: str, cursor: int, ranges: RangeSet) -> None:
        self._cursors[sink] = max(cursor, self._cursors.get(sink, 0))
        if ranges:
            self._acked[sink] = ranges
        else:
            self._acked.pop(sink, None)

    def _set_split_sync(self, sink: str, split_seq: int | None) -> None:
        conn = self._connection()
        if split_seq is None:
            conn.execute(_DELETE_SPLIT, (sink,))
            self._splits.pop(sink, None)
            return
        _live_position, pending = _pending_ranges(
            self._cursors.get(sink, 0),
            split_seq,
            self._acked.get(sink, RangeSet()),
            self._deleted_up_to,
            self._deleted_ranges,
        )
        split = _Split(split_seq, now_us(), pending.total())
        conn.execute(_UPSERT_SPLIT, (sink, split.seq, split.started_us, split.depth))
        self._splits[sink] = split

    def _backlog_sync(self, sink: str) -> LaneState:
        cursor = self._cursors.get(sink, 0)
        split_row = self._splits.get(sink)
        split = None if split_row is None else split_row.seq
        live_position, pending = _pending_ranges(
            cursor,
            split,
            self._acked.get(sink, RangeSet()),
            self._deleted_up_to,
            self._deleted_ranges,
        )
        return LaneState(
            cursor=cursor,
            split=split,
            live_position=live_position,
            pending_ranges=pending.ranges(),
            depth=pending.total(),
            oldest_ts_us=_first_ts(self._connection(), pending),
        )

    def _quarantine_sync(
        self,
        sink: str,
        readings: list[StoredReading],
        status: int,
        reason: str,
        from_seq: int | None,
    ) -> None:
        conn = self._connection()
        quarantined_us = now_us()
        rows = [
            (
                sink,
                r.seq,
                r.ts_us,
                r.source,
                r.channel,
                r.value,
                r.unit,
                _QUALITY_CODES[r.quality],
                status,
                reason,
                quarantined_us,
            )
            for r in readings
        ]
        up_to = max(r.seq for r in readings)
        # Without from_seq the cursor moves to up_to, which acknowledges 1 to up_to.
        plan = self._plan_ack(sink, 1 if from_seq is None else from_seq, up_to)
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT_QUARANTINE, rows)
            if plan is not None:
                self._write_acknowledged(conn, sink, *plan)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        if plan is not None:
            self._apply_acknowledged(sink, *plan)

    def _quarantined_count_sync(self, sink: str | None) -> int:
        conn = self._connection()
        if sink is None:
            return int(conn.execute(_COUNT_QUARANTINE).fetchone()[0])
        return int(conn.execute(_COUNT_QUARANTINE_OF_SINK, (sink,)).fetchone()[0])

    def _stats_sync(self) -> BufferStats:
        conn = self._connection()
        if self._last_values_seq < self._last_seq:
            self._save_last_values(conn)
        stats = _collect_stats(conn, self.path, self.sinks)
        if not self._unsaved_disk_drops:
            return stats
        return dataclasses.replace(
            stats,
            dropped_disk_full=stats.dropped_disk_full + self._unsaved_disk_drops,
            last_disk_full_us=self._last_disk_drop_us,
        )

    def _delete_chunk_sync(self) -> tuple[int, bool]:
        """Delete up to DELETE_CHUNK_ROWS rows that every enabled sink has acknowledged.

        Returns the rows deleted and whether more such rows remain. Rows at the low
        end are deleted up to a seq. Rows further up that were acknowledged by range
        are deleted as a range, which is recorded in deleted_ranges.
        """
        conn = self._connection()
        if self._last_values_seq < self._last_seq and time.monotonic() >= self._last_values_due:
            # Without commits, as between the polls of a slow source, the cleanup writes the
            # last values.
            self._save_last_values(conn)
        if not self.sinks:
            return 0, False
        low = self._deleted_up_to + 1
        # Rows whose values are not in the channels table yet wait for the next cleanup,
        # so that no channel's newest reading is deleted before its value is copied.
        candidates = self._acknowledged_by_all(low, self._last_values_seq)
        for first, last in self._deleted_ranges:
            candidates.remove(first, last)
        if not candidates:
            return 0, False
        first, last = next(iter(candidates))
        last = min(last, first + DELETE_CHUNK_ROWS - 1)
        more = last < (candidates.last() or 0)

        self._recent_floor = max(self._recent_floor, last + 1)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if first == low:
                deleted = conn.execute(_DELETE_UP_TO, (last,)).rowcount
                update = self._advance_deleted_up_to(conn, last)
            else:
                deleted = conn.execute(_DELETE_BETWEEN, (first, last)).rowcount
                deleted_ranges = self._deleted_ranges.copy()
                deleted_ranges.add(first, last)
                _write_deleted_ranges(conn, deleted_ranges)
                update = _LaneUpdate(self._deleted_up_to, deleted_ranges, {}, {})
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
        self._apply_lane_update(update)
        return deleted, more

    def _advance_deleted_up_to(self, conn: sqlite3.Connection, up_to: int) -> _LaneUpdate:
        """Write what follows from deleting every row up to `up_to`, in the caller's transaction.

        Deleted ranges that now start right above `up_to` join the rows deleted from the
        low end, and acknowledged ranges that no stored unacknowledged reading separates
        from their sink's cursor any more are merged into the cursor.
        """
        deleted_ranges = self._deleted_ranges.copy()
        deleted_ranges.remove(1, max(1, up_to))
        while deleted_ranges.first() == up_to + 1:
            first, up_to = next(iter(deleted_ranges))
            deleted_ranges.remove(first, up_to)
        if deleted_ranges != self._deleted_ranges:
            _write_deleted_ranges(conn, deleted_ranges)

        update = _LaneUpdate(up_to, deleted_ranges, {}, {})
        for sink, ranges in self._acked.items():
            cursor = self._cursors.get(sink, 0)
            settled = ranges.copy()
            new_cursor = _settle_cursor(cursor, settled, up_to, deleted_ranges)
            if new_cursor != cursor or settled != ranges:
                self._write_acknowledged(conn, sink, new_cursor, settled)
                update.cursors[sink] = new_cursor
                update.acked[sink] = settled
        return update

    def _apply_lane_update(self, update: _LaneUpdate) -> None:
        self._deleted_up_to = update.deleted_up_to
        self._deleted_ranges = update.deleted_ranges
        for sink, cursor in update.cursors.items():
            self._apply_acknowledged(sink, cursor, update.acked[sink])

    def _row_count(self) -> int:
        """Return the rows stored, from the seq bookkeeping alone."""
        return self._last_seq - self._deleted_up_to - self._deleted_ranges.total()

    def _acknowledged(self, sink: str, low: int, high: int) -> RangeSet:
        """Return the seq values from `low` to `high` that a sink has acknowledged."""
        acknowledged = self._acked.get(sink, RangeSet()).within(low, high)
        cursor = self._cursors.get(sink, 0)
        if cursor >= low and low <= high:
            acknowledged.add(low, min(cursor, high))
        return acknowledged

    def _acknowledged_by_all(self, low: int, high: int) -> RangeSet:
        """Return the seq values from `low` to `high` that every enabled sink has acknowledged."""
        if not self.sinks:
            return RangeSet()
        common = self._acknowledged(self.sinks[0], low, high)
        for sink in self.sinks[1:]:
            common = common.intersection(self._acknowledged(sink, low, high))
        return common

    def _compact_sync(self) -> None:
        conn = self._connection()
        # Through execute(), incremental_vacuum frees only one page per call, but
        # executescript() runs it to completion.
        conn.executescript("PRAGMA incremental_vacuum;")
        self._checkpoint(conn)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Copy the WAL into the main file and truncate the WAL file to zero bytes."""
        # A read transaction in another process (status) keeps the WAL from being reset.
        # Wait for it only briefly, because appends queue behind this call.
        conn.execute(f"PRAGMA busy_timeout = {CHECKPOINT_BUSY_TIMEOUT_MS}")
        try:
            busy, wal_pages, copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        log.debug(
            "buffer_checkpointed",
            path=str(self.path),
            busy=busy,
            wal_pages=wal_pages,
            copied=copied,
        )


def read_stats(data_dir: Path, sinks: Sequence[str]) -> BufferStats:
    """Read a snapshot from another process, read-only, while the agent may be writing.

    Raises FileNotFoundError when the database does not exist yet.
    """
    path = Path(data_dir) / DB_FILENAME
    if not path.is_file():
        message = (
            f"no buffer database at {path}: the agent has not run with data_dir {data_dir} yet. "
            "Check agent.data_dir in the config, or start the agent once"
        )
        raise FileNotFoundError(message)
    uri = f"{path.resolve().as_uri()}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc
    with contextlib.closing(conn):
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            version = _inspect_database(conn, path)
            if version == 0:
                message = (
                    f"buffer database {path} has no tables yet: the agent has not finished "
                    "its first start. Try again once it runs"
                )
                raise FileNotFoundError(message)
            return _collect_stats(conn, path, sinks)
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from exc


def _open_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Check that the file is a buffer (or empty), set the pragmas and create the tables."""
    try:
        # Inspect before any pragma so that a foreign database is never modified.
        if _inspect_database(conn, path) != 0:
            _quick_check(conn, path)
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        journal_mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if journal_mode != "wal":
            # Without WAL, `status` readers block the writer and vice versa.
            log.warning("buffer_wal_unavailable", path=str(path), journal_mode=journal_mode)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Checked again under the write lock in case another process created it.
            if _inspect_database(conn, path) == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute(_CREATE_QUARANTINE)
            conn.execute(_CREATE_SET_ASIDE)
            conn.execute(_CREATE_ACKED_RANGES)
            conn.execute(_CREATE_SPLITS)
            conn.execute(_CREATE_DELETED_RANGES)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc


def _quick_check(conn: sqlite3.Connection, path: Path) -> None:
    """Raise CorruptDatabaseError when `PRAGMA quick_check` finds damage.

    quick_check reads every page of the file, so a large buffer opens more slowly.
    """
    # NOTE: a 74 MB buffer took 0.6 s with the file in the page cache (one x86 VM), so
    # a full 2 GiB buffer may take 20 s or more to open, longer from cold flash storage.
    started = time.monotonic()
    rows = [str(row[0]) for row in conn.execute("PRAGMA quick_check(10)")]
    log.debug("buffer_quick_check", path=str(path), seconds=round(time.monotonic() - started, 3))
    if rows == ["ok"]:
        return
    # A row may hold several findings, one per line, after a "*** in database main ***" line.
    findings = [line for row in rows for line in row.splitlines() if not line.startswith("***")]
    cause = f"quick_check found: {'; '.join(findings[:3])}"
    message = f"buffer database {path} is corrupt ({cause})"
    raise CorruptDatabaseError(path, message, cause)


def _record_set_aside(conn: sqlite3.Connection, aside: _SetAside) -> None:
    """Store the set-aside file in a new database and start its seq above the old one."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _fetch_last_seq(conn) < aside.seq_floor:
            # The next insert takes the highest seq in sqlite_sequence plus one.
            conn.execute("DELETE FROM sqlite_sequence WHERE name = 'readings'")
            conn.execute(_SEED_SEQUENCE, (aside.seq_floor,))
        conn.executemany(_INSERT_SET_ASIDE, aside.earlier)
        conn.execute(_INSERT_SET_ASIDE, (str(aside.path), aside.reason, now_us()))
        conn.execute("COMMIT")
    except BaseException:
        _rollback(conn)
        raise


def _move_aside(path: Path) -> Path:
    """Rename a database file and its -wal and -shm files to buffer-corrupt-<UTC time>.db."""
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{SET_ASIDE_PREFIX}{stamp}.db")
    number = 1
    while any(os.path.lexists(_sidecar(target, suffix)) for suffix in ("", "-wal", "-shm")):
        number += 1
        target = path.with_name(f"{SET_ASIDE_PREFIX}{stamp}-{number}.db")
    # The WAL goes first: SQLite would read a WAL left next to the new database
    # as part of it.
    for suffix in ("-wal", "-shm", ""):
        source = _sidecar(path, suffix)
        if os.path.lexists(source):
            source.rename(_sidecar(target, suffix))
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return target


def _sidecar(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _wal_path(path: Path) -> Path:
    return _sidecar(path, "-wal")


def _inspect_database(conn: sqlite3.Connection, path: Path) -> int:
    """Return the schema version of a buffer file, or 0 for an empty file.

    Raises ForeignDatabaseError for any other SQLite database.
    """
    application_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = sorted(row[0] for row in conn.execute(_SELECT_TABLES))
    if application_id == APPLICATION_ID and version == SCHEMA_VERSION:
        return int(version)
    if application_id == 0 and version == 0 and not tables:
        return 0
    if application_id == APPLICATION_ID:
        detail = f"it has schema version {version}, this rig-agent reads {SCHEMA_VERSION}"
        fix = "Run the rig-agent version that created it, or move the file aside"
    else:
        detail = (
            f"application_id {application_id}, user_version {version}, "
            f"tables {', '.join(tables) or 'none'}"
        )
        fix = "Set agent.data_dir to a directory of its own, or move the file aside"
    message = f"{path} is not a rig-agent buffer database ({detail}). {fix}"
    raise ForeignDatabaseError(path, message)


def _open_error(path: Path, exc: sqlite3.Error) -> BufferDatabaseError:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None and code & 0xFF in _CORRUPTION_CODES:
        message = (
            f"buffer database {path} is corrupt or not an SQLite database ({exc}). "
            "Stop the agent, move the file and its -wal and -shm files aside, and start again"
        )
        return CorruptDatabaseError(path, message, str(exc))
    message = (
        f"cannot use buffer database {path}: {exc}. "
        f"Check that the agent's user can read and write {path.parent}"
    )
    return BufferDatabaseError(path, message)


def _collect_stats(conn: sqlite3.Connection, path: Path, sinks: Sequence[str]) -> BufferStats:
    # One read transaction, so that every figure comes from the same snapshot.
    conn.execute("BEGIN")
    try:
        last_seq = _fetch_last_seq(conn)
        low, high = conn.execute(_SELECT_SEQ_RANGE).fetchone()
        counters: dict[str, int] = dict(conn.execute(_SELECT_COUNTERS).fetchall())
        cursors = dict(conn.execute(_SELECT_CURSORS).fetchall())
        channel_rows = conn.execute(_SELECT_CHANNEL_VALUES).fetchall()
        quarantined, quarantine_rows = _fetch_quarantine(conn)
        set_aside_count, set_aside_paths = _fetch_set_aside(conn)
        lanes = _fetch_lanes(conn)
        backlogs = [_sink_backlog(conn, sink, cursors.get(sink, 0), lanes, low) for sink in sinks]
    finally:
        conn.execute("COMMIT")

    # seq values are assigned without gaps and rows leave either from the low end or as
    # a range recorded in deleted_ranges, so the rows are low..high minus those ranges.
    rows = 0 if low is None else high - low + 1 - lanes.deleted.count(low, high)
    sink_stats = []
    for sink in sinks:
        cursor = cursors.get(sink, 0)
        depth = 0
        if low is not None and max(cursor + 1, low) <= high:
            unacknowledged = RangeSet([(max(cursor + 1, low), high)])
            for first, last in [*lanes.acked.get(sink, RangeSet()), *lanes.deleted]:
                unacknowledged.remove(first, last)
            depth = unacknowledged.total()
        dropped = counters.get(_DROPPED_ROWS_OF_SINK.format(sink=sink), 0)
        sink_stats.append(SinkStats(sink, cursor, depth, dropped))
    channels = [
        ChannelValue(source, channel, unit, ts_us, value, _QUALITY_BY_CODE[quality])
        for source, channel, unit, ts_us, value, quality in channel_rows
    ]
    return BufferStats(
        last_seq=last_seq,
        rows=rows,
        dropped_rows=counters.get(DROPPED_ROWS, 0),
        db_bytes=_file_size(path) + _file_size(_wal_path(path)),
        sinks=sink_stats,
        channels=channels,
        quarantined=quarantined,
        quarantine_newest=quarantine_rows,
        dropped_disk_full=counters.get(DROPPED_DISK_FULL, 0),
        last_disk_full_us=counters.get(LAST_DISK_FULL_US),
        corrupt_databases_set_aside=set_aside_count,
        set_aside_paths=set_aside_paths,
        backlogs=backlogs,
    )


def _sink_backlog(
    conn: sqlite3.Connection, sink: str, cursor: int, lanes: _Lanes, low: int | None
) -> SinkBacklog:
    """Return the backlog of one sink from the lane tables, within the caller's transaction."""
    split = lanes.splits.get(sink)
    deleted_up_to = _fetch_last_seq(conn) if low is None else low - 1
    _live_position, pending = _pending_ranges(
        cursor,
        None if split is None else split.seq,
        lanes.acked.get(sink, RangeSet()),
        deleted_up_to,
        lanes.deleted,
    )
    if split is None:
        return SinkBacklog(sink, None, pending.total(), _first_ts(conn, pending))
    return SinkBacklog(
        sink,
        split.seq,
        pending.total(),
        _first_ts(conn, pending),
        split_us=split.started_us,
        split_depth=split.depth,
    )


def _fetch_set_aside(conn: sqlite3.Connection) -> tuple[int, list[str]]:
    """Return the count of set-aside files and the newest paths; (0, []) without the table."""
    tables = {row[0] for row in conn.execute(_SELECT_TABLES)}
    if "set_aside" not in tables:
        return 0, []
    count = int(conn.execute(_COUNT_SET_ASIDE).fetchone()[0])
    paths = [str(row[0]) for row in conn.execute(_SELECT_SET_ASIDE_NEWEST, (SET_ASIDE_LISTED,))]
    return count, paths


def _fetch_quarantine(conn: sqlite3.Connection) -> tuple[int, list[QuarantinedReading]]:
    """Return the quarantine count and newest rows; (0, []) for a buffer without the table."""
    tables = {row[0] for row in conn.execute(_SELECT_TABLES)}
    if "quarantine" not in tables:
        return 0, []
    count = int(conn.execute(_COUNT_QUARANTINE).fetchone()[0])
    rows = conn.execute(_SELECT_QUARANTINE_NEWEST, (QUARANTINE_LISTED,)).fetchall()
    newest = [
        QuarantinedReading(
            sink,
            seq,
            ts_us,
            source,
            channel,
            value,
            unit,
            _QUALITY_BY_CODE[quality],
            status,
            reason,
            quarantined_us,
        )
        for (
            sink,
            seq,
            ts_us,
            source,
            channel,
            value,
            unit,
            quality,
            status,
            reason,
            quarantined_us,
        ) in rows
    ]
    return count, newest


def _insert_rows(conn: sqlite3.Connection, rows: list[tuple[int, int, float | None, int]]) -> None:
    """Insert reading rows in order, _ROWS_PER_INSERT to a statement and the rest one by one."""
    whole = len(rows) - len(rows) % _ROWS_PER_INSERT
    if whole:
        values = list(itertools.chain.from_iterable(rows[:whole]))
        step = 4 * _ROWS_PER_INSERT
        for start in range(0, len(values), step):
            conn.execute(_INSERT_READINGS, values[start : start + step])
    if whole < len(rows):
        conn.executemany(_INSERT_READING, rows[whole:])


def _write_last_values(conn: sqlite3.Connection, above_seq: int, up_to_seq: int) -> None:
    """Copy the newest reading of each channel above `above_seq` into the channels table.

    Runs within the caller's transaction.
    """
    if _UPDATE_FROM:
        conn.execute(_UPDATE_LAST_VALUES, (above_seq,))
    else:
        newest = [
            (ts_us, value, quality, channel_id)
            for channel_id, ts_us, value, quality, _seq in conn.execute(_NEWEST_ABOVE, (above_seq,))
        ]
        conn.executemany(_UPDATE_CHANNEL_NEWEST, newest)
    conn.execute(_RAISE_COUNTER_TO, (_LAST_VALUES_SEQ, up_to_seq))


def _fetch_last_seq(conn: sqlite3.Connection) -> int:
    # sqlite_sequence keeps the highest seq ever given, even after every row is deleted.
    row = conn.execute(_SELECT_LAST_SEQ).fetchone()
    return 0 if row is None else int(row[0])


def _require_rowid(cursor: sqlite3.Cursor) -> int:
    rowid = cursor.lastrowid
    if rowid is None:
        message = "SQLite returned no rowid for an inserted channel"
        raise RuntimeError(message)
    return rowid


def _rollback(conn: sqlite3.Connection) -> None:
    # After some errors (disk full, I/O error) SQLite has already rolled back.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


def _used_bytes(conn: sqlite3.Connection, page_size: int) -> int:
    """Return the bytes of main-file pages in use, counting pages held in the WAL too."""
    page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
    free_pages = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
    return (page_count - free_pages) * page_size


def _estimate_commit_bytes(count: int, page_size: int) -> int:
    """Return the disk bytes a commit of `count` readings may take, erring high."""
    # Besides the new leaf pages, a commit rewrites a few pages: interior pages,
    # the channels table and sqlite_sequence. Each WAL frame adds a 24-byte header.
    pages = -(-count * ESTIMATED_ROW_BYTES // page_size) + 4
    return pages * (page_size + 24)


def _is_disk_error(exc: sqlite3.Error) -> bool:
    """Return whether SQLite failed for a full disk or an I/O error (any extended code)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _DISK_ERROR_CODES


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


LOCK_FILENAME = "buffer.lock"


def _lock_data_dir(data_dir: Path) -> TextIO:
    """Take an exclusive lock on data_dir/buffer.lock, or raise BufferInUseError.

    The kernel releases a flock when its process dies, so a crashed agent
    never leaves a stale lock behind.
    """
    path = data_dir / LOCK_FILENAME
    lock_file = path.open("a+", encoding="utf-8")
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.seek(0)
        holder = lock_file.read().strip() or "unknown"
        lock_file.close()
        message = (
            f"another rig-agent (pid {holder}) is using the buffer in {data_dir}: "
            "stop it first, or give this agent its own agent.data_dir"
        )
        raise BufferInUseError(path, message) from None
    lock_file.seek(0)
    lock_file.truncate()
    lock_file.write(f"{os.getpid()}\n")
    lock_file.flush()
    return lock_file
