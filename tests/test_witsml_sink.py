"""Tests of the WITSML sink with a real buffer and the reference service under uvicorn."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from structlog.testing import capture_logs
from structlog.typing import EventDict

from buffer.reading import Quality, Reading, StoredReading
from buffer.store import Buffer
from config.model import CloudSection, WitsmlColumn, WitsmlSection
from tests.peers import CloudService
from uplink.witsml import WitsmlSink, closed_prefix
from uplink.witsml_doc import parse_log_documents

T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
T0_S = T0 / 1_000_000
MS = 1000
S = 1_000_000
MAX_DELAY = 0.2
"""Backoff ceiling in seconds for the sinks under test, so that recovery is quick."""
WAIT_S = 20.0

COLUMNS = (
    WitsmlColumn(
        key="hookload",
        source=None,
        channel="hookload",
        mnemonic="HKLA",
        unit="klbf",
        uid="HKLA",
        description="Hook load",
    ),
    WitsmlColumn(
        key="edr/bit_depth",
        source="edr",
        channel="bit_depth",
        mnemonic="DBTM",
        unit="m",
        uid="DBTM",
        description="",
    ),
)

ExpectedRow = tuple[int, tuple[float | None, ...]]


def public_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


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
    """The module's service with every pending fault cleared after the test."""
    try:
        yield service
    finally:
        await service.clear_faults()


@pytest.fixture
def log_uid() -> str:
    """A log uid no other test uses, so each test reads only its own rows."""
    return f"log-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def buffer(tmp_path: Path) -> AsyncIterator[Buffer]:
    async with Buffer(tmp_path / "data", ["witsml"]) as opened:
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


async def fast_sleep(seconds: float) -> None:
    """Sleep at most 50 ms, so that the interval between passes does not slow the tests."""
    await asyncio.sleep(min(seconds, 0.05))


def make_sink(
    service: CloudService,
    log_uid: str,
    buffer: Buffer,
    key: ec.EllipticCurvePrivateKey,
    *,
    clock: Callable[[], float] | None = None,
    columns: tuple[WitsmlColumn, ...] = COLUMNS,
    **overrides: Any,
) -> WitsmlSink:
    cloud_cfg = CloudSection.model_validate(
        {
            "url": service.base_url,
            "device_id": f"edge-{log_uid}",
            "private_key_file": "/unused/device-key.pem",
            "timeout": "5s",
        }
    )
    settings: dict[str, Any] = {
        "interval": "1s",
        "row_period": "1s",
        "settle": "1s",
        "well_uid": "W-001",
        "well_name": "Example 1H",
        "wellbore_uid": "WB-001",
        "wellbore_name": "Example 1H OH",
        "log_uid": log_uid,
        "log_name": "Rig 07 time log",
        "curves": {c.key: {"mnemonic": c.mnemonic} for c in columns},
    }
    cfg = WitsmlSection.model_validate(settings | overrides)
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    return WitsmlSink(
        cfg,
        cloud_cfg,
        columns=columns,
        buffer=buffer,
        key=key,
        max_delay=MAX_DELAY,
        sleep=fast_sleep,
        **extra,
    )


@contextlib.asynccontextmanager
async def running(sink: WitsmlSink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(sink.run())
    try:
        yield task
    finally:
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        failure = results[0]
        if not isinstance(failure, asyncio.CancelledError):
            raise AssertionError(f"the sink stopped on its own: {failure!r}")


async def wait_until(check: Callable[[], Awaitable[bool]], limit_s: float = WAIT_S) -> None:
    async with asyncio.timeout(limit_s):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def wait_for_cursor(buffer: Buffer, seq: int) -> None:
    async def reached() -> bool:
        return await buffer.cursor("witsml") >= seq

    await wait_until(reached)


def hookload(ts_us: int, value: float, quality: Quality = Quality.GOOD) -> Reading:
    return Reading(ts_us, "rig_plc", "hookload", value, "klbf", quality)


def bit_depth(ts_us: int, value: float | None, quality: Quality = Quality.GOOD) -> Reading:
    return Reading(ts_us, "edr", "bit_depth", value, "m", quality)


def unmapped(ts_us: int, value: float) -> Reading:
    return Reading(ts_us, "edr", "wits_0150", value, "")


def steady_readings(seconds: int) -> list[Reading]:
    """Hook load every 250 ms and bit depth every second, 400 ms into it, for `seconds`."""
    readings = [hookload(T0 + i * 250 * MS, 200.0 + i) for i in range(seconds * 4)]
    readings += [bit_depth(T0 + j * S + 400 * MS, 1500.0 + j) for j in range(seconds)]
    return sorted(readings, key=lambda r: r.ts_us)


def steady_rows(seconds: int) -> list[ExpectedRow]:
    """The rows of `steady_readings`: the fourth hook load and the bit depth of each second."""
    return [(T0 + j * S, (200.0 + 4 * j + 3, 1500.0 + j)) for j in range(seconds)]


async def add_fault(service: CloudService, **fault: object) -> None:
    """Queue one fault on the service, including the WITSML fields `reject_time` and `route`."""
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        response = await client.post("/_test/faults", json=fault)
    response.raise_for_status()


def as_number(text: str | None) -> float | None:
    return None if text is None else float(text)


async def stored_rows(service: CloudService, log_uid: str) -> list[ExpectedRow]:
    """Return the rows the service stores for a log, values as numbers, HKLA then DBTM."""
    (parsed,) = parse_log_documents(await service.witsml_log(log_uid))
    order = [[c.mnemonic for c in parsed.curves].index(c.mnemonic) for c in COLUMNS]
    return [(ts_us, tuple(as_number(values[i]) for i in order)) for ts_us, values in parsed.rows]


async def sent_documents(
    service: CloudService, log_uid: str, assert_valid: Callable[[bytes], None]
) -> list[dict[str, Any]]:
    """Return every document the service received for a log, each checked against the XSD."""
    found: list[dict[str, Any]] = []
    after: int | None = 0
    async with httpx.AsyncClient(base_url=service.base_url, timeout=10) as client:
        while after is not None:
            response = await client.get("/v1/witsml/documents", params={"after_id": after})
            response.raise_for_status()
            page = response.json()
            for document in page["documents"]:
                body = base64.b64decode(document["body_base64"])
                if parse_log_documents(body)[0].header.log_uid == log_uid:
                    found.append({**document, "body": body})
            after = page["next_after_id"]
    for document in found:
        assert_valid(document["body"])
    return found


def stored_reading(seq: int, seconds: float) -> StoredReading:
    return StoredReading(seq, T0 + round(seconds * S), "rig_plc", "hookload", 1.0, "", Quality.GOOD)


# --- which readings are closed --------------------------------------------------------


@pytest.mark.parametrize(
    ("now_s", "timestamps_s", "closed"),
    [
        # Period [0, 1) ended 1 s ago at now = 2.0, exactly the settle time.
        (2.0, [0.1, 0.9, 1.0, 1.5], 2),
        (1.999, [0.1, 0.9, 1.0], 0),
        # The prefix ends at the first open reading, even if a later one is closed.
        (2.5, [0.5, 1.2, 0.7], 1),
        (100.0, [0.5, 1.2, 0.7], 3),
        # More than 10 minutes ahead of the clock counts as closed, and less does not.
        (2.0, [0.5, 2.0 + 601, 0.8], 3),
        (2.0, [0.5, 2.0 + 599, 0.8], 1),
    ],
)
def test_closed_prefix(now_s: float, timestamps_s: list[float], closed: int) -> None:
    """A reading is closed once its 1 s row period ended 1 s (the settle time) ago."""
    readings = [stored_reading(i + 1, t) for i, t in enumerate(timestamps_s)]
    result = closed_prefix(readings, T0_S + now_s, period=1.0, settle=1.0)
    assert [r.seq for r in result] == list(range(1, closed + 1))


# --- rows ----------------------------------------------------------------------------


async def test_rows_equal_last_readings(
    cloud: CloudService,
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    assert_witsml_valid: Callable[[bytes], None],
) -> None:
    """Two channels at different rates become one row per second with each channel's last value."""
    readings = [hookload(T0 + i * 250 * MS, 200.0 + i * 0.5) for i in range(12)]
    readings += [bit_depth(T0 + j * S + 400 * MS, 1500.25 + j) for j in range(3)]
    readings += [
        unmapped(T0 + 100 * MS, 7.0),
        # The same channel name from another source is not the mapped edr/bit_depth.
        Reading(T0 + 900 * MS, "rig_plc", "bit_depth", 9999.0, "m"),
        # Bad and non-finite readings never give a value.
        bit_depth(T0 + 2900 * MS, None, Quality.BAD),
        # Seconds 3 and 4 hold only an unmapped reading, so they get no row.
        unmapped(T0 + 3500 * MS, 8.0),
        hookload(T0 + 5100 * MS, 210.0, Quality.UNCERTAIN),
        bit_depth(T0 + 5500 * MS, math.nan),
    ]
    await buffer.append(sorted(readings, key=lambda r: r.ts_us))
    sink = make_sink(cloud, log_uid, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, buffer.last_seq)

    assert await stored_rows(cloud, log_uid) == [
        (T0, (201.5, 1500.25)),
        (T0 + 1 * S, (203.5, 1501.25)),
        (T0 + 2 * S, (205.5, 1502.25)),
        (T0 + 5 * S, (210.0, None)),
    ]
    assert await buffer.cursor("witsml") == buffer.last_seq == len(readings)
    assert sink.rows_uploaded == 4
    assert sink.documents_uploaded == 1
    assert sink.rejected_rows == 0
    (document,) = await sent_documents(cloud, log_uid, assert_witsml_valid)
    assert document["idempotency_key"] == f"edge-{log_uid}:witsml:{log_uid}:1-{len(readings)}"
    assert document["device_id"] == f"edge-{log_uid}"


async def test_unmapped_readings_need_no_request(
    cloud: CloudService, log_uid: str, buffer: Buffer, device_key: ec.EllipticCurvePrivateKey
) -> None:
    """Readings of unmapped channels only move the cursor, without a request."""
    await buffer.append([unmapped(T0 + i * S, float(i)) for i in range(5)])
    sink = make_sink(cloud, log_uid, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, 5)

    assert sink.requests == 0
    assert sink.documents_uploaded == 0


async def test_open_period_waits_for_settle(
    cloud: CloudService,
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    assert_witsml_valid: Callable[[bytes], None],
) -> None:
    """A row period is uploaded only once it ended `settle` ago by the sink's clock."""
    now = [T0_S + 2.0]
    await buffer.append(steady_readings(4))
    sink = make_sink(cloud, log_uid, buffer, device_key, clock=lambda: now[0])
    async with running(sink):
        # Second 0 ended exactly 1 s ago; second 1 is still within the settle time.
        await wait_for_cursor(buffer, 5)
        await asyncio.sleep(0.5)  # about ten more passes with the same clock
        assert await stored_rows(cloud, log_uid) == steady_rows(1)
        assert await buffer.cursor("witsml") == 5
        assert sink.documents_uploaded == 1

        now[0] = T0_S + 3.0
        await wait_for_cursor(buffer, 10)
        await asyncio.sleep(0.5)
        assert await stored_rows(cloud, log_uid) == steady_rows(2)
        assert await buffer.cursor("witsml") == 10

        now[0] = T0_S + 100.0
        await wait_for_cursor(buffer, buffer.last_seq)

    assert await stored_rows(cloud, log_uid) == steady_rows(4)
    documents = await sent_documents(cloud, log_uid, assert_witsml_valid)
    assert [len(parse_log_documents(d["body"])[0].rows) for d in documents] == [1, 1, 2]


async def test_document_split_at_max_rows(
    cloud: CloudService,
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    assert_witsml_valid: Callable[[bytes], None],
) -> None:
    """Five rows with max_rows = 2 go in three documents of 2, 2 and 1 rows."""
    await buffer.append(steady_readings(5))
    sink = make_sink(cloud, log_uid, buffer, device_key, max_rows=2)
    async with running(sink):
        await wait_for_cursor(buffer, buffer.last_seq)

    assert await stored_rows(cloud, log_uid) == steady_rows(5)
    documents = await sent_documents(cloud, log_uid, assert_witsml_valid)
    rows = [parse_log_documents(d["body"])[0].rows for d in documents]
    assert [[ts for ts, _ in part] for part in rows] == [
        [T0, T0 + S],
        [T0 + 2 * S, T0 + 3 * S],
        [T0 + 4 * S],
    ]
    assert sink.documents_uploaded == 3
    # Seqs 1-5 are second 0 and seqs 6-10 second 1, and so on.
    assert [d["idempotency_key"].rsplit(":", 1)[1] for d in documents] == [
        "1-10",
        "11-20",
        "21-25",
    ]


# --- rejections -------------------------------------------------------------------------


async def test_rejected_row_quarantined(
    cloud: CloudService,
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    assert_witsml_valid: Callable[[bytes], None],
    debug_logs: list[EventDict],
) -> None:
    """A row the service rejects with 422 has its readings quarantined; every other row arrives."""
    await add_fault(cloud, reject_time="2026-01-01T00:00:02Z")
    readings = steady_readings(6)
    readings.append(unmapped(T0 + 2 * S + 600 * MS, 1.0))
    readings.sort(key=lambda r: r.ts_us)
    # The bit depth of second 2 arrives last, after the readings of seconds 3 to 5.
    late = readings.index(bit_depth(T0 + 2 * S + 400 * MS, 1502.0))
    readings.append(readings.pop(late))
    await buffer.append(readings)
    sink = make_sink(cloud, log_uid, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, buffer.last_seq)

    expected = steady_rows(6)
    del expected[2]
    assert await stored_rows(cloud, log_uid) == expected
    assert sink.rejected_rows == 1
    # The four hook loads and the bit depth of second 2; the unmapped reading is not sent.
    assert await buffer.quarantined_count("witsml") == 5
    stats = await buffer.stats()
    assert {(q.sink, q.status) for q in stats.quarantine_newest} == {("witsml", 422)}
    assert sorted(q.channel for q in stats.quarantine_newest) == ["bit_depth"] + ["hookload"] * 4
    assert {q.ts_us // S for q in stats.quarantine_newest} == {T0 // S + 2}
    assert max(q.seq for q in stats.quarantine_newest) == buffer.last_seq
    assert await buffer.cursor("witsml") == buffer.last_seq
    (logged,) = [e for e in debug_logs if e["event"] == "witsml_row_quarantined"]
    assert logged["log_level"] == "error"
    assert logged["row_time"] == "2026-01-01T00:00:02Z"
    assert logged["status"] == 422
    await sent_documents(cloud, log_uid, assert_witsml_valid)


async def test_oversized_document_split(
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    assert_witsml_valid: Callable[[bytes], None],
) -> None:
    """A document over the service's body limit is split in halves until the parts fit."""
    small = CloudService(max_body_bytes=6000)
    small.register_key(public_pem(device_key))
    small.start()
    try:
        await buffer.append(steady_readings(300))
        sink = make_sink(small, log_uid, buffer, device_key)
        async with running(sink):
            await wait_for_cursor(buffer, buffer.last_seq)
        rows = await stored_rows(small, log_uid)
        documents = await sent_documents(small, log_uid, assert_witsml_valid)
    finally:
        small.close()

    assert rows == steady_rows(300)
    assert sink.rejected_rows == 0
    assert len(documents) > 2
    assert sink.requests > len(documents)
    assert sum(len(parse_log_documents(d["body"])[0].rows) for d in documents) == 300


# --- responses that mean "later" ----------------------------------------------------


async def test_unavailable_retried(
    cloud: CloudService,
    log_uid: str,
    buffer: Buffer,
    device_key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
) -> None:
    """Two 503 responses are retried with backoff, logged once as a warning, then recovered."""
    await add_fault(cloud, status=503, count=2, route="witsml")
    await buffer.append(steady_readings(3))
    sink = make_sink(cloud, log_uid, buffer, device_key)
    async with running(sink):
        await wait_for_cursor(buffer, buffer.last_seq)

    assert sink.requests == 3
    assert await stored_rows(cloud, log_uid) == steady_rows(3)
    failures = [e for e in debug_logs if e["event"] == "witsml_upload_failed"]
    assert [e["log_level"] for e in failures] == ["warning", "debug"]
    assert failures[0]["status"] == 503
    assert failures[0]["first_row"] == "2026-01-01T00:00:00Z"
    recovered = [e for e in debug_logs if e["event"] == "witsml_upload_recovered"]
    assert len(recovered) == 1
    uploaded = [e for e in debug_logs if e["event"] == "witsml_document_uploaded"]
    assert [(e["log_level"], e["rows"], e["new_rows"]) for e in uploaded] == [("debug", 3, 3)]


async def test_log_conflict_held_not_quarantined(
    cloud: CloudService,
    log_uid: str,
    tmp_path: Path,
    device_key: ec.EllipticCurvePrivateKey,
    debug_logs: list[EventDict],
) -> None:
    """A unit that differs from the stored log keeps the readings and retries; nothing is lost."""
    async with Buffer(tmp_path / "first", ["witsml"]) as first:
        await first.append(steady_readings(2))
        sink = make_sink(cloud, log_uid, first, device_key)
        async with running(sink):
            await wait_for_cursor(first, first.last_seq)

    changed = (dataclasses.replace(COLUMNS[0], unit="kN"), COLUMNS[1])
    async with Buffer(tmp_path / "second", ["witsml"]) as second:
        await second.append(steady_readings(4))
        conflicting = make_sink(cloud, log_uid, second, device_key, columns=changed)
        async with running(conflicting):
            await wait_until(lambda: _requests_at_least(conflicting, 3))
        assert await second.cursor("witsml") == 0
        assert await second.quarantined_count("witsml") == 0

    assert conflicting.rejected_rows == 0
    conflicts = [e for e in debug_logs if e["event"] == "witsml_log_conflict"]
    assert len(conflicts) == 1
    assert conflicts[0]["log_level"] == "error"
    assert "kN" in conflicts[0]["reason"]
    assert await stored_rows(cloud, log_uid) == steady_rows(2)


async def _requests_at_least(sink: WitsmlSink, count: int) -> bool:
    return sink.requests >= count
