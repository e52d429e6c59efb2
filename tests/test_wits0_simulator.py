"""Wits0Simulator: packets a WITS0 parser accepts, changing values and the handshake mode."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import pytest

from drivers.simulator import RigModel
from drivers.wits0_parser import Wits0Packet, Wits0Parser, encode_packet
from drivers.wits0_simulator import (
    KDAN_PER_KLBF,
    KPA_PER_PSI,
    SIM_SOURCE_TAG,
    Wits0Simulator,
)

INTERVAL = 0.05
KEEP_ALIVE = encode_packet([("0111", "-9999")])


class Client:
    """A TCP client of the simulator that parses what it receives."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.parser = Wits0Parser()
        self.received = b""

    @classmethod
    async def connect(cls, sim: Wits0Simulator) -> Client:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)
        return cls(reader, writer)

    async def packets(self, count: int) -> list[Wits0Packet]:
        """Read until `count` packets have arrived, within 5 s."""
        packets: list[Wits0Packet] = []
        async with asyncio.timeout(5):
            while len(packets) < count:
                data = await self.reader.read(4096)
                assert data, "the simulator closed the connection"
                self.received += data
                packets += self.parser.feed(data)
        return packets

    async def silent_for(self, seconds: float) -> bool:
        """Return True when nothing arrives for `seconds`."""
        try:
            async with asyncio.timeout(seconds):
                data = await self.reader.read(4096)
        except TimeoutError:
            return True
        self.received += data
        return False

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


@pytest.fixture
async def simulator() -> AsyncIterator[Wits0Simulator]:
    """A streaming simulator on a free loopback port, one packet every 50 ms."""
    sim = Wits0Simulator(interval=INTERVAL, seed=3)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest.fixture
async def handshake_simulator() -> AsyncIterator[Wits0Simulator]:
    """A simulator that sends only to clients that have sent a valid packet."""
    sim = Wits0Simulator(interval=INTERVAL, seed=3, require_handshake=True)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def values(packet: Wits0Packet) -> dict[str, float | None]:
    return {item.code: item.value for item in packet.items}


async def test_packets_parse(simulator: Wits0Simulator) -> None:
    """Every packet parses cleanly, carries the source tag and the record 01 drilling items."""
    client = await Client.connect(simulator)
    packets = await client.packets(3)
    await client.close()
    for packet in packets:
        assert packet.source_tag == SIM_SOURCE_TAG
        assert packet.malformed_lines == 0
        assert packet.repeated_items == 0
        assert {"0108", "0110", "0112", "0113", "0114", "0116", "0118", "0120"} <= set(
            values(packet)
        )
        assert {"0121", "0123", "0124", "0126", "0130", "0131", "0133", "0137"} <= set(
            values(packet)
        )
    assert client.parser.counters.junk_bytes == 0
    assert client.parser.counters.discarded_packets == 0


async def test_stream_starts_with_tag(simulator: Wits0Simulator) -> None:
    """The stream starts with `&&` and the `1984SIMULATOR/EDR` line, as a Pason EDR sends."""
    client = await Client.connect(simulator)
    await client.packets(1)
    await client.close()
    assert client.received.startswith(b"&&\r\n1984SIMULATOR/EDR\r\n")


async def test_idle_pump_sentinel(simulator: Wits0Simulator) -> None:
    """The idle pump 3 (0125) is sent as the -9999.00 sentinel."""
    client = await Client.connect(simulator)
    (packet,) = await client.packets(1)
    await client.close()
    item = packet.get("0125")
    assert item is not None
    assert item.text == "-9999.00"


async def test_values_change(simulator: Wits0Simulator) -> None:
    """Consecutive packets carry changing values, and the bit drills deeper."""
    client = await Client.connect(simulator)
    packets = await client.packets(6)
    await client.close()
    first, last = values(packets[0]), values(packets[-1])
    assert first["0114"] != last["0114"]
    assert first["0108"] is not None
    assert last["0108"] is not None
    assert last["0108"] > first["0108"]
    assert simulator.packets_sent >= 6


async def test_metric_units(simulator: Wits0Simulator) -> None:
    """Hookload goes out in kdaN and standpipe pressure in kPa, converted from the rig model."""
    items = dict(simulator.step(0.0))
    model = simulator.model.values
    assert float(items["0114"]) == pytest.approx(model["hookload"] * KDAN_PER_KLBF, abs=0.01)
    assert float(items["0121"]) == pytest.approx(
        model["standpipe_pressure"] * KPA_PER_PSI, abs=0.01
    )


async def test_two_clients(simulator: Wits0Simulator) -> None:
    """Each connected client receives the packets."""
    first = await Client.connect(simulator)
    second = await Client.connect(simulator)
    packets_first = await first.packets(2)
    packets_second = await second.packets(2)
    await first.close()
    await second.close()
    assert len(packets_first) >= 2
    assert len(packets_second) >= 2


async def test_handshake_needed(handshake_simulator: Wits0Simulator) -> None:
    """In handshake mode nothing is sent before the client sends a valid packet."""
    client = await Client.connect(handshake_simulator)
    silent = await client.silent_for(10 * INTERVAL)
    await client.close()
    assert silent
    assert handshake_simulator.packets_sent == 0


async def test_handshake_unlocks(handshake_simulator: Wits0Simulator) -> None:
    """After the `0111-9999` keep-alive packet the client receives data."""
    client = await Client.connect(handshake_simulator)
    client.writer.write(KEEP_ALIVE)
    await client.writer.drain()
    packets = await client.packets(2)
    await client.close()
    assert packets[0].get("0108") is not None
    assert handshake_simulator.handshakes_received == 1


async def test_junk_is_no_handshake(handshake_simulator: Wits0Simulator) -> None:
    """Bytes that hold no valid packet do not start the stream."""
    client = await Client.connect(handshake_simulator)
    client.writer.write(b"hello\r\n&&\r\n!!\r\n")
    await client.writer.drain()
    silent = await client.silent_for(10 * INTERVAL)
    await client.close()
    assert silent
    assert handshake_simulator.handshakes_received == 0


async def test_handshake_hold_expires() -> None:
    """With `handshake_hold` set, the stream stops when the client does not repeat the handshake."""
    sim = Wits0Simulator(interval=INTERVAL, require_handshake=True, handshake_hold=0.3)
    await sim.start()
    try:
        client = await Client.connect(sim)
        client.writer.write(KEEP_ALIVE)
        await client.writer.drain()
        await client.packets(1)
        await asyncio.sleep(0.4)
        sent = sim.packets_sent
        await asyncio.sleep(0.3)
        stopped = sim.packets_sent == sent
        await client.close()
    finally:
        await sim.stop()
    assert stopped


async def test_device_time_items() -> None:
    """With `device_time`, 0105 and 0106 carry the zero-padded date and time in the time zone."""
    sim = Wits0Simulator(device_time=True, timezone="Asia/Kolkata")
    moment = dt.datetime(2024, 3, 5, 1, 2, 3, tzinfo=dt.UTC)
    items = dict(sim.step(1.0, wall_time=moment.timestamp()))
    assert items["0105"] == "240305"
    assert items["0106"] == "063203"


async def test_stop_disconnects_clients(simulator: Wits0Simulator) -> None:
    """`stop` closes the connection of a client that is still connected."""
    client = await Client.connect(simulator)
    await client.packets(1)
    await simulator.stop()
    async with asyncio.timeout(5):
        await client.reader.read()
    await client.close()
    assert client.reader.at_eof()
    assert simulator.clients == 0


async def test_shared_model() -> None:
    """Given another simulator's model, the EDR reports its values and does not step it."""
    model = RigModel(seed=11)
    sim = Wits0Simulator(model=model)
    elapsed = model.elapsed_s
    items = dict(sim.step(30.0))
    assert model.elapsed_s == elapsed
    assert items["0108"] == f"{model.bit_depth:.2f}"
