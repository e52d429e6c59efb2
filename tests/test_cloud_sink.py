"""Tests of the cloud sink against the reference ingest service under uvicorn on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import gc
import gzip
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs
from structlog.typing import EventDict

from agent.status import format_stats
from buffer.reading import Quality, Reading, StoredReading
from buffer.store import Buffer, read_stats
from config.model import CloudSection
from tests.peers import CloudService
from uplink.auth import generate_key_file, jwk_thumbprint, load_private_key
from uplink.cloud import CloudSink, parse_retry_after

RIG = "rig-07"
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
REPO = Path(__file__).resolve().parents[1]
MAX_DELAY = 0.5
"""Backoff ceiling in seconds for the sinks under test, so that recovery is quick."""
DELIVERY_TIMEOUT = 30.0


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def make_readings(count: int, ts_us: int = T0) -> list[Reading]:
    """Return `count` good readings of one source over 20 channels, 1 ms apart."""
    return [
        Reading(ts_us + i * 1000, "mud-pumps", f"ch{i % 20}", float(i), "psi", Quality.GOOD)
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def device_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def service(device_key: ec.EllipticCurvePrivateKey) -> Iterator[CloudService]:
    """One uvicorn child process for the module, with `device_key` registered and faults on."""
    cloud = CloudService()
    cloud.register_key(public_pem(device_key))
    cloud.start()
    try:
        yield cloud
    finally:
        cloud.close()


@pytest.fixture
async def cloud(service: CloudService) -> AsyncIterator[CloudService]:
    """The module's service, running, with every pending fault cleared after the test."""
    if service.proc is None:
        service.start()
    try:
        yield service
    finally:
        if service.proc is None:
            service.start()
        await service.clear_faults()


@pytest.fixture
def device_id() -> str:
    """A device id no other test uses, so each test reads its own counters."""
    return f"edge-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    async with Buffer(tmp_path / "data", ["cloud"]) as opened:
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


def cloud_section(url: str, device_id: str, **overrides: Any) -> CloudSection:
    settings: dict[str, Any] = {
        "url": url,
        "device_id": device_id,
        "private_key_file": "/unused/device-key.pem",
        "interval": "200ms",
        "timeout": "5s",
    }
    return CloudSection.model_validate(settings | overrides)


def make_sink(
    service: CloudService,
    device_id: str,
    buffer: Buffer,
    key: ec.EllipticCurvePrivateKey,
    **overrides: Any,
) -> CloudSink:
    cfg = cloud_section(service.base_url, device_id, **overrides)
    return CloudSink(cfg, rig_id=RIG, buffer=buffer, key=key, max_delay=MAX_DELAY)


@contextlib.asynccontextmanager
async def running(sink: CloudSink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def wait_until(check: Callable[[], Any], limit_s: float = DELIVERY_TIMEOUT) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def wait_for_cursor(buffer: Buffer, seq: int, limit_s: float = DELIVERY_TIMEOUT) -> None:
    async def reached() -> bool:
        return await buffer.cursor("cloud") >= seq

    await wait_until(reached, limit_s)


async def stored_seqs(service: CloudService, device_id: str) -> list[int]:
    return [row["seq"] for row in await service.readings(device_id)]


# --- unit: Retry-After ------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("2", 2.0),
        (" 120 ", 120.0),
        ("soon", None),
        ("-3", None),
        (format_datetime(dt.datetime(2026, 1, 1, 0, 0, 30, tzinfo=dt.UTC), usegmt=True), 30.0),
        ("Thu, 01 Jan 2026 00:00:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    """Retry-After is read as seconds or as an HTTP date relative to now, else ignored."""
    now = 1_767_225_600.0  # 2026-01-01T00:00:00Z
    assert parse_retry_after(header, now=now) == expected


# --- delivery -----------------------------------------------------------------------


async def test_delivers_each_seq_once(
    cloud: CloudService,
    device_id: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
) -> None:
    """Every buffered reading arrives in the service's store exactly once, each token used once."""
    count = 100_000
    for start in range(0, count, 5000):
        await buffer.append(make_readings(5000, T0 + start * 1000))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, count)

    assert await stored_seqs(cloud, device_id) == list(range(1, count + 1))
    stats = await cloud.device_stats(device_id)
    assert stats["duplicates"] == 0
    assert sink.uploaded == count
    # The service rejects a reused jti, so a reused token would show as a 401 and a retry.
    assert not [e for e in debug_logs if e["event"] == "cloud_token_rejected_retrying"]


async def test_service_restart_loses_nothing(
    cloud: CloudService,
    device_id: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
) -> None:
    """Readings buffered while the service is down arrive once it is back, each once."""
    sink = make_sink(cloud, device_id, buffer, device_key, batch_max_readings=200)
    async with running(sink):
        await buffer.append(make_readings(1000))
        await wait_for_cursor(buffer, 1000)

        cloud.stop()
        await buffer.append(make_readings(1000, T0 + 10**9))
        await asyncio.sleep(3.0)
        assert sink.connected is False
        assert await buffer.cursor("cloud") == 1000

        cloud.start()
        await wait_for_cursor(buffer, 2000)

    assert await stored_seqs(cloud, device_id) == list(range(1, 2001))
    failures = [e for e in debug_logs if e["event"] == "cloud_upload_failed"]
    assert [e["log_level"] for e in failures[:2]] == ["warning", "debug"]
    assert {e["log_level"] for e in failures[1:]} == {"debug"}
    assert failures[0]["first_seq"] == 1001
    recovered = [e for e in debug_logs if e["event"] == "cloud_upload_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["outage_s"] >= 2.5


async def run_child_sink(base_url: str, device_id: str, data_dir: str, key_file: str) -> None:
    """Run one cloud sink over the buffer in `data_dir`; the test kills this process."""
    cfg = cloud_section(base_url, device_id, batch_max_readings=100)
    key = load_private_key(Path(key_file))
    async with Buffer(Path(data_dir), ["cloud"]) as child_buffer:
        await CloudSink(cfg, rig_id=RIG, buffer=child_buffer, key=key, max_delay=MAX_DELAY).run()


async def test_agent_killed_mid_upload(
    cloud: CloudService, device_id: str, tmp_path: Path, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """A sink process killed with SIGKILL during uploads and started again loses nothing."""
    count = 20_000
    data_dir = tmp_path / "data"
    async with Buffer(data_dir, ["cloud"]) as buffer:
        for start in range(0, count, 5000):
            await buffer.append(make_readings(5000, T0 + start * 1000))
    key_file = tmp_path / "device-key.pem"
    key_file.write_bytes(
        device_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    code = (
        "import asyncio, sys\n"
        "from tests.test_cloud_sink import run_child_sink\n"
        "asyncio.run(run_child_sink(*sys.argv[1:]))\n"
    )
    args = [cloud.base_url, device_id, str(data_dir), str(key_file)]

    async def stored() -> int:
        return int((await cloud.device_stats(device_id))["readings"])

    stored_at_kill: list[int] = []
    for until in (2000, count):
        child = await asyncio.create_subprocess_exec(sys.executable, "-c", code, *args, cwd=REPO)
        try:

            async def reached(until: int = until, child: Process = child) -> bool:
                assert child.returncode is None, "the child sink exited early"
                return await stored() >= until

            await wait_until(reached)
        finally:
            child.send_signal(signal.SIGKILL)
            await child.wait()
        stored_at_kill.append(await stored())

    assert stored_at_kill[0] < count, "the first kill came after the last upload"
    assert await stored_seqs(cloud, device_id) == list(range(1, count + 1))


async def test_lost_acknowledgement_duplicates_counted(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """A stored batch that got a 503 response is sent again, and the service counts duplicates."""
    await cloud.inject_fault(status=503, after_store=True, count=1)
    await buffer.append(make_readings(300))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 300)

    assert await stored_seqs(cloud, device_id) == list(range(1, 301))
    stats = await cloud.device_stats(device_id)
    assert stats["duplicates"] == 300
    assert sink.duplicates == 300


# --- responses that mean "later" ----------------------------------------------------


async def test_retry_after_waits(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """A 429 with Retry-After: 2 makes the sink wait about 2 s, then nothing is lost."""
    await cloud.inject_fault(status=429, retry_after=2, count=1)
    await buffer.append(make_readings(50))
    sink = make_sink(cloud, device_id, buffer, device_key)
    started = time.monotonic()
    async with running(sink):
        await wait_for_cursor(buffer, 50)
    waited = time.monotonic() - started

    # The backoff ceiling is MAX_DELAY, so only Retry-After explains a 2 s wait.
    assert waited >= 1.9
    assert sink.requests == 2
    assert await stored_seqs(cloud, device_id) == list(range(1, 51))


async def test_unavailable_retried(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """Two 503 responses without Retry-After are retried with backoff and nothing is lost."""
    await cloud.inject_fault(status=503, count=2)
    await buffer.append(make_readings(50))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 50)

    assert sink.requests == 3
    assert await stored_seqs(cloud, device_id) == list(range(1, 51))


async def test_single_401_renews_token(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """One 401 makes the sink retry at once with a fresh token, without a failed upload."""
    await cloud.inject_fault(status=401, count=1)
    await buffer.append(make_readings(50))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 50)

    assert sink.last_error is None
    assert await stored_seqs(cloud, device_id) == list(range(1, 51))


async def test_removed_key_then_restored(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """While the device key is unregistered uploads back off; once restored all readings arrive."""
    kid = jwk_thumbprint(device_key.public_key())
    cloud.unregister_key(kid)
    try:
        await buffer.append(make_readings(100))
        sink = make_sink(cloud, device_id, buffer, device_key)
        async with running(sink):

            async def rejected_twice() -> bool:
                return sink.requests >= 2

            await wait_until(rejected_twice, limit_s=10)
            assert await buffer.cursor("cloud") == 0
            assert sink.last_error is not None
            cloud.register_key(public_pem(device_key))
            await wait_for_cursor(buffer, 100)
    finally:
        cloud.register_key(public_pem(device_key))

    assert await stored_seqs(cloud, device_id) == list(range(1, 101))


# --- responses that split the batch -----------------------------------------------


async def test_rejected_reading_quarantined(
    cloud: CloudService, device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """A reading the service rejects with 422 goes to quarantine and every other one arrives."""
    await cloud.inject_fault(reject_seq=537)
    await buffer.append(make_readings(1000))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 1000)

    assert await stored_seqs(cloud, device_id) == [s for s in range(1, 1001) if s != 537]
    assert await buffer.quarantined_count("cloud") == 1
    assert sink.quarantined == 1
    stats = await buffer.stats()
    assert stats.quarantined == 1
    kept = stats.quarantine_newest[0]
    assert (kept.sink, kept.seq, kept.status) == ("cloud", 537, 422)
    assert kept.value == 536.0
    assert "537" in format_stats(RIG, stats)


async def test_quarantine_visible_to_status(
    cloud: CloudService, device_id: str, tmp_path: Path, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """`status` reads the quarantine count from another connection while the buffer is closed."""
    await cloud.inject_fault(reject_seq=3)
    async with Buffer(tmp_path / "data", ["cloud"]) as buffer:
        await buffer.append(make_readings(10))
        sink = make_sink(cloud, device_id, buffer, device_key)
        async with running(sink):
            await wait_for_cursor(buffer, 10)

    stats = read_stats(tmp_path / "data", ["cloud"])
    assert stats.quarantined == 1
    assert stats.quarantine_newest[0].seq == 3


async def test_oversized_batch_split(
    device_id: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """A batch over the service's body limit is split in halves until the parts fit."""
    small = CloudService(max_body_bytes=30_000)
    small.register_key(public_pem(device_key))
    small.start()
    try:
        await buffer.append(make_readings(2000))
        sink = make_sink(small, device_id, buffer, device_key)
        async with running(sink):
            await wait_for_cursor(buffer, 2000)
        assert await stored_seqs(small, device_id) == list(range(1, 2001))
        stats = await small.device_stats(device_id)
    finally:
        small.close()

    assert stats["duplicates"] == 0
    assert sink.quarantined == 0
    assert sink.requests > 2


# --- lookahead: the next batch is prepared during the upload -----------------------

RESPONSE_DELAY_MAX_S = 1.0
"""Maximum seconds the recording service delays a response while it waits for a read."""


class ObservedBuffer(Buffer):
    """A Buffer that records the first seq of every read, and can delay or fail some reads."""

    def __init__(self, data_dir: Path, sinks: list[str]) -> None:
        super().__init__(data_dir, sinks)
        self.reads: list[int] = []
        """First seq of each read_batch and read_range call, in call order."""
        self.cancelled_reads: list[int] = []
        self.on_read: Callable[[int], Awaitable[None]] | None = None
        """Hook awaited at the start of every read with its first seq, which may wait or raise."""

    async def read_batch(
        self, sink: str, limit: int, after_seq: int | None = None
    ) -> list[StoredReading]:
        start = await self.cursor(sink) if after_seq is None else after_seq
        await self._observe(start + 1)
        return await super().read_batch(sink, limit, after_seq)

    async def read_range(self, first_seq: int, last_seq: int, limit: int) -> list[StoredReading]:
        await self._observe(first_seq)
        return await super().read_range(first_seq, last_seq, limit)

    async def wait_for_read(self, first_seq: int, limit_s: float) -> bool:
        """Wait until a read from `first_seq` has started; return False after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while first_seq not in self.reads:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def _observe(self, first_seq: int) -> None:
        self.reads.append(first_seq)
        if self.on_read is None:
            return
        try:
            await self.on_read(first_seq)
        except asyncio.CancelledError:
            self.cancelled_reads.append(first_seq)
            raise


@dataclasses.dataclass
class Post:
    """One POST that the recording service received, and how it responded."""

    seqs: list[int]
    """Seqs of the readings in the decompressed body, in body order."""
    key_seqs: tuple[int, int]
    """First and last seq that the Idempotency-Key names."""
    backlog: bool
    status: int = 0
    read_ahead: bool | None = None
    """For a delayed POST: whether the read of the following seq had started by the response."""


class RecordingService:
    """A loopback HTTP/1.1 server that records each readings POST and responds to it.

    `status_for(post)` picks the status (200 unless set), and `before_response(post)`
    is awaited before the response, so a test can delay it. The service checks no token.
    """

    def __init__(self) -> None:
        self.posts: list[Post] = []
        self.status_for: Callable[[Post], int] = lambda post: 200
        self.before_response: Callable[[Post], Awaitable[None]] | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._handlers:
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    def sent_seqs(self, *, backlog: bool) -> list[int]:
        """Seqs of the 2xx POSTs of one lane kind, in the order the service received them."""
        posts = [p for p in self.posts if p.backlog == backlog and 200 <= p.status < 300]
        return [seq for post in posts for seq in post.seqs]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                post = await self._read_post(reader)
                if post is None:
                    return
                self.posts.append(post)
                if self.before_response is not None:
                    await self.before_response(post)
                post.status = self.status_for(post)
                body = json.dumps({"accepted": len(post.seqs), "duplicates": 0}).encode()
                if post.status >= 300:
                    body = json.dumps({"detail": "rejected by the test"}).encode()
                head = f"HTTP/1.1 {post.status} X\r\nContent-Type: application/json\r\n"
                head += f"Content-Length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        except asyncio.CancelledError:
            # close() cancels handlers that still delay a response. Python 3.11 logs an
            # error for a handler task that ends cancelled (3.12 does not), so end normally.
            return
        finally:
            self._handlers.discard(task)
            writer.close()

    @staticmethod
    async def _read_post(reader: asyncio.StreamReader) -> Post | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:] if line)
        headers = {name.lower(): value for name, value in headers.items()}
        body = await reader.readexactly(int(headers["content-length"]))
        document = json.loads(gzip.decompress(body))
        first, last = headers["idempotency-key"].rsplit(":", 1)[1].split("-")
        return Post(
            seqs=[r["seq"] for r in document["readings"]],
            key_seqs=(int(first), int(last)),
            backlog=headers.get("x-rig-backlog") == "1",
        )


@contextlib.asynccontextmanager
async def started_recorder() -> AsyncIterator[RecordingService]:
    service = RecordingService()
    await service.start()
    try:
        yield service
    finally:
        await service.close()


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingService]:
    async with started_recorder() as service:
        yield service


@pytest.fixture
async def observed(tmp_path: Path) -> AsyncIterator[ObservedBuffer]:
    async with ObservedBuffer(tmp_path / "data", ["cloud"]) as opened:
        yield opened


def delay_until_next_read(
    buffer: ObservedBuffer, last_seqs: set[int]
) -> Callable[[Post], Awaitable[None]]:
    """Delay the response to each POST that ends at one of `last_seqs` until the next read."""

    async def delay(post: Post) -> None:
        if post.seqs[-1] in last_seqs:
            post.read_ahead = await buffer.wait_for_read(post.seqs[-1] + 1, RESPONSE_DELAY_MAX_S)

    return delay


def recorder_sink(
    recorder: RecordingService,
    device_id: str,
    buffer: Buffer,
    key: ec.EllipticCurvePrivateKey,
    **overrides: Any,
) -> CloudSink:
    cfg = cloud_section(recorder.base_url, device_id, batch_max_readings=100, **overrides)
    return CloudSink(cfg, rig_id=RIG, buffer=buffer, key=key, max_delay=MAX_DELAY)


async def wait_for_sent(recorder: RecordingService, last_seq: int, *, backlog: bool) -> None:
    async def sent() -> bool:
        return last_seq in recorder.sent_seqs(backlog=backlog)

    await wait_until(sent, limit_s=10)


@pytest.mark.parametrize("lane", ["plain", "backlog"])
async def test_next_batch_read_during_upload(
    lane: str,
    recorder: RecordingService,
    observed: ObservedBuffer,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
) -> None:
    """The plain and backlog lanes read the next batch while the service delays a response."""
    await observed.append(make_readings(300))
    threshold = 10_000 if lane == "plain" else 0
    sink = recorder_sink(recorder, device_id, observed, device_key, backlog_threshold=threshold)
    recorder.before_response = delay_until_next_read(observed, {100, 200})
    async with running(sink):
        await wait_for_cursor(observed, 300, limit_s=10)

    delayed = [post for post in recorder.posts if post.read_ahead is not None]
    assert [post.seqs[-1] for post in delayed] == [100, 200]
    assert [post.read_ahead for post in delayed] == [True, True]
    assert recorder.sent_seqs(backlog=lane == "backlog") == list(range(1, 301))


async def test_live_lane_reads_ahead(
    recorder: RecordingService,
    observed: ObservedBuffer,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
) -> None:
    """The live lane reads its next batch while the service delays a response."""
    await observed.append(make_readings(10))
    # One backlog reading a second keeps the backlog lane, and so the live lane, running.
    sink = recorder_sink(
        recorder, device_id, observed, device_key, backlog_threshold=0, backlog_rate="1/s"
    )
    recorder.before_response = delay_until_next_read(observed, {110, 210})
    async with running(sink):

        async def split() -> bool:
            return any(post.backlog for post in recorder.posts)

        await wait_until(split, limit_s=10)
        await observed.append(make_readings(300, T0 + 10**9))
        await wait_for_sent(recorder, 310, backlog=False)
        backlog_sent = recorder.sent_seqs(backlog=True)

    delayed = [post for post in recorder.posts if post.read_ahead is not None]
    assert [post.seqs[-1] for post in delayed] == [110, 210]
    assert [post.read_ahead for post in delayed] == [True, True]
    assert recorder.sent_seqs(backlog=False) == list(range(11, 311))
    assert len(backlog_sent) < 10, "the backlog lane ended before the live lane was done"


@pytest.mark.parametrize("lane", ["plain", "backlog"])
async def test_split_then_next_batch_in_order(
    lane: str,
    recorder: RecordingService,
    observed: ObservedBuffer,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
) -> None:
    """A 413 splits the first batch, and the batch read ahead follows its halves, each seq once."""
    await observed.append(make_readings(300))
    threshold = 10_000 if lane == "plain" else 0
    sink = recorder_sink(recorder, device_id, observed, device_key, backlog_threshold=threshold)
    recorder.before_response = delay_until_next_read(observed, {100})
    recorder.status_for = lambda post: 413 if len(post.seqs) == 100 and post.seqs[0] == 1 else 200
    async with running(sink):
        await wait_for_cursor(observed, 300, limit_s=10)

    ranges = [(post.seqs[0], post.seqs[-1], post.status) for post in recorder.posts]
    assert ranges == [(1, 100, 413), (1, 50, 200), (51, 100, 200), (101, 200, 200), (201, 300, 200)]
    assert recorder.posts[0].read_ahead is True
    for post in recorder.posts:
        assert post.seqs == list(range(post.key_seqs[0], post.key_seqs[1] + 1))
    assert recorder.sent_seqs(backlog=lane == "backlog") == list(range(1, 301))


def asyncio_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Messages that asyncio logged at ERROR, such as a task exception never retrieved."""
    gc.collect()
    return [r.getMessage() for r in caplog.records if r.name == "asyncio" and r.levelno >= 40]


async def cancel_during_upload(
    read: str, data_dir: Path, device_id: str, key: ec.EllipticCurvePrivateKey
) -> tuple[list[int], int]:
    """Cancel a sink while the service delays its first response and its read ahead waits or fails.

    Returns the first seqs of the reads that were cancelled, and the cursor at the end.
    """
    never = asyncio.Event()

    async def on_read(first_seq: int) -> None:
        if first_seq != 101:
            return
        if read == "fails":
            message = "read failed on purpose"
            raise OSError(message)
        await never.wait()

    async with (
        started_recorder() as recorder,
        ObservedBuffer(data_dir, ["cloud"]) as observed,
    ):
        await observed.append(make_readings(300))
        observed.on_read = on_read
        recorder.before_response = lambda post: never.wait()
        sink = recorder_sink(recorder, device_id, observed, key)
        async with running(sink) as task:
            assert await observed.wait_for_read(101, 10)
            await asyncio.sleep(0.05)
        assert task.cancelled()
        return list(observed.cancelled_reads), await observed.cursor("cloud")


@pytest.mark.parametrize("read", ["waits", "fails"])
def test_cancel_ends_lookahead(
    read: str,
    tmp_path: Path,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelling the sink mid-upload cancels a pending read ahead and retrieves a failed one."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    # The sink runs in an event loop of its own. Once that loop is closed, its tasks can
    # be freed, and asyncio logs any task exception that was never retrieved.
    scenario = cancel_during_upload(read, tmp_path / "data", device_id, device_key)
    cancelled_reads, cursor = asyncio.run(scenario)

    assert cancelled_reads == ([101] if read == "waits" else [])
    assert cursor == 0
    assert asyncio_errors(caplog) == []


async def test_replan_ends_lookahead(
    recorder: RecordingService,
    observed: ObservedBuffer,
    device_id: str,
    device_key: ec.EllipticCurvePrivateKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed upload that splits the sink into lanes cancels the read ahead of the plain lane."""
    caplog.set_level(logging.ERROR, logger="asyncio")
    await observed.append(make_readings(300))
    never = asyncio.Event()

    async def on_read(first_seq: int) -> None:
        if first_seq == 101 and 101 not in observed.cancelled_reads:
            await never.wait()

    observed.on_read = on_read

    async def delay_first(post: Post) -> None:
        if len(recorder.posts) == 1:
            await observed.wait_for_read(101, RESPONSE_DELAY_MAX_S)
            # One more reading puts the backlog over the threshold, so the 503 below
            # makes the plain lane return and the sink split into lanes.
            await observed.append(make_readings(1, T0 + 10**9))

    recorder.before_response = delay_first
    recorder.status_for = lambda post: 503 if len(recorder.posts) == 1 else 200
    sink = recorder_sink(recorder, device_id, observed, device_key, backlog_threshold=300)
    async with running(sink):
        await wait_for_cursor(observed, 301, limit_s=10)

    assert observed.cancelled_reads == [101]
    assert [post.backlog for post in recorder.posts] == [False, True, True, True, True]
    assert recorder.sent_seqs(backlog=True) == list(range(1, 302))
    assert asyncio_errors(caplog) == []


# --- start-up and secrets -----------------------------------------------------------


def test_open_key_file_stops_run(tmp_path: Path, service: CloudService) -> None:
    """`rig-agent run` with a key file readable by others exits 1, naming the file."""
    key_file = tmp_path / "device-key.pem"
    generate_key_file(key_file)
    key_file.chmod(0o644)
    data_dir = tmp_path / "data"
    config = tmp_path / "agent.toml"
    config.write_text(
        f'[agent]\nrig_id = "{RIG}"\ndata_dir = "{data_dir}"\nmetrics_listen = ""\n\n'
        f'[cloud]\nurl = "{service.base_url}"\ndevice_id = "edge-1"\n'
        f'private_key_file = "{key_file}"\n',
        encoding="utf-8",
    )
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert str(key_file) in done.stderr
    assert f"chmod 600 {key_file}" in done.stderr
    assert not (data_dir / "buffer.sqlite3").exists()


async def test_logs_hold_no_secrets(
    cloud: CloudService,
    device_id: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """No token, Authorization header or key appears in the logs, even around auth failures."""
    caplog.set_level(logging.DEBUG)
    kid = jwk_thumbprint(device_key.public_key())
    await cloud.inject_fault(status=401, count=3)
    await cloud.inject_fault(status=503, retry_after=0, count=1)
    await buffer.append(make_readings(100))
    sink = make_sink(cloud, device_id, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 100)
    cloud.unregister_key(kid)
    try:
        await buffer.append(make_readings(10))
        async with running(sink):

            async def failed() -> bool:
                return any(e["event"] == "cloud_auth_failed" for e in debug_logs)

            await wait_until(failed, limit_s=10)
    finally:
        cloud.register_key(public_pem(device_key))

    text = repr(debug_logs) + caplog.text
    private_pem = device_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    assert any(e["event"] == "cloud_upload_failed" for e in debug_logs)
    assert "eyJ" not in text  # every JWT starts with the base64url of '{"'
    assert "Bearer" not in text
    assert "authorization" not in text.lower()
    assert private_pem.splitlines()[1] not in text


# --- buffer quarantine ----------------------------------------------------------------


async def test_quarantine_moves_cursor(buffer: Buffer) -> None:
    """Quarantining readings keeps copies of them and moves only that sink's cursor past them."""
    await buffer.append(make_readings(5))
    rejected = await buffer.read_batch("cloud", 2, after_seq=2)
    await buffer.quarantine("cloud", rejected, 422, "value out of range")

    assert await buffer.cursor("cloud") == 4
    assert await buffer.cursor("mqtt") == 0
    assert await buffer.quarantined_count("cloud") == 2
    assert await buffer.quarantined_count("mqtt") == 0
    stats = await buffer.stats()
    assert [q.seq for q in stats.quarantine_newest] == [4, 3]
    assert stats.quarantine_newest[0].reason == "value out of range"


async def test_quarantine_beyond_last_seq_rejected(buffer: Buffer) -> None:
    """A reading with a seq the buffer never gave cannot be quarantined."""
    await buffer.append(make_readings(1))
    ghost = (await buffer.read_batch("cloud", 1))[0]
    with pytest.raises(ValueError, match="last_seq 1"):
        await buffer.quarantine("cloud", [ghost._replace(seq=9)], 422, "bad")


async def test_older_buffer_gains_quarantine(tmp_path: Path) -> None:
    """A buffer made before the quarantine table existed reads as 0 and gains it on open."""
    data_dir = tmp_path / "data"
    async with Buffer(data_dir, ["cloud"]) as buffer:
        await buffer.append(make_readings(3))
    with contextlib.closing(sqlite3.connect(data_dir / "buffer.sqlite3")) as conn:
        conn.execute("DROP TABLE quarantine")
        conn.commit()

    assert read_stats(data_dir, ["cloud"]).quarantined == 0
    async with Buffer(data_dir, ["cloud"]) as buffer:
        rows = await buffer.read_batch("cloud", 1)
        await buffer.quarantine("cloud", rows, 400, "not JSON")
    assert read_stats(data_dir, ["cloud"]).quarantined == 1
