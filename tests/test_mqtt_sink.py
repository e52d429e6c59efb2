"""Tests of the MQTT sink against a private mosquitto: delivery, PUBACK cursor, restarts, status."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import structlog
from structlog.testing import capture_logs
from structlog.typing import EventDict

from buffer.reading import Quality, Reading, StoredReading, format_ts
from buffer.store import Buffer
from config.model import MqttSection
from tests.peers import Mosquitto, subscriber
from uplink.mqtt import (
    RECONNECT_BASE_DELAY,
    RECONNECT_MAX_DELAY,
    MqttSink,
    PasswordFileError,
    build_payload,
    group_readings,
    read_password_file,
    reconnect_delay,
)

RIG = "rig-07"
PREFIX = f"rigs/{RIG}"
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
REPO = Path(__file__).resolve().parents[1]


class CountingBuffer(Buffer):
    """The real SQLite buffer, recording every cursor commit the sink makes."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir, ["mqtt"])
        self.commits: list[int] = []

    @property
    def committed(self) -> int:
        """The cursor after the sink's latest commit, for synchronous wait checks."""
        return self.commits[-1] if self.commits else 0

    async def commit_cursor(self, sink: str, seq: int) -> None:
        await super().commit_cursor(sink, seq)
        self.commits.append(seq)


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[CountingBuffer]:
    async with CountingBuffer(tmp_path) as opened:
        yield opened


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


def make_readings(count: int, source: str = "mud-pumps", ts_us: int = T0) -> list[Reading]:
    """Return `count` good readings of one source, one channel each, all at `ts_us`."""
    return [Reading(ts_us, source, f"ch{i}", float(i), "psi", Quality.GOOD) for i in range(count)]


def mqtt_config(broker: Mosquitto, **overrides: Any) -> MqttSection:
    return MqttSection(url=broker.url, topic_prefix=PREFIX, **overrides)


def make_sink(
    cfg: MqttSection,
    buffer: Buffer,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> MqttSink:
    return MqttSink(cfg, rig_id=RIG, topic_prefix=PREFIX, buffer=buffer, sleep=sleep)


@asynccontextmanager
async def running(sink: MqttSink) -> AsyncIterator[asyncio.Task[None]]:
    """Run the sink in a task and cancel it on exit, as the agent's shutdown does."""
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)


async def wait_until(check: Callable[[], bool], limit_s: float = 10.0) -> None:
    """Poll `check` until it holds, and raise TimeoutError after `limit_s` seconds."""
    async with asyncio.timeout(limit_s):
        while not check():  # noqa: ASYNC110 - the state belongs to other tasks and threads
            await asyncio.sleep(0.02)


async def status_seen_by_new_subscriber(port: int) -> dict[str, Any]:
    """Return the retained status as a subscriber that joins now receives it."""
    async with subscriber(port, f"{PREFIX}/status") as got:
        await wait_until(lambda: bool(got.messages), limit_s=5)
        return got.messages[-1][1]


# --- units -------------------------------------------------------------------


def test_group_readings_cuts_runs() -> None:
    """Groups are runs of one source in seq order, cut at the per-message maximum."""
    rows = [
        StoredReading(seq, T0, source, "c", 1.0, "", Quality.GOOD)
        for seq, source in enumerate(["a", "a", "a", "b", "b", "a"], start=1)
    ]
    groups = group_readings(rows, max_per_message=2)
    assert [[r.seq for r in g] for g in groups] == [[1, 2], [3], [4, 5], [6]]


def test_build_payload_fields() -> None:
    """A payload carries rig, source and every reading field, and a bad reading has a null value."""
    rows = [
        StoredReading(7, T0 + 5, "mud-pumps", "spp", 2500.5, "psi", Quality.GOOD),
        StoredReading(8, T0 + 5, "mud-pumps", "spm", 12.0, "1/min", Quality.BAD),
    ]
    body = json.loads(build_payload(RIG, rows))
    assert body["rig_id"] == RIG
    assert body["source"] == "mud-pumps"
    assert body["readings"][0] == {
        "seq": 7,
        "ts": "2026-01-01T00:00:00.000005Z",
        "channel": "spp",
        "value": 2500.5,
        "unit": "psi",
        "quality": "good",
    }
    assert body["readings"][1]["value"] is None
    assert body["readings"][1]["quality"] == "bad"


def test_reconnect_delay_bounds() -> None:
    """Every backoff delay lies in [0, min(cap, base * 2**attempt)], even for huge attempts."""
    for attempt in [*range(12), 100, 10_000]:
        ceiling = min(RECONNECT_MAX_DELAY, RECONNECT_BASE_DELAY * 2 ** min(attempt, 64))
        delays = [reconnect_delay(attempt) for _ in range(200)]
        assert min(delays) >= 0.0
        assert max(delays) <= ceiling
    assert max(reconnect_delay(40) for _ in range(500)) > RECONNECT_MAX_DELAY / 2


def test_password_file_newline(tmp_path: Path) -> None:
    """Exactly one trailing newline is dropped from the password file."""
    path = tmp_path / "mqtt-password"
    path.write_text("s3cret\n\n")
    assert read_password_file(str(path)) == "s3cret\n"
    path.write_text("s3cret\r\n")
    assert read_password_file(str(path)) == "s3cret"


async def test_password_file_missing(tmp_path: Path, buffer: CountingBuffer) -> None:
    """A missing password file stops the sink with an error that names the file."""
    missing = tmp_path / "no-such-password"
    cfg = MqttSection(url="mqtt://127.0.0.1:9", username="rig", password_file=str(missing))
    sink = make_sink(cfg, buffer)
    with pytest.raises(PasswordFileError, match="no-such-password") as info:
        async with asyncio.timeout(5):
            await sink.run()
    assert info.value.path == str(missing)


# --- against a real broker ---------------------------------------------------


async def test_every_seq_arrives_in_order(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """Every reading arrives once, in seq order, on its source's topic with all fields."""
    sink = make_sink(mqtt_config(mosquitto, max_readings_per_message=7), buffer)
    async with subscriber(mosquitto.port, f"{PREFIX}/readings/#") as got, running(sink):
        for round_ in range(10):
            await buffer.append(make_readings(20, "mud-pumps", T0 + round_))
            await buffer.append(make_readings(10, "drawworks", T0 + round_))
        await wait_until(lambda: len(got.seqs()) >= buffer.last_seq)

    assert got.seqs() == list(range(1, 301))
    assert await buffer.cursor("mqtt") == 300
    assert sink.published == 300
    for topic, body in got.messages:
        assert topic == f"{PREFIX}/readings/{body['source']}"
        assert body["rig_id"] == RIG
        assert 1 <= len(body["readings"]) <= 7
    first = got.readings()[0]
    assert first == {
        "seq": 1,
        "ts": format_ts(T0),
        "channel": "ch0",
        "value": 0.0,
        "unit": "psi",
        "quality": "good",
    }


async def test_qos0_delivers(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """With QoS 0 the sink still publishes every reading and moves its cursor."""
    sink = make_sink(mqtt_config(mosquitto, qos=0), buffer)
    async with subscriber(mosquitto.port, f"{PREFIX}/readings/#") as got, running(sink):
        await buffer.append(make_readings(50))
        await wait_until(lambda: buffer.committed == 50)
        await wait_until(lambda: len(got.seqs()) >= 50)
    assert got.seqs() == list(range(1, 51))


async def test_cursor_waits_for_puback(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """The cursor stays put while the broker is frozen, and catches up once it resumes."""
    assert mosquitto.proc is not None
    sink = make_sink(mqtt_config(mosquitto, max_readings_per_message=10), buffer)
    async with subscriber(mosquitto.port, f"{PREFIX}/readings/#") as got, running(sink):
        await buffer.append(make_readings(30))
        await wait_until(lambda: buffer.committed == 30)

        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        try:
            await buffer.append(make_readings(200, ts_us=T0 + 1))
            await asyncio.sleep(1.0)
            assert await buffer.cursor("mqtt") == 30
            assert sink.published == 30
        finally:
            os.kill(mosquitto.proc.pid, signal.SIGCONT)

        await wait_until(lambda: buffer.committed == 230)
        await wait_until(lambda: len(set(got.seqs())) >= 230)
    assert sorted(set(got.seqs())) == list(range(1, 231))
    assert sink.reconnects == 0


async def test_broker_restart_loses_nothing(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """Readings in flight or added while the broker is down all arrive after it restarts."""
    assert mosquitto.proc is not None
    retry_allowed = asyncio.Event()
    retry_allowed.set()

    async def gated_sleep(delay: float) -> None:
        # Hold reconnects until the test subscriber is back, so nothing is
        # published while it is away.
        await retry_allowed.wait()
        await asyncio.sleep(min(delay, 0.05))

    sink = make_sink(mqtt_config(mosquitto, max_readings_per_message=5), buffer, gated_sleep)
    async with subscriber(mosquitto.port, f"{PREFIX}/readings/#") as got, running(sink):
        await buffer.append(make_readings(100))
        await wait_until(lambda: buffer.committed == 100)

        # Freeze, then kill the broker, so publishes are surely in flight
        # without a PUBACK when the link drops.
        retry_allowed.clear()
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        await buffer.append(make_readings(300, ts_us=T0 + 1))
        await asyncio.sleep(0.3)
        os.kill(mosquitto.proc.pid, signal.SIGKILL)
        await asyncio.to_thread(mosquitto.stop)
        await wait_until(lambda: not sink.connected, limit_s=3)
        assert await buffer.cursor("mqtt") == 100
        await wait_until(lambda: not got.connected.is_set(), limit_s=3)
        await buffer.append(make_readings(100, ts_us=T0 + 2))

        await asyncio.to_thread(mosquitto.start)
        async with asyncio.timeout(10):
            await got.connected.wait()
        retry_allowed.set()
        await wait_until(lambda: buffer.committed == buffer.last_seq)
        await wait_until(lambda: len(set(got.seqs())) >= buffer.last_seq)

    missing = set(range(1, buffer.last_seq + 1)) - set(got.seqs())
    assert missing == set()
    assert sink.reconnects == 1
    assert sink.last_error is not None


async def test_commits_coalesced(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """Many small acknowledged messages produce few cursor commits, and the last one is final."""
    sink = make_sink(mqtt_config(mosquitto, max_readings_per_message=1), buffer)
    async with running(sink):
        await wait_until(lambda: sink.connected)
        started = asyncio.get_running_loop().time()
        await buffer.append(make_readings(2000))
        await wait_until(lambda: buffer.committed == 2000)
        elapsed = asyncio.get_running_loop().time() - started
    assert sink.messages == 2000
    assert len(buffer.commits) <= elapsed / 0.1 + 2


async def test_birth_retained_online(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """A subscriber that joins after the sink connected receives the retained online status."""
    sink = make_sink(mqtt_config(mosquitto), buffer)
    async with running(sink):
        await wait_until(lambda: sink.connected)
        status = await status_seen_by_new_subscriber(mosquitto.port)
    assert status["state"] == "online"
    assert status["rig_id"] == RIG
    assert status["ts"].endswith("Z")


async def test_clean_stop_retains_offline(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """Cancelling the sink commits what was acknowledged and leaves the status offline."""
    sink = make_sink(mqtt_config(mosquitto), buffer)
    async with running(sink):
        await buffer.append(make_readings(40))
        await wait_until(lambda: sink.published == 40)
    status = await status_seen_by_new_subscriber(mosquitto.port)
    assert status["state"] == "offline"
    assert await buffer.cursor("mqtt") == 40
    assert not sink.connected


async def test_stop_while_broker_frozen(mosquitto: Mosquitto, buffer: CountingBuffer) -> None:
    """A stop during a broker freeze ends within about 2 s, with the cursor at the last PUBACK."""
    assert mosquitto.proc is not None
    loop = asyncio.get_running_loop()
    sink = make_sink(mqtt_config(mosquitto), buffer)
    task = asyncio.create_task(sink.run())
    try:
        await buffer.append(make_readings(10))
        await wait_until(lambda: buffer.committed == 10)
        os.kill(mosquitto.proc.pid, signal.SIGSTOP)
        await buffer.append(make_readings(50, ts_us=T0 + 1))
        await asyncio.sleep(0.2)

        started = loop.time()
        task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(task, return_exceptions=True)
        elapsed = loop.time() - started
    finally:
        os.kill(mosquitto.proc.pid, signal.SIGCONT)
        task.cancel()
    assert task.cancelled()
    assert elapsed < 3.0
    assert await buffer.cursor("mqtt") == 10


async def run_child_sink(port: int, data_dir: str) -> None:
    """Run a sink against 127.0.0.1:port until killed (entry point of the child process)."""
    cfg = MqttSection.model_validate(
        {"url": f"mqtt://127.0.0.1:{port}", "topic_prefix": PREFIX, "keepalive": "5s"}
    )
    async with Buffer(Path(data_dir), ["mqtt"]) as child_buffer:
        await make_sink(cfg, child_buffer).run()


async def test_will_offline_after_kill(mosquitto: Mosquitto, tmp_path: Path) -> None:
    """When the sink's process dies abruptly the broker publishes the retained offline will."""
    code = (
        "import asyncio, sys\n"
        "from tests.test_mqtt_sink import run_child_sink\n"
        "asyncio.run(run_child_sink(int(sys.argv[1]), sys.argv[2]))\n"
    )
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, str(mosquitto.port), str(tmp_path), cwd=REPO
    )
    try:
        async with subscriber(mosquitto.port, f"{PREFIX}/status") as got:

            def states() -> list[str]:
                return [body["state"] for _topic, body in got.messages]

            def child_online() -> bool:
                assert child.returncode is None, "the child sink exited early"
                return "online" in states()

            await wait_until(child_online, limit_s=15)
            child.send_signal(signal.SIGKILL)
            await wait_until(lambda: states()[-1] == "offline", limit_s=5)
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
    assert got.messages[-1][1] == {"state": "offline", "rig_id": RIG}
    status = await status_seen_by_new_subscriber(mosquitto.port)
    assert status["state"] == "offline"


async def test_new_client_per_connection(
    mosquitto: Mosquitto, buffer: CountingBuffer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each connection attempt builds a new client, named after the rig by default."""
    built: list[aiomqtt.Client] = []
    real_client = aiomqtt.Client

    def recording_client(*args: Any, **kwargs: Any) -> aiomqtt.Client:
        client = real_client(*args, **kwargs)
        built.append(client)
        return client

    monkeypatch.setattr(aiomqtt, "Client", recording_client)
    sink = make_sink(mqtt_config(mosquitto, max_inflight=7), buffer)
    async with running(sink):
        await wait_until(lambda: sink.connected)
        await asyncio.to_thread(mosquitto.stop)
        await wait_until(lambda: len(built) >= 2, limit_s=5)
    assert len({id(c) for c in built}) == len(built)
    assert built[0].identifier == f"rig-agent-{RIG}"


async def test_outage_logging(
    buffer: CountingBuffer, tmp_path: Path, debug_logs: list[EventDict]
) -> None:
    """An outage logs one warning, debug repeats with a count, and one info on recovery."""
    password_file = tmp_path / "mqtt-password"
    password_file.write_text("hunter2-secret\n")
    broker = Mosquitto()  # The port is reserved now, and the broker starts later.

    async def quick_sleep(delay: float) -> None:
        await asyncio.sleep(min(delay, 0.05))

    def repeats() -> list[EventDict]:
        return [e for e in debug_logs if e["event"] == "mqtt_still_unavailable"]

    cfg = mqtt_config(broker, username="rig", password_file=str(password_file))
    sink = make_sink(cfg, buffer, quick_sleep)
    try:
        async with running(sink):
            await wait_until(lambda: len(repeats()) >= 2)
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: sink.connected)
    finally:
        broker.close()

    events = [e for e in debug_logs if e["event"].startswith("mqtt_")]
    assert (events[0]["event"], events[0]["log_level"]) == ("mqtt_unavailable", "warning")
    assert "retry_in_s" in events[0]
    assert {e["log_level"] for e in repeats()} == {"debug"}
    assert repeats()[1]["failed_attempts"] == 3
    recovered = [e for e in events if e["event"] == "mqtt_reconnected"]
    assert len(recovered) == 1
    assert recovered[0]["log_level"] == "info"
    assert recovered[0]["outage_s"] >= 0
    assert "hunter2-secret" not in repr(debug_logs)


def test_password_file_credential_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare password_file name is read from $CREDENTIALS_DIRECTORY when systemd sets it."""
    (tmp_path / "mqtt-password").write_text("from-credentials\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))

    assert read_password_file("mqtt-password") == "from-credentials"

    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    monkeypatch.chdir(tmp_path / "..")
    with pytest.raises(PasswordFileError):
        read_password_file("mqtt-password")
