"""The buffer's size cap and its handling of a full disk, on real files and a real small tmpfs."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from buffer.reading import Reading, now_us
from buffer.store import DB_FILENAME, MIN_MAX_BYTES, Buffer, read_stats
from buffer.writer import BufferWriter

CAP = MIN_MAX_BYTES
"""The smallest cap, so that a few hundred batches fill it several times over."""
BATCH = 500
BYTES_PER_READING = 64
"""Generous bound on the disk bytes of one stored reading (about 26 are measured)."""
BATCH_ALLOWANCE = BATCH * BYTES_PER_READING
"""How far one commit batch may take the files over the cap."""
SMALL_FS_BYTES = 4 * 1024**2


def make_readings(count: int, start: int = 0) -> list[Reading]:
    """Build `count` readings spread over four channels, with values start, start + 1, ..."""
    return [
        Reading(1_700_000_000_000_000 + index, "pumps", f"ch{index % 4}", float(index), "psi")
        for index in range(start, start + count)
    ]


def size_on_disk(data_dir: Path) -> int:
    """Return the bytes of the database file plus its WAL file."""
    total = 0
    for name in (DB_FILENAME, DB_FILENAME + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += (data_dir / name).stat().st_size
    return total


def stored_seqs(data_dir: Path) -> list[int]:
    """Return the seq of every stored reading, read through a separate connection."""
    with contextlib.closing(sqlite3.connect(data_dir / DB_FILENAME)) as conn:
        return [int(row[0]) for row in conn.execute("SELECT seq FROM readings ORDER BY seq")]


def free_bytes(path: Path) -> int:
    fs = os.statvfs(path)
    return fs.f_bavail * fs.f_frsize


def fill_filesystem(mount_point: Path, leave_free: int) -> Path:
    """Write a filler file until at most `leave_free` bytes are free, or the disk is full."""
    filler = mount_point / "filler"
    with filler.open("wb", buffering=0) as out:
        while (free := free_bytes(mount_point)) > leave_free:
            try:
                out.write(b"\0" * min(64 * 1024, free - leave_free))
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return filler


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs mounted for the test and unmounted after it.

    Mounting needs root, as in CI. Without it the test fails, because a
    skipped test would hide that the full-disk handling went untested.
    """
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.fail(
            "the full-disk tests mount a 4 MiB tmpfs and need root (CI runs them as root); "
            "run pytest as root to test the buffer on a full disk"
        )
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mount.returncode != 0:
        pytest.fail(f"mounting a 4 MiB tmpfs on {mount_point} failed: {mount.stderr.strip()}")
    try:
        yield mount_point
    finally:
        umount = subprocess.run(
            ["umount", str(mount_point)], capture_output=True, text=True, check=False
        )
        if umount.returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)
            pytest.fail(f"unmounting {mount_point} failed: {umount.stderr.strip()}")


# Arguments


@pytest.mark.parametrize("max_bytes", [0, 1000, MIN_MAX_BYTES - 1])
def test_small_max_bytes_rejected(tmp_path: Path, max_bytes: int) -> None:
    """A max_bytes under 1 MiB raises ValueError naming the value and the minimum."""
    with pytest.raises(ValueError, match=f"max_bytes is {max_bytes} bytes") as caught:
        Buffer(tmp_path, ["mqtt"], max_bytes=max_bytes)
    assert str(MIN_MAX_BYTES) in str(caught.value)


def test_negative_min_free_rejected(tmp_path: Path) -> None:
    """A negative min_free_bytes raises ValueError naming the value."""
    with pytest.raises(ValueError, match="min_free_bytes is -1"):
        Buffer(tmp_path, ["mqtt"], min_free_bytes=-1)


# The size cap


async def test_cap_bounds_size_on_disk(tmp_path: Path) -> None:
    """With a sink that never acknowledges, the files stay within the cap plus one batch."""
    produced = 0
    peak = 0
    async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP, cleanup_interval=3600) as buffer:
        for _ in range(300):
            await buffer.append(make_readings(BATCH, produced))
            produced += BATCH
            peak = max(peak, size_on_disk(tmp_path))
        stats = await buffer.stats()
        batch = await buffer.read_batch("mqtt", limit=1)

    seqs = stored_seqs(tmp_path)
    assert peak <= CAP + BATCH_ALLOWANCE, f"peak {peak} bytes on disk"
    assert peak > CAP // 2, f"peak {peak} bytes: the cap was never approached"
    assert stats.dropped_rows == produced - len(seqs)
    assert stats.dropped_rows > produced // 2
    assert stats.rows == len(seqs)
    assert stats.sinks[0].dropped_buffer_full == stats.dropped_rows
    # The newest readings are kept: the stored seqs are the last ones handed out.
    assert seqs == list(range(produced - len(seqs) + 1, produced + 1))
    assert batch[0].seq == seqs[0]


async def test_cap_counts_durable(tmp_path: Path) -> None:
    """The drop counters survive a reopen and are read by read_stats from another connection."""
    async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP, cleanup_interval=3600) as buffer:
        for start in range(0, 100 * BATCH, BATCH):
            await buffer.append(make_readings(BATCH, start))
        before = await buffer.stats()

    after = read_stats(tmp_path, ["mqtt"])
    assert before.dropped_rows > 0
    assert after.dropped_rows == before.dropped_rows
    assert after.sinks[0].dropped_buffer_full == before.dropped_rows
    async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP) as reopened:
        assert (await reopened.stats()).dropped_rows == before.dropped_rows


async def test_cap_counts_per_sink(tmp_path: Path) -> None:
    """Each sink is charged only for deleted readings above its own cursor."""
    lost = {"mqtt": 0, "cloud": 0}
    async with Buffer(tmp_path, ["mqtt", "cloud"], max_bytes=CAP, cleanup_interval=3600) as buffer:
        oldest = 1
        mqtt_cursor = 0
        for index in range(200):
            # The mqtt sink keeps up for the first 100 batches, then stops acknowledging.
            if index < 100:
                mqtt_cursor = buffer.last_seq
                await buffer.commit_cursor("mqtt", mqtt_cursor)
            await buffer.append(make_readings(BATCH, buffer.last_seq))
            stats = await buffer.stats()
            new_oldest = stats.last_seq - stats.rows + 1
            # This append deleted the rows oldest .. new_oldest - 1.
            lost["cloud"] += new_oldest - oldest
            lost["mqtt"] += max(0, new_oldest - 1 - max(mqtt_cursor, oldest - 1))
            oldest = new_oldest

    dropped = {sink.name: sink.dropped_buffer_full for sink in stats.sinks}
    assert dropped == lost
    assert 0 < lost["mqtt"] < lost["cloud"]
    # The cloud sink acknowledged nothing, so every deleted row counts as dropped.
    assert stats.dropped_rows == lost["cloud"] == oldest - 1


async def test_cap_skips_acknowledged_rows(tmp_path: Path) -> None:
    """Rows every sink acknowledged are deleted by the cap without counting as dropped."""
    async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP, cleanup_interval=3600) as buffer:
        for start in range(0, 100 * BATCH, BATCH):
            await buffer.append(make_readings(BATCH, start))
            await buffer.commit_cursor("mqtt", buffer.last_seq)
        stats = await buffer.stats()

    assert stats.rows < 100 * BATCH
    assert stats.dropped_rows == 0
    assert stats.sinks[0].dropped_buffer_full == 0


async def test_cap_warning_rate_limited(tmp_path: Path) -> None:
    """Drops are logged at once, then at most once a minute; the lines add up to the total."""
    with capture_logs() as logs:
        async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP, cleanup_interval=3600) as buffer:
            for start in range(0, 200 * BATCH, BATCH):
                await buffer.append(make_readings(BATCH, start))
            during = [e for e in logs if e["event"] == "buffer_full_dropped_oldest"]
            stats = await buffer.stats()
    after_close = [e for e in logs if e["event"] == "buffer_full_dropped_oldest"]

    assert len(during) == 1
    assert during[0]["log_level"] == "warning"
    assert during[0]["dropped_by_sink"]["mqtt"] == during[0]["dropped_total"]
    # Closing logs the drops counted since the last line.
    assert len(after_close) == 2
    assert after_close[-1]["dropped_total"] == stats.dropped_rows
    assert sum(e["dropped"] for e in after_close) == stats.dropped_rows


async def test_lowered_cap_shrinks_file(tmp_path: Path) -> None:
    """A buffer reopened with a cap below its size drops the oldest rows and shrinks to the cap."""
    async with Buffer(tmp_path, ["mqtt"], cleanup_interval=3600) as uncapped:
        for start in range(0, 200 * BATCH, BATCH):
            await uncapped.append(make_readings(BATCH, start))
    assert size_on_disk(tmp_path) > 2 * CAP

    async with Buffer(tmp_path, ["mqtt"], max_bytes=CAP, cleanup_interval=3600) as capped:
        opened_size = size_on_disk(tmp_path)
        await capped.append(make_readings(BATCH, 200 * BATCH))
        appended_size = size_on_disk(tmp_path)
        stats = await capped.stats()

    assert opened_size <= CAP, f"{opened_size} bytes on disk after open"
    assert appended_size <= CAP + BATCH_ALLOWANCE, f"{appended_size} bytes after an append"
    assert stats.dropped_rows == 201 * BATCH - stats.rows


async def test_cap_throughput_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Measure append+commit throughput without limits, with the checks on, and at the cap.

    The rates are printed for comparison; timing on shared CI machines is too
    noisy for an assertion on them.
    """
    batches = 300
    batch = 100
    settings: dict[str, dict[str, int]] = {
        "no limits": {},
        "checks on, cap not reached": {"max_bytes": 1024**3, "min_free_bytes": 1},
        "checks on, at a 1 MiB cap": {"max_bytes": CAP, "min_free_bytes": 1},
    }
    best = dict.fromkeys(settings, 0.0)
    for repeat in range(2):
        for name, limits in settings.items():
            data_dir = tmp_path / f"{repeat}-{len(name)}"
            async with Buffer(data_dir, ["mqtt"], cleanup_interval=3600, **limits) as buffer:
                started = time.perf_counter()
                for start in range(0, batches * batch, batch):
                    await buffer.append(make_readings(batch, start))
                elapsed = time.perf_counter() - started
                assert buffer.last_seq == batches * batch
            best[name] = max(best[name], batches * batch / elapsed)
    with capsys.disabled():
        print()
        for name, rate in best.items():
            print(f"buffer append+commit, {batch} readings a batch, {name}: {rate:,.0f} readings/s")


# A full disk


async def test_disk_full_drops_and_resumes(small_fs: Path) -> None:
    """On a full disk the writer keeps running and counts drops; with space back it stores again."""
    data_dir = small_fs / "data"
    async with Buffer(data_dir, ["mqtt"], cleanup_interval=3600) as buffer:
        writer = BufferWriter(buffer, commit_interval=0)
        runner = asyncio.create_task(writer.run())
        await writer.put(make_readings(BATCH))
        await writer.flush()
        filler = fill_filesystem(small_fs, leave_free=0)

        produced = BATCH
        with capture_logs() as logs:
            # Writes that fit in WAL space allocated earlier still succeed for a while.
            while writer.dropped == 0 and produced < 400 * BATCH:
                await writer.put(make_readings(BATCH, produced))
                produced += BATCH
                await writer.flush()
            for _ in range(20):
                await writer.put(make_readings(BATCH, produced))
                produced += BATCH
                await writer.flush()
        full_stats = await buffer.stats()
        stored_while_full = buffer.last_seq

        await asyncio.to_thread(filler.unlink)
        await writer.put(make_readings(BATCH, produced))
        produced += BATCH
        await writer.flush()
        assert not runner.done()
        runner.cancel()
        after_stats = await buffer.stats()

    warnings = [e for e in logs if e["event"] == "buffer_disk_full_dropped"]
    assert writer.dropped >= 20 * BATCH
    assert writer.committed + writer.dropped == produced
    assert full_stats.dropped_disk_full == writer.dropped
    assert full_stats.last_disk_full_us is not None
    assert full_stats.last_seq == stored_while_full
    assert buffer.last_seq == stored_while_full + BATCH
    assert after_stats.dropped_disk_full == writer.dropped
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "full" in warnings[0]["error"]
    # The count kept in memory while the disk was full was written once space returned.
    on_disk = read_stats(data_dir, ["mqtt"])
    assert on_disk.dropped_disk_full == writer.dropped
    assert on_disk.last_disk_full_us == full_stats.last_disk_full_us


async def test_min_free_bytes_drops_batch(small_fs: Path) -> None:
    """A batch that would cut into min_free_bytes is dropped, counted on disk, and not raised."""
    data_dir = small_fs / "data"
    min_free = 2 * 1024**2
    async with Buffer(data_dir, ["mqtt"], min_free_bytes=min_free, cleanup_interval=3600) as buffer:
        assert await buffer.append(make_readings(BATCH)) == (1, BATCH)
        filler = fill_filesystem(small_fs, leave_free=min_free - 64 * 1024)

        before_us = now_us()
        with capture_logs() as logs:
            results = [
                await buffer.append(make_readings(BATCH, start))
                for start in range(BATCH, 6 * BATCH, BATCH)
            ]
        after_us = now_us()
        # The disk still has space, so the counters are already in the file.
        on_disk = read_stats(data_dir, ["mqtt"])

        await asyncio.to_thread(filler.unlink)
        resumed = await buffer.append(make_readings(BATCH, 6 * BATCH))

    warnings = [e for e in logs if e["event"] == "buffer_disk_full_dropped"]
    assert results == [(BATCH + 1, BATCH)] * 5
    assert on_disk.dropped_disk_full == 5 * BATCH
    assert on_disk.last_disk_full_us is not None
    assert before_us <= on_disk.last_disk_full_us <= after_us
    assert resumed == (BATCH + 1, 2 * BATCH)
    assert len(warnings) == 1
    assert warnings[0]["min_free_bytes"] == min_free
    assert warnings[0]["free_bytes"] < min_free
    assert stored_seqs(data_dir) == list(range(1, 2 * BATCH + 1))
