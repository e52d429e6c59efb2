"""`rig-agent status`: read the buffer of a running (or stopped) agent and print its state."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from buffer.reading import format_ts, now_us
from buffer.store import BufferDatabaseError, BufferStats, read_stats

__all__ = ["format_duration_short", "format_stats", "run_status"]


def run_status(config_path: Path, *, watch: bool, as_json: bool) -> int:
    """Print the buffer state for the config's data_dir; refresh every second with `watch`."""
    from config.loader import ConfigError, load_config

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    sinks = config.enabled_sinks()
    try:
        while True:
            try:
                stats = read_stats(config.agent.data_dir, sinks)
            except (FileNotFoundError, BufferDatabaseError) as exc:
                print(str(exc), file=sys.stderr)
                return 1
            if as_json:
                print(json.dumps(asdict(stats), default=str))
            else:
                if watch:
                    print("\x1b[H\x1b[2J", end="")
                print(format_stats(config.agent.rig_id, stats))
            if not watch:
                return 0
            time.sleep(1.0)
    except KeyboardInterrupt:
        return 0


def format_stats(rig_id: str, stats: BufferStats, *, now: int | None = None) -> str:
    """Render buffer statistics as a plain-text screen.

    `now` is the time in microseconds since the epoch that backlog ages are
    measured against; the default is the current time.
    """
    lines = [
        f"rig {rig_id}: last seq {stats.last_seq}, {stats.rows} readings buffered, "
        f"{stats.dropped_rows} dropped, {stats.quarantined} quarantined, "
        f"{stats.db_bytes / 1024**2:.1f} MiB on disk",
        *_loss_lines(stats),
        "",
    ]
    # The dropped column appears once the size cap has cost any sink a reading.
    with_dropped = any(sink.dropped_buffer_full for sink in stats.sinks)
    header = f"{'sink':<12} {'cursor':>12} {'depth':>10}"
    lines.append(header + (f" {'dropped (buffer full)':>22}" if with_dropped else ""))
    if not stats.sinks:
        lines.append("(no sinks enabled: readings stay in the buffer)")
    for sink in stats.sinks:
        row = f"{sink.name:<12} {sink.cursor:>12} {sink.depth:>10}"
        lines.append(row + (f" {sink.dropped_buffer_full:>22}" if with_dropped else ""))
    lines += _backlog_lines(stats, now_us() if now is None else now)

    lines += ["", f"{'source':<16} {'channel':<24} {'value':>14} {'unit':<8} {'quality':<9} time"]
    for ch in stats.channels:
        value = "-" if ch.value is None else f"{ch.value:.6g}"
        lines.append(
            f"{ch.source:<16} {ch.channel:<24} {value:>14} {ch.unit:<8} "
            f"{ch.quality.value:<9} {format_ts(ch.ts_us)}"
        )
    lines += _quarantine_lines(stats)
    return "\n".join(lines)


def _loss_lines(stats: BufferStats) -> list[str]:
    """Render the readings lost to a full disk and the corrupt files set aside, when any."""
    lines = []
    if stats.dropped_disk_full:
        when = (
            f", the last at {format_ts(stats.last_disk_full_us)}"
            if stats.last_disk_full_us is not None
            else ""
        )
        lines.append(
            f"{stats.dropped_disk_full} readings dropped because the disk was full "
            f"or short of buffer.min_free_bytes{when}"
        )
    if stats.corrupt_databases_set_aside:
        count = stats.corrupt_databases_set_aside
        listed = len(stats.set_aside_paths)
        newest = f", the newest {listed} here" if listed < count else ""
        lines.append(
            f"{count} corrupt buffer database file{'s' if count != 1 else ''} moved aside "
            f"and replaced by a new database{newest}:"
        )
        lines += [f"  {path}" for path in stats.set_aside_paths]
    return lines


def _backlog_lines(stats: BufferStats, now: int) -> list[str]:
    """Render the backlog lane of each sink that drains one after an outage, if any does."""
    draining = [b for b in stats.backlogs if b.split is not None or b.depth > 0]
    if not draining:
        return []
    lines = [
        "",
        "backlog lanes (new readings go first, older ones drain behind them):",
        f"{'sink':<12} {'backlog':>10} {'oldest':>10} {'time left':>10} {'split seq':>12}",
    ]
    for backlog in draining:
        oldest = "-"
        if backlog.oldest_ts_us is not None:
            oldest = format_duration_short((now - backlog.oldest_ts_us) / 1e6)
        left = backlog.drain_seconds(now)
        estimate = "unknown" if left is None else format_duration_short(left)
        split = "-" if backlog.split is None else str(backlog.split)
        lines.append(
            f"{backlog.name:<12} {backlog.depth:>10} {oldest:>10} {estimate:>10} {split:>12}"
        )
    return lines


def format_duration_short(seconds: float) -> str:
    """Format a duration in its two largest units, such as "2h 05m", "6m 02s" or "45s"."""
    total = max(0, round(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _quarantine_lines(stats: BufferStats) -> list[str]:
    """Render the newest readings that a destination rejected and the buffer kept aside."""
    if not stats.quarantined:
        return []
    shown = len(stats.quarantine_newest)
    lines = [
        "",
        f"quarantined readings: {stats.quarantined} (newest {shown} below, newest first)",
        f"{'sink':<8} {'seq':>12} {'source':<16} {'channel':<24} {'value':>14} status reason",
    ]
    for q in stats.quarantine_newest:
        value = "-" if q.value is None else f"{q.value:.6g}"
        lines.append(
            f"{q.sink:<8} {q.seq:>12} {q.source:<16} {q.channel:<24} {value:>14} "
            f"{q.status:>6} {q.reason}"
        )
    return lines
