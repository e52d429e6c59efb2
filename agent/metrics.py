"""Snapshots of the running agent and their Prometheus text rendering.

The runtime fills an `AgentSnapshot` each time `/metrics` or `/healthz` is
requested. `render_metrics` turns it into the Prometheus text exposition
format (version 0.0.4) through prometheus_client. The HTTP server and the
health rules are in `agent.health`. docs/metrics.md lists every metric.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = [
    "METRICS_CONTENT_TYPE",
    "AgentSnapshot",
    "BufferSnapshot",
    "ClockSnapshot",
    "SinkSnapshot",
    "SourceSnapshot",
    "render_metrics",
]

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""Content-Type of the Prometheus text format that `render_metrics` produces."""

PREFIX = "rig_agent_"


@dataclass(frozen=True)
class SourceSnapshot:
    """State of one configured source (a Modbus device or a WITS0 stream)."""

    name: str
    """Source name from the config, used as the `source` label."""
    protocol: Literal["modbus", "wits0"]
    readings: Mapping[str, int] = field(default_factory=dict)
    """Readings produced since the agent started, per channel. Each value only grows."""
    errors: int = 0
    """Failed polls or reads since the agent started (timeouts, exceptions, bad frames)."""
    connected: bool | None = None
    """Whether the device link is up, or None when the driver cannot tell."""
    last_reading_unix: float | None = None
    """Unix time of the newest reading from this source, or None before the first one."""


@dataclass(frozen=True)
class SinkSnapshot:
    """State of one enabled sink (MQTT, cloud, WITSML)."""

    name: str
    """Sink name as stored with its cursor, used as the `sink` label."""
    connected: bool
    last_success_unix: float | None = None
    """Unix time of the last delivery the destination acknowledged, or None before the first."""
    depth: int = 0
    """Buffered readings after this sink's cursor, still to be delivered."""
    oldest_unacknowledged_age_seconds: float | None = None
    """Age of the oldest reading after the cursor, or None when nothing is waiting."""
    dropped: int = 0
    """Counter of readings this sink never got because the buffer reached max_bytes."""
    quarantined: int = 0
    """Counter of readings the destination rejected and the buffer set aside."""
    backfill: int = 0
    """Readings the backlog lane has still to send after an outage; 0 when not draining."""
    backfill_oldest_age_seconds: float | None = None
    """Age of the oldest of those readings, or None when there is none."""
    backfill_drain_seconds: float | None = None
    """Estimated seconds until the backlog lane is done; None while the rate is unknown."""


@dataclass(frozen=True)
class BufferSnapshot:
    """State of the SQLite buffer."""

    open: bool
    """Whether the buffer database is open and accepting readings."""
    size_bytes: int = 0
    """Size of the database files on disk (main file and write-ahead log)."""
    last_seq: int = 0
    """Highest seq assigned so far."""
    disk_full_dropped: int = 0
    """Counter of readings dropped because the disk was full."""
    last_disk_full_unix: float | None = None
    """Unix time of the newest drop counted in `disk_full_dropped`, or None if there was none."""
    corrupt_databases: int = 0
    """Counter of corrupt database files renamed and set aside."""


@dataclass(frozen=True)
class ClockSnapshot:
    """State of the system clock, as far as the agent can detect it."""

    synchronized: bool | None = None
    """Whether the clock is synchronized (NTP, PTP, GPS), or None when unknown."""
    jumps: int = 0
    """Counter of wall-clock jumps detected since the agent started."""


@dataclass(frozen=True)
class AgentSnapshot:
    """One consistent view of the running agent, taken by the runtime on request."""

    rig_id: str
    """Shown by /healthz only: Prometheus adds its own target labels to every series."""
    version: str
    start_unix: float
    """Unix time at which the agent process started."""
    buffer: BufferSnapshot
    sources: tuple[SourceSnapshot, ...] = ()
    sinks: tuple[SinkSnapshot, ...] = ()
    clock: ClockSnapshot = field(default_factory=ClockSnapshot)
    stale: tuple[str, ...] = ()
    """Names of the parts that the watchdog finds making no progress, such as "sink:mqtt"."""


def render_metrics(snapshot: AgentSnapshot) -> bytes:
    """Render `snapshot` in the Prometheus text format, version 0.0.4, as UTF-8 bytes."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector(Collector):
    """A collector that yields the metric families of one fixed snapshot."""

    def __init__(self, snapshot: AgentSnapshot) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        yield from _agent_metrics(self._snapshot)
        yield from _source_metrics(self._snapshot.sources)
        yield from _sink_metrics(self._snapshot.sinks)
        yield from _buffer_metrics(self._snapshot.buffer)
        yield from _clock_metrics(self._snapshot.clock)


def _agent_metrics(snapshot: AgentSnapshot) -> Iterator[Metric]:
    yield InfoMetricFamily(
        PREFIX + "build", "Version of the running rig-agent.", value={"version": snapshot.version}
    )
    yield GaugeMetricFamily(
        PREFIX + "start_time_seconds",
        "Unix time at which the agent started.",
        value=snapshot.start_unix,
    )
    yield GaugeMetricFamily(
        PREFIX + "stale_parts",
        "Parts (writer, sources, sinks) that the watchdog sees as making no progress.",
        value=len(snapshot.stale),
    )


def _source_metrics(sources: tuple[SourceSnapshot, ...]) -> Iterator[Metric]:
    info = GaugeMetricFamily(
        PREFIX + "source_info",
        "Configured source and its protocol; always 1.",
        labels=["source", "protocol"],
    )
    readings = CounterMetricFamily(
        PREFIX + "source_readings",
        "Readings produced by a source since the agent started, per channel.",
        labels=["source", "channel"],
    )
    errors = CounterMetricFamily(
        PREFIX + "source_errors",
        "Failed polls or reads of a source since the agent started.",
        labels=["source"],
    )
    connected = GaugeMetricFamily(
        PREFIX + "source_connected",
        "1 when the source's link is up, 0 when down; absent when the driver cannot tell.",
        labels=["source"],
    )
    last_reading = GaugeMetricFamily(
        PREFIX + "source_last_reading_timestamp_seconds",
        "Unix time of the newest reading from a source; absent before the first one.",
        labels=["source"],
    )
    for source in sources:
        info.add_metric([source.name, source.protocol], 1)
        for channel, count in sorted(source.readings.items()):
            readings.add_metric([source.name, channel], count)
        errors.add_metric([source.name], source.errors)
        if source.connected is not None:
            connected.add_metric([source.name], int(source.connected))
        if source.last_reading_unix is not None:
            last_reading.add_metric([source.name], source.last_reading_unix)
    yield from (info, readings, errors, connected, last_reading)


def _sink_metrics(sinks: tuple[SinkSnapshot, ...]) -> Iterator[Metric]:
    connected = GaugeMetricFamily(
        PREFIX + "sink_connected",
        "1 when the sink's destination is reachable, 0 when not.",
        labels=["sink"],
    )
    last_success = GaugeMetricFamily(
        PREFIX + "sink_last_success_timestamp_seconds",
        "Unix time of the last delivery the destination acknowledged; absent before the first.",
        labels=["sink"],
    )
    depth = GaugeMetricFamily(
        PREFIX + "sink_backlog_readings",
        "Buffered readings after the sink's cursor, still to be delivered.",
        labels=["sink"],
    )
    oldest_age = GaugeMetricFamily(
        PREFIX + "sink_oldest_unacknowledged_age_seconds",
        "Age of the oldest reading the destination has not acknowledged; 0 when none waits.",
        labels=["sink"],
    )
    dropped = CounterMetricFamily(
        PREFIX + "sink_dropped_readings",
        "Readings dropped before this sink delivered them, because the buffer was full.",
        labels=["sink"],
    )
    quarantined = CounterMetricFamily(
        PREFIX + "sink_quarantined_readings",
        "Readings the destination rejected and the buffer set aside.",
        labels=["sink"],
    )
    for sink in sinks:
        connected.add_metric([sink.name], int(sink.connected))
        if sink.last_success_unix is not None:
            last_success.add_metric([sink.name], sink.last_success_unix)
        depth.add_metric([sink.name], sink.depth)
        age = sink.oldest_unacknowledged_age_seconds
        oldest_age.add_metric([sink.name], 0.0 if age is None else age)
        dropped.add_metric([sink.name], sink.dropped)
        quarantined.add_metric([sink.name], sink.quarantined)
    yield from (connected, last_success, depth, oldest_age, dropped, quarantined)
    yield from _backfill_metrics(sinks)


def _backfill_metrics(sinks: tuple[SinkSnapshot, ...]) -> Iterator[Metric]:
    backfill = GaugeMetricFamily(
        PREFIX + "sink_backfill_readings",
        "Readings the backlog lane has still to send after an outage; 0 when not draining.",
        labels=["sink"],
    )
    oldest_age = GaugeMetricFamily(
        PREFIX + "sink_backfill_oldest_age_seconds",
        "Age of the oldest reading the backlog lane has still to send; 0 when none.",
        labels=["sink"],
    )
    drain = GaugeMetricFamily(
        PREFIX + "sink_backfill_drain_estimate_seconds",
        "Estimated seconds until the backlog lane is done; absent while the rate is unknown.",
        labels=["sink"],
    )
    for sink in sinks:
        backfill.add_metric([sink.name], sink.backfill)
        age = sink.backfill_oldest_age_seconds
        oldest_age.add_metric([sink.name], 0.0 if age is None else age)
        if sink.backfill_drain_seconds is not None:
            drain.add_metric([sink.name], sink.backfill_drain_seconds)
    yield from (backfill, oldest_age, drain)


def _buffer_metrics(buffer: BufferSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        PREFIX + "buffer_open",
        "1 when the buffer database is open, 0 when not.",
        value=int(buffer.open),
    )
    yield GaugeMetricFamily(
        PREFIX + "buffer_size_bytes",
        "Size of the buffer database files on disk.",
        value=buffer.size_bytes,
    )
    yield GaugeMetricFamily(
        PREFIX + "buffer_last_seq", "Highest seq the buffer has assigned.", value=buffer.last_seq
    )
    yield CounterMetricFamily(
        PREFIX + "buffer_disk_full_dropped_readings",
        "Readings dropped because the disk was full.",
        value=buffer.disk_full_dropped,
    )
    yield CounterMetricFamily(
        PREFIX + "buffer_corrupt_databases",
        "Corrupt buffer databases renamed and set aside.",
        value=buffer.corrupt_databases,
    )


def _clock_metrics(clock: ClockSnapshot) -> Iterator[Metric]:
    synchronized = GaugeMetricFamily(
        PREFIX + "clock_synchronized",
        "1 when the system clock is synchronized, 0 when not; absent when unknown.",
    )
    if clock.synchronized is not None:
        synchronized.add_metric([], int(clock.synchronized))
    yield synchronized
    yield CounterMetricFamily(
        PREFIX + "clock_jumps",
        "Wall-clock jumps detected since the agent started.",
        value=clock.jumps,
    )
