"""/metrics and /healthz: Prometheus rendering, health rules and the HTTP server on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent import health as health_module
from agent.health import (
    DISK_FULL_WINDOW,
    MAX_REQUEST_BYTES,
    MetricsListenError,
    MetricsServer,
    health,
    parse_listen,
    serve_metrics,
)
from agent.metrics import (
    AgentSnapshot,
    BufferSnapshot,
    ClockSnapshot,
    SinkSnapshot,
    SourceSnapshot,
    render_metrics,
)
from tests.peers import free_port

NOW = 1_750_000_000.0

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def readings_key(source: str, channel: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("rig_agent_source_readings_total", (("channel", channel), ("source", source)))


def make_snapshot(now: float = NOW) -> AgentSnapshot:
    """A healthy agent with two sources, two sinks and values that differ from one another."""
    return AgentSnapshot(
        rig_id="rig-07",
        version="0.1.0",
        start_unix=now - 3600.0,
        buffer=BufferSnapshot(
            open=True,
            size_bytes=52_428_800,
            last_seq=123_456,
            disk_full_dropped=17,
            last_disk_full_unix=now - 7200.0,
            corrupt_databases=2,
        ),
        sources=(
            SourceSnapshot(
                name="mud-pumps",
                protocol="modbus",
                readings={"standpipe_pressure": 3601, "pump_1_spm": 3599},
                errors=4,
                connected=True,
                last_reading_unix=now - 0.5,
            ),
            SourceSnapshot(
                name="mud-logger",
                protocol="wits0",
                readings={"bit_depth": 907, "hole_depth": 905},
                errors=11,
                connected=None,
                last_reading_unix=None,
            ),
        ),
        sinks=(
            SinkSnapshot(
                name="mqtt",
                connected=True,
                last_success_unix=now - 1.0,
                depth=12,
                oldest_unacknowledged_age_seconds=1.5,
                dropped=5,
                quarantined=0,
            ),
            SinkSnapshot(
                name="cloud",
                connected=False,
                last_success_unix=None,
                depth=98_000,
                oldest_unacknowledged_age_seconds=None,
                dropped=1000,
                quarantined=3,
            ),
        ),
        clock=ClockSnapshot(synchronized=False, jumps=6),
    )


def parse_samples(text: str) -> tuple[dict[str, str], Samples]:
    """Parse exposition text into {family: type} and {(sample name, labels): value}."""
    types: dict[str, str] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, f"duplicate sample {key}"
            samples[key] = sample.value
    return types, samples


# --- render_metrics ---------------------------------------------------------------------------


def test_render_counters_equal_snapshot() -> None:
    snapshot = make_snapshot()
    types, samples = parse_samples(render_metrics(snapshot).decode())

    expected_counters: Samples = {
        readings_key("mud-pumps", "standpipe_pressure"): 3601,
        readings_key("mud-pumps", "pump_1_spm"): 3599,
        readings_key("mud-logger", "bit_depth"): 907,
        readings_key("mud-logger", "hole_depth"): 905,
        ("rig_agent_source_errors_total", (("source", "mud-pumps"),)): 4,
        ("rig_agent_source_errors_total", (("source", "mud-logger"),)): 11,
        ("rig_agent_sink_dropped_readings_total", (("sink", "mqtt"),)): 5,
        ("rig_agent_sink_dropped_readings_total", (("sink", "cloud"),)): 1000,
        ("rig_agent_sink_quarantined_readings_total", (("sink", "mqtt"),)): 0,
        ("rig_agent_sink_quarantined_readings_total", (("sink", "cloud"),)): 3,
        ("rig_agent_buffer_disk_full_dropped_readings_total", ()): 17,
        ("rig_agent_buffer_corrupt_databases_total", ()): 2,
        ("rig_agent_clock_jumps_total", ()): 6,
    }  # fmt: skip
    for key, value in expected_counters.items():
        assert samples.get(key) == value, key

    counter_samples = {
        key for key in samples if types.get(key[0].removesuffix("_total")) == "counter"
    }
    assert counter_samples == set(expected_counters)


def test_render_gauges_equal_snapshot() -> None:
    snapshot = make_snapshot()
    _types, samples = parse_samples(render_metrics(snapshot).decode())

    expected_gauges: Samples = {
        ("rig_agent_build_info", (("version", "0.1.0"),)): 1,
        ("rig_agent_start_time_seconds", ()): NOW - 3600.0,
        ("rig_agent_stale_parts", ()): 0,
        ("rig_agent_source_info", (("protocol", "modbus"), ("source", "mud-pumps"))): 1,
        ("rig_agent_source_info", (("protocol", "wits0"), ("source", "mud-logger"))): 1,
        ("rig_agent_source_connected", (("source", "mud-pumps"),)): 1,
        ("rig_agent_source_last_reading_timestamp_seconds", (("source", "mud-pumps"),)): NOW - 0.5,
        ("rig_agent_sink_connected", (("sink", "mqtt"),)): 1,
        ("rig_agent_sink_connected", (("sink", "cloud"),)): 0,
        ("rig_agent_sink_last_success_timestamp_seconds", (("sink", "mqtt"),)): NOW - 1.0,
        ("rig_agent_sink_backlog_readings", (("sink", "mqtt"),)): 12,
        ("rig_agent_sink_backlog_readings", (("sink", "cloud"),)): 98_000,
        ("rig_agent_sink_oldest_unacknowledged_age_seconds", (("sink", "mqtt"),)): 1.5,
        ("rig_agent_sink_oldest_unacknowledged_age_seconds", (("sink", "cloud"),)): 0.0,
        ("rig_agent_buffer_open", ()): 1,
        ("rig_agent_buffer_size_bytes", ()): 52_428_800,
        ("rig_agent_buffer_last_seq", ()): 123_456,
        ("rig_agent_clock_synchronized", ()): 0,
    }  # fmt: skip
    for key, value in expected_gauges.items():
        assert samples.get(key) == value, key


def test_render_omits_unknown_values() -> None:
    """Unknown link state, clock state and missing times produce no sample, not a fake 0."""
    snapshot = replace(make_snapshot(), clock=ClockSnapshot(synchronized=None, jumps=0))
    _types, samples = parse_samples(render_metrics(snapshot).decode())
    names_and_sources = {(name, dict(labels).get("source")) for name, labels in samples}

    assert ("rig_agent_source_connected", "mud-logger") not in names_and_sources
    assert ("rig_agent_source_last_reading_timestamp_seconds", "mud-logger") not in (
        names_and_sources
    )
    sink_times = {
        dict(labels)["sink"]
        for name, labels in samples
        if name == "rig_agent_sink_last_success_timestamp_seconds"
    }
    assert sink_times == {"mqtt"}
    assert not any(name == "rig_agent_clock_synchronized" for name, _ in samples)


def test_render_names_and_labels() -> None:
    """Every family is prefixed, and no series carries rig_id: Prometheus adds target labels."""
    text = render_metrics(make_snapshot()).decode()
    families = list(text_string_to_metric_families(text))

    assert len(families) >= 20
    for family in families:
        assert family.name.startswith("rig_agent_"), family.name
        for sample in family.samples:
            assert "rig_id" not in sample.labels, sample
            assert "rig-07" not in sample.labels.values(), sample


def test_render_escapes_label_values() -> None:
    """A channel name with quotes and backslashes survives the round trip."""
    odd = 'pit "A"\\volume'
    source = SourceSnapshot(name="tank", protocol="modbus", readings={odd: 42})
    snapshot = replace(make_snapshot(), sources=(source,))
    _types, samples = parse_samples(render_metrics(snapshot).decode())

    key = ("rig_agent_source_readings_total", (("channel", odd), ("source", "tank")))
    assert samples[key] == 42


def test_render_counts_stale_parts() -> None:
    snapshot = replace(make_snapshot(), stale=("buffer-writer", "sink:mqtt"))
    _types, samples = parse_samples(render_metrics(snapshot).decode())

    assert samples[("rig_agent_stale_parts", ())] == 2


# --- health rules -----------------------------------------------------------------------------


def test_health_ok_with_disconnected_sink() -> None:
    """The cloud sink of the sample snapshot is down, and the agent stays healthy."""
    ok, reasons = health(make_snapshot(), NOW)

    assert ok
    assert reasons == []


def test_health_stale_parts() -> None:
    snapshot = replace(make_snapshot(), stale=("buffer-writer", "sink:cloud"))
    ok, reasons = health(snapshot, NOW)

    assert not ok
    assert len(reasons) == 2
    assert "buffer-writer" in reasons[0]
    assert "sink:cloud" in reasons[1]


def test_health_buffer_not_open() -> None:
    snapshot = replace(make_snapshot(), buffer=BufferSnapshot(open=False))
    ok, reasons = health(snapshot, NOW)

    assert not ok
    assert reasons == ["the buffer database is not open"]


@pytest.mark.parametrize(
    ("seconds_ago", "healthy"),
    [(0.0, False), (DISK_FULL_WINDOW - 1.0, False), (DISK_FULL_WINDOW + 1.0, True)],
)
def test_health_disk_full_window(seconds_ago: float, healthy: bool) -> None:
    buffer = replace(make_snapshot().buffer, last_disk_full_unix=NOW - seconds_ago)
    snapshot = replace(make_snapshot(), buffer=buffer)
    ok, reasons = health(snapshot, NOW)

    assert ok is healthy
    if not healthy:
        assert len(reasons) == 1
        assert "disk is full" in reasons[0]
        assert "17 dropped" in reasons[0]


def test_health_sources_silent() -> None:
    """Sources are configured but the newest reading is older than the limit."""
    base = make_snapshot()
    silent = tuple(replace(s, last_reading_unix=NOW - 400.0) for s in base.sources)
    snapshot = replace(base, sources=silent)

    ok, reasons = health(snapshot, NOW, source_silence_limit=300.0)
    assert not ok
    assert reasons == ["no source produced a reading for 400 s (limit 300 s)"]

    ok, reasons = health(snapshot, NOW, source_silence_limit=500.0)
    assert ok


def test_health_silence_counts_from_start() -> None:
    """Before any reading, the silence is measured from the agent's start."""
    base = make_snapshot()
    never = tuple(replace(s, last_reading_unix=None) for s in base.sources)

    young = replace(base, sources=never, start_unix=NOW - 10.0)
    assert health(young, NOW, source_silence_limit=60.0) == (True, [])

    old = replace(base, sources=never, start_unix=NOW - 100.0)
    ok, reasons = health(old, NOW, source_silence_limit=60.0)
    assert not ok
    assert "no source produced a reading for 100 s" in reasons[0]


def test_health_no_sources_configured() -> None:
    """An agent without sources (only draining its buffer) is not unhealthy for silence."""
    snapshot = replace(make_snapshot(), sources=(), start_unix=NOW - 86_400.0)

    assert health(snapshot, NOW) == (True, [])


# --- listen address ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),  # noqa: S104 - parsed only, nothing binds
        ("[::1]:65535", ("::1", 65535)),
        ("localhost:9108", ("localhost", 9108)),
    ],
)
def test_parse_listen_valid(value: str, expected: tuple[str, int]) -> None:
    assert parse_listen(value) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "turns metrics off"),
        ("127.0.0.1", "has no port"),
        (":9108", "has no host"),
        ("::1:9108", "IPv6 address in brackets"),
        ("127.0.0.1:0", "from 1 to 65535"),
        ("127.0.0.1:65536", "from 1 to 65535"),
        ("127.0.0.1:http", "from 1 to 65535"),
        ("127.0.0.1:-1", "from 1 to 65535"),
    ],
)
def test_parse_listen_invalid(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_listen(value)
    assert "agent.metrics_listen" in str(info.value)


# --- HTTP server ------------------------------------------------------------------------------


class Response:
    """One HTTP response read to the end of the connection."""

    def __init__(self, raw: bytes) -> None:
        head, _, self.body = raw.partition(b"\r\n\r\n")
        lines = head.decode("ascii").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:])
        }

    def json(self) -> dict[str, object]:
        document = json.loads(self.body)
        assert isinstance(document, dict)
        return document


async def exchange(port: int, request: bytes, wait_s: float = 5.0) -> Response:
    """Send raw bytes to 127.0.0.1:port and read the response until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(wait_s):
            raw = await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()
    return Response(raw)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: test\r\n\r\n".encode()


@pytest.fixture
def snapshot_box() -> list[AgentSnapshot]:
    """The snapshot the server returns; a test replaces element 0 to change it."""
    return [make_snapshot(time.time())]


@pytest.fixture
async def server_port(snapshot_box: list[AgentSnapshot]) -> AsyncIterator[int]:
    """A MetricsServer on a free 127.0.0.1 port, serving the snapshot in `snapshot_box`."""
    server = MetricsServer(lambda: snapshot_box[0])
    await server.start(f"127.0.0.1:{free_port()}")
    task = asyncio.create_task(server.serve_forever())
    try:
        yield server.address[1]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.aclose()


async def test_http_metrics(server_port: int, snapshot_box: list[AgentSnapshot]) -> None:
    response = await exchange(server_port, get("/metrics"))

    assert response.status == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert int(response.headers["content-length"]) == len(response.body)
    assert response.body == render_metrics(snapshot_box[0])


async def test_http_metrics_query_string(server_port: int) -> None:
    response = await exchange(server_port, get("/metrics?name[]=rig_agent_buffer_open"))

    assert response.status == 200


async def test_http_head(server_port: int, snapshot_box: list[AgentSnapshot]) -> None:
    response = await exchange(server_port, get("/metrics", method="HEAD"))

    assert response.status == 200
    assert response.body == b""
    assert int(response.headers["content-length"]) == len(render_metrics(snapshot_box[0]))


async def test_http_healthz_ok(server_port: int) -> None:
    response = await exchange(server_port, get("/healthz"))
    document = response.json()

    assert response.status == 200
    assert response.headers["content-type"] == "application/json"
    assert document["status"] == "ok"
    assert document["reasons"] == []
    assert document["rig_id"] == "rig-07"
    sinks = document["sinks"]
    assert isinstance(sinks, list)
    assert {s["name"]: s["connected"] for s in sinks} == {"mqtt": True, "cloud": False}


async def test_http_healthz_unhealthy(server_port: int, snapshot_box: list[AgentSnapshot]) -> None:
    snapshot_box[0] = replace(
        snapshot_box[0], stale=("sink:mqtt",), buffer=BufferSnapshot(open=False)
    )
    response = await exchange(server_port, get("/healthz"))
    document = response.json()

    assert response.status == 503
    assert document["status"] == "unhealthy"
    reasons = document["reasons"]
    assert isinstance(reasons, list)
    assert len(reasons) == 2
    assert "sink:mqtt" in reasons[0]
    assert reasons[1] == "the buffer database is not open"


async def test_http_unknown_path(server_port: int) -> None:
    response = await exchange(server_port, get("/admin"))

    assert response.status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
async def test_http_other_methods(server_port: int, method: str) -> None:
    response = await exchange(server_port, get("/metrics", method=method))

    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),  # a TLS ClientHello
        (b"get /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
        (b"GET /metrics SPDY/3\r\n\r\n", 400),
    ],
)
async def test_http_bad_request_closed_fast(
    server_port: int, request_bytes: bytes, status: int
) -> None:
    """A request that cannot be served is rejected without waiting for the read timeout."""
    started = time.monotonic()
    response = await exchange(server_port, request_bytes, wait_s=health_module.READ_TIMEOUT / 2)

    assert response.status == status
    assert time.monotonic() - started < 1.0


async def test_http_request_too_large(server_port: int) -> None:
    filler = b"X-Filler: " + b"a" * 100 + b"\r\n"
    request = b"GET /metrics HTTP/1.1\r\n" + filler * (MAX_REQUEST_BYTES // len(filler) + 2)
    response = await exchange(server_port, request)

    assert response.status == 431


async def test_http_client_closes_early(server_port: int) -> None:
    """A client that sends part of a request and closes gets a 400, and the server goes on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
    writer.write(b"GET /metr")
    writer.write_eof()
    async with asyncio.timeout(5):
        raw = await reader.read()
    writer.close()
    await writer.wait_closed()

    assert Response(raw).status == 400
    assert (await exchange(server_port, get("/healthz"))).status == 200


async def test_http_slow_client_does_not_block(
    server_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that sends a byte at a time is cut off at the read timeout; others are served."""
    monkeypatch.setattr(health_module, "READ_TIMEOUT", 1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", server_port)

    async def dribble() -> None:
        for byte in get("/metrics"):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)

    dribbler = asyncio.create_task(dribble())
    started = time.monotonic()
    try:
        fast = await exchange(server_port, get("/metrics"), wait_s=0.8)
        assert fast.status == 200
        async with asyncio.timeout(3):
            raw = await reader.read()
    finally:
        dribbler.cancel()
        with pytest.raises(asyncio.CancelledError):
            await dribbler
        writer.close()
        await writer.wait_closed()

    assert Response(raw).status == 408
    assert 0.9 < time.monotonic() - started < 2.5


async def test_http_connection_limit(server_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections over the limit get 503 at once instead of waiting in a queue."""
    monkeypatch.setattr(health_module, "MAX_CONNECTIONS", 2)
    idle = [await asyncio.open_connection("127.0.0.1", server_port) for _ in range(2)]
    try:
        await asyncio.sleep(0.1)
        started = time.monotonic()
        reader, writer = await asyncio.open_connection("127.0.0.1", server_port)
        async with asyncio.timeout(2):
            raw = await reader.read()
        writer.close()
        await writer.wait_closed()
        assert Response(raw).status == 503
        assert time.monotonic() - started < 1.0
    finally:
        for _reader, idle_writer in idle:
            idle_writer.close()
            await idle_writer.wait_closed()

    await asyncio.sleep(0.1)
    assert (await exchange(server_port, get("/healthz"))).status == 200


async def test_http_snapshot_failure(snapshot_box: list[AgentSnapshot]) -> None:
    def broken() -> AgentSnapshot:
        raise RuntimeError("buffer stats unavailable")

    server = MetricsServer(broken)
    await server.start(f"127.0.0.1:{free_port()}")
    task = asyncio.create_task(server.serve_forever())
    port = server.address[1]
    try:
        metrics = await exchange(port, get("/metrics"))
        healthz = await exchange(port, get("/healthz"))
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.aclose()

    assert metrics.status == 500
    assert healthz.status == 503
    assert healthz.json()["status"] == "unhealthy"


async def wait_until_listening(port: int) -> None:
    async with asyncio.timeout(5):
        while True:
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_serve_metrics_until_cancelled() -> None:
    port = free_port()
    snapshot: Callable[[], AgentSnapshot] = lambda: make_snapshot(time.time())  # noqa: E731
    task = asyncio.create_task(serve_metrics(f"127.0.0.1:{port}", snapshot))
    await wait_until_listening(port)

    assert (await exchange(port, get("/healthz"))).status == 200

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_serve_metrics_port_in_use() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        listen = f"127.0.0.1:{port}"

        with pytest.raises(MetricsListenError) as info:
            await serve_metrics(listen, make_snapshot)

    message = str(info.value)
    assert f'"{listen}"' in message
    assert "already in use by another process" in message
    assert "choose a free port in agent.metrics_listen" in message
    assert "agent.metrics_listen" in message


async def test_serve_metrics_invalid_listen() -> None:
    with pytest.raises(MetricsListenError, match="has no port"):
        await serve_metrics("127.0.0.1", make_snapshot)
