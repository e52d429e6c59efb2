"""ModbusTcpDriver against a real pymodbus server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from itertools import pairwise
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from structlog.testing import capture_logs

from buffer.reading import Quality, Reading
from config.model import ModbusPoint, ModbusSource
from drivers.modbus import ModbusTcpDriver
from drivers.modbus_decode import apply_scale, encode_value
from drivers.modbus_plan import plan_requests
from tests.peers import free_port

HOLDING_BASE, HOLDING_SIZE = 0, 200
INPUT_BASE, INPUT_SIZE = 1000, 50
ORDERS = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
TYPES = ["int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64"]
FUNCTION_CODES = {"holding": 3, "input": 4}


class Device:
    """A pymodbus server with holding 0..199 and input 1000..1049 that tests stop, mute or fail."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.requests: Counter[int] = Counter()
        self.connections: list[bool] = []
        self.disconnected = asyncio.Event()
        self.mute = False
        self.fail_with: ExcCodes | None = None
        self.images = {"holding": [0] * HOLDING_SIZE, "input": [0] * INPUT_SIZE}
        self.bases = {"holding": HOLDING_BASE, "input": INPUT_BASE}
        self.server: ModbusTcpServer | None = None

    async def start(self) -> None:
        bits = [SimData(0, values=[False] * 16, datatype=DataType.BITS)]
        holding = [SimData(HOLDING_BASE, count=HOLDING_SIZE, datatype=DataType.REGISTERS)]
        inputs = [SimData(INPUT_BASE, count=INPUT_SIZE, datatype=DataType.REGISTERS)]
        device = SimDevice(id=1, simdata=(bits, list(bits), holding, inputs), action=self._action)
        self.server = ModbusTcpServer(
            device,
            address=("127.0.0.1", self.port),
            trace_pdu=self._trace_pdu,
            trace_packet=self._trace_packet,
            trace_connect=self._trace_connect,
        )
        await self.server.serve_forever(background=True)
        for table in self.images:
            await self._push(table)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None

    async def write(self, table: str, address: int, words: Sequence[int]) -> None:
        start = address - self.bases[table]
        self.images[table][start : start + len(words)] = list(words)
        await self._push(table)

    async def _push(self, table: str) -> None:
        if self.server is not None:
            code = FUNCTION_CODES[table]
            await self.server.async_setValues(1, code, self.bases[table], self.images[table])

    async def _action(self, function_code: int, *args: Any) -> ExcCodes | None:
        is_read = args[-1] is None
        return self.fail_with if is_read else None

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[pdu.function_code] += 1
        return pdu

    def _trace_connect(self, connected: bool) -> None:
        self.connections.append(connected)
        if not connected:
            self.disconnected.set()

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        # A muted device drops its responses, like a PLC that stopped responding.
        return b"" if sending and self.mute else data


class Collector:
    """The driver's emit callable: records each poll's readings and when they arrived."""

    def __init__(self, delay: float = 0.0) -> None:
        self.polls: list[tuple[float, list[Reading]]] = []
        self.delay = delay
        self._changed = asyncio.Condition()

    async def __call__(self, readings: Sequence[Reading]) -> None:
        async with self._changed:
            self.polls.append((asyncio.get_running_loop().time(), list(readings)))
            self._changed.notify_all()
        if self.delay:
            await asyncio.sleep(self.delay)

    async def wait_for(
        self, predicate: Callable[[list[tuple[float, list[Reading]]]], bool], within: float = 5
    ) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: predicate(self.polls))

    async def wait_polls(self, count: int, within: float = 5) -> None:
        await self.wait_for(lambda polls: len(polls) >= count, within)

    def readings(self) -> list[Reading]:
        return [reading for _, batch in self.polls for reading in batch]


@pytest.fixture
async def device() -> AsyncIterator[Device]:
    """A running test device on a free loopback port."""
    dev = Device(free_port())
    await dev.start()
    try:
        yield dev
    finally:
        await dev.stop()


@asynccontextmanager
async def running(driver: ModbusTcpDriver, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
    """Run the driver as a task, cancel it on exit and re-raise any exception it raised."""
    task = asyncio.create_task(driver.run(emit))
    try:
        yield task
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.done(), "driver still running 5 s after cancel()"
        if not task.cancelled():
            task.result()


def make_source(port: int, points: list[dict[str, Any]], **extra: str) -> ModbusSource:
    fields: dict[str, Any] = {
        "name": "rig",
        "url": f"tcp://127.0.0.1:{port}",
        "poll_interval": "100ms",
        "timeout": "200ms",
        "points": points,
    }
    fields.update(extra)
    return ModbusSource.model_validate(fields)


def sample_value(type_name: str, index: int) -> float:
    """A value for the type that is negative where the type allows and exact in floats."""
    sign = -1 if index % 2 else 1
    return {
        "int16": -(index * 100 + 1),
        "uint16": 60000 - index,
        "int32": -123456 * (index + 1),
        "uint32": 3_000_000_000 + index,
        "int64": -(2**40) - index,
        "uint64": 2**63 + index,
        "float32": sign * (1000.25 + index),
        "float64": sign * 98765.4321 * (index + 1),
    }[type_name]


def mixed_points() -> list[dict[str, Any]]:
    """40 contiguous holding points and 10 contiguous input points of every type and order."""
    points: list[dict[str, Any]] = []
    next_address = {"holding": HOLDING_BASE, "input": INPUT_BASE}
    for index in range(50):
        table = "holding" if index < 40 else "input"
        type_name = TYPES[index % len(TYPES)]
        word_order, byte_order = ORDERS[(index // len(TYPES)) % len(ORDERS)]
        scaled = index % 5 == 0
        point = {
            "channel": f"p{index:02d}",
            "table": table,
            "address": next_address[table],
            "type": type_name,
            "word_order": word_order,
            "byte_order": byte_order,
            "scale": 0.1 if scaled else 1.0,
            "offset": -5.0 if scaled else 0.0,
        }
        next_address[table] += ModbusPoint.model_validate(point).registers
        points.append(point)
    return points


async def load_points(dev: Device, points: list[dict[str, Any]]) -> dict[str, float]:
    """Write each point's sample value to the device; return the expected engineering values."""
    expected: dict[str, float] = {}
    for index, entry in enumerate(points):
        point = ModbusPoint.model_validate(entry)
        raw = sample_value(point.type, index)
        words = encode_value(raw, point.type, point.word_order, point.byte_order)
        await dev.write(point.table, point.address, words)
        expected[point.channel] = apply_scale(raw, point.scale, point.offset)
    return expected


async def test_mixed_points_decode(device: Device) -> None:
    """50 points of mixed types and orders read back exactly the values the server holds."""
    points = mixed_points()
    expected = await load_points(device, points)
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(3)

    for _, batch in emit.polls[:3]:
        assert {r.channel: r.value for r in batch} == expected
        assert {r.quality for r in batch} == {Quality.GOOD}
        assert {r.source for r in batch} == {"rig"}


async def test_contiguous_points_share_requests(device: Device) -> None:
    """Contiguous points are read with one request per table per poll."""
    points = mixed_points()
    await load_points(device, points)
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(3)
        polls = len(emit.polls)
        requests = dict(device.requests)

    assert len(driver.requests) == 2
    assert requests == {3: polls, 4: polls}


async def test_readings_timestamped_per_request(device: Device) -> None:
    """All readings of one request share the timestamp taken when its response arrived."""
    points = mixed_points()
    await load_points(device, points)
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(1)

    batch = emit.polls[0][1]
    holding_ts = {r.ts_us for r in batch if int(r.channel[1:]) < 40}
    input_ts = {r.ts_us for r in batch if int(r.channel[1:]) >= 40}
    assert len(holding_ts) == 1
    assert len(input_ts) == 1
    assert min(input_ts) >= max(holding_ts)


async def test_missing_range_one_bad_reading(device: Device) -> None:
    """A point the server does not map gives one bad reading, then none, while others read."""
    points = [
        {"channel": "good", "address": 10, "type": "uint16"},
        {"channel": "missing", "address": 500, "type": "uint16", "unit": "psi"},
    ]
    await device.write("holding", 10, [1234])
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    with capture_logs() as logs:
        async with running(driver, emit):
            await emit.wait_polls(5)

    missing = [r for r in emit.readings() if r.channel == "missing"]
    good = [r for r in emit.readings() if r.channel == "good"]
    assert missing == [Reading(missing[0].ts_us, "rig", "missing", None, "psi", Quality.BAD)]
    assert len(good) >= 5
    assert {r.value for r in good} == {1234.0}
    failures = [e for e in logs if e["event"] == "modbus_read_failed"]
    assert failures[0]["log_level"] == "warning"
    assert "exception code 2" in failures[0]["error"]
    assert {e["log_level"] for e in failures[1:]} == {"debug"}


async def test_exception_response_recovers(device: Device) -> None:
    """An exception response marks points bad once, and good readings return when it clears."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    await device.write("holding", 3, [120])
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    with capture_logs() as logs:
        async with running(driver, emit):
            await emit.wait_polls(2)
            device.fail_with = ExcCodes.DEVICE_BUSY
            await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.BAD)
            await asyncio.sleep(0.35)
            device.fail_with = None
            await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.GOOD)

    qualities = [r.quality for r in emit.readings()]
    first_bad = qualities.index(Quality.BAD)
    assert qualities.count(Quality.BAD) == 1
    assert qualities[first_bad + 1] is Quality.GOOD
    recovered = [e for e in logs if e["event"] == "modbus_read_recovered"]
    assert len(recovered) == 1
    assert recovered[0]["outage_s"] >= 0.3


async def test_server_restart_resumes(device: Device) -> None:
    """A stopped server gives one bad reading per point; a restart brings good readings back."""
    points = mixed_points()[:6]
    expected = await load_points(device, points)
    source = make_source(device.port, points)
    driver = ModbusTcpDriver(source, reconnect_delay_min=0.05, reconnect_delay_max=0.1)
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(2)
        await device.stop()
        await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.BAD)
        bad_at = len(emit.polls)
        await asyncio.sleep(0.5)
        silent_polls = len(emit.polls) - bad_at
        await device.start()
        await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.GOOD)

    bad = [r for r in emit.readings() if r.quality is Quality.BAD]
    assert sorted(r.channel for r in bad) == sorted(expected)
    assert {r.value for r in bad} == {None}
    assert silent_polls == 0
    assert {r.channel: r.value for r in emit.polls[-1][1]} == expected


async def test_silent_device_times_out(device: Device) -> None:
    """A device that stops responding marks points bad after the timeout, then recovers."""
    points = [{"channel": "hookload", "address": 0, "type": "float32"}]
    await device.write("holding", 0, encode_value(250.5, "float32", "big", "big"))
    source = make_source(device.port, points, timeout="100ms")
    driver = ModbusTcpDriver(source, reconnect_delay_min=0.05, reconnect_delay_max=0.1)
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(1)
        device.mute = True
        await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.BAD, within=3)
        await asyncio.sleep(0.5)
        device.mute = False
        await emit.wait_for(lambda polls: polls[-1][1][0].quality is Quality.GOOD, within=5)

    qualities = [r.quality for r in emit.readings()]
    assert qualities.count(Quality.BAD) == 1
    assert emit.polls[-1][1][0].value == 250.5


async def test_unreachable_at_start(device: Device) -> None:
    """With no server at start, every point gets one bad reading and the driver keeps trying."""
    await device.stop()
    points = mixed_points()[:3]
    source = make_source(device.port, points)
    driver = ModbusTcpDriver(source, reconnect_delay_min=0.05, reconnect_delay_max=0.1)
    emit = Collector()

    with capture_logs() as logs:
        async with running(driver, emit):
            await emit.wait_polls(1)
            await asyncio.sleep(0.5)
            await device.start()
            await emit.wait_polls(2)

    first = emit.polls[0][1]
    assert [r.quality for r in first] == [Quality.BAD] * 3
    assert emit.polls[1][1][0].quality is Quality.GOOD
    failed = [e for e in logs if e["event"] == "modbus_connect_failed"]
    assert failed[0]["log_level"] == "warning"
    assert {e["log_level"] for e in failed[1:]} == {"debug"}
    assert [e["event"] for e in logs].count("modbus_reconnected") == 1


async def test_nan_value_is_bad(device: Device) -> None:
    """A float register holding NaN gives one bad reading instead of a NaN value."""
    points = [{"channel": "torque", "address": 20, "type": "float32"}]
    await device.write("holding", 20, encode_value(math.nan, "float32", "big", "big"))
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(1)
        await asyncio.sleep(0.35)

    readings = emit.readings()
    assert len(readings) == 1
    assert readings[0].quality is Quality.BAD


async def test_schedule_does_not_drift(device: Device) -> None:
    """20 polls at 100 ms take 2 s even when each poll's work takes 30 ms."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector(delay=0.03)

    async with running(driver, emit):
        await emit.wait_polls(21)

    elapsed = emit.polls[20][0] - emit.polls[0][0]
    assert 1.95 <= elapsed <= 2.1


async def test_overrun_skips_ticks(device: Device) -> None:
    """A poll longer than the interval skips the missed ticks and warns once."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    with capture_logs() as logs:
        driver = ModbusTcpDriver(make_source(device.port, points))
        emit = Collector(delay=0.25)
        async with running(driver, emit):
            await emit.wait_polls(4)

    gaps = [later[0] - earlier[0] for earlier, later in pairwise(emit.polls)]
    assert all(0.29 <= gap <= 0.35 for gap in gaps)
    overruns = [e for e in logs if e["event"] == "modbus_poll_overrun"]
    assert overruns[0]["log_level"] == "warning"
    assert overruns[0]["skipped"] == 2
    assert {e["log_level"] for e in overruns[1:]} == {"debug"}


async def test_cancel_closes_connection(device: Device) -> None:
    """Cancelling run() closes the TCP connection to the device."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    driver = ModbusTcpDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(1)
    async with asyncio.timeout(2):
        await device.disconnected.wait()

    assert device.connections == [True, False]


async def test_cancel_swallowed_by_library(device: Device, monkeypatch: pytest.MonkeyPatch) -> None:
    """run() stops even when a client call swallows the CancelledError, as wait_for can on 3.11."""
    in_connect = asyncio.Event()
    swallowed: list[bool] = []

    async def swallowing_connect(self: AsyncModbusTcpClient) -> bool:
        in_connect.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed.append(True)
        return False

    monkeypatch.setattr(AsyncModbusTcpClient, "connect", swallowing_connect)
    await device.stop()
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    driver = ModbusTcpDriver(make_source(device.port, points, timeout="5s"))
    task = asyncio.create_task(driver.run(Collector()))
    async with asyncio.timeout(2):
        await in_connect.wait()

    task.cancel()
    await asyncio.wait({task}, timeout=2)
    stopped = task.done()
    if not stopped:
        task.cancel()
        await asyncio.wait({task}, timeout=2)

    assert swallowed
    assert stopped


def _points(*spans: tuple[str, int, str]) -> list[ModbusPoint]:
    return [
        ModbusPoint.model_validate(
            {"channel": f"c{i}", "table": table, "address": address, "type": type_name}
        )
        for i, (table, address, type_name) in enumerate(spans)
    ]


def test_plan_merges_adjacent_and_overlapping() -> None:
    """Adjacent and overlapping spans share one read that covers them exactly."""
    points = _points(("holding", 0, "float32"), ("holding", 2, "uint16"), ("holding", 1, "int16"))
    plan = plan_requests(points)
    assert [(r.table, r.address, r.count) for r in plan] == [("holding", 0, 3)]


def test_plan_splits_at_gaps_and_tables() -> None:
    """A gap between spans or a different table starts a new read."""
    points = _points(("holding", 0, "uint16"), ("holding", 2, "uint16"), ("input", 1, "uint16"))
    plan = plan_requests(points)
    spans = [(r.table, r.address, r.count) for r in plan]
    assert spans == [("holding", 0, 1), ("holding", 2, 1), ("input", 1, 1)]


def test_plan_respects_max_registers() -> None:
    """A contiguous run longer than 125 registers is split into reads of at most 125."""
    points = _points(*[("holding", address, "float64") for address in range(0, 400, 4)])
    plan = plan_requests(points)
    assert max(r.count for r in plan) <= 125
    assert sum(r.count for r in plan) == 400
    assert [r.address for r in plan] == [0, 124, 248, 372]
