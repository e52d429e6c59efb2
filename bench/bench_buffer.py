"""Readings/s appended and committed through `buffer.store.Buffer`, next to raw sqlite3 inserts.

The raw side runs twice: plain inserts, and inserts plus the per-channel
last-value update that the buffer makes in each transaction. Every side
uses the same pragmas (WAL, synchronous=FULL), the same table and the same
rows. Run from the repository root:

    .venv/bin/python -m bench.bench_buffer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    add_json_option,
    code_version,
    machine_info,
    positive_int,
    print_table,
    quiet_logs,
    write_json,
)
from buffer.reading import Quality, Reading, now_us
from buffer.store import DB_FILENAME, Buffer
from config.units import parse_size

QUALITY_GOOD = 0
"""Code of quality `good` in the buffer's readings table."""

RAW_PRAGMAS = (
    "PRAGMA auto_vacuum = INCREMENTAL",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA journal_size_limit = 67108864",
)
"""The pragmas `Buffer` sets on its connection, applied to the raw sqlite3 database too."""

RAW_TABLE = """CREATE TABLE readings (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_us INTEGER NOT NULL,
    channel_id INTEGER NOT NULL,
    value REAL,
    quality INTEGER NOT NULL
)"""
RAW_INSERT = "INSERT INTO readings (ts_us, channel_id, value, quality) VALUES (?, ?, ?, ?)"
RAW_CHANNELS_TABLE = """CREATE TABLE channels (
    id INTEGER PRIMARY KEY,
    source TEXT,
    channel TEXT,
    unit TEXT,
    last_ts_us,
    last_value,
    last_quality,
    UNIQUE (source, channel)
)"""
RAW_INSERT_CHANNEL = "INSERT INTO channels (source, channel, unit) VALUES (?, ?, 'psi')"
RAW_UPDATE_CHANNEL = (
    "UPDATE channels SET last_ts_us = ?, last_value = ?, last_quality = ? WHERE id = ?"
)


def make_readings(count: int, channels: int) -> list[Reading]:
    """Build `count` readings that cycle over `channels` channels of 100-channel sources."""
    start = now_us()
    readings = []
    for index in range(count):
        channel = index % channels
        readings.append(
            Reading(
                ts_us=start + index,
                source=f"device{channel // 100:02d}",
                channel=f"ch{channel:04d}",
                value=1000.0 + (index % 977) * 0.125,
                unit="psi",
                quality=Quality.GOOD,
            )
        )
    return readings


def raw_rows(readings: Sequence[Reading], channels: int) -> list[tuple[int, int, float, int]]:
    """Return the rows the buffer would insert for these readings (channel ids from 1)."""
    rows = []
    for index, reading in enumerate(readings):
        assert reading.value is not None
        rows.append((reading.ts_us, index % channels + 1, reading.value, QUALITY_GOOD))
    return rows


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


def database_bytes(directory: Path, name: str) -> int:
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += (directory / f"{name}{suffix}").stat().st_size
    return total


async def run_buffer(
    directory: Path,
    warmup: Sequence[Reading],
    readings: Sequence[Reading],
    batch_size: int,
    max_bytes: int | None,
    min_free_bytes: int,
) -> tuple[float, int]:
    """Append readings in batches through the Buffer API; return seconds and database bytes."""
    buffer = Buffer(directory, ["mqtt"], max_bytes=max_bytes, min_free_bytes=min_free_bytes)
    async with buffer:
        # Creating the channel rows is a one-time cost, so it is left out of the timing.
        await buffer.append(warmup)
        parts = batches(readings, batch_size)
        started = time.perf_counter()
        for part in parts:
            await buffer.append(part)
        seconds = time.perf_counter() - started
        expected = len(warmup) + len(readings)
        if buffer.last_seq != expected:
            message = f"buffer's last seq is {buffer.last_seq}, expected {expected}"
            raise RuntimeError(message)
    return seconds, database_bytes(directory, DB_FILENAME)


def run_raw(
    directory: Path,
    warmup: Sequence[tuple[int, int, float, int]],
    rows: Sequence[tuple[int, int, float, int]],
    batch_size: int,
    *,
    last_values: bool,
) -> tuple[float, int]:
    """Insert rows with executemany, one transaction per batch; return seconds and bytes.

    With `last_values`, each transaction also updates the newest value of each
    channel in the batch, in a channels table shaped like the buffer's.
    """
    name = "raw.sqlite3"
    conn = sqlite3.connect(directory / name, isolation_level=None)
    try:
        for pragma in RAW_PRAGMAS:
            conn.execute(pragma)
        conn.execute(RAW_TABLE)
        conn.execute(RAW_CHANNELS_TABLE)
        channels = sorted({row[1] for row in warmup})
        conn.executemany(
            RAW_INSERT_CHANNEL, [(f"device{c // 100:02d}", f"ch{c:04d}") for c in channels]
        )
        conn.executemany(RAW_INSERT, warmup)
        parts = batches(rows, batch_size)
        started = time.perf_counter()
        for part in parts:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(RAW_INSERT, part)
            if last_values:
                newest = {row[1]: row for row in part}
                conn.executemany(
                    RAW_UPDATE_CHANNEL,
                    [
                        (ts_us, value, quality, channel)
                        for ts_us, channel, value, quality in newest.values()
                    ],
                )
            conn.execute("COMMIT")
        seconds = time.perf_counter() - started
        count = conn.execute("SELECT count(*) FROM readings").fetchone()[0]
        if count != len(warmup) + len(rows):
            message = f"raw table contains {count} rows, expected {len(warmup) + len(rows)}"
            raise RuntimeError(message)
    finally:
        conn.close()
    return seconds, database_bytes(directory, name)


def measure_case(args: argparse.Namespace, batch_size: int) -> dict[str, Any]:
    """Run one batch size `--repeat` times on each side and return the median rates."""
    count = min(args.readings, args.max_commits * batch_size)
    count -= count % batch_size
    warmup = make_readings(args.channels, args.channels)
    readings = make_readings(count, args.channels)
    warmup_rows = raw_rows(warmup, args.channels)
    rows = raw_rows(readings, args.channels)

    rates: dict[str, list[float]] = {"buffer": [], "raw": [], "raw_last_values": []}
    db_bytes: dict[str, int] = {}
    for _ in range(args.repeat):
        for side in rates:
            with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench-buffer-") as name:
                if side == "buffer":
                    run = run_buffer(
                        Path(name),
                        warmup,
                        readings,
                        batch_size,
                        args.max_bytes,
                        args.min_free_bytes,
                    )
                    seconds, db_bytes[side] = asyncio.run(run)
                else:
                    last_values = side == "raw_last_values"
                    seconds, db_bytes[side] = run_raw(
                        Path(name), warmup_rows, rows, batch_size, last_values=last_values
                    )
            rates[side].append(count / seconds)

    median = {side: statistics.median(values) for side, values in rates.items()}
    total_rows = count + len(warmup)
    case: dict[str, Any] = {
        "batch_size": batch_size,
        "readings": count,
        "commits": count // batch_size,
    }
    for side, rate in median.items():
        case[f"{side}_readings_per_s"] = round(rate, 1)
    case["ratio"] = round(median["buffer"] / median["raw"], 3)
    case["ratio_to_raw_last_values"] = round(median["buffer"] / median["raw_last_values"], 3)
    for side, rate in median.items():
        case[f"{side}_us_per_commit"] = round(1e6 * batch_size / rate, 1)
    for side, size in db_bytes.items():
        case[f"{side}_db_bytes_per_reading"] = round(size / total_rows, 1)
    case["runs_readings_per_s"] = {
        side: [round(rate, 1) for rate in values] for side, values in rates.items()
    }
    return case


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bench_buffer",
        description=(
            "Measure readings/s appended and committed through the buffer API at several "
            "batch sizes, next to raw sqlite3 executemany inserts of the same rows."
        ),
    )
    parser.add_argument(
        "--batch-sizes",
        default="1,100,1000",
        help="comma-separated readings per commit (default: 1,100,1000)",
    )
    parser.add_argument(
        "--readings",
        type=positive_int,
        default=300_000,
        help="readings appended per batch size and run (default: 300000)",
    )
    parser.add_argument(
        "--max-commits",
        type=positive_int,
        default=3000,
        help="cap on commits per run, which limits the readings at small batch sizes "
        "(default: 3000)",
    )
    parser.add_argument(
        "--channels", type=positive_int, default=500, help="distinct channels (default: 500)"
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=3,
        help="runs per batch size and side; the median is reported (default: 3)",
    )
    parser.add_argument(
        "--max-bytes",
        type=parse_size,
        default=parse_size("2GiB"),
        help="buffer max_bytes, a size such as 2GiB (default: 2GiB, as in the config)",
    )
    parser.add_argument(
        "--min-free-bytes",
        type=parse_size,
        default=parse_size("64MiB"),
        help="buffer min_free_bytes, a size such as 64MiB (default: 64MiB, as in the config)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="folder for the temporary databases (default: the system temporary folder)",
    )
    add_json_option(parser, "bench_buffer")
    args = parser.parse_args(argv)
    try:
        args.batch_sizes = [positive_int(part) for part in args.batch_sizes.split(",")]
    except argparse.ArgumentTypeError as exc:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: {exc}")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_logs()
    machine = machine_info()
    cases = [measure_case(args, size) for size in args.batch_sizes]
    print_table(
        "Buffer append vs raw sqlite3 executemany (WAL, synchronous=FULL), median of runs",
        [
            ("batch_size", "batch"),
            ("readings", "readings"),
            ("buffer_readings_per_s", "buffer/s"),
            ("raw_readings_per_s", "raw/s"),
            ("ratio", "buffer/raw"),
            ("raw_last_values_readings_per_s", "raw+last/s"),
            ("ratio_to_raw_last_values", "buffer/raw+last"),
            ("buffer_us_per_commit", "buffer us/commit"),
            ("raw_us_per_commit", "raw us/commit"),
        ],
        cases,
    )
    write_json(
        args.json,
        {
            "benchmark": "bench_buffer",
            "machine": machine,
            "code": code_version(),
            "settings": {
                "channels": args.channels,
                "repeat": args.repeat,
                "max_bytes": args.max_bytes,
                "min_free_bytes": args.min_free_bytes,
                "pragmas": list(RAW_PRAGMAS),
            },
            "cases": cases,
        },
    )


if __name__ == "__main__":
    main()
