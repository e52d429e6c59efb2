"""Helpers shared by the benchmark scripts: machine facts, process counters, tables and JSON."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import structlog

__all__ = [
    "RESULTS_DIR",
    "LatencyHistogram",
    "add_json_option",
    "code_version",
    "cpu_seconds",
    "machine_info",
    "memory_bytes",
    "positive_int",
    "print_table",
    "quiet_logs",
    "start_py_spy",
    "write_json",
]

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default folder of the JSON results, one file per script."""

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_info() -> dict[str, Any]:
    """Return the facts about this machine that a benchmark figure depends on.

    `load_average` is the 1, 5 and 15 minute load when called: call it before the
    measurements, so that it shows what else was running.
    """
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": _mem_total_bytes(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }


def code_version() -> dict[str, Any]:
    """Return the git commit of the checkout and the files changed since it, if git can tell."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "changed_files": None}
    changed = sorted(line[3:] for line in status.splitlines() if line.strip())
    return {"commit": commit, "changed_files": changed}


def _cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown"
    for line in text.splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return None


def quiet_logs() -> None:
    """Drop this process's structlog events below warning, so that they do not hide the tables."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds a process has used, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    # The command name in field 2 may contain spaces, so split after its closing bracket.
    fields = text.rsplit(")", 1)[1].split()
    # Fields 14 and 15 of the file (utime, stime) are 11 and 12 after the bracket.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def memory_bytes(pid: int) -> dict[str, int]:
    """Return `rss` (VmRSS) and `peak_rss` (VmHWM) of a process in bytes."""
    values: dict[str, int] = {}
    names = {"VmRSS:": "rss", "VmHWM:": "peak_rss"}
    for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
        parts = line.split()
        if parts and parts[0] in names:
            values[names[parts[0]]] = int(parts[1]) * 1024
    return values


def start_py_spy(pid: int, output: Path, duration: float | None = None) -> subprocess.Popen[bytes]:
    """Start `py-spy record` on a process, writing the raw (collapsed stack) format to `output`.

    Without `duration` it records until the process exits. py-spy is not a
    dependency of the project: install it into the virtual environment first.
    """
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    output.parent.mkdir(parents=True, exist_ok=True)
    command = [binary, "record", "--pid", str(pid), "--format", "raw", "--nonblocking"]
    command += ["--output", str(output)]
    if duration is not None:
        command += ["--duration", str(max(1, round(duration)))]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class LatencyHistogram:
    """Latencies counted in buckets of 0.1 ms, so that millions of readings take little memory."""

    BUCKET_MS = 0.1

    def __init__(self) -> None:
        self._buckets: Counter[int] = Counter()
        self.count = 0
        self.max_ms = 0.0

    def add(self, latency_ms: float, count: int = 1) -> None:
        """Count `count` readings that each took `latency_ms`."""
        self._buckets[int(latency_ms / self.BUCKET_MS)] += count
        self.count += count
        self.max_ms = max(self.max_ms, latency_ms)

    def percentile(self, fraction: float) -> float | None:
        """Return the upper edge in ms of the bucket holding that fraction of readings."""
        if self.count == 0:
            return None
        rank = fraction * self.count
        seen = 0
        for bucket in sorted(self._buckets):
            seen += self._buckets[bucket]
            if seen >= rank:
                return round((bucket + 1) * self.BUCKET_MS, 1)
        return round(self.max_ms, 1)

    def summary(self) -> dict[str, float | int | None]:
        return {
            "readings": self.count,
            "p50_ms": self.percentile(0.50),
            "p99_ms": self.percentile(0.99),
            "max_ms": round(self.max_ms, 1) if self.count else None,
        }


def positive_int(text: str) -> int:
    """Parse an argparse integer of at least 1; underscores such as 5_000_000 are accepted."""
    try:
        value = int(text)
    except ValueError:
        message = f"invalid integer {text!r}: expected a whole number such as 1000 or 5_000_000"
        raise argparse.ArgumentTypeError(message) from None
    if value < 1:
        message = f"invalid value {value}: expected 1 or more"
        raise argparse.ArgumentTypeError(message)
    return value


def add_json_option(parser: argparse.ArgumentParser, name: str) -> None:
    """Add `--json PATH`, defaulting to bench/results/NAME.json."""
    parser.add_argument(
        "--json",
        type=Path,
        default=RESULTS_DIR / f"{name}.json",
        help=f"file the results are written to as JSON (default: bench/results/{name}.json)",
    )


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write results as indented JSON, creating the folder, and print the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"results written to {path}")


def print_table(
    title: str, columns: Sequence[tuple[str, str]], rows: Sequence[Mapping[str, Any]]
) -> None:
    """Print rows as a plain text table; `columns` pairs each key with its heading."""
    cells = [[_format_cell(row.get(key)) for key, _ in columns] for row in rows]
    headings = [heading for _, heading in columns]
    widths = [
        max(len(headings[i]), *(len(line[i]) for line in cells)) if cells else len(headings[i])
        for i in range(len(columns))
    ]
    print(f"\n{title}")
    print("  ".join(heading.rjust(width) for heading, width in zip(headings, widths, strict=True)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True)))
    sys.stdout.flush()


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
