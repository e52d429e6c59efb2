"""The `rig-agent export` command: write buffered readings out as CSV or JSON lines."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import secrets
import sys
from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

from buffer.reading import StoredReading, format_ts, now_us

__all__ = [
    "CSV_HEADER",
    "ExportSummary",
    "add_export_arguments",
    "parse_time_bound",
    "run_export_command",
    "write_csv",
    "write_jsonl",
]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_BUFFER = 2
EXIT_INTERRUPTED = 130

CSV_HEADER = ("seq", "ts", "source", "channel", "value", "unit", "quality")

ExportFormat = Literal["csv", "jsonl"]

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)
# Time bounds are clamped to the years 1 to 9999, the range that datetime and format_ts
# can show, which also keeps them inside SQLite's 64-bit integers.
_MIN_US = (dt.datetime.min.replace(tzinfo=dt.UTC) - _EPOCH) // _MICROSECOND
_MAX_US = (dt.datetime.max.replace(tzinfo=dt.UTC) - _EPOCH) // _MICROSECOND
_TIME_HELP = (
    'an RFC 3339 time with a zone, such as "2026-12-04T10:00:00Z", '
    'or a duration before now, such as "2h" or "30m"'
)


@dataclass(slots=True)
class ExportSummary:
    """Counts and ranges of the readings written by one export."""

    rows: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    min_ts_us: int | None = None
    max_ts_us: int | None = None

    def add(self, reading: StoredReading) -> None:
        """Count one written reading."""
        self.rows += 1
        if self.first_seq is None:
            self.first_seq = reading.seq
        self.last_seq = reading.seq
        # Timestamps follow the device clocks, so they need not rise with seq.
        if self.min_ts_us is None or reading.ts_us < self.min_ts_us:
            self.min_ts_us = reading.ts_us
        if self.max_ts_us is None or reading.ts_us > self.max_ts_us:
            self.max_ts_us = reading.ts_us


class _TimestampFormatter:
    """Format timestamps as format_ts does, reusing the text of the previous whole second.

    Readings come in bursts that share a second, and building the date and time
    text was the largest single cost of an exported row in a cProfile run.
    """

    def __init__(self) -> None:
        self._seconds: int | None = None
        self._prefix = ""

    def format(self, ts_us: int) -> str:
        seconds, micros = divmod(ts_us, 1_000_000)
        if seconds != self._seconds:
            # Cut ".000000Z" off the whole second as format_ts writes it.
            self._prefix = format_ts(seconds * 1_000_000)[:-8]
            self._seconds = seconds
        return f"{self._prefix}.{micros:06d}Z"


class _UsageError(Exception):
    """An argument or config value that the user must fix (exit code 1)."""


class _BufferReadError(Exception):
    """A failure of the buffer while its readings are read (exit code 2).

    Its own type keeps a FileNotFoundError of the reader apart from an OSError
    of the output file.
    """


def add_export_arguments(commands: argparse._SubParsersAction[Any]) -> None:
    """Add the `export` command to the top-level subparsers."""
    export = commands.add_parser(
        "export",
        help="write buffered readings out as CSV or JSON lines",
        description="Write the readings still in the local buffer, in seq order, as CSV "
        "(columns seq,ts,source,channel,value,unit,quality; an empty value is null) or as "
        "one JSON object per line. ts is RFC 3339 UTC with microseconds. It reads the buffer "
        "read-only and can run while the agent runs. Exit 1 on invalid arguments or config "
        "or when --out cannot be written, 2 when the buffer cannot be read.",
        usage_exit_code=EXIT_USAGE,
    )
    export.add_argument("-c", "--config", type=Path, required=True, help="path of the TOML config")
    export.add_argument(
        "--format", choices=("csv", "jsonl"), required=True, help="output format: csv or jsonl"
    )
    export.add_argument(
        "--since",
        metavar="T",
        default=None,
        help=f"only readings with ts at or after T: {_TIME_HELP}",
    )
    export.add_argument(
        "--until",
        metavar="T",
        default=None,
        help=f"only readings with ts before T (exclusive): {_TIME_HELP}",
    )
    export.add_argument(
        "--source", metavar="NAME", default=None, help="only readings of this source"
    )
    export.add_argument(
        "--channel", metavar="NAME", default=None, help="only readings of this channel"
    )
    export.add_argument(
        "--out",
        type=Path,
        default=None,
        metavar="PATH",
        help="write to this file, replacing it only once the export is complete "
        "(default: standard output)",
    )


def run_export_command(args: argparse.Namespace) -> int:
    """Run `rig-agent export` and return the exit code."""
    from buffer.reader import iter_readings
    from buffer.store import BufferDatabaseError

    try:
        data_dir, since_us, until_us = _check_arguments(args)
    except _UsageError as exc:
        print(f"rig-agent export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FileNotFoundError, BufferDatabaseError) as exc:
        print(f"rig-agent export: failed to read the buffer: {exc}", file=sys.stderr)
        return EXIT_BUFFER

    readings = _report_read_errors(
        iter_readings(
            data_dir,
            since_us=since_us,
            until_us=until_us,
            source=args.source,
            channel=args.channel,
        )
    )
    destination = "standard output" if args.out is None else str(args.out)
    try:
        if args.out is None:
            summary = _write_stdout(args.format, readings)
        else:
            summary = _write_file_atomically(args.format, readings, args.out)
    except _BufferReadError as exc:
        print(f"rig-agent export: failed to read the buffer: {exc}", file=sys.stderr)
        if args.out is not None:
            print(f"rig-agent export: {args.out} was left unchanged", file=sys.stderr)
        return EXIT_BUFFER
    except _UsageError as exc:
        print(f"rig-agent export: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        unchanged = "" if args.out is None else f"; {args.out} was left unchanged"
        print(f"rig-agent export: interrupted{unchanged}", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        readings.close()

    print(f"rig-agent export: {_describe(summary, destination)}", file=sys.stderr)
    if since_us is not None and (summary.min_ts_us or until_us or 0) - since_us > _GAP_NOTE_US:
        print(
            "rig-agent export: note: the buffer keeps a reading only until every sink has "
            "acknowledged it, so older readings were delivered and deleted from this box",
            file=sys.stderr,
        )
    return EXIT_OK


_GAP_NOTE_US = 60_000_000
"""A --since this far before the first exported reading gets a note on deleted readings."""


def parse_time_bound(text: str, now: int) -> int:
    """Convert a --since or --until value to microseconds since the Unix epoch.

    `text` is an RFC 3339 time with a zone, or a duration such as "2h" that
    counts back from `now` (microseconds since the epoch). Fractions of a
    second below one microsecond are cut off, and a result before the year 1
    or after 9999 is moved to that limit. Raises ValueError.
    """
    from config.units import parse_non_negative_duration

    stripped = text.strip()
    try:
        seconds = parse_non_negative_duration(stripped)
    except ValueError:
        pass
    else:
        return max(_MIN_US, now - round(seconds * 1_000_000))
    try:
        # RFC 3339 allows a lower-case t and z, which fromisoformat rejects.
        moment = dt.datetime.fromisoformat(stripped.upper())
    except ValueError:
        message = f"invalid time {text!r}: expected {_TIME_HELP}"
        raise ValueError(message) from None
    if moment.tzinfo is None:
        message = (
            f"invalid time {text!r}: it has no zone; add Z for UTC or an offset such as +01:00"
        )
        raise ValueError(message)
    return min(_MAX_US, max(_MIN_US, (moment - _EPOCH) // _MICROSECOND))


def write_csv(readings: Iterable[StoredReading], out: TextIO) -> ExportSummary:
    """Write readings as CSV with a header row and return what was written.

    Rows end in CRLF as RFC 4180 has it. A null value is an empty field, and a
    float is written with the fewest digits that read back as the same float.
    """
    summary = ExportSummary()
    timestamp = _TimestampFormatter()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for reading in readings:
        value = "" if reading.value is None else repr(float(reading.value))
        writer.writerow(
            (
                reading.seq,
                timestamp.format(reading.ts_us),
                reading.source,
                reading.channel,
                value,
                reading.unit,
                reading.quality.value,
            )
        )
        summary.add(reading)
    return summary


def write_jsonl(readings: Iterable[StoredReading], out: TextIO) -> ExportSummary:
    """Write readings as one JSON object per line and return what was written.

    The keys are the fields of the uplinks' reading JSON plus "source". JSON has
    no infinity, so an infinite value is written as null with its quality unchanged.
    """
    summary = ExportSummary()
    timestamp = _TimestampFormatter()
    # json.dumps with options builds a new encoder on every call.
    encoder = json.JSONEncoder(allow_nan=False)
    for reading in readings:
        value = reading.value
        if value is not None and not math.isfinite(value):
            value = None
        line = {
            "seq": reading.seq,
            "ts": timestamp.format(reading.ts_us),
            "source": reading.source,
            "channel": reading.channel,
            "value": value,
            "unit": reading.unit,
            "quality": reading.quality.value,
        }
        out.write(encoder.encode(line))
        out.write("\n")
        summary.add(reading)
    return summary


def _check_arguments(args: argparse.Namespace) -> tuple[Path, int | None, int | None]:
    """Validate the arguments and config; return data_dir and the time bounds in microseconds."""
    from buffer.reader import list_channels
    from config.loader import ConfigError, load_config

    now = now_us()
    since_us = _parse_option("--since", args.since, now)
    until_us = _parse_option("--until", args.until, now)
    if since_us is not None and until_us is not None and since_us >= until_us:
        message = (
            f"--since {args.since} ({format_ts(since_us)}) is not before "
            f"--until {args.until} ({format_ts(until_us)}), so no reading can match: "
            "give an earlier --since or a later --until"
        )
        raise _UsageError(message)
    if args.out is not None:
        _check_out_path(args.out)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        message = f"invalid config {args.config}:\n{exc}"
        raise _UsageError(message) from exc
    data_dir = Path(config.agent.data_dir)

    # Opening the buffer here reports a missing or unreadable one before --out is touched.
    channels = list_channels(data_dir)
    if args.source is not None and all(c.source != args.source for c in channels):
        known = sorted({c.source for c in channels})
        message = (
            f"--source {args.source!r}: no reading of this source was ever buffered in "
            f"{data_dir}. Sources in the buffer: {', '.join(known) or 'none'}"
        )
        raise _UsageError(message)
    if args.channel is not None:
        of_source = [c for c in channels if args.source is None or c.source == args.source]
        if all(c.channel != args.channel for c in of_source):
            known = sorted({c.channel for c in of_source})
            where = "" if args.source is None else f" of source {args.source!r}"
            message = (
                f"--channel {args.channel!r}: no reading of this channel{where} was ever "
                f"buffered in {data_dir}. Channels in the buffer: {', '.join(known) or 'none'}"
            )
            raise _UsageError(message)
    return data_dir, since_us, until_us


def _parse_option(option: str, text: str | None, now: int) -> int | None:
    if text is None:
        return None
    try:
        return parse_time_bound(text, now)
    except ValueError as exc:
        message = f"{option}: {exc}"
        raise _UsageError(message) from exc


def _report_read_errors(
    readings: Iterator[StoredReading],
) -> Generator[StoredReading, None, None]:
    from buffer.store import BufferDatabaseError

    try:
        yield from readings
    except (FileNotFoundError, BufferDatabaseError) as exc:
        raise _BufferReadError(str(exc)) from exc


def _check_out_path(out: Path) -> None:
    if out.is_dir():
        message = f"--out {out} is a directory: give the path of a file to write"
        raise _UsageError(message)
    parent = out.parent
    if not parent.is_dir():
        message = f"--out {out}: directory {parent} not found. Create it or choose another path"
        raise _UsageError(message)


def _write(
    export_format: ExportFormat, readings: Iterable[StoredReading], out: TextIO
) -> ExportSummary:
    if export_format == "csv":
        return write_csv(readings, out)
    return write_jsonl(readings, out)


def _write_stdout(export_format: ExportFormat, readings: Iterable[StoredReading]) -> ExportSummary:
    try:
        summary = _write(export_format, readings, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:
        raise  # The reading end closed (head, less), and agent.cli.main exits quietly.
    except OSError as exc:
        message = f"failed to write to standard output: {exc.strerror or exc}"
        raise _UsageError(message) from exc
    return summary


def _write_file_atomically(
    export_format: ExportFormat, readings: Iterable[StoredReading], path: Path
) -> ExportSummary:
    """Write to a temporary file beside `path`, sync it and rename it over `path`.

    A failed or interrupted export removes the temporary file and leaves `path`
    as it was.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        # Mode 0o666 minus the umask, as for any file the user creates.
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        message = f"--out {path}: failed to create a file in {path.parent}: {exc.strerror or exc}"
        raise _UsageError(message) from exc
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as out:
            summary = _write(export_format, readings, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        message = f"--out {path}: failed to write: {exc.strerror or exc}. {path} was left unchanged"
        raise _UsageError(message) from exc
    finally:
        temporary.unlink(missing_ok=True)
    _sync_directory(path.parent)
    return summary


def _sync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable, as a USB stick may be pulled right after."""
    try:
        descriptor = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        # Some filesystems reject fsync of a directory. The file itself is already synced.
        pass
    finally:
        os.close(descriptor)


def _describe(summary: ExportSummary, destination: str) -> str:
    if summary.min_ts_us is None or summary.max_ts_us is None:
        return f"wrote 0 readings to {destination}: no buffered reading matches"
    noun = "reading" if summary.rows == 1 else "readings"
    return (
        f"wrote {summary.rows} {noun} to {destination}: seq {summary.first_seq} to "
        f"{summary.last_seq}, ts {format_ts(summary.min_ts_us)} to {format_ts(summary.max_ts_us)}"
    )
