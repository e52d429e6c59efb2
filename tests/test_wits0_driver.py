"""Wits0Driver over real links: a socat pty pair, TCP to a device and TCP from a device."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from serial_asyncio_fast import open_serial_connection
from structlog.testing import capture_logs

from buffer.reading import Reading
from config.model import Wits0Source
from drivers.wits0 import (
    Wits0Counters,
    Wits0Driver,
    Wits0LinkError,
    device_time_us,
    open_link,
    packet_readings,
)
from drivers.wits0_parser import Wits0Packet, Wits0Parser, encode_packet
from tests.peers import Collector, SerialPair, WitsDevice, free_port, running

PACKETS = 1000
ITEMS = {
    "0108": {"channel": "bit_depth", "unit": "m"},
    "0110": {"channel": "hole_depth", "unit": "m"},
    "0121": {"channel": "standpipe_pressure", "unit": "kPa"},
}
UNITS = {"bit_depth": "m", "hole_depth": "m", "standpipe_pressure": "kPa", "wits_0150": ""}


def packet_items(index: int) -> list[tuple[str, str]]:
    """Return the items of test packet `index`: three mapped codes and one unmapped code."""
    return [
        ("0108", f"{1000 + index * 0.01:.2f}"),
        ("0110", f"{2000 + index:.2f}"),
        ("0121", f"{-index * 0.25:.2f}"),
        ("0150", str(index)),
    ]


def packet_bytes(index: int) -> bytes:
    return encode_packet(packet_items(index), source_tag="PASON/EDR")


def expected_values(index: int) -> dict[str, float]:
    channels = ("bit_depth", "hole_depth", "standpipe_pressure", "wits_0150")
    return {
        channel: float(text)
        for channel, (_, text) in zip(channels, packet_items(index), strict=True)
    }


def make_source(url: str, **extra: Any) -> Wits0Source:
    fields: dict[str, Any] = {"name": "edr", "url": url, "items": ITEMS, "silence_timeout": "5s"}
    fields.update(extra)
    return Wits0Source.model_validate(fields)


def make_driver(source: Wits0Source) -> Wits0Driver:
    return Wits0Driver(source, reconnect_delay_min=0.05, reconnect_delay_max=0.2)


def values_of(batch: list[Reading]) -> dict[str, float | None]:
    return {reading.channel: reading.value for reading in batch}


def assert_all_packets(emit: Collector, count: int) -> None:
    """Check one emit per packet, in order, with every value and unit of every packet."""
    batches = [batch for _, batch in emit.polls]
    assert len(batches) == count
    for index, batch in enumerate(batches):
        assert values_of(batch) == expected_values(index), f"packet {index}"
        assert {r.unit for r in batch} == {UNITS[r.channel] for r in batch}, f"packet {index}"
        assert len({r.ts_us for r in batch}) == 1, f"packet {index} has several timestamps"


async def wait_connected(driver: Wits0Driver, within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        await driver.connected.wait()


async def wait_until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.02)


async def connect_to(
    port: int, within: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a tcp-listen source, retrying until the driver listens."""
    async with asyncio.timeout(within):
        while True:
            try:
                return await asyncio.open_connection("127.0.0.1", port)
            except ConnectionRefusedError:
                await asyncio.sleep(0.02)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        async with asyncio.timeout(2):
            await writer.wait_closed()
    except (OSError, TimeoutError):
        writer.transport.abort()


@pytest.fixture
def serial_pair(tmp_path: Path) -> Iterator[SerialPair]:
    """A socat pty pair at tmp_path/ttyA (the driver's end) and tmp_path/ttyB (the device's)."""
    pair = SerialPair(tmp_path)
    pair.start()
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture
async def device() -> AsyncIterator[WitsDevice]:
    """A WITS device on a free loopback port that the driver connects to."""
    peer = WitsDevice()
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


async def test_serial_thousand_packets(serial_pair: SerialPair) -> None:
    """1,000 packets written to a pty at 9600 baud arrive as 1,000 batches with every value."""
    driver = make_driver(make_source(f"serial://{serial_pair.a}?baudrate=9600&parity=N"))
    emit = Collector()
    async with running(driver, emit):
        await wait_connected(driver)
        async with asyncio.timeout(5):
            _, writer = await open_serial_connection(url=str(serial_pair.b), baudrate=9600)
        try:
            writer.write(b"".join(packet_bytes(index) for index in range(PACKETS)))
            async with asyncio.timeout(15):
                await writer.drain()
            await emit.wait_polls(PACKETS, within=15)
        finally:
            await close_writer(writer)

    assert_all_packets(emit, PACKETS)
    assert driver.counters.packets == PACKETS
    assert driver.source_tag == "PASON/EDR"


async def test_tcp_connect_thousand_packets(device: WitsDevice) -> None:
    """Over tcp:// (the agent connects), 1,000 packets arrive with every value."""
    driver = make_driver(make_source(device.url))
    emit = Collector()
    async with running(driver, emit):
        await device.wait_connections(1)
        for start in range(0, PACKETS, 100):
            await device.write(b"".join(packet_bytes(i) for i in range(start, start + 100)))
        await emit.wait_polls(PACKETS, within=15)

    assert_all_packets(emit, PACKETS)
    assert driver.counters.bytes_received == sum(len(packet_bytes(i)) for i in range(PACKETS))


async def test_tcp_listen_thousand_packets() -> None:
    """Over tcp-listen:// (the device connects), 1,000 packets arrive with every value."""
    port = free_port()
    driver = make_driver(make_source(f"tcp-listen://127.0.0.1:{port}"))
    emit = Collector()
    async with running(driver, emit):
        _, writer = await connect_to(port)
        try:
            for index in range(PACKETS):
                writer.write(packet_bytes(index))
            async with asyncio.timeout(10):
                await writer.drain()
            await emit.wait_polls(PACKETS, within=15)
        finally:
            await close_writer(writer)

    assert_all_packets(emit, PACKETS)


async def test_listen_new_connection_replaces() -> None:
    """A second device connection replaces the first: the first is closed, the second read."""
    port = free_port()
    driver = make_driver(make_source(f"tcp-listen://127.0.0.1:{port}"))
    emit = Collector()
    with capture_logs() as logs:
        async with running(driver, emit):
            first_reader, first = await connect_to(port)
            first.write(packet_bytes(0))
            await emit.wait_polls(1)
            _, second = await connect_to(port)
            async with asyncio.timeout(5):
                closed = await first_reader.read(100)
            second.write(packet_bytes(1))
            await emit.wait_polls(2)
            await close_writer(first)
            await close_writer(second)

    assert closed == b""
    assert_all_packets(emit, 2)
    assert driver.counters.reconnects == 1
    events = [entry["event"] for entry in logs]
    assert events.count("wits0_connection_replaced") == 1
    assert "wits0_link_lost" not in events


async def test_transmit_wakes_edr() -> None:
    """With transmit on, an EDR that sends only after it receives a valid packet delivers data."""
    edr = WitsDevice(handshake=True, packets=[packet_bytes(i) for i in range(5)])
    await edr.start()
    try:
        source = make_source(edr.url, transmit=True, transmit_interval="200ms")
        driver = make_driver(source)
        emit = Collector()
        async with running(driver, emit):
            await emit.wait_polls(5)
            await asyncio.sleep(0.5)
    finally:
        await edr.stop()

    assert_all_packets(emit, 5)
    assert [item.code for item in edr.received[0].items] == ["0111"]
    assert edr.received[0].items[0].value == -9999
    assert len(edr.received) >= 2, "the keep-alive was not repeated every transmit_interval"
    assert driver.counters.transmitted_packets >= len(edr.received)


async def test_no_transmit_edr_silent() -> None:
    """With transmit off, the same EDR sends nothing and no reading arrives."""
    edr = WitsDevice(handshake=True, packets=[packet_bytes(i) for i in range(5)])
    await edr.start()
    try:
        driver = make_driver(make_source(edr.url))
        emit = Collector()
        async with running(driver, emit):
            await edr.wait_connections(1)
            await asyncio.sleep(2)
    finally:
        await edr.stop()

    assert emit.polls == []
    assert edr.received == []
    assert edr.sent_packets == 0
    assert driver.counters.transmitted_packets == 0


async def test_serial_pair_recreated(serial_pair: SerialPair) -> None:
    """When the pty pair vanishes and comes back under its paths, the driver reopens it."""
    driver = make_driver(make_source(f"serial://{serial_pair.a}?baudrate=9600"))
    emit = Collector()
    with capture_logs() as logs:
        async with running(driver, emit) as task:
            await wait_connected(driver)
            _, writer = await open_serial_connection(url=str(serial_pair.b), baudrate=9600)
            writer.write(packet_bytes(0))
            await emit.wait_polls(1)
            writer.write(b"&&\r\n0108123")  # a partial packet, lost with the port
            await asyncio.sleep(0.1)

            serial_pair.stop()
            writer.transport.abort()
            await wait_until(lambda: driver.counters.open_failures >= 2)
            serial_pair.start()
            await wait_connected(driver)
            discarded_on_reopen = driver.counters.discarded_packets

            _, writer = await open_serial_connection(url=str(serial_pair.b), baudrate=9600)
            writer.write(packet_bytes(1))
            await emit.wait_polls(2)
            await close_writer(writer)
            still_running = not task.done()

    assert still_running
    assert_all_packets(emit, 2)
    assert driver.counters.reconnects == 1
    assert driver.counters.open_failures >= 1
    assert discarded_on_reopen == 1, "the partial packet was not dropped with the old port"
    events = [entry["event"] for entry in logs]
    assert events.count("wits0_link_lost") == 1
    assert events.count("wits0_link_recovered") == 1
    warnings = [e["event"] for e in logs if e["log_level"] == "warning"]
    assert warnings == ["wits0_link_lost"], "repeated open failures must log at debug level"


async def test_silent_link_watchdog(device: WitsDevice) -> None:
    """A connected device that sends nothing trips the watchdog, which reconnects."""
    driver = make_driver(make_source(device.url, silence_timeout="300ms"))
    emit = Collector()
    with capture_logs() as logs:
        async with running(driver, emit):
            await device.wait_connections(3, within=5)
            # On a slow machine the watchdog may close the newest connection before the
            # packet arrives, so it is sent again on whichever connection is newest then.
            async with asyncio.timeout(5):
                while not emit.polls:
                    with contextlib.suppress(OSError):
                        await device.write(packet_bytes(0))
                    await asyncio.sleep(0.1)

    assert driver.counters.watchdog_timeouts >= 2
    assert driver.counters.reconnects >= 2
    assert values_of(emit.polls[0][1]) == expected_values(0)
    watchdog = [e for e in logs if e["event"] == "wits0_watchdog_timeout"]
    assert watchdog[0]["log_level"] == "warning"
    assert {e["log_level"] for e in watchdog[1:]} == {"debug"}
    assert "wits0_data_resumed" in [e["event"] for e in logs]


async def test_connect_refused_then_served() -> None:
    """A device that is not up yet is retried with backoff until it accepts."""
    device = WitsDevice()
    driver = make_driver(make_source(device.url))
    emit = Collector()
    async with running(driver, emit):
        await asyncio.sleep(0.5)
        await device.start()
        try:
            await device.wait_connections(1)
            await device.write(packet_bytes(0))
            await emit.wait_polls(1)
        finally:
            await device.stop()

    assert driver.counters.open_failures >= 2
    assert_all_packets(emit, 1)


async def test_null_values_counted(device: WitsDevice) -> None:
    """Sentinel values produce no reading and are counted per channel."""
    driver = make_driver(make_source(device.url))
    emit = Collector()
    nulls = [("0108", "-9999.00"), ("0110", "-8888"), ("0121", "-999.25"), ("0150", "-999.250")]
    async with running(driver, emit):
        await device.wait_connections(1)
        await device.write(encode_packet([*nulls, ("0160", "-9999.01")]))
        await device.write(encode_packet([("0108", "-9999"), ("0110", "5.5")]))
        await emit.wait_polls(2)

    assert values_of(emit.polls[0][1]) == {"wits_0160": -9999.01}
    assert values_of(emit.polls[1][1]) == {"hole_depth": 5.5}
    assert driver.counters.null_values == {
        "bit_depth": 2,
        "hole_depth": 1,
        "standpipe_pressure": 1,
        "wits_0150": 1,
    }


async def test_junk_and_malformed_lines(device: WitsDevice) -> None:
    """Junk, malformed lines and an unterminated packet do not lose the valid data around them."""
    driver = make_driver(make_source(device.url))
    emit = Collector()
    stream = (
        b"\x00\xffnoise&&\r\n0108abc\r\n01\r\n0110 12.5\r\n0121 3,5\r\n"
        b"XX08 1\r\n0108 7.25\r\n!!\r\n"
        b"garbage\n&&\n0108 1.0\n&&\n0108 2.0\n0108 2.5\n0150\n!!\n"
        b"\r\r\n&&\r0110 9\r!!\r"
    )
    async with running(driver, emit):
        await device.wait_connections(1)
        for offset in range(0, len(stream), 7):  # split at arbitrary points
            await device.write(stream[offset : offset + 7])
            await asyncio.sleep(0.005)
        await emit.wait_polls(3)

    assert [values_of(batch) for _, batch in emit.polls] == [
        {"hole_depth": 12.5, "bit_depth": 7.25},
        {"bit_depth": 2.5},
        {"hole_depth": 9.0},
    ]
    counters = driver.counters
    assert counters.packets == 3
    assert counters.malformed_lines == 4
    assert counters.discarded_packets == 1
    assert counters.repeated_items == 1
    assert counters.bare_items == 1
    assert counters.junk_bytes > 0


async def test_source_tag_logged_on_change(device: WitsDevice) -> None:
    """The 1984 source tag is logged when first seen and when it changes, not on every packet."""
    driver = make_driver(make_source(device.url))
    emit = Collector()
    with capture_logs() as logs:
        async with running(driver, emit):
            await device.wait_connections(1)
            for tag in ("PASON/EDR", "PASON/EDR", "WITSKIT", "WITSKIT"):
                await device.write(encode_packet([("0108", "1.5")], source_tag=tag))
            await emit.wait_polls(4)

    tags = [(e["tag"], e["previous"]) for e in logs if e["event"] == "wits0_source_tag"]
    assert tags == [("PASON/EDR", None), ("WITSKIT", "PASON/EDR")]
    assert driver.source_tag == "WITSKIT"
    assert [values_of(batch) for _, batch in emit.polls] == [{"bit_depth": 1.5}] * 4


async def test_device_time_over_tcp(device: WitsDevice) -> None:
    """With use_device_time, a packet's readings carry its date and time in the zone, as UTC."""
    source = make_source(device.url, use_device_time=True, timezone="America/Chicago")
    driver = make_driver(source)
    emit = Collector()
    async with running(driver, emit):
        await device.wait_connections(1)
        items = [("0105", "240115"), ("0106", "063000"), ("0108", "10.5")]
        await device.write(encode_packet(items))
        await emit.wait_polls(1)

    (reading,) = emit.polls[0][1]
    assert reading.channel == "bit_depth"
    assert reading.ts_us == utc_us(2024, 1, 15, 12, 30, 0)


# --- packet_readings: mapping and time stamps without a link ----------------------


def utc_us(year: int, month: int, day: int, hour: int, minute: int, second: int) -> int:
    instant = dt.datetime(year, month, day, hour, minute, second, tzinfo=dt.UTC)
    return int(instant.timestamp()) * 1_000_000


def parse_one(data: bytes) -> Wits0Packet:
    (packet,) = Wits0Parser().feed(data)
    return packet


RECEIVED_US = utc_us(2024, 6, 1, 0, 0, 0)


@pytest.mark.parametrize(
    ("zone", "date", "time", "expected"),
    [
        ("America/Chicago", "240115", "063000", utc_us(2024, 1, 15, 12, 30, 0)),
        ("America/Chicago", "240715", "063000", utc_us(2024, 7, 15, 11, 30, 0)),
        ("Europe/Oslo", "241231", "235959", utc_us(2024, 12, 31, 22, 59, 59)),
        ("UTC", "50102", "70809", utc_us(2005, 1, 2, 7, 8, 9)),
        ("Asia/Kolkata", "240301.00", "000000", utc_us(2024, 2, 29, 18, 30, 0)),
    ],
)
def test_device_time_zones(zone: str, date: str, time: str, expected: int) -> None:
    """Date and time items in the source's zone convert to the right UTC instant."""
    source = make_source("tcp://127.0.0.1:1", use_device_time=True, timezone=zone)
    packet = parse_one(encode_packet([("0105", date), ("0106", time), ("0108", "1.5")]))
    readings = packet_readings(source, packet, RECEIVED_US)
    assert [(r.channel, r.ts_us) for r in readings] == [("bit_depth", expected)]


def test_device_time_invalid_falls_back() -> None:
    """An impossible date gives the receive time, counted, and the date items stay readings."""
    source = make_source("tcp://127.0.0.1:1", use_device_time=True, timezone="UTC")
    counters = Wits0Counters()
    packet = parse_one(encode_packet([("0105", "241301"), ("0106", "120000"), ("0108", "1.5")]))
    with capture_logs() as logs:
        first = packet_readings(source, packet, RECEIVED_US, counters)
        packet_readings(source, packet, RECEIVED_US, counters)

    assert {r.ts_us for r in first} == {RECEIVED_US}
    assert sorted(r.channel for r in first) == ["bit_depth", "wits_0105", "wits_0106"]
    assert counters.device_time_fallbacks == 2
    assert [e["log_level"] for e in logs] == ["warning", "debug"]


def test_device_time_per_record() -> None:
    """With two records in a packet, each record's items take that record's date and time."""
    source = make_source("tcp://127.0.0.1:1", use_device_time=True, timezone="UTC")
    items = [
        ("0105", "240101"),
        ("0106", "010000"),
        ("0108", "1"),
        ("0205", "240101"),
        ("0206", "020000"),
        ("0208", "2"),
        ("0308", "3"),
    ]
    readings = packet_readings(source, parse_one(encode_packet(items)), RECEIVED_US)
    stamps = {r.channel: r.ts_us for r in readings}
    assert stamps == {
        "bit_depth": utc_us(2024, 1, 1, 1, 0, 0),
        "wits_0208": utc_us(2024, 1, 1, 2, 0, 0),
        "wits_0308": utc_us(2024, 1, 1, 1, 0, 0),
    }


def test_receive_time_keeps_date_items() -> None:
    """Without use_device_time, every item gets the receive time and date items are readings."""
    source = make_source("tcp://127.0.0.1:1", items="standard-01")
    packet = parse_one(encode_packet([("0105", "240101"), ("0106", "010000"), ("0108", "1")]))
    readings = packet_readings(source, packet, RECEIVED_US)
    assert {r.ts_us for r in readings} == {RECEIVED_US}
    assert [r.channel for r in readings] == ["DATE", "TIME", "DBTM"]


def test_missing_device_time_counted() -> None:
    """use_device_time without a date and time pair gives the receive time, counted."""
    source = make_source("tcp://127.0.0.1:1", use_device_time=True)
    counters = Wits0Counters()
    packet = parse_one(encode_packet([("0106", "010000"), ("0108", "1")]))
    readings = packet_readings(source, packet, RECEIVED_US, counters)
    assert {r.ts_us for r in readings} == {RECEIVED_US}
    assert counters.packets_without_device_time == 1


@pytest.mark.parametrize(
    ("units", "expected"),
    [("metric", [("DBTM", "m"), ("SPPA", "kPa")]), ("fps", [("DBTM", "ft"), ("SPPA", "psi")])],
)
def test_standard_table_units(units: str, expected: list[tuple[str, str]]) -> None:
    """items = "standard-01" names channels by mnemonic with the unit set chosen."""
    source = make_source("tcp://127.0.0.1:1", items="standard-01", units=units)
    packet = parse_one(encode_packet([("0108", "1"), ("0121", "2")]))
    readings = packet_readings(source, packet, RECEIVED_US)
    assert [(r.channel, r.unit) for r in readings] == expected


def test_unmapped_drop() -> None:
    """unmapped = "drop" emits only the codes of the items table."""
    source = make_source("tcp://127.0.0.1:1", unmapped="drop")
    packet = parse_one(encode_packet([("0108", "1"), ("0150", "2"), ("0208", "3")]))
    readings = packet_readings(source, packet, RECEIVED_US)
    assert [r.channel for r in readings] == ["bit_depth"]


def test_device_time_rejects_bad_values() -> None:
    """Date and time values that are not 6-digit integers raise ValueError."""
    for date, time in [(240101.5, 0.0), (1_000_000.0, 0.0), (240101.0, 250000.0), (-1.0, 0.0)]:
        with pytest.raises(ValueError, match=r"invalid|must be|out of range"):
            device_time_us(date, time, dt.UTC)


async def test_open_missing_serial_port(tmp_path: Path) -> None:
    """Opening a serial path that does not exist raises Wits0LinkError naming the path."""
    source = make_source(f"serial://{tmp_path}/ttyUSB9")
    with pytest.raises(Wits0LinkError, match="not found"):
        await open_link(source)
