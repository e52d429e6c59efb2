"""Read buffered readings from another process, read-only, while the agent may be writing."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path

from buffer.reading import StoredReading
from buffer.store import (
    _QUALITY_BY_CODE,
    BUSY_TIMEOUT_MS,
    DB_FILENAME,
    _inspect_database,
    _open_error,
)

__all__ = ["BufferChannel", "iter_readings", "list_channels"]

_SELECT_CHANNELS = "SELECT id, source, channel, unit FROM channels ORDER BY source, channel"
# A NULL parameter turns its condition off. The channel names and unit are looked up in
# Python rather than joined, so the plan stays a scan in seq order that returns rows as
# it goes. A join could make SQLite sort the whole table in a temporary b-tree first.
_SELECT_READINGS = """
    SELECT seq, ts_us, channel_id, value, quality FROM readings
    WHERE (:since IS NULL OR ts_us >= :since)
      AND (:until IS NULL OR ts_us < :until)
      AND channel_id IN (
          SELECT id FROM channels
          WHERE (:source IS NULL OR source = :source) AND (:channel IS NULL OR channel = :channel)
      )
    ORDER BY seq
"""


@dataclass(frozen=True, slots=True)
class BufferChannel:
    """A channel that has at least once been written to the buffer."""

    source: str
    channel: str
    unit: str


def iter_readings(
    data_dir: Path,
    *,
    since_us: int | None = None,
    until_us: int | None = None,
    source: str | None = None,
    channel: str | None = None,
    batch: int = 10_000,
) -> Generator[StoredReading, None, None]:
    """Yield the readings still in the buffer of `data_dir`, in `seq` order.

    `since_us` is inclusive and `until_us` exclusive, both compared with the
    reading's `ts_us`. `source` and `channel` select by exact name. Rows are
    fetched `batch` at a time, so memory does not grow with the buffer.

    Every row comes from one read transaction, so the result is the buffer as
    it was when the first row was read: readings appended later are left out,
    and readings deleted meanwhile are still included. The transaction keeps
    the agent from truncating its WAL file until the iterator is exhausted or
    closed, so close it early when you stop before the end.

    Raises FileNotFoundError when data_dir has no buffer database yet, and
    BufferDatabaseError (or a subclass) when the file cannot be read or is
    not a rig-agent buffer. Either can also be raised during iteration.
    """
    if batch < 1:
        message = f"batch is {batch}: expected at least 1"
        raise ValueError(message)
    path = Path(data_dir) / DB_FILENAME
    with contextlib.closing(_connect_read_only(Path(data_dir))) as conn:
        try:
            # One read transaction, so the channel lookup and the readings query see the
            # same snapshot and every channel_id read has its row in `channels`.
            conn.execute("BEGIN")
            channels = _select_channels(conn, source, channel)
            if not channels:
                return
            params = {"since": since_us, "until": until_us, "source": source, "channel": channel}
            cursor = conn.execute(_SELECT_READINGS, params)
            while rows := cursor.fetchmany(batch):
                for seq, ts_us, channel_id, value, quality in rows:
                    ch = channels[channel_id]
                    yield StoredReading(
                        seq, ts_us, ch.source, ch.channel, value, ch.unit, _QUALITY_BY_CODE[quality]
                    )
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from exc
        # The read transaction ends when the connection closes.


def list_channels(data_dir: Path) -> list[BufferChannel]:
    """Return every channel the buffer has stored a reading of, sorted by source and channel.

    A channel stays listed after all of its readings have been deleted. Raises
    as `iter_readings` does.
    """
    path = Path(data_dir) / DB_FILENAME
    with contextlib.closing(_connect_read_only(Path(data_dir))) as conn:
        try:
            return list(_select_channels(conn, None, None).values())
        except sqlite3.Error as exc:
            raise _open_error(path, exc) from exc


def _connect_read_only(data_dir: Path) -> sqlite3.Connection:
    """Open the buffer database read-only and check that it is a rig-agent buffer.

    The running agent holds an exclusive flock on data_dir/buffer.lock but none
    on the database, and WAL mode lets this reader run beside its writes.
    """
    path = data_dir / DB_FILENAME
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
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = _inspect_database(conn, path)
    except sqlite3.Error as exc:
        conn.close()
        raise _open_error(path, exc) from exc
    except BaseException:
        conn.close()
        raise
    if version == 0:
        conn.close()
        message = (
            f"buffer database {path} has no tables yet: the agent has not finished "
            "its first start. Try again once it runs"
        )
        raise FileNotFoundError(message)
    return conn


def _select_channels(
    conn: sqlite3.Connection, source: str | None, channel: str | None
) -> dict[int, BufferChannel]:
    selected: dict[int, BufferChannel] = {}
    for channel_id, row_source, row_channel, unit in conn.execute(_SELECT_CHANNELS):
        if source is not None and row_source != source:
            continue
        if channel is not None and row_channel != channel:
            continue
        selected[channel_id] = BufferChannel(row_source, row_channel, unit)
    return selected
