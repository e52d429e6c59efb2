"""Live lane and backlog lane after outages, against a real mosquitto and the cloud service.

The MQTT outage test runs the sink in this process over a real buffer, fed at
1,000 readings/s, so that it can time the reconnect. The kill test runs the
agent as a child process and kills it with SIGKILL during the drain.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import httpx
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs
from structlog.typing import EventDict

from buffer.reading import Reading, now_us
from buffer.store import Buffer, read_stats
from buffer.writer import BufferWriter
from config.model import CloudSection, MqttSection
from tests.peers import AgentProcess, CloudService, ModbusPeer, Mosquitto, free_port, sim_device
from uplink.cloud import CloudSink
from uplink.lanes import BURST_SECONDS
from uplink.mqtt import MqttSink

pytestmark = pytest.mark.e2e

RIG = "rig-lanes"
PREFIX = f"rigs/{RIG}"
WAIT = 30.0
"""Seconds any single wait for delivery may take before the test fails."""


@dataclasses.dataclass(frozen=True)
class Arrival:
    """One readings or backfill message as the subscriber received it."""

    monotonic: float
    wall_us: int
    topic: str
    seqs: tuple[int, ...]
    ts_us: tuple[int, ...]


@dataclasses.dataclass
class Inbox:
    """Every message under the topic prefix, with its arrival time."""

    arrivals: list[Arrival] = dataclasses.field(default_factory=list)
    connected: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    def of(self, lane: str) -> list[Arrival]:
        """Return the messages of the "readings" or the "backfill" topics, in arrival order."""
        return [a for a in self.arrivals if f"/{lane}/" in a.topic]

    def seqs(self, lane: str | None = None) -> list[int]:
        lanes = ("readings", "backfill") if lane is None else (lane,)
        return [seq for name in lanes for arrival in self.of(name) for seq in arrival.seqs]


def parse_ts(text: str) -> int:
    """Convert an RFC 3339 UTC time with microseconds to microseconds since the epoch."""
    moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return int(moment.timestamp()) * 1_000_000 + moment.microsecond


@contextlib.asynccontextmanager
async def inbox_on(port: int, qos: int = 0) -> AsyncIterator[Inbox]:
    """Subscribe to everything under PREFIX, reconnecting as needed.

    With QoS 0 the broker never sends a message to this subscriber twice. A
    QoS 1 message in flight to it when the test stops the broker would come
    again after the restart, and look like a duplicate of the sink. A QoS 0
    subscriber misses what is published while it is away, so the test must
    hold the sink's reconnect until the subscriber is back. With QoS 1 the
    session is persistent and the broker keeps those messages for it.
    """
    inbox = Inbox()
    identifier = f"lanes-test-{uuid.uuid4().hex[:8]}"

    async def listen() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", port, identifier=identifier, clean_session=qos == 0
                ) as client:
                    await client.subscribe(f"{PREFIX}/#", qos=qos)
                    inbox.connected.set()
                    async for message in client.messages:
                        topic = str(message.topic)
                        if "/readings/" not in topic and "/backfill/" not in topic:
                            continue
                        assert isinstance(message.payload, bytes | bytearray)
                        readings = json.loads(message.payload)["readings"]
                        inbox.arrivals.append(
                            Arrival(
                                time.monotonic(),
                                now_us(),
                                topic,
                                tuple(int(r["seq"]) for r in readings),
                                tuple(parse_ts(r["ts"]) for r in readings),
                            )
                        )
            except aiomqtt.MqttError:
                inbox.connected.clear()
                await asyncio.sleep(0.1)

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await inbox.connected.wait()
        yield inbox
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def wait_until(check: Callable[[], bool], limit_s: float = WAIT, label: str = "") -> None:
    """Poll `check` until it holds; fail naming `label` after `limit_s` seconds."""
    deadline = time.monotonic() + limit_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit_s:.0f} s waiting for {label or 'a condition'}")
        await asyncio.sleep(0.01)


async def produce(writer: BufferWriter, per_second: int) -> None:
    """Put `per_second` readings a second into the writer, timestamped when they are made."""
    started = time.monotonic()
    produced = 0
    while True:
        due = int((time.monotonic() - started) * per_second)
        if due > produced:
            ts = now_us()
            batch = [
                Reading(ts, "pumps", f"ch{index % 20}", float(index), "psi")
                for index in range(produced, due)
            ]
            await writer.put(batch)
            produced = due
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(*coroutines: Any) -> AsyncIterator[list[asyncio.Task[Any]]]:
    """Run coroutines as tasks and cancel them on exit, the last one first."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        yield tasks
    finally:
        for task in reversed(tasks):
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def max_in_window(arrivals: list[Arrival], window_s: float) -> int:
    """Return the maximum number of readings that arrived within any `window_s` seconds."""
    times = [a.monotonic for a in arrivals]
    counts = [len(a.seqs) for a in arrivals]
    prefix = [0]
    for count in counts:
        prefix.append(prefix[-1] + count)
    max_count = 0
    for index, start in enumerate(times):
        end = bisect.bisect_left(times, start + window_s)
        max_count = max(max_count, prefix[end] - prefix[index])
    return max_count


# --- MQTT: a 60 s outage at 1,000 readings/s -----------------------------------


OUTAGE_S = 60.0
LIVE_RATE = 1000
BACKLOG_RATE = 5000
PER_MESSAGE = 250


async def test_mqtt_live_first_after_outage(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """After 60 s without a broker, new readings arrive within 1 s while the backlog drains.

    Every seq arrives exactly once across the readings and backfill topics, and
    the backfill topic stays within backlog_rate over every 10 s window.
    """
    retry_allowed = asyncio.Event()
    retry_allowed.set()

    async def gated_sleep(delay: float) -> None:
        # Reconnects wait until the subscriber is back, and then come quickly, so the
        # time to the first live reading measures the sink, not its backoff.
        await retry_allowed.wait()
        await asyncio.sleep(min(delay, 0.05))

    cfg = MqttSection(
        url=mosquitto.url,
        topic_prefix=PREFIX,
        backlog_rate=f"{BACKLOG_RATE}/s",
        max_readings_per_message=PER_MESSAGE,
    )
    async with Buffer(tmp_path / "data", ["mqtt"]) as buffer, inbox_on(mosquitto.port) as inbox:
        writer = BufferWriter(buffer, commit_interval=0.1)
        sink = MqttSink(cfg, rig_id=RIG, topic_prefix=PREFIX, buffer=buffer, sleep=gated_sleep)
        async with running(writer.run(), produce(writer, LIVE_RATE), sink.run()) as tasks:
            await wait_until(lambda: len(inbox.seqs()) >= LIVE_RATE, label="live readings")

            retry_allowed.clear()
            await asyncio.to_thread(mosquitto.stop)
            await wait_until(lambda: not sink.connected, 5, "the sink to notice the outage")
            await asyncio.sleep(OUTAGE_S)
            cursor_before = await buffer.cursor("mqtt")

            await asyncio.to_thread(mosquitto.start)
            async with asyncio.timeout(10):
                await inbox.connected.wait()
            retry_allowed.set()
            await wait_until(lambda: sink.connected, 10, "the sink to reconnect")
            connected_at = time.monotonic()
            # The sink plans its lanes just after it connects, so give it a moment.
            split = None
            deadline = time.monotonic() + 5
            while split is None and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
                split = (await buffer.backlog("mqtt")).split
            assert split is not None, "the sink did not split its backlog"
            assert split - cursor_before >= OUTAGE_S * LIVE_RATE * 0.9

            def first_live() -> Arrival | None:
                return next((a for a in inbox.of("readings") if a.seqs[0] > split), None)

            await wait_until(lambda: first_live() is not None, 10, "the first live reading")
            live = first_live()
            assert live is not None
            while (await buffer.backlog("mqtt")).split is not None:
                assert not tasks[2].done(), "the sink stopped"
                await asyncio.sleep(0.1)
            tasks[1].cancel()
            await writer.flush()
            await wait_until(lambda: len(set(inbox.seqs())) >= buffer.last_seq, label="every seq")
        last_seq = buffer.last_seq

    # The first live reading came within 1 s of the reconnect and was at most 1 s old.
    assert live.monotonic - connected_at <= 1.0
    assert max(live.wall_us - ts for ts in live.ts_us) <= 1_000_000
    backfill = inbox.of("backfill")
    assert backfill, "nothing arrived on the backfill topic"
    assert backfill[0].monotonic - connected_at < 5.0
    # The backlog was still draining for most of its time after the first live reading.
    expected_drain_s = OUTAGE_S * LIVE_RATE / BACKLOG_RATE
    assert backfill[-1].monotonic - live.monotonic >= 0.8 * expected_drain_s

    counts = Counter(inbox.seqs())
    assert sorted(counts) == list(range(1, last_seq + 1))
    assert [seq for seq, n in counts.items() if n > 1] == []
    assert set(inbox.seqs("backfill")) == set(range(cursor_before + 1, split + 1))

    allowance = max(BACKLOG_RATE * BURST_SECONDS, PER_MESSAGE)
    max_in_10s = max_in_window(backfill, 10.0)
    drain_s = backfill[-1].monotonic - backfill[0].monotonic
    print(
        f"backfill: {len(inbox.seqs('backfill'))} readings in {drain_s:.1f} s, "
        f"at most {max_in_10s} in 10 s; first live reading "
        f"{live.monotonic - connected_at:.3f} s after the reconnect"
    )
    assert drain_s >= min(10.0, 0.8 * expected_drain_s)
    assert max_in_10s <= BACKLOG_RATE * 10 + allowance
    # The limiter paces the lane rather than stalling it.
    assert len(inbox.seqs("backfill")) / drain_s >= 0.8 * BACKLOG_RATE


# --- MQTT: SIGKILL of the agent during the drain ------------------------------


KILL_POINTS = 100
"""Modbus points polled every 100 ms: 1,000 readings/s."""
KILL_INFLIGHT = 10
KILL_PER_MESSAGE = 100


def write_agent_config(path: Path, mqtt_port: int, modbus_port: int, metrics_port: int) -> None:
    """Write an agent config: one Modbus source of KILL_POINTS points, MQTT with lanes."""
    lines = [
        "[agent]",
        'rig_id = "rig-lanes"',
        f'data_dir = "{path.parent / "data"}"',
        'log_format = "json"',
        f'metrics_listen = "127.0.0.1:{metrics_port}"',
        'clock_check = "off"',
        "[buffer]",
        'commit_interval = "100ms"',
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        'topic_prefix = "rigs/{rig_id}"',
        f"max_inflight = {KILL_INFLIGHT}",
        f"max_readings_per_message = {KILL_PER_MESSAGE}",
        "backlog_threshold = 3000",
        'backlog_rate = "1000/s"',
        "[[sources.modbus]]",
        'name = "pumps"',
        f'url = "tcp://127.0.0.1:{modbus_port}"',
        "unit_id = 1",
        'poll_interval = "100ms"',
        'timeout = "300ms"',
    ]
    for index in range(KILL_POINTS):
        lines += ["[[sources.modbus.points]]", f'channel = "p{index}"', f"address = {index}"]
    path.write_text("\n".join(lines) + "\n")


async def wait_for_backfill_metrics(port: int) -> dict[str, float]:
    """Scrape /metrics until the mqtt sink reports a backfill; return its backfill samples."""
    names = (
        "rig_agent_sink_backfill_readings",
        "rig_agent_sink_backfill_oldest_age_seconds",
        "rig_agent_sink_backfill_drain_estimate_seconds",
    )
    async with httpx.AsyncClient(timeout=5) as client, asyncio.timeout(WAIT):
        while True:
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            found = {
                sample.name: sample.value
                for family in text_string_to_metric_families(response.text)
                for sample in family.samples
                if sample.name in names and sample.labels == {"sink": "mqtt"}
            }
            if found.get(names[0], 0) > 0 and len(found) == len(names):
                return found
            await asyncio.sleep(0.1)


@contextlib.contextmanager
def closing_agent(agent: AgentProcess) -> Iterator[AgentProcess]:
    try:
        yield agent
    finally:
        agent.close()


async def test_mqtt_kill_during_drain(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """An agent killed with SIGKILL during the drain resumes it: nothing is missing.

    Duplicates come only from messages in flight or acknowledged but not yet
    committed when the agent died, so they stay under two publish windows.
    """
    config = tmp_path / "agent.toml"
    data_dir = tmp_path / "data"
    peer = ModbusPeer([sim_device(1)], tcp_port=free_port())
    await peer.start()
    metrics_port = free_port()
    write_agent_config(config, mosquitto.port, peer.tcp_port, metrics_port)
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        # QoS 1 on a persistent session: the broker keeps what the agent publishes
        # while this subscriber is away. Redelivered messages count as duplicates.
        async with inbox_on(mosquitto.port, qos=1) as inbox, asyncio.timeout(120):
            with closing_agent(agent):
                await agent.start()
                await wait_until(lambda: len(inbox.seqs()) >= 1000, label="live readings")
                await asyncio.to_thread(mosquitto.stop)
                await asyncio.sleep(6.0)
                await asyncio.to_thread(mosquitto.start)

                # Kill the agent once the drain has begun, well before it ends.
                await wait_until(lambda: len(inbox.seqs("backfill")) >= 1500, label="backfill")
                agent.kill()
                killed = read_stats(data_dir, ["mqtt"]).backlogs[0]
                assert killed.split is not None
                assert killed.depth > 0, "the drain had ended before the kill"

                await agent.start()
                # While the drain goes on, /metrics and `rig-agent status` show it.
                backfill = await wait_for_backfill_metrics(metrics_port)
                assert backfill["rig_agent_sink_backfill_readings"] > 0
                assert backfill["rig_agent_sink_backfill_oldest_age_seconds"] > 6.0
                assert backfill["rig_agent_sink_backfill_drain_estimate_seconds"] > 0
                status = await asyncio.to_thread(
                    subprocess.run,
                    [sys.executable, "-m", "agent.cli", "status", "-c", str(config)],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=30,
                )
                lanes = status.stdout[status.stdout.index("backlog lanes") :].splitlines()
                assert lanes[1].split() == [
                    "sink",
                    "backlog",
                    "oldest",
                    "time",
                    "left",
                    "split",
                    "seq",
                ]
                assert lanes[2].split()[0] == "mqtt"
                await wait_until(
                    lambda: read_stats(data_dir, ["mqtt"]).backlogs[0].split is None,
                    label="the drain to end after the restart",
                )
                await peer.stop()
                await wait_until(
                    lambda: read_stats(data_dir, ["mqtt"]).sinks[0].depth == 0, label="depth 0"
                )
                last_seq = read_stats(data_dir, ["mqtt"]).last_seq
                await wait_until(
                    lambda: set(range(1, last_seq + 1)) <= set(inbox.seqs()), label="every seq"
                )
                assert agent.terminate() == 0
    finally:
        await peer.stop()

    seqs = inbox.seqs()
    missing = set(range(1, last_seq + 1)) - set(seqs)
    assert missing == set()
    duplicates = len(seqs) - len(set(seqs))
    print(f"SIGKILL during the drain: {last_seq} seqs, {duplicates} duplicates")
    assert duplicates <= 2 * KILL_INFLIGHT * KILL_PER_MESSAGE
    log = (tmp_path / "agent.log").read_text()
    restarted = log[log.rindex('"agent_started"') :]
    assert '"lanes_resumed"' in restarted or '"lanes_split"' in restarted
    assert '"lanes_drained"' in restarted


# --- Cloud: backlog batches marked, live first ----------------------------------


@pytest.fixture
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def service(device_key: ec.EllipticCurvePrivateKey) -> Iterator[CloudService]:
    """The reference service in a child process, with `device_key` registered."""
    cloud = CloudService()
    cloud.register_key(
        device_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.close()


CLOUD_BACKLOG_RATE = 4000


async def test_cloud_live_first_after_outage(
    service: CloudService,
    device_key: ec.EllipticCurvePrivateKey,
    tmp_path: Path,
    debug_logs: list[EventDict],
) -> None:
    """After an outage, the live lane uploads first and the backlog follows marked as such."""
    device_id = f"edge-{uuid.uuid4().hex[:10]}"
    cfg = CloudSection.model_validate(
        {
            "url": service.base_url,
            "device_id": device_id,
            "private_key_file": "/unused/device-key.pem",
            "interval": "200ms",
            "timeout": "5s",
            "backlog_threshold": 5000,
            "backlog_rate": f"{CLOUD_BACKLOG_RATE}/s",
        }
    )

    async def short_sleep(delay: float) -> None:
        await asyncio.sleep(min(delay, 0.2))

    async with Buffer(tmp_path / "data", ["cloud"]) as buffer:
        writer = BufferWriter(buffer, commit_interval=0.1)
        sink = CloudSink(cfg, rig_id=RIG, buffer=buffer, key=device_key, sleep=short_sleep)
        async with running(writer.run(), produce(writer, LIVE_RATE), sink.run()) as tasks:
            await wait_until(lambda: sink.uploaded >= 1000, label="live uploads")
            await asyncio.to_thread(service.stop)
            await wait_until(lambda: not sink.connected, 10, "the sink to notice the outage")
            await asyncio.sleep(8.0)
            outage_events = len(debug_logs)
            await asyncio.to_thread(service.start)

            await wait_until(lambda: sink.backfilled > 0, label="backlog uploads")
            while (await buffer.backlog("cloud")).split is not None:
                assert not tasks[2].done(), "the sink stopped"
                await asyncio.sleep(0.1)
            tasks[1].cancel()
            await writer.flush()
            await wait_until(lambda: sink.uploaded >= buffer.last_seq, label="every reading")
            last_seq = buffer.last_seq
        stats = await service.device_stats(device_id)
        stored = [row["seq"] for row in await service.readings(device_id)]

    assert stored == list(range(1, last_seq + 1))
    assert stats["duplicates"] == 0
    # Every reading of a backlog batch, and only those, arrived with X-Rig-Backlog: 1.
    assert stats["backfill_readings"] == sink.backfilled
    assert sink.backfilled >= 5000
    uploads = [e for e in debug_logs[outage_events:] if e["event"] == "cloud_batch_uploaded"]
    assert uploads[0]["backlog"] is False, "a backlog batch went before the live lane"
    drained = [e for e in debug_logs if e["event"] == "lanes_drained"]
    assert len(drained) == 1
    # The backlog lane stayed within its rate: sending it took at least its size over the
    # rate, less the one burst the bucket allows.
    burst = CLOUD_BACKLOG_RATE * BURST_SECONDS
    assert drained[0]["drain_s"] >= (sink.backfilled - burst) / CLOUD_BACKLOG_RATE - 0.1


@pytest.fixture
def debug_logs() -> Iterator[list[EventDict]]:
    """Capture structlog events at every level, whatever level an earlier test configured."""
    old_wrapper = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with capture_logs() as logs:
            yield logs
    finally:
        structlog.configure(wrapper_class=old_wrapper)
