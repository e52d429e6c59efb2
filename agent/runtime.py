"""The agent runtime: buffer, drivers and sinks of a config, their health, reloads and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib.metadata
import itertools
import operator
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from agent.clock import ClockWatch
from agent.health import MetricsListenError, MetricsServer
from agent.metrics import (
    AgentSnapshot,
    BufferSnapshot,
    ClockSnapshot,
    SinkSnapshot,
    SourceSnapshot,
)
from agent.reload import ReloadPlan, plan_reload
from agent.sdnotify import Heartbeat, Liveness, Notifier, run_watchdog
from agent.supervisor import supervise
from buffer.reading import Quality, Reading
from buffer.store import Buffer, BufferStats
from buffer.writer import BufferWriter
from config.model import CloudSection, Config, ModbusSource, Wits0Source
from drivers.base import Driver
from drivers.modbus import ModbusDriver, poll_phases
from drivers.modbus_bus import BusRegistry, ModbusBus
from drivers.wits0 import Wits0Driver
from uplink.auth import KeyFileError, load_private_key, resolve_secret_path
from uplink.cloud import CloudSink
from uplink.mqtt import MqttSink
from uplink.witsml import WitsmlSink

__all__ = [
    "LIVENESS_MAX_AGE",
    "SHUTDOWN_BUDGET",
    "STATS_INTERVAL",
    "STATUS_INTERVAL",
    "Agent",
    "format_age",
]

log = structlog.get_logger(__name__)

SHUTDOWN_BUDGET = 8.0
"""Seconds the whole shutdown may take; systemd and the docs promise exit within 10 s."""
RESTART_BUDGET = 5.0
"""Seconds a reload waits for one stopped source or sink to finish."""
STATS_INTERVAL = 2.0
"""Seconds between two reads of the buffer statistics behind /metrics and STATUS=."""
STATUS_INTERVAL = 5.0
"""Seconds between two STATUS= notifications to systemd."""
LIVENESS_MAX_AGE = 5.0
"""Seconds without a heartbeat after which a part counts as stale, plus buffer.commit_interval.

A sink that makes progress beats at least once a second, and so does the
writer's check, so this leaves room for a slow SQLite call or a busy event loop.
"""
LIVENESS_TICK = 1.0
"""Seconds between two checks of the writer's progress."""

Sink = MqttSink | CloudSink | WitsmlSink
Source = ModbusSource | Wits0Source


class Agent:
    """One running agent: the buffer, its writer, the drivers and the sinks of a config.

    While it runs, the agent counts readings per source and channel, keeps a
    heartbeat per sink and for the writer, serves /metrics and /healthz when
    agent.metrics_listen is set, and sends systemd notifications through
    `notifier`. `request_reload` makes it read `config_path` again.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        notifier: Notifier | None = None,
        clock: ClockWatch | None = None,
    ) -> None:
        """Build the parts of the agent, and raise KeyFileError for an unusable cloud key file.

        The device key is read here, before the buffer opens, so that a bad key
        file stops the agent at start instead of failing the cloud sink later.
        `clock` replaces the ClockWatch that agent.clock_check selects.
        """
        self.config = config
        self.config_path = config_path
        self.notifier = notifier
        self.start_unix = time.time()
        self.version = _version()
        self._cloud_key = _load_cloud_key(config.cloud) if config.cloud is not None else None
        self.buffer = Buffer(
            config.agent.data_dir,
            config.enabled_sinks(),
            max_bytes=config.buffer.max_bytes,
            min_free_bytes=config.buffer.min_free_bytes,
        )
        self.writer = BufferWriter(self.buffer, config.buffer.commit_interval)
        self.liveness = Liveness()
        self.max_age = LIVENESS_MAX_AGE + config.buffer.commit_interval
        """Heartbeat age in seconds beyond which a part counts as stale."""
        self._writer_heartbeat = self.liveness.register("writer")
        self.clock = clock if clock is not None else _clock_watch(config)

        buses = BusRegistry()
        phases = poll_phases(config.sources.modbus)
        self.drivers: list[Driver] = [
            self._build_driver(s, buses, phases) for s in _sources(config)
        ]
        self.sinks: list[MqttSink] = []
        """The MQTT sink, when [mqtt] is set."""
        self.cloud_sink: CloudSink | None = None
        self.witsml_sink: WitsmlSink | None = None
        # The set of sinks stays fixed while the agent runs, and a sink restarted by a
        # reload takes over the heartbeat of the one it replaces.
        self._heartbeats: dict[str, Heartbeat] = {
            name: self.liveness.register(_sink_part(name)) for name in config.enabled_sinks()
        }
        for sink in self._build_sinks(config, self._cloud_key, config.enabled_sinks()):
            self._set_sink(sink)

        # Counters since the agent started, kept here so that they survive a
        # source restarted by a reload.
        self._readings: dict[str, Counter[str]] = {}
        self._last_reading: dict[str, float] = {}
        self._retired_errors: Counter[str] = Counter()
        self._retired_jumps = 0

        # Cached by the refresh task, so that a /metrics request does not query SQLite.
        self._stats: BufferStats | None = None
        self._oldest_ts_us: dict[str, int] = {}
        self._quarantined: dict[str, int] = {}
        self._last_connected: dict[str, float] = {}
        self._rate = 0.0
        self._rate_mark: tuple[float, int] | None = None

        self._buffer_open = False
        self._group: asyncio.TaskGroup | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running: set[str] = set()
        self._metrics: MetricsServer | None = None
        self._reload_requested = asyncio.Event()
        self.started = asyncio.Event()

    # --- parts ------------------------------------------------------------------------------

    def all_sinks(self) -> list[Sink]:
        """Return every enabled sink: the MQTT sink in `sinks`, the cloud sink, the witsml sink."""
        cloud = [self.cloud_sink] if self.cloud_sink is not None else []
        witsml = [self.witsml_sink] if self.witsml_sink is not None else []
        return [*self.sinks, *cloud, *witsml]

    def _build_driver(
        self,
        source: Source,
        buses: BusRegistry | dict[str, ModbusBus],
        phases: dict[str, float],
    ) -> Driver:
        if isinstance(source, Wits0Source):
            return Wits0Driver(source)
        if isinstance(buses, BusRegistry):
            bus = buses.bus_for(source.endpoint)
        else:
            bus = buses[source.endpoint.bus_key]
        return ModbusDriver(source, bus, phase=phases.get(source.name, 0.0))

    def _build_sinks(
        self, config: Config, key: EllipticCurvePrivateKey | None, names: Sequence[str]
    ) -> list[Sink]:
        """Build the named sinks of `config`, each beating the heartbeat of its name.

        Raises ValueError or OSError for a sink setting that only fails at
        construction, such as an unreadable CA file.
        """
        sinks: list[Sink] = []
        if "mqtt" in names and config.mqtt is not None:
            sinks.append(
                MqttSink(
                    config.mqtt,
                    rig_id=config.agent.rig_id,
                    topic_prefix=config.topic_prefix(),
                    buffer=self.buffer,
                    beat=self._heartbeats["mqtt"].beat,
                )
            )
        if "cloud" in names and config.cloud is not None and key is not None:
            sinks.append(
                CloudSink(
                    config.cloud,
                    rig_id=config.agent.rig_id,
                    buffer=self.buffer,
                    key=key,
                    max_delay=config.cloud.retry_max_delay,
                    beat=self._heartbeats["cloud"].beat,
                )
            )
        # [witsml] requires [cloud]: it posts to the same service with the same device key.
        if (
            "witsml" in names
            and config.witsml is not None
            and config.cloud is not None
            and key is not None
        ):
            sinks.append(
                WitsmlSink(
                    config.witsml,
                    config.cloud,
                    columns=config.witsml_columns(),
                    buffer=self.buffer,
                    key=key,
                    max_delay=config.cloud.retry_max_delay,
                    beat=self._heartbeats["witsml"].beat,
                )
            )
        return sinks

    def _set_sink(self, sink: Sink) -> None:
        """Make `sink` the agent's sink of its name."""
        if isinstance(sink, MqttSink):
            self.sinks = [sink]
        elif isinstance(sink, CloudSink):
            self.cloud_sink = sink
        else:
            self.witsml_sink = sink

    # --- readings ---------------------------------------------------------------------------

    async def _emit(self, readings: Sequence[Reading]) -> None:
        """Count one batch of a driver and hand it to the writer.

        While the clock is known to be unsynchronized, good readings become uncertain.
        """
        if self.clock is not None and readings:
            check = self.clock.check()
            if check.synchronized is False:
                readings = _uncertain(readings)
        await self.writer.put(readings)
        now = time.time()
        # Every reading of a driver's batch comes from one source, so this loops once.
        # groupby, attrgetter and Counter.update count the readings in C.
        for source, group in itertools.groupby(readings, key=_SOURCE):
            counts = self._readings.get(source)
            if counts is None:
                counts = self._readings[source] = Counter()
            counts.update(map(_CHANNEL, group))
            self._last_reading[source] = now

    # --- running ----------------------------------------------------------------------------

    def request_reload(self) -> None:
        """Ask the running agent to read its config file again; safe from a signal handler."""
        self._reload_requested.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down: drivers, then the writer, then sinks.

        Raises MetricsListenError, before any source starts, when the metrics
        server cannot listen on agent.metrics_listen.
        """
        async with self.buffer:
            self._buffer_open = True
            try:
                await self._run_parts(stop)
            finally:
                self._buffer_open = False
                await self._stop_metrics()
        log.info("agent_stopped", last_seq=self.buffer.last_seq)

    async def _run_parts(self, stop: asyncio.Event) -> None:
        # Opening a large buffer can take long, and the writer has had no chance to beat.
        self._writer_heartbeat.beat()
        if self.config.agent.metrics_listen:
            await self._start_metrics(self.config.agent.metrics_listen)
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._start_task("buffer-writer", supervise("task", "buffer-writer", self.writer.run))
            for sink in self.all_sinks():
                self._start_sink(sink)
            for driver in self.drivers:
                self._start_source(driver)
            self._start_task("liveness", supervise("task", "liveness", self._watch_liveness))
            self._start_task("stats", supervise("task", "stats", self._refresh_loop))
            if self._metrics is not None:
                self._start_metrics_task(self._metrics)
            log.info(
                "agent_started",
                rig_id=self.config.agent.rig_id,
                data_dir=str(self.config.agent.data_dir),
                last_seq=self.buffer.last_seq,
                sources=[d.name for d in self.drivers],
                sinks=[s.name for s in self.all_sinks()],
                metrics_listen=self.config.agent.metrics_listen or None,
                watchdog_s=None if self.notifier is None else self.notifier.watchdog_interval,
            )
            self.started.set()
            if self.notifier is not None:
                self.notifier.ready(self.status_text())
                watchdog = functools.partial(
                    run_watchdog,
                    self.notifier,
                    self.liveness,
                    self.max_age,
                    self.status_text,
                    STATUS_INTERVAL,
                )
                self._start_task("watchdog", supervise("task", "watchdog", watchdog))
            await self._serve(stop)
            await self._shutdown()
        self._group = None

    def _start_task(self, name: str, work: Coroutine[Any, Any, None]) -> None:
        if self._group is None:
            work.close()
            msg = f"cannot start {name}: the agent's parts start only inside run()"
            raise RuntimeError(msg)
        self._tasks[name] = self._group.create_task(work, name=name)

    def _start_sink(self, sink: Sink) -> None:
        part = _sink_part(sink.name)
        self._heartbeats[sink.name].beat()
        body = functools.partial(self._tracked, part, sink.run)
        self._start_task(part, supervise("sink", sink.name, body))

    def _start_source(self, driver: Driver) -> None:
        body = functools.partial(driver.run, self._emit)
        self._start_task(f"source:{driver.name}", supervise("source", driver.name, body))

    async def _tracked(self, part: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body`, noting that it runs; between restarts, `_watch_liveness` beats for it."""
        self._running.add(part)
        try:
            await body()
        finally:
            self._running.discard(part)

    async def _serve(self, stop: asyncio.Event) -> None:
        """Wait for `stop`, applying each requested reload in between."""
        while not stop.is_set():
            if self._reload_requested.is_set():
                self._reload_requested.clear()
                try:
                    await self.reload()
                except Exception as exc:
                    # A failure here would end the task group and skip the flush on
                    # shutdown, so the agent logs it and runs on with what it has.
                    log.exception("config_reload_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            waits = [
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self._reload_requested.wait()),
            ]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()
                await asyncio.gather(*waits, return_exceptions=True)

    async def _shutdown(self) -> None:
        log.info("agent_stopping")
        if self.notifier is not None:
            self.notifier.stopping()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_BUDGET

        await _cancel_all(self._take_task("watchdog"), 1.0)
        await _cancel_all(self._take_tasks("source:"), deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.5, deadline - loop.time() - 2.0)):
                await self.writer.flush()
        except TimeoutError:
            log.error("buffer_flush_timed_out", pending=self.writer.pending)
        await _cancel_all(self._take_task("buffer-writer"), 1.0)
        await _cancel_all(self._take_tasks("sink:"), max(0.5, deadline - loop.time()))
        await _cancel_all(self._take_tasks(""), 1.0)

    def _take_tasks(self, prefix: str) -> list[asyncio.Task[None]]:
        """Remove and return the tasks whose name starts with `prefix` ("" for all)."""
        names = [name for name in self._tasks if name.startswith(prefix)]
        return [self._tasks.pop(name) for name in names]

    def _take_task(self, name: str) -> list[asyncio.Task[None]]:
        """Remove and return the task called `name`, as a list of none or one."""
        task = self._tasks.pop(name, None)
        return [] if task is None else [task]

    # --- liveness ---------------------------------------------------------------------------

    async def _watch_liveness(self) -> None:
        """Beat for the writer while it keeps up, and for sinks waiting to be restarted.

        The writer counts as making progress while nothing is pending or while
        readings leave its queue, stored or dropped for lack of space. A sink
        between two runs is in the supervisor's backoff, which is bounded.
        """
        writer = self.writer
        last_progress = -1
        while True:
            progress = writer.committed + writer.dropped
            if writer.pending == 0 or progress != last_progress:
                self._writer_heartbeat.beat()
            last_progress = progress
            for name, heartbeat in self._heartbeats.items():
                if _sink_part(name) not in self._running:
                    heartbeat.beat()
            await asyncio.sleep(LIVENESS_TICK)

    # --- metrics and status -----------------------------------------------------------------

    async def _refresh_loop(self) -> None:
        while True:
            await self.refresh_stats()
            await asyncio.sleep(STATS_INTERVAL)

    async def refresh_stats(self) -> None:
        """Read the buffer statistics that /metrics and STATUS= show, on the SQLite thread."""
        stats = await self.buffer.stats()
        oldest: dict[str, int] = {}
        quarantined: dict[str, int] = {}
        for sink in stats.sinks:
            if sink.depth > 0:
                first = await self.buffer.read_batch(sink.name, 1)
                if first:
                    oldest[sink.name] = first[0].ts_us
            quarantined[sink.name] = await self.buffer.quarantined_count(sink.name)
        self._stats = stats
        self._oldest_ts_us = oldest
        self._quarantined = quarantined

        now = time.monotonic()
        total = sum(sum(counts.values()) for counts in self._readings.values())
        if self._rate_mark is not None and now > self._rate_mark[0]:
            self._rate = (total - self._rate_mark[1]) / (now - self._rate_mark[0])
        self._rate_mark = (now, total)
        for running in self.all_sinks():
            if running.connected or running.name not in self._last_connected:
                self._last_connected[running.name] = now
        if self.clock is not None:
            # Checked here too, so that a jump is seen while no source produces readings.
            self.clock.check()

    def snapshot(self) -> AgentSnapshot:
        """Return the agent's state for /metrics and /healthz, from cached values only."""
        now = time.time()
        stats = self._stats
        buffer = BufferSnapshot(open=self._buffer_open, last_seq=self.buffer.last_seq)
        if stats is not None:
            last_disk_full = stats.last_disk_full_us
            buffer = dataclasses.replace(
                buffer,
                size_bytes=stats.db_bytes,
                disk_full_dropped=stats.dropped_disk_full,
                last_disk_full_unix=None if last_disk_full is None else last_disk_full / 1e6,
                corrupt_databases=stats.corrupt_databases_set_aside,
            )
        return AgentSnapshot(
            rig_id=self.config.agent.rig_id,
            version=self.version,
            start_unix=self.start_unix,
            buffer=buffer,
            sources=tuple(self._source_snapshot(driver) for driver in self.drivers),
            sinks=tuple(self._sink_snapshot(sink, stats, now) for sink in self.all_sinks()),
            clock=self._clock_snapshot(),
            stale=tuple(self.liveness.stale(self.max_age)),
        )

    def _source_snapshot(self, driver: Driver) -> SourceSnapshot:
        return SourceSnapshot(
            name=driver.name,
            protocol="wits0" if isinstance(driver, Wits0Driver) else "modbus",
            readings=dict(self._readings.get(driver.name, {})),
            errors=self._retired_errors[driver.name] + _driver_errors(driver),
            connected=_driver_connected(driver),
            last_reading_unix=self._last_reading.get(driver.name),
        )

    def _sink_snapshot(self, sink: Sink, stats: BufferStats | None, now: float) -> SinkSnapshot:
        by_name = {s.name: s for s in stats.sinks} if stats is not None else {}
        sink_stats = by_name.get(sink.name)
        oldest = self._oldest_ts_us.get(sink.name)
        backlogs = {b.name: b for b in stats.backlogs} if stats is not None else {}
        backlog = backlogs.get(sink.name)
        backfill_oldest = None if backlog is None else backlog.oldest_ts_us
        return SinkSnapshot(
            name=sink.name,
            connected=sink.connected,
            last_success_unix=sink.last_success,
            depth=0 if sink_stats is None else sink_stats.depth,
            oldest_unacknowledged_age_seconds=None if oldest is None else now - oldest / 1e6,
            dropped=0 if sink_stats is None else sink_stats.dropped_buffer_full,
            quarantined=self._quarantined.get(sink.name, 0),
            backfill=0 if backlog is None else backlog.depth,
            backfill_oldest_age_seconds=(
                None if backfill_oldest is None else now - backfill_oldest / 1e6
            ),
            backfill_drain_seconds=(
                None if backlog is None else backlog.drain_seconds(round(now * 1e6))
            ),
        )

    def _clock_snapshot(self) -> ClockSnapshot:
        if self.clock is None:
            return ClockSnapshot(synchronized=None, jumps=self._retired_jumps)
        return ClockSnapshot(
            synchronized=self.clock.synchronized, jumps=self._retired_jumps + self.clock.jumps
        )

    def status_text(self) -> str:
        """Return the one-line summary for STATUS=, such as "2 sources, 40 readings/s; mqtt..."."""
        up = sum(1 for driver in self.drivers if _driver_connected(driver))
        count = len(self.drivers)
        noun = "source" if count == 1 else "sources"
        sources = f"{count} {noun}" if up == count else f"{up} of {count} {noun} up"
        parts = [f"{sources}, {self._rate:.0f} readings/s"]
        stats = self._stats
        depths = {s.name: s.depth for s in stats.sinks} if stats is not None else {}
        now = time.monotonic()
        sink_texts = []
        for sink in self.all_sinks():
            text = f"{sink.name} depth {depths.get(sink.name, 0)}"
            if not sink.connected:
                since = self._last_connected.get(sink.name, now)
                text += f" (offline {format_age(now - since)})"
            sink_texts.append(text)
        if sink_texts:
            parts.append(", ".join(sink_texts))
        # With the watchdog on, run_watchdog puts the stale parts in front of this text.
        watchdog = self.notifier is not None and self.notifier.watchdog_interval is not None
        stale = self.liveness.stale(self.max_age)
        if stale and not watchdog:
            parts.append(f"stale: {', '.join(stale)}")
        return "; ".join(parts)

    async def _start_metrics(self, listen: str) -> None:
        """Bind the metrics server; raise MetricsListenError when the address is unusable."""
        server = MetricsServer(self.snapshot)
        await server.start(listen)
        self._metrics = server

    def _start_metrics_task(self, server: MetricsServer) -> None:
        serve = supervise("task", "metrics-server", server.serve_forever)
        self._start_task("metrics-server", serve)

    async def _stop_metrics(self) -> None:
        task = self._tasks.pop("metrics-server", None)
        if task is not None:
            await _cancel_all([task], 1.0)
        server, self._metrics = self._metrics, None
        if server is not None:
            await server.aclose()

    # --- reload -----------------------------------------------------------------------------

    async def reload(self) -> None:
        """Read `config_path` again and apply what changed, keeping the old config if invalid.

        Sends RELOADING=1 before and READY=1 after, whatever the outcome.
        """
        if self.notifier is not None:
            self.notifier.reloading()
        try:
            await self._reload_from_file()
        finally:
            if self.notifier is not None:
                self.notifier.ready(self.status_text())

    async def _reload_from_file(self) -> None:
        from config.loader import ConfigError, load_config

        path = self.config_path
        if path is None:
            log.warning("config_reload_ignored", reason="the agent was started without a file")
            return
        log.info("config_reload_started", path=str(path))
        try:
            new = await asyncio.to_thread(load_config, path)
        except ConfigError as exc:
            errors = [str(issue) for issue in exc.issues]
            log.error("config_reload_rejected", path=str(path), errors=errors)
            return
        await self.apply_config(new)

    async def apply_config(self, new: Config) -> ReloadPlan | None:
        """Move the running agent to the validated config `new`; return the applied plan.

        Only changed sources and sinks restart; the writer and the buffer keep
        running. Returns None, with the old config kept, when a new sink
        cannot be built (such as an unreadable key or CA file).
        """
        plan, effective = plan_reload(self.config, new)
        path = str(self.config_path) if self.config_path is not None else None
        try:
            prepared = self._prepare(plan, effective)
        except (KeyFileError, ValueError, OSError) as exc:
            log.error("config_reload_rejected", path=path, errors=[str(exc)])
            return None
        if plan.restart_required:
            log.warning(
                "config_reload_needs_restart",
                path=path,
                keys=list(plan.restart_required),
                hint="restart the agent to apply these; it runs on with their old values",
            )

        effective = await self._apply(plan, effective, *prepared)
        self.config = effective
        if plan.empty:
            log.info("config_reloaded", path=path, changed="nothing")
        else:
            log.info("config_reloaded", path=path, **plan.changes())
        return plan

    def _prepare(
        self, plan: ReloadPlan, effective: Config
    ) -> tuple[list[Driver], list[Sink], EllipticCurvePrivateKey | None]:
        """Build the new drivers and sinks of a plan, before anything running is touched."""
        key = self._cloud_key
        uploads = {"cloud", "witsml"} & set(plan.restart_sinks)
        if uploads and effective.cloud is not None:
            # Read again even from the same path, so that a replaced key file takes effect.
            key = _load_cloud_key(effective.cloud)
        sinks = self._build_sinks(effective, key, plan.restart_sinks)

        kept = [d for d in self.drivers if d.name not in plan.stop_sources]
        buses: dict[str, ModbusBus] = {
            d.bus.key: d.bus for d in kept if isinstance(d, ModbusDriver)
        }
        registry = BusRegistry()
        for source in plan.start_sources:
            if isinstance(source, ModbusSource) and source.endpoint.bus_key not in buses:
                buses[source.endpoint.bus_key] = registry.bus_for(source.endpoint)
        phases = poll_phases(effective.sources.modbus)
        drivers = [self._build_driver(source, buses, phases) for source in plan.start_sources]
        return drivers, sinks, key

    async def _apply(
        self,
        plan: ReloadPlan,
        effective: Config,
        drivers: list[Driver],
        sinks: list[Sink],
        key: EllipticCurvePrivateKey | None,
    ) -> Config:
        """Stop and start the parts of a prepared plan; return the config now running."""
        for name in plan.stop_sources:
            await self._stop_source(name)
        for sink in sinks:
            await _cancel_all(self._take_task(_sink_part(sink.name)), RESTART_BUDGET)
            self._set_sink(sink)
            self._start_sink(sink)
        self._cloud_key = key
        for driver in drivers:
            self.drivers.append(driver)
            self._start_source(driver)

        if plan.log_level is not None:
            from agent.logs import configure_logging

            configure_logging(plan.log_level, self.config.agent.log_format)
        if plan.clock_changed:
            if self.clock is not None:
                self._retired_jumps += self.clock.jumps
            self.clock = _clock_watch(effective)
        if plan.metrics_listen is not None:
            listen = await self._restart_metrics(plan.metrics_listen)
            if listen != effective.agent.metrics_listen:
                agent = effective.agent.model_copy(update={"metrics_listen": listen})
                effective = effective.model_copy(update={"agent": agent})
        return effective

    async def _stop_source(self, name: str) -> None:
        await _cancel_all(self._take_task(f"source:{name}"), RESTART_BUDGET)
        for driver in [d for d in self.drivers if d.name == name]:
            self._retired_errors[name] += _driver_errors(driver)
            self.drivers.remove(driver)

    async def _restart_metrics(self, listen: str) -> str:
        """Serve metrics on `listen` ("" for off); return the address now served."""
        old = self.config.agent.metrics_listen
        await self._stop_metrics()
        if not listen:
            return ""
        # When the new address fails, serve on the old one again rather than not at all.
        for address in (listen, old):
            if not address:
                continue
            try:
                await self._start_metrics(address)
            except MetricsListenError as exc:
                log.error("metrics_server_failed", listen=address, error=str(exc))
                continue
            if self._metrics is not None:
                self._start_metrics_task(self._metrics)
            return address
        return ""


# --- helpers ------------------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("rig-agent")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sources(config: Config) -> list[Source]:
    return [*config.sources.modbus, *config.sources.wits0]


def _sink_part(name: str) -> str:
    """Return the liveness and task name of a sink, such as "sink:mqtt"."""
    return f"sink:{name}"


def _clock_watch(config: Config) -> ClockWatch | None:
    if config.agent.clock_check == "off":
        return None
    return ClockWatch(config.agent.clock_jump_threshold)


_SOURCE = operator.attrgetter("source")
_CHANNEL = operator.attrgetter("channel")


def _uncertain(readings: Sequence[Reading]) -> list[Reading]:
    """Return the readings with good ones marked uncertain."""
    good, uncertain, new = Quality.GOOD, Quality.UNCERTAIN, tuple.__new__
    # The agent does this for every reading while the clock is unsynchronized.
    # tuple.__new__ with all six fields builds the same Reading as its constructor
    # in about half the time, and a quarter of the time of Reading._replace.
    return [
        new(Reading, (ts_us, source, channel, value, unit, uncertain if q is good else q))
        for ts_us, source, channel, value, unit, q in readings
    ]


def _driver_errors(driver: Driver) -> int:
    if isinstance(driver, ModbusDriver | Wits0Driver):
        return driver.counters.failures
    return 0


def _driver_connected(driver: Driver) -> bool | None:
    if isinstance(driver, ModbusDriver):
        return driver.counters.responding
    if isinstance(driver, Wits0Driver):
        return driver.connected.is_set()
    return None


def format_age(seconds: float) -> str:
    """Format a duration for STATUS= in its largest whole unit: "45s", "5m", "3h" or "2d"."""
    seconds = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{int(seconds)}s"


def _load_cloud_key(cfg: CloudSection) -> EllipticCurvePrivateKey:
    path = resolve_secret_path(cfg.private_key_file)
    key = load_private_key(path)
    log.info("cloud_key_loaded", path=str(path), device_id=cfg.device_id)
    return key


async def _cancel_all(tasks: Sequence[asyncio.Task[None]], budget: float) -> None:
    for task in tasks:
        task.cancel()
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=max(budget, 0.1))
    for task in pending:
        log.error("task_did_not_stop", task=task.get_name())
    for task in tasks:
        if task.done() and not task.cancelled():
            with contextlib.suppress(BaseException):
                task.result()
