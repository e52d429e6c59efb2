"""A corrupt buffer file is moved aside at open and replaced; a foreign database is left alone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sqlite3
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from buffer.reading import Reading, now_us
from buffer.store import DB_FILENAME, Buffer, ForeignDatabaseError, read_stats

PAGE_SIZE = 4096
"""SQLite's default page size, which the buffer uses."""
ROWS = 50_000
SET_ASIDE_NAME = re.compile(r"buffer-corrupt-\d{8}T\d{6}Z(-\d+)?\.db")


def make_readings(count: int, start: int = 0) -> list[Reading]:
    """Build `count` readings of one channel with values start, start + 1, ..."""
    return [
        Reading(1_700_000_000_000_000 + index, "pumps", "spp", float(index), "psi")
        for index in range(start, start + count)
    ]


def set_aside_files(data_dir: Path) -> list[Path]:
    """List the corrupt database files moved aside in data_dir, oldest name first."""
    return sorted(data_dir.glob("buffer-corrupt-*.db"))


def write_garbage(path: Path, offset: int, garbage: bytes) -> None:
    with path.open("r+b") as file:
        file.seek(offset)
        file.write(garbage)


def break_rowid_order(path: Path, page: int) -> None:
    """Flip the lowest bit of the rowid of the second cell of a table leaf page.

    The rowids of a leaf are consecutive, so the flipped one equals a neighbour's
    and the page is no longer in rowid order.
    """
    data = bytearray(path.read_bytes())
    base = (page - 1) * PAGE_SIZE
    assert data[base] == 13, f"page {page} is not a table leaf page"
    # The cell pointer array follows the 8-byte leaf header; entry 1 is the second cell.
    cell = base + int.from_bytes(data[base + 10 : base + 12], "big")
    # A cell starts with the payload length varint (one byte here), then the rowid varint.
    assert data[cell] < 0x80, "the payload length takes more than one byte"
    end = cell + 1
    while data[end] & 0x80:
        end += 1
    data[end] ^= 0x01
    path.write_bytes(bytes(data))


async def make_buffer(data_dir: Path, rows: int = ROWS) -> None:
    """Create a closed buffer with `rows` readings and the mqtt cursor at 100."""
    async with Buffer(data_dir, ["mqtt"], cleanup_interval=3600) as buffer:
        for start in range(0, rows, 1000):
            await buffer.append(make_readings(1000, start))
        await buffer.commit_cursor("mqtt", 100)


async def test_garbage_in_middle_set_aside(tmp_path: Path) -> None:
    """Garbage in the middle of the file: it is moved aside unchanged and a new buffer works."""
    await make_buffer(tmp_path)
    path = tmp_path / DB_FILENAME
    middle = path.stat().st_size // 2 // PAGE_SIZE * PAGE_SIZE
    write_garbage(path, middle, os.urandom(2 * PAGE_SIZE))
    corrupt = path.read_bytes()

    with capture_logs() as logs:
        async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as buffer:
            first, last = await buffer.append(make_readings(3))
            stats = await buffer.stats()
            batch = await buffer.read_batch("mqtt", limit=10)

    [aside] = set_aside_files(tmp_path)
    [event] = [e for e in logs if e["event"] == "buffer_corrupt_set_aside"]
    assert SET_ASIDE_NAME.fullmatch(aside.name)
    assert aside.read_bytes() == corrupt
    assert event["log_level"] == "error"
    assert event["path"] == str(path)
    assert event["moved_to"] == str(aside)
    # The new database continues the seq of the old one, so destinations that remove
    # duplicates by seq keep the new readings.
    assert (first, last) == (ROWS + 1, ROWS + 3)
    assert [r.seq for r in batch] == [ROWS + 1, ROWS + 2, ROWS + 3]
    assert stats.rows == 3
    assert stats.corrupt_databases_set_aside == 1
    assert stats.set_aside_paths == [str(aside)]
    assert stats.sinks[0].cursor == 0
    from_disk = read_stats(tmp_path, ["mqtt"])
    assert from_disk.corrupt_databases_set_aside == 1
    assert from_disk.set_aside_paths == [str(aside)]


async def test_quick_check_finding_set_aside(tmp_path: Path) -> None:
    """Damage that only quick_check reports (rowids out of order) also sets the file aside."""
    await make_buffer(tmp_path)
    path = tmp_path / DB_FILENAME
    page = path.stat().st_size // PAGE_SIZE // 2
    break_rowid_order(path, page)

    with capture_logs() as logs:
        async with Buffer(tmp_path, ["mqtt"]) as buffer:
            assert buffer.last_seq == ROWS

    [event] = [e for e in logs if e["event"] == "buffer_corrupt_set_aside"]
    assert event["error"].startswith("quick_check found: ")
    assert f"page {page} cell 1" in event["error"]
    assert "out of order" in event["error"]
    assert len(set_aside_files(tmp_path)) == 1


async def test_second_set_aside_counted(tmp_path: Path) -> None:
    """A second corrupt file is counted on top of the first, with both paths kept."""
    await make_buffer(tmp_path, rows=20_000)
    path = tmp_path / DB_FILENAME
    for _ in range(2):
        middle = path.stat().st_size // 2 // PAGE_SIZE * PAGE_SIZE
        write_garbage(path, middle, os.urandom(2 * PAGE_SIZE))
        async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as buffer:
            for start in range(0, 20_000, 1000):
                await buffer.append(make_readings(1000, start))

    stats = read_stats(tmp_path, ["mqtt"])
    asides = set_aside_files(tmp_path)
    # Both set-asides may fall in the same second, so the second name may carry "-2".
    assert len(asides) == 2
    assert stats.corrupt_databases_set_aside == 2
    assert sorted(stats.set_aside_paths) == [str(p) for p in asides]
    assert stats.last_seq == 60_000


async def test_unreadable_file_seq_from_clock(tmp_path: Path) -> None:
    """When no seq can be read from the corrupt file, the new seq starts above the clock in µs."""
    (tmp_path / DB_FILENAME).write_bytes(os.urandom(8 * PAGE_SIZE))
    before_us = now_us()
    with capture_logs() as logs:
        async with Buffer(tmp_path, []) as buffer:
            first, _last = await buffer.append(make_readings(1))

    [event] = [e for e in logs if e["event"] == "buffer_corrupt_set_aside"]
    assert event["seq_floor_from"] == "clock"
    assert first > before_us
    assert "file is not a database" in event["error"]


async def test_foreign_database_refused(tmp_path: Path) -> None:
    """Another application's database raises ForeignDatabaseError and stays in place unchanged."""
    path = tmp_path / DB_FILENAME
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.executemany("INSERT INTO invoices (total) VALUES (?)", [(1.5,), (2.5,)])
        conn.commit()
    before = path.read_bytes()

    with pytest.raises(ForeignDatabaseError, match="invoices"):
        await Buffer(tmp_path, []).open()

    assert path.read_bytes() == before
    assert set_aside_files(tmp_path) == []


SET_ASIDE_CHILD = """
import asyncio, sys
from pathlib import Path
from buffer.store import Buffer

async def main():
    async with Buffer(Path(sys.argv[1]), []) as buffer:
        print("opened", buffer.last_seq, flush=True)

asyncio.run(main())
"""


async def test_set_aside_in_other_process(tmp_path: Path) -> None:
    """A separate process opening a corrupt buffer sets it aside and exits cleanly."""
    await make_buffer(tmp_path, rows=10_000)
    path = tmp_path / DB_FILENAME
    write_garbage(path, 0, os.urandom(100))

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SET_ASIDE_CHILD,
        str(tmp_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        stdout, stderr = await child.communicate()

    assert child.returncode == 0, stderr.decode()
    assert b"opened" in stdout
    assert b"buffer_corrupt_set_aside" in stdout + stderr
    assert len(set_aside_files(tmp_path)) == 1
