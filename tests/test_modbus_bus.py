"""ModbusBus and BusRegistry against real pymodbus servers on loopback and on a socat pair."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from drivers.modbus_bus import (
    MAX_SILENT_REQUESTS,
    BusRegistry,
    DeviceException,
    DeviceTimeout,
    LinkDown,
    ModbusBus,
)
from drivers.modbus_transport import parse_modbus_url
from tests.peers import ModbusPeer, SerialPair, free_port, sim_device


@pytest.fixture
async def peer() -> AsyncIterator[ModbusPeer]:
    """A TCP server for units 1 and 2 on a free loopback port."""
    server = ModbusPeer(
        [sim_device(1, registers=50), sim_device(2, registers=50)], tcp_port=free_port()
    )
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def tcp_bus(port: int, timeout: float = 0.1) -> ModbusBus:
    bus = ModbusBus(
        parse_modbus_url(f"tcp://127.0.0.1:{port}"),
        reconnect_delay_min=0.2,
        reconnect_delay_max=0.4,
    )
    bus.add_device(1, timeout=timeout, frame_pause=0.0)
    return bus


def test_registry_shares_bus() -> None:
    """Endpoints with one bus key get one bus; other keys get their own."""
    registry = BusRegistry()
    first = registry.bus_for(parse_modbus_url("rtu:///dev/ttyUSB0?baudrate=9600"))
    again = registry.bus_for(parse_modbus_url("rtu:///dev/ttyUSB0?baudrate=9600"))
    other = registry.bus_for(parse_modbus_url("rtu+tcp://127.0.0.1:4001"))

    assert again is first
    assert other is not first
    assert len(registry.buses) == 2


def test_registry_rejects_other_settings() -> None:
    """One serial port with two different baud rates is an error naming both."""
    registry = BusRegistry()
    registry.bus_for(parse_modbus_url("rtu:///dev/ttyUSB0?baudrate=9600"))

    with pytest.raises(ValueError, match="9600 8N1") as raised:
        registry.bus_for(parse_modbus_url("rtu:///dev/ttyUSB0?baudrate=19200"))
    assert "19200 8N1" in str(raised.value)


def test_frame_pause_widens() -> None:
    """The bus keeps the maximum timeout and frame pause of its devices."""
    bus = ModbusBus(parse_modbus_url("rtu:///dev/ttyUSB0"))
    bus.add_device(1, timeout=0.5, frame_pause=0.01)
    bus.add_device(2, timeout=0.2, frame_pause=0.03)

    assert bus.timeout == 0.5
    assert bus.frame_pause == 0.03
    assert bus.unit_ids == {1, 2}


async def test_read_registers_and_bits(peer: ModbusPeer) -> None:
    """read() returns exactly the requested registers or bits, from the addressed unit."""
    await peer.write(2, "holding", 5, [11, 12, 13])
    await peer.write(2, "coil", 3, [True, False, True])
    bus = tcp_bus(peer.tcp_port)

    async with bus:
        registers = await bus.read(2, "holding", 5, 3, 0.5)
        bits = await bus.read(2, "coil", 3, 3, 0.5)
        other_unit = await bus.read(1, "holding", 5, 3, 0.5)

    assert registers == [11, 12, 13]
    assert bits == [True, False, True]
    assert other_unit == [0, 0, 0]


async def test_exception_code_raised(peer: ModbusPeer) -> None:
    """A read outside the device's map raises DeviceException with code 2."""
    bus = tcp_bus(peer.tcp_port)

    async with bus:
        with pytest.raises(DeviceException) as raised:
            await bus.read(1, "holding", 60, 2, 0.5)

    assert raised.value.code == 2
    assert raised.value.unit_id == 1
    assert "read of holding 60..61" in str(raised.value)


async def test_timeout_is_our_own(peer: ModbusPeer) -> None:
    """A silent unit raises DeviceTimeout after the request's timeout, with no library retry."""
    peer.muted.add(1)
    bus = tcp_bus(peer.tcp_port, timeout=0.5)

    async with bus:
        await bus.read(2, "holding", 0, 1, 0.5)
        started = time.monotonic()
        with pytest.raises(DeviceTimeout, match="timed out after 100ms"):
            await bus.read(1, "holding", 0, 1, 0.1)
        elapsed = time.monotonic() - started

    assert 0.09 <= elapsed < 0.3
    assert peer.requests[(1, 3)] == 1


async def test_silent_connection_reopened(peer: ModbusPeer) -> None:
    """A TCP connection with no response to several requests in a row is closed and reopened."""
    peer.muted.add(1)
    bus = tcp_bus(peer.tcp_port)

    async with bus:
        for _ in range(MAX_SILENT_REQUESTS):
            with pytest.raises(DeviceTimeout):
                await bus.read(1, "holding", 0, 1, 0.05)
        peer.muted.clear()
        value = await bus.read(1, "holding", 0, 1, 0.5)

    assert value == [0]
    assert peer.connections[:3] == [True, False, True]


async def test_unit_timeout_keeps_connection(peer: ModbusPeer) -> None:
    """Timeouts of one unit between responses of another do not reopen the connection."""
    peer.muted.add(1)
    bus = tcp_bus(peer.tcp_port)

    async with bus:
        for _ in range(2 * MAX_SILENT_REQUESTS):
            with pytest.raises(DeviceTimeout):
                await bus.read(1, "holding", 0, 1, 0.05)
            await bus.read(2, "holding", 0, 1, 0.5)

    assert peer.connections == [True]


async def test_refused_connect_backs_off() -> None:
    """Nothing listening: LinkDown, then LinkDown at once until the backoff has passed."""
    bus = tcp_bus(free_port())

    async with bus:
        with pytest.raises(LinkDown, match="could not connect"):
            await bus.read(1, "holding", 0, 1, 0.1)
        started = time.monotonic()
        with pytest.raises(LinkDown, match="next attempt in"):
            await bus.read(1, "holding", 0, 1, 0.1)
        elapsed = time.monotonic() - started

    assert elapsed < 0.05


async def test_last_user_closes(peer: ModbusPeer) -> None:
    """The connection stays open while any user is inside the bus, and closes after the last."""
    bus = tcp_bus(peer.tcp_port)

    async with bus:
        async with bus:
            await bus.read(1, "holding", 0, 1, 0.5)
        still_open = bus.connected

    assert still_open
    assert not bus.connected


async def test_port_rejecting_settings(tmp_path: Path) -> None:
    """A port that rejects a serial setting raises LinkDown and is left closed for a retry."""
    pair = SerialPair(tmp_path)
    pair.start()
    try:
        rejected = ModbusBus(parse_modbus_url(f"rtu://{pair.a}?baudrate=9600&parity=E"))
        rejected.add_device(1, timeout=0.1, frame_pause=0.0)
        async with rejected:
            with pytest.raises(LinkDown, match="rejected the settings"):
                await rejected.read(1, "holding", 0, 1, 0.1)

        # The failed open must not keep the port's exclusive lock.
        accepted = ModbusBus(parse_modbus_url(f"rtu://{pair.a}?baudrate=9600"))
        accepted.add_device(1, timeout=0.1, frame_pause=0.0)
        async with accepted:
            with pytest.raises(DeviceTimeout):
                await accepted.read(1, "holding", 0, 1, 0.1)
    finally:
        pair.stop()
