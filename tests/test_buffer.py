"""The SQLite buffer and its batching writer, on real database files under tmp_path."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import signal
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

import buffer.store as store_module
from buffer.reader import iter_readings
from buffer.reading import Quality, Reading, StoredReading, format_ts
from buffer.store import (
    DB_FILENAME,
    LAST_VALUES_INTERVAL,
    MIN_MAX_BYTES,
    RECENT_READINGS,
    Buffer,
    BufferStats,
    ForeignDatabaseError,
    check_readings,
    read_stats,
)
from buffer.writer import BufferWriter

WAIT = 10.0
"""Seconds any single wait in these tests may take before the test fails."""


def make_readings(
    count: int, start: int = 0, source: str = "pumps", channel: str = "spp"
) -> list[Reading]:
    """Build `count` readings of one channel with values start, start + 1, ..."""
    return [
        Reading(1_700_000_000_000_000 + index, source, channel, float(index), "psi")
        for index in range(start, start + count)
    ]


def count_rows(data_dir: Path, above_seq: int = 0) -> int:
    """Count rows with seq above `above_seq` through a separate connection."""
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILENAME)) as conn:
        row = conn.execute("SELECT count(*) FROM readings WHERE seq > ?", (above_seq,)).fetchone()
    return int(row[0])


def set_aside_files(data_dir: Path) -> list[Path]:
    """List the corrupt database files moved aside in data_dir."""
    return sorted(data_dir.glob("buffer-corrupt-*.db"))


async def wait_until(condition: Callable[[], bool]) -> None:
    """Poll a condition that no event signals (file contents, logs) until it holds."""
    async with asyncio.timeout(WAIT):
        while not condition():  # noqa: ASYNC110 - no Event signals these conditions
            await asyncio.sleep(0.01)


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    """An open buffer with two enabled sinks and no background cleanup during the test."""
    async with Buffer(tmp_path / "data", ["mqtt", "cloud"], cleanup_interval=3600) as opened:
        yield opened


class CountingBuffer(Buffer):
    """A buffer that records the loop time and size of every append.

    It can fail the first appends, and hold each transaction on the SQLite thread.
    """

    def __init__(self, data_dir: Path, sinks: Sequence[str], fail_first: int = 0) -> None:
        super().__init__(data_dir, sinks, cleanup_interval=3600)
        self.appends: list[tuple[float, int]] = []
        self.fail_first = fail_first
        self.thread_delay = 0.0

    async def append(
        self, readings: Sequence[Reading], *, checked: bool = False
    ) -> tuple[int, int]:
        self.appends.append((asyncio.get_running_loop().time(), len(readings)))
        if len(self.appends) <= self.fail_first:
            raise sqlite3.OperationalError("disk I/O error")
        return await super().append(readings, checked=checked)

    def _append_sync(self, readings: list[Reading], *, checked: bool = False) -> tuple[int, int]:
        time.sleep(self.thread_delay)
        return super()._append_sync(readings, checked=checked)


# Opening and the file


async def test_open_creates_private_dir(tmp_path: Path) -> None:
    """Opening creates data_dir with mode 0o750."""
    data_dir = tmp_path / "new" / "data"
    async with Buffer(data_dir, []):
        pass
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o750


async def test_open_sets_pragmas(buffer: Buffer) -> None:
    """The file is in WAL mode with incremental auto_vacuum and the schema version set."""
    with sqlite3.connect(buffer.path) as conn:
        assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 1


async def test_open_twice_rejected(buffer: Buffer) -> None:
    """A Buffer that is already open cannot be opened again."""
    with pytest.raises(RuntimeError, match="is open"):
        await buffer.open()


async def test_use_after_close_rejected(tmp_path: Path) -> None:
    """Calls on a closed buffer raise RuntimeError naming the state."""
    closed = Buffer(tmp_path, [])
    async with closed:
        pass
    with pytest.raises(RuntimeError, match="is closed"):
        await closed.append(make_readings(1))


async def test_non_sqlite_file_set_aside(tmp_path: Path) -> None:
    """A file that is not SQLite is moved aside unchanged and a new buffer opens."""
    garbage = os.urandom(8192)
    (tmp_path / DB_FILENAME).write_bytes(garbage)
    async with Buffer(tmp_path, []) as opened:
        await opened.append(make_readings(1))
        stats = await opened.stats()
    [aside] = set_aside_files(tmp_path)
    assert aside.read_bytes() == garbage
    assert stats.set_aside_paths == [str(aside)]
    assert stats.rows == 1


async def test_foreign_database_untouched(tmp_path: Path) -> None:
    """Another application's SQLite file raises ForeignDatabaseError and stays unchanged."""
    path = tmp_path / DB_FILENAME
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(ForeignDatabaseError, match="invoices"):
        await Buffer(tmp_path, []).open()
    assert path.read_bytes() == before


# Sequence numbers and appends


async def test_append_returns_seq_range(buffer: Buffer) -> None:
    """Each append returns the contiguous seq range it was given."""
    assert await buffer.append(make_readings(3)) == (1, 3)
    assert await buffer.append(make_readings(2)) == (4, 5)
    assert buffer.last_seq == 5


async def test_append_empty_touches_nothing(buffer: Buffer) -> None:
    """An empty append returns (last_seq + 1, last_seq) and inserts nothing."""
    await buffer.append(make_readings(4))
    assert await buffer.append([]) == (5, 4)
    assert count_rows(buffer.data_dir) == 4


async def test_seq_never_reused(tmp_path: Path) -> None:
    """After every row is deleted and the buffer reopened, seq continues where it was."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as first:
        await first.append(make_readings(10))
        await first.commit_cursor("mqtt", 10)
        assert await first.delete_acknowledged() == 10
    assert count_rows(tmp_path) == 0

    async with Buffer(tmp_path, ["mqtt"]) as second:
        assert second.last_seq == 10
        assert await second.append(make_readings(2)) == (11, 12)


async def test_failed_append_inserts_nothing(buffer: Buffer) -> None:
    """A batch with a bad reading is rejected whole and leaves seq unchanged."""
    bad = Reading(1, "pumps", "spp", "high", "psi")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="value 'high'"):
        await buffer.append([*make_readings(3), bad])
    assert count_rows(buffer.data_dir) == 0
    assert await buffer.append(make_readings(1)) == (1, 1)


async def test_wait_for_data_wakes(buffer: Buffer) -> None:
    """wait_for_data returns True once an append passes after_seq."""
    waiter = asyncio.create_task(buffer.wait_for_data(0, timeout=60))
    await asyncio.sleep(0.01)
    await buffer.append(make_readings(1))
    async with asyncio.timeout(2):
        assert await waiter is True


async def test_wait_for_data_times_out(buffer: Buffer) -> None:
    """wait_for_data returns False when nothing new arrives in time."""
    await buffer.append(make_readings(2))
    assert await buffer.wait_for_data(2, timeout=0.05) is False


# Cursors and reads


async def test_cursor_durable_and_monotonic(tmp_path: Path) -> None:
    """A committed cursor survives reopening and never moves backward."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as first:
        await first.append(make_readings(10))
        await first.commit_cursor("mqtt", 7)
        await first.commit_cursor("mqtt", 3)
        assert await first.cursor("mqtt") == 7

    async with Buffer(tmp_path, ["mqtt"]) as second:
        assert await second.cursor("mqtt") == 7
        assert await second.cursor("cloud") == 0


async def test_cursor_beyond_last_seq_rejected(buffer: Buffer) -> None:
    """A cursor above last_seq raises ValueError, so unseen rows cannot be deleted."""
    await buffer.append(make_readings(3))
    with pytest.raises(ValueError, match="seq 4"):
        await buffer.commit_cursor("mqtt", 4)


async def test_read_batch_after_cursor(buffer: Buffer) -> None:
    """read_batch starts after the sink's cursor, in seq order, with names and units."""
    await buffer.append(make_readings(3, source="pumps", channel="spp"))
    await buffer.append(
        [Reading(5, "mudlog", "bit_depth", None, "m", Quality.BAD), *make_readings(2, start=3)]
    )
    await buffer.commit_cursor("mqtt", 2)

    batch = await buffer.read_batch("mqtt", limit=2)
    assert [r.seq for r in batch] == [3, 4]
    assert (batch[1].source, batch[1].channel, batch[1].unit) == ("mudlog", "bit_depth", "m")
    assert batch[1].value is None
    assert batch[1].quality is Quality.BAD
    assert batch[0].value == 2.0


async def test_read_batch_after_seq(buffer: Buffer) -> None:
    """An explicit after_seq overrides the cursor."""
    await buffer.append(make_readings(6))
    await buffer.commit_cursor("mqtt", 5)
    batch = await buffer.read_batch("mqtt", limit=100, after_seq=1)
    assert [r.seq for r in batch] == [2, 3, 4, 5, 6]


# Deletion of acknowledged rows


async def test_delete_waits_for_lagging_sink(buffer: Buffer) -> None:
    """Rows are deleted only up to the lowest cursor of the enabled sinks."""
    await buffer.append(make_readings(10))
    await buffer.commit_cursor("mqtt", 10)
    assert await buffer.delete_acknowledged() == 0

    await buffer.commit_cursor("cloud", 4)
    assert await buffer.delete_acknowledged() == 4
    assert count_rows(buffer.data_dir) == 6
    assert [r.seq for r in await buffer.read_batch("cloud", limit=100)] == [5, 6, 7, 8, 9, 10]


async def test_disabled_sink_ignored(tmp_path: Path) -> None:
    """A cursor of a sink that is not enabled does not hold rows back."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as opened:
        await opened.append(make_readings(5))
        await opened.commit_cursor("mqtt", 5)
        await opened.commit_cursor("old-sink", 1)
        assert await opened.delete_acknowledged() == 5


async def test_no_sinks_keeps_rows(tmp_path: Path) -> None:
    """With no enabled sink nothing is deleted."""
    async with Buffer(tmp_path, [], cleanup_interval=3600) as opened:
        await opened.append(make_readings(5))
        await opened.commit_cursor("mqtt", 5)
        assert await opened.delete_acknowledged() == 0
    assert count_rows(tmp_path) == 5


async def test_background_cleanup(tmp_path: Path) -> None:
    """The background task deletes acknowledged rows and compacts the file."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=0.02, compact_interval=0) as opened:
        await opened.append(make_readings(20_000))
        await opened.commit_cursor("mqtt", 20_000)
        await wait_until(lambda: count_rows(tmp_path) == 0)
        await wait_until(lambda: (tmp_path / (DB_FILENAME + "-wal")).stat().st_size == 0)
    assert count_rows(tmp_path) == 0


# Channels and stats


async def test_channel_last_value(buffer: Buffer) -> None:
    """Each channel keeps the newest reading of the latest batch that contained it."""
    await buffer.append(make_readings(3, channel="spp") + make_readings(2, channel="hook"))
    await buffer.append(
        [
            Reading(10, "pumps", "spp", 1.0, "psi"),
            Reading(11, "pumps", "spp", None, "psi", Quality.BAD),
        ]
    )
    channels = {c.channel: c for c in (await buffer.stats()).channels}
    assert channels["spp"].value is None
    assert channels["spp"].quality is Quality.BAD
    assert channels["spp"].ts_us == 11
    assert channels["hook"].value == 1.0


async def test_stats_depth(buffer: Buffer) -> None:
    """stats reports rows, last_seq and each enabled sink's depth above its cursor."""
    await buffer.append(make_readings(10))
    await buffer.commit_cursor("mqtt", 8)
    await buffer.commit_cursor("cloud", 3)
    await buffer.delete_acknowledged()

    stats = await buffer.stats()
    depths = {s.name: (s.cursor, s.depth) for s in stats.sinks}
    assert stats.last_seq == 10
    assert stats.rows == 7
    assert stats.dropped_rows == 0
    assert stats.db_bytes > 0
    assert depths == {"mqtt": (8, 2), "cloud": (3, 7)}


def test_read_stats_missing(tmp_path: Path) -> None:
    """read_stats on a data_dir without a database names the path."""
    with pytest.raises(FileNotFoundError, match="has not run") as caught:
        read_stats(tmp_path, ["mqtt"])
    assert str(tmp_path / DB_FILENAME) in str(caught.value)


READ_STATS_CHILD = """
import dataclasses, json, sys
from pathlib import Path
from buffer.store import read_stats
stats = read_stats(Path(sys.argv[1]), ["mqtt"])
print(json.dumps(dataclasses.asdict(stats), default=str))
"""


async def test_read_stats_other_process(buffer: Buffer) -> None:
    """Another process reads consistent stats read-only while the buffer is being appended to."""
    await buffer.append(make_readings(100))
    await buffer.commit_cursor("mqtt", 40)
    stop = asyncio.Event()

    async def keep_appending() -> None:
        while not stop.is_set():
            await buffer.append(make_readings(50, channel="hook"))
            await asyncio.sleep(0.002)

    appender = asyncio.create_task(keep_appending())
    before = buffer.last_seq
    async with asyncio.timeout(WAIT):
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            READ_STATS_CHILD,
            str(buffer.data_dir),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await child.communicate()
    after = buffer.last_seq
    stop.set()
    await appender

    assert child.returncode == 0, stderr.decode()
    stats = json.loads(stdout)
    assert before <= stats["last_seq"] <= after
    assert after > before
    assert stats["sinks"] == [
        {"name": "mqtt", "cursor": 40, "depth": stats["last_seq"] - 40, "dropped_buffer_full": 0},
    ]
    assert {c["channel"] for c in stats["channels"]} == {"spp", "hook"}


# Durability across SIGKILL

KILL_CHILD = """
import asyncio, sys
from pathlib import Path
from buffer.reading import Reading
from buffer.store import Buffer

async def main():
    async with Buffer(Path(sys.argv[1]), []) as buffer:
        value = 0
        while True:
            batch = [Reading(value + i, "pumps", "spp", float(value + i), "psi") for i in range(50)]
            value += 50
            _first, last = await buffer.append(batch)
            await buffer.commit_cursor("mqtt", last)
            print("committed", last, flush=True)

asyncio.run(main())
"""


async def test_survives_sigkill(tmp_path: Path) -> None:
    """Every reading and cursor a killed process reported as committed is in the file."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILL_CHILD,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdout is not None
    last = 0
    commits = 0
    try:
        async with asyncio.timeout(WAIT):
            while commits < 40:
                line = await child.stdout.readline()
                if not line:
                    pytest.fail(f"child exited with {await child.wait()} before committing")
                words = line.split()
                if words[:1] == [b"committed"]:
                    last = int(words[1])
                    commits += 1
    finally:
        child.send_signal(signal.SIGKILL)
        await child.wait()
    assert child.returncode == -signal.SIGKILL

    async with Buffer(tmp_path, []) as reopened:
        assert reopened.last_seq >= last
        assert await reopened.cursor("mqtt") >= last
        batch = await reopened.read_batch("mqtt", limit=last, after_seq=0)
    assert [r.seq for r in batch] == list(range(1, last + 1))
    assert [r.value for r in batch] == [float(seq - 1) for seq in range(1, last + 1)]


LAST_VALUES_CHILD = """
import asyncio, os, signal, sys
from pathlib import Path
from buffer.reading import Reading, Quality
from buffer.store import Buffer

async def main():
    buffer = Buffer(Path(sys.argv[1]), [])
    await buffer.open()
    await buffer.append([Reading(500_000, "pumps", "hook", 7.0, "klbf")])
    await buffer.append([Reading(1_000_000, "pumps", "spp", 1.0, "psi")])
    await buffer.append([Reading(2_000_000, "pumps", "spp", 2.0, "psi")])
    await buffer.append([Reading(3_000_000, "pumps", "spp", None, "psi", Quality.BAD)])
    await buffer.append([Reading(4_000_000, "pumps", "spp", 4.0, "psi")])
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


def channel_values(stats: BufferStats) -> dict[str, tuple[int, float | None, Quality]]:
    return {c.channel: (c.ts_us, c.value, c.quality) for c in stats.channels}


@pytest.fixture(params=["update-from", "select-then-update"])
def last_values_sql(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a test with UPDATE FROM (SQLite 3.33 and newer) and with the older two steps."""
    monkeypatch.setattr(store_module, "_UPDATE_FROM", request.param == "update-from")


@pytest.mark.usefixtures("last_values_sql")
async def test_last_values_recovered_after_sigkill(tmp_path: Path) -> None:
    """Last values not yet written when the agent was killed are read back from the readings."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LAST_VALUES_CHILD, str(tmp_path)
    )
    async with asyncio.timeout(WAIT):
        assert await child.wait() == -signal.SIGKILL
    # Only the first reading of each channel was written before the kill.
    before = channel_values(read_stats(tmp_path, []))
    assert before == {"spp": (1_000_000, 1.0, Quality.GOOD), "hook": (500_000, 7.0, Quality.GOOD)}

    async with Buffer(tmp_path, []) as reopened:
        stats = await reopened.stats()
    assert channel_values(stats) == {
        "spp": (4_000_000, 4.0, Quality.GOOD),
        "hook": (500_000, 7.0, Quality.GOOD),
    }
    assert channel_values(read_stats(tmp_path, [])) == channel_values(stats)


@pytest.mark.usefixtures("last_values_sql")
async def test_last_values_written_at_most_once_per_interval(buffer: Buffer) -> None:
    """read_stats gets last values up to LAST_VALUES_INTERVAL late, and stats() at once."""
    await buffer.append([Reading(1_000_000, "pumps", "spp", 1.0, "psi")])
    await buffer.append([Reading(2_000_000, "pumps", "spp", 2.0, "psi")])
    assert channel_values(read_stats(buffer.data_dir, []))["spp"][1] == 1.0

    await asyncio.sleep(LAST_VALUES_INTERVAL)
    await buffer.append([Reading(3_000_000, "pumps", "spp", 3.0, "psi")])
    assert channel_values(read_stats(buffer.data_dir, []))["spp"][1] == 3.0

    await buffer.append([Reading(4_000_000, "pumps", "spp", 4.0, "bar")])
    assert channel_values(read_stats(buffer.data_dir, []))["spp"][1] == 3.0
    stats = await buffer.stats()
    assert [(c.value, c.unit) for c in stats.channels] == [(4.0, "bar")]
    assert channel_values(read_stats(buffer.data_dir, []))["spp"][1] == 4.0


@pytest.mark.usefixtures("last_values_sql")
async def test_last_values_written_before_rows_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acknowledged rows wait for their values to reach the channels table before deletion."""
    monkeypatch.setattr(store_module, "LAST_VALUES_INTERVAL", 3600.0)
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as buffer:
        await buffer.append([Reading(1_000_000, "slow", "counter", 1.0, "")])
        await buffer.append([Reading(4_000_000, "slow", "counter", 2.0, "")])
        await buffer.commit_cursor("mqtt", buffer.last_seq)
        assert await buffer.delete_acknowledged() == 1
        assert count_rows(tmp_path) == 1
        await buffer.stats()
        assert await buffer.delete_acknowledged() == 1
        assert count_rows(tmp_path) == 0
        assert channel_values(read_stats(tmp_path, [])) == {
            "counter": (4_000_000, 2.0, Quality.GOOD)
        }


async def test_last_values_written_by_cleanup_without_commits(buffer: Buffer) -> None:
    """A value committed just after a write reaches the file at the next due cleanup."""
    await buffer.append([Reading(1_000_000, "slow", "counter", 1.0, "")])
    await buffer.append([Reading(4_000_000, "slow", "counter", 2.0, "")])
    await buffer.delete_acknowledged()
    assert channel_values(read_stats(buffer.data_dir, []))["counter"][1] == 1.0
    await asyncio.sleep(LAST_VALUES_INTERVAL)
    await buffer.delete_acknowledged()
    assert channel_values(read_stats(buffer.data_dir, []))["counter"][1] == 2.0


@pytest.mark.usefixtures("last_values_sql")
async def test_last_values_written_before_size_cap_deletes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size cap's delete of unacknowledged rows also copies their newest values first."""
    monkeypatch.setattr(store_module, "LAST_VALUES_INTERVAL", 3600.0)
    async with Buffer(tmp_path, ["mqtt"], max_bytes=MIN_MAX_BYTES, cleanup_interval=3600) as buf:
        await buf.append(make_readings(1, channel="slow"))
        for start in range(1, 60_001, 5_000):
            await buf.append(make_readings(5_000, start=start, channel="fast"))
        await buf.append([Reading(2_000_000_000_000_000, "pumps", "slow", 7.0, "psi")])
        for start in range(60_001, 120_001, 5_000):
            await buf.append(make_readings(5_000, start=start, channel="fast"))
        stats = read_stats(tmp_path, ["mqtt"])
    assert stats.dropped_rows > 0
    assert channel_values(stats)["slow"] == (2_000_000_000_000_000, 7.0, Quality.GOOD)


# Reads served from memory


async def on_disk(buffer: Buffer, after_seq: int, limit: int) -> list[StoredReading]:
    """Return the readings above after_seq as the database file contains them."""
    rows = [r for r in iter_readings(buffer.data_dir) if r.seq > after_seq]
    return rows[:limit]


async def test_recent_reads_match_the_database(buffer: Buffer) -> None:
    """read_batch from memory returns what the file holds, for NaN, ints and text quality too."""
    nan = float("nan")
    batches = [
        [
            Reading(1_000_000, "pumps", "spp", 1.5, "psi"),
            Reading(1_000_000, "pumps", "hook", 3, "klbf"),
        ],
        [Reading(2_000_000, "pumps", "spp", nan, "psi", Quality.UNCERTAIN)],
        [Reading(3_000_000, "pumps", "spp", None, "psi", Quality.BAD)],
        [Reading(4_000_000, "mud", "pit1", -0.0, "m3", "good")],  # type: ignore[arg-type]
        make_readings(7, start=10),
    ]
    for batch in batches:
        await buffer.append(batch)
    await asyncio.sleep(0)  # lets the last commit reach the event loop
    last = buffer.last_seq
    assert last == 12
    for after in range(last + 1):
        for limit in (1, 2, 5, 100):
            from_memory = buffer._read_recent(after, limit)
            assert from_memory is not None, (after, limit)
            expected = await on_disk(buffer, after, limit)
            assert from_memory == expected
            assert [type(r.quality) for r in from_memory] == [Quality] * len(expected)
            assert await buffer.read_batch("mqtt", limit, after_seq=after) == expected


async def test_large_batches_keep_their_order(buffer: Buffer) -> None:
    """Batches inserted by many rows to a statement keep each reading at its own seq."""
    sizes = [450, 200, 1, 399]
    start = 0
    for size in sizes:
        await buffer.append(make_readings(size, start=start, channel=f"c{size}"))
        start += size
    stored = list(iter_readings(buffer.data_dir))
    assert [r.seq for r in stored] == list(range(1, start + 1))
    assert [r.value for r in stored] == [float(i) for i in range(start)]
    assert [r.ts_us - 1_700_000_000_000_000 for r in stored] == list(range(start))
    channels = [f"c{size}" for size in sizes for _ in range(size)]
    assert [r.channel for r in stored] == channels


async def test_unit_change_reads_from_the_database(buffer: Buffer) -> None:
    """After a unit change, readings stored before it come from SQLite with the new unit."""
    await buffer.append(make_readings(3))
    await buffer.append([Reading(5_000_000, "pumps", "spp", 12.0, "bar")])
    await asyncio.sleep(0)
    assert buffer._read_recent(0, 10) is None
    assert [r.seq for r in buffer._read_recent(3, 10) or []] == [4]
    batch = await buffer.read_batch("mqtt", 10, after_seq=0)
    assert batch == await on_disk(buffer, 0, 10)
    assert [r.unit for r in batch] == ["bar"] * 4


async def test_recent_reads_skip_deleted_rows(tmp_path: Path) -> None:
    """Rows deleted by acknowledgement or by the size cap are never served from memory."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as buffer:
        for start in range(0, 40, 10):
            await buffer.append(make_readings(10, start=start))
        await asyncio.sleep(0)
        await buffer.commit_cursor("mqtt", 25)
        await buffer.stats()  # writes the last values, which deletes wait for
        assert await buffer.delete_acknowledged() == 25
        assert buffer._read_recent(10, 100) is None
        batch = await buffer.read_batch("mqtt", 100, after_seq=10)
        assert [r.seq for r in batch] == list(range(26, 41))
        assert [r.seq for r in buffer._read_recent(25, 100) or []] == list(range(26, 41))


async def test_large_batch_read_from_the_database(buffer: Buffer) -> None:
    """A batch larger than RECENT_READINGS is not kept in memory; reads go to SQLite."""
    await buffer.append(make_readings(RECENT_READINGS + 1))
    await asyncio.sleep(0)
    assert buffer._read_recent(0, 10) is None
    assert [r.seq for r in await buffer.read_batch("mqtt", 10, after_seq=0)] == list(range(1, 11))


# The invariant under any sequence of operations

OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(0, 30)),
        st.tuples(st.just("commit"), st.sampled_from(["mqtt", "cloud"]), st.floats(0, 1)),
        st.tuples(st.just("delete")),
        st.tuples(st.just("reopen")),
    ),
    max_size=25,
)


async def run_operations(data_dir: Path, operations: list[tuple[object, ...]]) -> None:
    """Apply operations to a buffer and a model, checking the invariants after each."""
    sinks = ["mqtt", "cloud"]
    buffer = Buffer(data_dir, sinks, cleanup_interval=3600)
    await buffer.open()
    last_seq = 0
    cursors = dict.fromkeys(sinks, 0)
    deleted_up_to = 0
    try:
        for operation in operations:
            match operation:
                case ("append", int(count)):
                    first, last = await buffer.append(make_readings(count))
                    assert (first, last) == (last_seq + 1, last_seq + count)
                    last_seq += count
                case ("commit", str(sink), float(fraction)):
                    seq = int(fraction * last_seq)
                    await buffer.commit_cursor(sink, seq)
                    cursors[sink] = max(cursors[sink], seq)
                case ("delete",):
                    await buffer.delete_acknowledged()
                    deleted_up_to = max(deleted_up_to, min(cursors.values()))
                case ("reopen",):
                    await buffer.aclose()
                    buffer = Buffer(data_dir, sinks, cleanup_interval=3600)
                    await buffer.open()

            stats = await buffer.stats()
            assert stats.last_seq == last_seq
            assert stats.rows == last_seq - deleted_up_to
            assert stats.rows == count_rows(data_dir)
            for sink_stats in stats.sinks:
                assert sink_stats.cursor == cursors[sink_stats.name]
                assert sink_stats.depth == last_seq - sink_stats.cursor
                assert sink_stats.depth == count_rows(data_dir, sink_stats.cursor)
    finally:
        await buffer.aclose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_depth_invariant(operations: list[tuple[object, ...]]) -> None:
    """Any mix of appends, commits, deletes and reopens keeps depth = last_seq - cursor."""
    with tempfile.TemporaryDirectory() as data_dir:
        asyncio.run(run_operations(Path(data_dir), operations))


# The writer


async def test_writer_batches_puts(tmp_path: Path) -> None:
    """Many put() calls become few appends, spaced at least commit_interval apart."""
    interval = 0.2
    async with CountingBuffer(tmp_path, []) as counting:
        writer = BufferWriter(counting, commit_interval=interval)
        runner = asyncio.create_task(writer.run())
        began = asyncio.get_running_loop().time()
        for start in range(0, 200, 2):
            await writer.put(make_readings(2, start=start))
            await asyncio.sleep(0.005)
        await wait_until(lambda: writer.pending == 0)
        elapsed = asyncio.get_running_loop().time() - began
        runner.cancel()

        starts = [t for t, _size in counting.appends]
        assert writer.committed == 200
        assert counting.last_seq == 200
        assert len(counting.appends) <= elapsed / interval + 2
        assert all(b - a >= interval * 0.95 for a, b in itertools.pairwise(starts))


async def test_writer_flush_commits_all(tmp_path: Path) -> None:
    """flush() commits every pending reading in one append."""
    async with CountingBuffer(tmp_path, []) as counting:
        writer = BufferWriter(counting, commit_interval=60)
        for start in range(0, 50, 10):
            await writer.put(make_readings(10, start=start))
        assert writer.pending == 50
        await writer.flush()
        assert writer.pending == 0
        assert writer.committed == 50
        assert [size for _t, size in counting.appends] == [50]


async def test_writer_retries_failed_append(tmp_path: Path) -> None:
    """Readings stay pending after a failed append and are committed once on retry."""
    async with CountingBuffer(tmp_path, [], fail_first=1) as failing:
        writer = BufferWriter(failing, commit_interval=0.01)
        with capture_logs() as logs:
            runner = asyncio.create_task(writer.run())
            await writer.put(make_readings(10))
            await wait_until(lambda: any(e["event"] == "buffer_append_recovered" for e in logs))
            runner.cancel()
        batch = await failing.read_batch("mqtt", limit=100)

    failed = [e for e in logs if e["event"] == "buffer_append_failed"]
    assert len(failing.appends) == 2
    assert writer.committed == 10
    assert [r.value for r in batch] == [float(i) for i in range(10)]
    assert [e["log_level"] for e in failed] == ["warning"]


async def test_writer_back_pressure(tmp_path: Path) -> None:
    """put() waits while max_pending readings are pending, and a cancelled put adds nothing."""
    async with Buffer(tmp_path, []) as opened:
        writer = BufferWriter(opened, commit_interval=60, max_pending=10)
        await writer.put(make_readings(10))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await writer.put(make_readings(5, start=10))
        assert writer.pending == 10

        blocked = asyncio.create_task(writer.put(make_readings(5, start=10)))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        await writer.flush()
        async with asyncio.timeout(WAIT):
            await blocked
        assert writer.pending == 5


async def test_writer_cancelled_flush(tmp_path: Path) -> None:
    """A flush cancelled during its append neither loses nor duplicates readings."""
    async with CountingBuffer(tmp_path, []) as slow:
        slow.thread_delay = 0.1
        writer = BufferWriter(slow, commit_interval=0)
        await writer.put(make_readings(10))
        flushing = asyncio.create_task(writer.flush())
        await asyncio.sleep(0.02)
        flushing.cancel()
        await writer.put(make_readings(5, start=10))
        async with asyncio.timeout(WAIT):
            await writer.flush()
        batch = await slow.read_batch("mqtt", limit=100)

    assert flushing.cancelled()
    assert writer.pending == 0
    assert writer.committed == 15
    assert [r.value for r in batch] == [float(i) for i in range(15)]


async def test_writer_rejects_bad_reading(tmp_path: Path) -> None:
    """put() raises TypeError for a reading the buffer cannot store and accepts none."""
    async with Buffer(tmp_path, []) as opened:
        writer = BufferWriter(opened, commit_interval=60)
        bad = Reading(1, "pumps", "spp", 1.0, "psi", "fine")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="quality 'fine'"):
            await writer.put([*make_readings(3), bad])
        assert writer.pending == 0


def test_format_ts_repeats_and_alternates() -> None:
    """The one-entry cache of format_ts gives each time its own text, in any order."""
    stamps = [1_700_000_000_123_456, 1_700_000_000_123_456, 1_700_000_001_000_000, -1, 0, -1]
    expected = [
        dt.datetime.fromtimestamp(ts / 1e6, tz=dt.UTC).isoformat(timespec="microseconds")
        for ts in stamps
    ]
    expected = [text.replace("+00:00", "Z") for text in expected]
    assert [format_ts(ts) for ts in stamps] == expected


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        ("ts_us", 1.5, "ts_us 1.5"),
        ("value", "high", "value 'high'"),
        ("quality", "fine", "quality 'fine'"),
        ("source", None, "source None"),
        ("channel", 7, "channel 7"),
        ("unit", b"psi", "unit b'psi'"),
    ],
)
def test_check_readings_names_the_bad_field(field: str, bad: object, message: str) -> None:
    """A batch with one unstorable field raises the TypeError check_reading gives for it."""
    good = make_readings(3)
    batch = [good[0], good[1]._replace(**{field: bad}), good[2]]
    with pytest.raises(TypeError, match=re.escape(message)):
        check_readings(batch)
    check_readings(good)
    check_readings([Reading(1, "pumps", "spp", None, "psi", "bad")])  # type: ignore[arg-type]
