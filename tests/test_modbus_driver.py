"""ModbusDriver over Modbus TCP against a real pymodbus server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
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
from drivers.modbus import ModbusDriver, poll_phases
from drivers.modbus_bus import BusRegistry, ModbusBus
from drivers.modbus_decode import encode_value, engineering_value
from drivers.modbus_plan import plan_requests
from tests.peers import Collector, ModbusPeer, free_port, running, sim_device

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


@pytest.fixture
async def device() -> AsyncIterator[Device]:
    """A running test device on a free loopback port."""
    dev = Device(free_port())
    await dev.start()
    try:
        yield dev
    finally:
        await dev.stop()


def fast_bus(source: ModbusSource) -> ModbusBus:
    """A bus for the source that retries a failed connect after 50 to 100 ms."""
    return ModbusBus(source.endpoint, reconnect_delay_min=0.05, reconnect_delay_max=0.1)


def make_source(port: int, points: list[dict[str, Any]], **extra: Any) -> ModbusSource:
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
        expected[point.channel] = engineering_value(raw, point.type, point.scale, point.offset)
    return expected


async def test_mixed_points_decode(device: Device) -> None:
    """50 points of mixed types and orders read back exactly the values the server holds."""
    points = mixed_points()
    expected = await load_points(device, points)
    driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points))
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


async def test_undecodable_response_marks_request_bad(
    device: Device, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A response with a register value over 65535 makes its request's points bad, not the poll."""
    points = [
        {"channel": "spm", "address": 3, "type": "uint16"},
        {"channel": "hook", "address": 150, "type": "uint16"},
    ]
    await device.write("holding", 3, [120])
    await device.write("holding", 150, [7])
    real_read = ModbusBus.read

    async def read(self: ModbusBus, unit_id: int, table: str, address: int, *args: Any) -> Any:
        data = await real_read(self, unit_id, table, address, *args)
        return [70000] if address == 3 else data

    monkeypatch.setattr(ModbusBus, "read", read)
    driver = ModbusDriver(make_source(device.port, points))
    emit = Collector()
    with capture_logs() as logs:
        async with running(driver, emit):
            await emit.wait_polls(3)

    first, *later = [{r.channel: (r.value, r.quality) for r in batch} for _, batch in emit.polls]
    assert first == {"spm": (None, Quality.BAD), "hook": (7.0, Quality.GOOD)}
    assert all(poll == {"hook": (7.0, Quality.GOOD)} for poll in later)
    assert driver.counters.invalid_responses >= 3
    failed = [e for e in logs if e["event"] == "modbus_read_failed"]
    assert [e["log_level"] for e in failed if e["log_level"] == "warning"] == ["warning"]
    assert "70000" in failed[0]["error"]


async def test_server_restart_resumes(device: Device) -> None:
    """A stopped server gives one bad reading per point; a restart brings good readings back."""
    points = mixed_points()[:6]
    expected = await load_points(device, points)
    source = make_source(device.port, points)
    driver = ModbusDriver(source, fast_bus(source))
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
    driver = ModbusDriver(source, fast_bus(source))
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
    driver = ModbusDriver(source, fast_bus(source))
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
    driver = ModbusDriver(make_source(device.port, points))
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(1)
        await asyncio.sleep(0.35)

    readings = emit.readings()
    assert len(readings) == 1
    assert readings[0].quality is Quality.BAD


async def test_null_value_counted(device: Device) -> None:
    """A raw value equal to null_value gives no reading and is counted for its channel."""
    points = [
        {"channel": "depth", "address": 30, "type": "int16", "null_value": -9999},
        {"channel": "spm", "address": 31, "type": "uint16"},
    ]
    await device.write("holding", 30, [*encode_value(-9999, "int16", "big", "big"), 88])
    driver = ModbusDriver(make_source(device.port, points))
    emit = Collector()

    with capture_logs() as logs:
        async with running(driver, emit):
            await emit.wait_polls(3)
            nulls_before_value = driver.counters.null_values["depth"]
            await device.write("holding", 30, [1234])
            await emit.wait_for(lambda polls: "depth" in {r.channel for r in polls[-1][1]})

    depth = [r for r in emit.readings() if r.channel == "depth"]
    assert nulls_before_value >= 3
    assert [(r.value, r.quality) for r in depth[:1]] == [(1234.0, Quality.GOOD)]
    assert len([r for r in emit.readings() if r.channel == "spm"]) >= 4
    null_logs = [e for e in logs if e["event"] == "modbus_null_value"]
    assert {e["log_level"] for e in null_logs} == {"debug"}
    assert null_logs[0]["channel"] == "depth"


async def test_schedule_does_not_drift(device: Device) -> None:
    """20 polls at 100 ms take 2 s even when each poll's work takes 30 ms."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    driver = ModbusDriver(make_source(device.port, points))
    emit = Collector(delay=0.03)

    async with running(driver, emit):
        await emit.wait_polls(21)

    elapsed = emit.polls[20][0] - emit.polls[0][0]
    assert 1.95 <= elapsed <= 2.1


async def test_phase_offsets_the_poll_grid(device: Device) -> None:
    """After the first poll, a source with phase 0.25 polls a quarter interval off the grid."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    source = make_source(device.port, points, poll_interval="200ms")
    driver = ModbusDriver(source, phase=0.25)
    emit = Collector()

    async with running(driver, emit):
        await emit.wait_polls(6)

    # Each poll is emitted a little after its tick, never before it.
    offsets = [(at - 0.05) % 0.2 for at, _ in emit.polls[1:6]]
    assert all(offset < 0.04 for offset in offsets), offsets


def test_poll_phases_spread_each_interval() -> None:
    """Sources sharing an interval get evenly spaced phases in name order; others get 0."""
    sources = [
        make_source(
            1,
            [{"channel": "spm", "address": 3, "type": "uint16"}],
            name=name,
            poll_interval=interval,
        )
        for name, interval in [("c", "1s"), ("a", "1s"), ("b", "1s"), ("d", "1s"), ("e", "5s")]
    ]
    assert poll_phases(sources) == {"a": 0.0, "b": 0.25, "c": 0.5, "d": 0.75, "e": 0.0}


@pytest.mark.parametrize("phase", [-0.1, 1.0, 1.5])
def test_phase_out_of_range_rejected(phase: float) -> None:
    """A phase outside 0 up to 1 raises ValueError naming the value."""
    source = make_source(1, [{"channel": "spm", "address": 3, "type": "uint16"}])
    with pytest.raises(ValueError, match=f"phase is {phase}"):
        ModbusDriver(source, phase=phase)


async def test_overrun_skips_ticks(device: Device) -> None:
    """A poll longer than the interval skips the missed ticks and warns once."""
    points = [{"channel": "spm", "address": 3, "type": "uint16"}]
    with capture_logs() as logs:
        driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points))
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
    driver = ModbusDriver(make_source(device.port, points, timeout="5s"))
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


def run_of_points(
    unit_id: int, table: str, type_name: str, addresses: range, **extra: Any
) -> list[dict[str, Any]]:
    """One point of the type at each address, named after unit, table and address."""
    return [
        {
            "channel": f"u{unit_id}_{table}_{address}",
            "table": table,
            "address": address,
            "type": type_name,
            **extra,
        }
        for address in addresses
    ]


# Three units of 100 points each, with gaps. The comments give the fewest
# reads that can cover each table under the source's limits.
GAPPED_SOURCES: dict[int, dict[str, Any]] = {
    1: {
        "points": [
            # 0..59 and 100..139: the gap of 40 is not read (max_gap 0), so 2 reads.
            *run_of_points(1, "holding", "uint16", range(0, 60)),
            *run_of_points(1, "holding", "float32", range(100, 140, 2), order="CDAB"),
            # 0..9 and 15..24: a gap of 5, so 2 reads.
            *run_of_points(1, "input", "int16", range(0, 10)),
            *run_of_points(1, "input", "int16", range(15, 25)),
        ],
    },
    2: {
        "max_gap": 5,
        "points": [
            # 0..99 and 103..127 may merge across the gap of 3, but 128
            # registers exceed the 125 one read returns, so 2 reads.
            *run_of_points(2, "holding", "uint32", range(0, 100, 2)),
            *run_of_points(2, "holding", "int16", range(103, 128)),
            # 25 coils: 1 read.
            *run_of_points(2, "coil", "bool", range(0, 25)),
        ],
    },
    3: {
        "max_gap": 1,
        "max_request_registers": 20,
        "points": [
            # Every other register of 0..98: a read of 20 registers covers at most 10 of
            # these points, so 5 reads.
            *run_of_points(3, "holding", "int16", range(0, 100, 2), scale=0.5),
            # 40 float32 in 0..79: 80 registers in reads of 20, so 4 reads.
            *run_of_points(3, "input", "float32", range(0, 80, 2)),
            # 10 discrete inputs: 1 read.
            *run_of_points(3, "discrete", "bool", range(0, 10)),
        ],
    },
}
FEWEST_READS = {
    (1, 3): 2,
    (1, 4): 2,
    (2, 3): 2,
    (2, 1): 1,
    (3, 3): 5,
    (3, 4): 4,
    (3, 2): 1,
}
"""Reads of one poll by (unit id, function code): 1 coil, 2 discrete, 3 holding, 4 input."""


def gapped_value(point: ModbusPoint, index: int) -> float:
    """A raw value for the point that fits its type and differs from its neighbours'."""
    if point.type == "bool":
        return float(index % 3 == 0)
    if point.type == "int16":
        return -(index + 1) * 7
    if point.type == "float32":
        return index * 1.25 - 40
    return 1000 * index + 17


async def load_gapped(peer: ModbusPeer, sources: list[ModbusSource]) -> dict[str, float]:
    """Write every point's raw value to the server; return the expected reading per channel."""
    expected: dict[str, float] = {}
    for source in sources:
        for index, point in enumerate(source.points):
            raw = gapped_value(point, index)
            if point.is_bits:
                await peer.write(source.unit_id, point.table, point.address, [bool(raw)])
            else:
                words = encode_value(raw, point.type, point.word_order, point.byte_order)
                await peer.write(source.unit_id, point.table, point.address, words)
            expected[point.channel] = engineering_value(raw, point.type, point.scale, point.offset)
    return expected


async def test_gapped_points_fewest_reads() -> None:
    """300 points over 3 units with gaps take the fewest reads per poll, and all values match."""
    peer = ModbusPeer([sim_device(unit_id) for unit_id in GAPPED_SOURCES], tcp_port=free_port())
    await peer.start()
    sources = [
        make_source(
            peer.tcp_port,
            keys["points"],
            name=f"unit{unit_id}",
            unit_id=unit_id,
            poll_interval="10s",
            **{key: value for key, value in keys.items() if key != "points"},
        )
        for unit_id, keys in GAPPED_SOURCES.items()
    ]
    try:
        expected = await load_gapped(peer, sources)
        buses = BusRegistry()
        drivers = [ModbusDriver(source, buses.bus_for(source.endpoint)) for source in sources]
        collectors = [Collector() for _ in drivers]
        async with AsyncExitStack() as stack:
            for driver, emit in zip(drivers, collectors, strict=True):
                await stack.enter_async_context(running(driver, emit))
            for emit in collectors:
                await emit.wait_polls(1)
            reads = dict(peer.requests)
    finally:
        await peer.stop()

    assert len(expected) == 300
    assert reads == FEWEST_READS
    assert sum(len(driver.requests) for driver in drivers) == sum(FEWEST_READS.values())
    values = {r.channel: r.value for emit in collectors for r in emit.polls[0][1]}
    assert values == expected
    qualities = {r.quality for emit in collectors for r in emit.polls[0][1]}
    assert qualities == {Quality.GOOD}


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
