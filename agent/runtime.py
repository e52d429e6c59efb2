"""The agent runtime: opens the buffer, starts drivers and sinks, and shuts them down in order."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Sequence

import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from agent.supervisor import supervise
from buffer.reading import Reading
from buffer.store import Buffer
from buffer.writer import BufferWriter
from config.model import CloudSection, Config
from drivers.base import Driver
from drivers.modbus import ModbusDriver
from drivers.modbus_bus import BusRegistry
from drivers.wits0 import Wits0Driver
from uplink.auth import load_private_key, resolve_secret_path
from uplink.cloud import CloudSink
from uplink.mqtt import MqttSink
from uplink.witsml import WitsmlSink

__all__ = ["SHUTDOWN_BUDGET", "Agent"]

log = structlog.get_logger(__name__)

SHUTDOWN_BUDGET = 8.0
"""Seconds the whole shutdown may take; systemd and the docs promise exit within 10 s."""


class Agent:
    """One running agent: the buffer, its writer, the drivers and the sinks of a config."""

    def __init__(self, config: Config) -> None:
        """Build the parts of the agent, and raise KeyFileError for an unusable cloud key file.

        The device key is read here, before the buffer opens, so that a bad key
        file stops the agent at start instead of failing the cloud sink later.
        """
        self.config = config
        cloud_key = _load_cloud_key(config.cloud) if config.cloud is not None else None
        self.buffer = Buffer(config.agent.data_dir, config.enabled_sinks())
        self.writer = BufferWriter(self.buffer, config.buffer.commit_interval)
        buses = BusRegistry()
        self.drivers: list[Driver] = [
            ModbusDriver(s, buses.bus_for(s.endpoint)) for s in config.sources.modbus
        ]
        self.drivers.extend(Wits0Driver(s) for s in config.sources.wits0)
        self.sinks: list[MqttSink] = []
        if config.mqtt is not None:
            self.sinks.append(
                MqttSink(
                    config.mqtt,
                    rig_id=config.agent.rig_id,
                    topic_prefix=config.topic_prefix(),
                    buffer=self.buffer,
                )
            )
        self.cloud_sink: CloudSink | None = None
        if config.cloud is not None and cloud_key is not None:
            self.cloud_sink = CloudSink(
                config.cloud,
                rig_id=config.agent.rig_id,
                buffer=self.buffer,
                key=cloud_key,
                max_delay=config.cloud.retry_max_delay,
            )
        # [witsml] requires [cloud]: it posts to the same service with the same device key.
        self.witsml_sink: WitsmlSink | None = None
        if config.witsml is not None and config.cloud is not None and cloud_key is not None:
            self.witsml_sink = WitsmlSink(
                config.witsml,
                config.cloud,
                columns=config.witsml_columns(),
                buffer=self.buffer,
                key=cloud_key,
                max_delay=config.cloud.retry_max_delay,
            )
        self.started = asyncio.Event()

    def all_sinks(self) -> list[MqttSink | CloudSink | WitsmlSink]:
        """Return every enabled sink: the MQTT sink in `sinks`, the cloud sink, the witsml sink."""
        cloud = [self.cloud_sink] if self.cloud_sink is not None else []
        witsml = [self.witsml_sink] if self.witsml_sink is not None else []
        return [*self.sinks, *cloud, *witsml]

    async def _emit(self, readings: Sequence[Reading]) -> None:
        await self.writer.put(readings)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down: drivers, then the writer, then sinks."""
        async with self.buffer:
            log.info(
                "agent_started",
                rig_id=self.config.agent.rig_id,
                data_dir=str(self.config.agent.data_dir),
                last_seq=self.buffer.last_seq,
                sources=[d.name for d in self.drivers],
                sinks=[s.name for s in self.all_sinks()],
            )
            async with asyncio.TaskGroup() as group:
                writer_task = group.create_task(
                    supervise("task", "buffer-writer", self.writer.run), name="buffer-writer"
                )
                sink_tasks = [
                    group.create_task(supervise("sink", s.name, s.run), name=f"sink:{s.name}")
                    for s in self.all_sinks()
                ]
                driver_tasks = [
                    group.create_task(
                        supervise("source", d.name, functools.partial(d.run, self._emit)),
                        name=f"source:{d.name}",
                    )
                    for d in self.drivers
                ]
                self.started.set()
                await stop.wait()
                await self._shutdown(driver_tasks, writer_task, sink_tasks)
        log.info("agent_stopped", last_seq=self.buffer.last_seq)

    async def _shutdown(
        self,
        driver_tasks: list[asyncio.Task[None]],
        writer_task: asyncio.Task[None],
        sink_tasks: list[asyncio.Task[None]],
    ) -> None:
        log.info("agent_stopping")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_BUDGET

        await _cancel_all(driver_tasks, deadline - loop.time())
        try:
            async with asyncio.timeout(max(0.5, deadline - loop.time() - 2.0)):
                await self.writer.flush()
        except TimeoutError:
            log.error("buffer_flush_timed_out", pending=self.writer.pending)
        await _cancel_all([writer_task], 1.0)
        await _cancel_all(sink_tasks, max(0.5, deadline - loop.time()))


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
