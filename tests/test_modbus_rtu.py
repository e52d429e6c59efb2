"""ModbusDriver over RTU: three unit ids on one socat serial pair, served by a pymodbus server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from buffer.reading import Quality, Reading
from config.model import ModbusSource
from drivers.modbus import ModbusDriver
from drivers.modbus_bus import BusRegistry
from drivers.modbus_decode import encode_value
from tests.peers import Collector, ModbusPeer, SerialPair, running, sim_device

UNITS = (1, 2, 3)
REGISTERS = 100
"""Each simulated unit maps holding and input registers 0..99."""


def unit_points(unit_id: int) -> list[dict[str, Any]]:
    """Three points in three separate reads: holding 0, holding 10..11 and holding 20."""
    return [
        {"channel": f"u{unit_id}_count", "address": 0, "type": "uint16"},
        {"channel": f"u{unit_id}_flow", "address": 10, "type": "float32", "unit": "l/min"},
        {"channel": f"u{unit_id}_temp", "address": 20, "type": "int16", "scale": 0.1},
    ]


def expected_values(unit_id: int) -> dict[str, float]:
    return {
        f"u{unit_id}_count": 100.0 * unit_id + 1,
        f"u{unit_id}_flow": 12.5 * unit_id,
        f"u{unit_id}_temp": -2.5 * unit_id,
    }


async def load_values(peer: ModbusPeer) -> None:
    for unit_id in UNITS:
        values = expected_values(unit_id)
        await peer.write(unit_id, "holding", 0, [int(values[f"u{unit_id}_count"])])
        flow = encode_value(values[f"u{unit_id}_flow"], "float32", "big", "big")
        await peer.write(unit_id, "holding", 10, flow)
        temp = encode_value(-25 * unit_id, "int16", "big", "big")
        await peer.write(unit_id, "holding", 20, temp)


def make_source(port: Path, unit_id: int, **extra: Any) -> ModbusSource:
    fields: dict[str, Any] = {
        "name": f"unit{unit_id}",
        "url": f"rtu://{port}?baudrate=115200",
        "unit_id": unit_id,
        "poll_interval": "100ms",
        "timeout": "50ms",
        "frame_pause": "2ms",
        "points": unit_points(unit_id),
    }
    fields.update(extra)
    return ModbusSource.model_validate(fields)


def make_drivers(sources: list[ModbusSource]) -> list[ModbusDriver]:
    """One driver per source, sharing buses, with short device and reconnect backoffs."""
    buses = BusRegistry(reconnect_delay_min=0.05, reconnect_delay_max=0.2)
    return [
        ModbusDriver(source, buses.bus_for(source.endpoint), backoff_min=0.2, backoff_max=0.4)
        for source in sources
    ]


@pytest.fixture
def serial_pair(tmp_path: Path) -> Iterator[SerialPair]:
    """A socat pty pair at tmp_path/ttyA and tmp_path/ttyB."""
    pair = SerialPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
async def peer(serial_pair: SerialPair) -> AsyncIterator[ModbusPeer]:
    """An RTU server for units 1, 2 and 3 on ttyB, with known values loaded."""
    server = ModbusPeer(
        [sim_device(unit_id, registers=REGISTERS) for unit_id in UNITS],
        serial_port=serial_pair.b,
    )
    await server.start()
    await load_values(server)
    try:
        yield server
    finally:
        await server.stop()


async def run_all(
    stack: AsyncExitStack, drivers: list[ModbusDriver]
) -> tuple[list[Collector], list[asyncio.Task[None]]]:
    collectors = [Collector() for _ in drivers]
    tasks = [
        await stack.enter_async_context(running(driver, emit))
        for driver, emit in zip(drivers, collectors, strict=True)
    ]
    return collectors, tasks


def values_of(batch: list[Reading]) -> dict[str, float | None]:
    return {reading.channel: reading.value for reading in batch}


def has_bad(polls: list[tuple[float, list[Reading]]]) -> bool:
    """Whether the last poll emitted a bad reading."""
    return any(reading.quality is Quality.BAD for reading in polls[-1][1])


def all_good(polls: list[tuple[float, list[Reading]]]) -> bool:
    """Whether the last poll emitted only good readings."""
    return all(reading.quality is Quality.GOOD for reading in polls[-1][1])


def polls_per_second(peer: ModbusPeer, unit_id: int, start: float, end: float) -> float:
    """Return the unit's poll rate at the server: its first request of each poll, per second."""
    times = [t for t in peer.request_times(unit_id) if start <= t < end]
    return len(times) / len(unit_points(unit_id)) / (end - start)


async def test_three_units_share_port(serial_pair: SerialPair, peer: ModbusPeer) -> None:
    """Three unit ids on one serial port read their own values, one frame at a time."""
    sources = [make_source(serial_pair.a, unit_id, frame_pause="5ms") for unit_id in UNITS]
    drivers = make_drivers(sources)

    async with AsyncExitStack() as stack:
        collectors, _ = await run_all(stack, drivers)
        for emit in collectors:
            await emit.wait_polls(5)

    assert len({id(driver.bus) for driver in drivers}) == 1
    for unit_id, emit in zip(UNITS, collectors, strict=True):
        for _, batch in emit.polls[:5]:
            assert values_of(batch) == expected_values(unit_id)
    events = peer.events
    kinds = [event.kind for event in events]
    assert kinds[0] == "request"
    assert all(a != b for a, b in pairwise(kinds)), "a request overlapped"
    for request, response in zip(events[::2], events[1::2], strict=False):
        assert response.unit_id == request.unit_id
    quiet = [
        later.time - earlier.time
        for earlier, later in zip(events[1::2], events[2::2], strict=False)
    ]
    assert min(quiet) >= 0.0045


async def test_dead_unit_isolated(serial_pair: SerialPair, peer: ModbusPeer) -> None:
    """A silent unit gets one bad reading per point and backs off; the others keep their rate."""
    drivers = make_drivers([make_source(serial_pair.a, unit_id) for unit_id in UNITS])
    dead = drivers[2]
    window = 2.0

    async with AsyncExitStack() as stack:
        collectors, _ = await run_all(stack, drivers)
        await collectors[2].wait_polls(3)
        before_start = time.monotonic()
        await asyncio.sleep(window)
        before_end = time.monotonic()

        peer.muted.add(3)
        await collectors[2].wait_for(has_bad)
        bad_polls = len(collectors[2].polls)
        after_start = time.monotonic()
        await asyncio.sleep(window)
        after_end = time.monotonic()
        silent_polls = len(collectors[2].polls) - bad_polls
        timeouts = dead.counters.timeouts

        peer.muted.clear()
        await collectors[2].wait_for(all_good, within=3)

    for unit_id in (1, 2):
        before = polls_per_second(peer, unit_id, before_start, before_end)
        after = polls_per_second(peer, unit_id, after_start, after_end)
        assert 0.8 <= after / before <= 1.2, f"unit {unit_id}: {before:.1f}/s then {after:.1f}/s"
    dead_requests = len([t for t in peer.request_times(3) if after_start <= t < after_end])
    # A backoff of at least 0.2 s with one request per probe allows at most this many.
    assert 1 <= dead_requests <= window / 0.2 + 1
    bad = [r for r in collectors[2].readings() if r.quality is Quality.BAD]
    assert sorted(r.channel for r in bad) == sorted(expected_values(3))
    assert {r.value for r in bad} == {None}
    assert silent_polls == 0
    assert timeouts >= dead_requests
    assert values_of(collectors[2].polls[-1][1]) == expected_values(3)


async def test_serial_pair_recreated(serial_pair: SerialPair, peer: ModbusPeer) -> None:
    """When the serial port vanishes and comes back under its path, polling resumes by itself."""
    drivers = make_drivers([make_source(serial_pair.a, unit_id) for unit_id in (1, 2)])

    with capture_logs() as logs:
        async with AsyncExitStack() as stack:
            collectors, tasks = await run_all(stack, drivers)
            for emit in collectors:
                await emit.wait_polls(2)

            serial_pair.stop()
            await peer.stop()
            for emit in collectors:
                await emit.wait_for(has_bad)
            await asyncio.sleep(0.5)
            serial_pair.start()
            await peer.start()
            await load_values(peer)
            for emit in collectors:
                await emit.wait_for(all_good, within=5)
            still_running = [not task.done() for task in tasks]

    assert still_running == [True, True]
    for unit_id, emit in zip((1, 2), collectors, strict=True):
        bad = [r for r in emit.readings() if r.quality is Quality.BAD]
        assert sorted(r.channel for r in bad) == sorted(expected_values(unit_id))
        assert values_of(emit.polls[-1][1]) == expected_values(unit_id)
    events = [e["event"] for e in logs]
    assert events.count("modbus_connection_lost") == 1
    assert events.count("modbus_reconnected") == 1


async def test_exception_logged_once(serial_pair: SerialPair, peer: ModbusPeer) -> None:
    """An illegal-address response marks its points bad once and logs one warning."""
    points = [
        *unit_points(1),
        {"channel": "missing", "address": REGISTERS + 50, "type": "uint16"},
    ]
    drivers = make_drivers([make_source(serial_pair.a, 1, points=points)])

    with capture_logs() as logs:
        async with AsyncExitStack() as stack:
            (emit,), _ = await run_all(stack, drivers)
            await emit.wait_polls(8)

    missing = [r for r in emit.readings() if r.channel == "missing"]
    assert [(r.value, r.quality) for r in missing] == [(None, Quality.BAD)]
    good = [r for r in emit.readings() if r.channel == "u1_count"]
    assert len(good) >= 8
    assert {r.quality for r in good} == {Quality.GOOD}
    failures = [e for e in logs if e["event"] == "modbus_read_failed"]
    loud = [e for e in failures if e["log_level"] != "debug"]
    assert len(loud) == 1
    assert "exception code 2" in loud[0]["error"]
    assert len(failures) >= 7
    assert drivers[0].counters.exception_responses == len(failures)
