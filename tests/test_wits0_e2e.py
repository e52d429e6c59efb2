"""End to end: a WITS device on each kind of link, the agent as a child process, mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from serial_asyncio_fast import open_serial_connection

from buffer.store import DB_FILENAME, read_stats
from drivers.wits0_parser import encode_packet
from tests.peers import AgentProcess, Mosquitto, SerialPair, WitsDevice, free_port, subscriber

pytestmark = pytest.mark.e2e

PACKETS = 1000
CHANNELS = {"0108": "bit_depth", "0110": "hole_depth", "0121": "standpipe_pressure"}
UNITS = {"bit_depth": "m", "hole_depth": "m", "standpipe_pressure": "kPa", "wits_0150": ""}
PER_PACKET = len(UNITS)
SELECT_ROWS = """
    SELECT r.seq, r.ts_us, c.source, c.channel, r.value, c.unit, r.quality
    FROM readings AS r JOIN channels AS c ON c.id = r.channel_id ORDER BY r.seq
"""


def packet_items(index: int) -> list[tuple[str, str]]:
    return [
        ("0108", f"{1000 + index * 0.01:.2f}"),
        ("0110", f"{2000 + index:.2f}"),
        ("0121", f"{-index * 0.25:.2f}"),
        ("0150", str(index)),
        ("0125", "-9999.00"),  # a null sentinel: never a reading
    ]


def expected_values(index: int) -> dict[str, float]:
    values = {CHANNELS.get(code, f"wits_{code}"): float(text) for code, text in packet_items(index)}
    del values["wits_0125"]
    return values


def write_config(path: Path, data_dir: Path, device_url: str, mqtt_port: int) -> None:
    lines = [
        "[agent]",
        'rig_id = "rig-wits"',
        f'data_dir = "{data_dir}"',
        'log_format = "json"',
        'metrics_listen = ""',
        # This test expects quality "good", which becomes "uncertain" on a machine
        # whose kernel reports the clock as unsynchronized, such as one without NTP.
        'clock_check = "off"',
        "[buffer]",
        'commit_interval = "100ms"',
        "[mqtt]",
        f'url = "mqtt://127.0.0.1:{mqtt_port}"',
        'topic_prefix = "rigs/{rig_id}"',
        "[[sources.wits0]]",
        'name = "edr"',
        f'url = "{device_url}"',
        'silence_timeout = "10s"',
        "[sources.wits0.items]",
    ]
    units = {"bit_depth": "m", "hole_depth": "m", "standpipe_pressure": "kPa"}
    lines += [
        f'"{code}" = {{ channel = "{ch}", unit = "{units[ch]}" }}' for code, ch in CHANNELS.items()
    ]
    path.write_text("\n".join(lines) + "\n")


def read_buffer(data_dir: Path) -> list[tuple[int, int, str, str, float | None, str, int]]:
    """Return every row of the buffer, read-only, in seq order."""
    uri = f"{(data_dir / DB_FILENAME).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        return list(conn.execute(SELECT_ROWS))


async def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.1)


Write = Callable[[bytes], Awaitable[None]]


class Link:
    """The device end of one link kind: its URL for the agent, and a way to write to it."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.device = WitsDevice()
        self.pair = SerialPair(tmp_path)
        self.port = free_port()

    @property
    def url(self) -> str:
        if self.kind == "serial":
            return f"serial://{self.pair.a}?baudrate=9600&parity=N"
        if self.kind == "tcp-listen":
            return f"tcp-listen://127.0.0.1:{self.port}"
        return self.device.url

    async def start(self) -> None:
        if self.kind == "serial":
            self.pair.start()
        elif self.kind == "tcp":
            await self.device.start()

    async def stop(self) -> None:
        await self.device.stop()
        self.pair.stop()

    @asynccontextmanager
    async def writer(self, agent_log: Path) -> AsyncIterator[Write]:
        """Open the device end once the agent has opened its end, and yield a write function."""
        if self.kind == "tcp":
            await self.device.wait_connections(1, within=10)
            yield self.device.write
            return
        # The agent has opened its end of the pty, or listens for the device.
        event = b'"wits0_listening"' if self.kind == "tcp-listen" else b'"wits0_connected"'
        await wait_until(lambda: event in agent_log.read_bytes(), 30, "the agent's end of the link")
        async with asyncio.timeout(5):
            if self.kind == "serial":
                _, stream = await open_serial_connection(url=str(self.pair.b), baudrate=9600)
            else:
                _, stream = await asyncio.open_connection("127.0.0.1", self.port)

        async def write(data: bytes) -> None:
            stream.write(data)
            async with asyncio.timeout(10):
                await stream.drain()

        try:
            yield write
        finally:
            stream.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(2):
                    await stream.wait_closed()


@pytest.mark.parametrize("kind", ["serial", "tcp", "tcp-listen"])
async def test_thousand_packets_buffered_and_published(
    kind: str, tmp_path: Path, mosquitto: Mosquitto
) -> None:
    """1,000 packets on each link: every value is in the buffer, then at the subscriber in order."""
    total = PACKETS * PER_PACKET
    data_dir = tmp_path / "data"
    link = Link(kind, tmp_path)
    await link.start()
    config = tmp_path / "agent.toml"
    write_config(config, data_dir, link.url, mosquitto.port)
    agent = AgentProcess(config, tmp_path / "agent.log")
    try:
        async with subscriber(mosquitto.port, "rigs/rig-wits/readings/#") as inbox:
            # With the broker down the buffer keeps every row, so all of them can be read back.
            mosquitto.stop()
            await agent.start()
            async with link.writer(agent.log) as write:
                for start in range(0, PACKETS, 100):
                    chunk = range(start, start + 100)
                    await write(b"".join(encode_packet(packet_items(i)) for i in chunk))
                await wait_until(
                    lambda: read_stats(data_dir, ["mqtt"]).last_seq >= total, 10, "all readings"
                )
            rows = read_buffer(data_dir)

            mosquitto.start()
            await wait_until(lambda: len(inbox.seqs()) >= total, 20, "the subscriber")
            assert agent.terminate(timeout=10) == 0
    finally:
        agent.close()
        await link.stop()

    assert [row[0] for row in rows] == list(range(1, total + 1))
    for index in range(PACKETS):
        batch = rows[index * PER_PACKET : (index + 1) * PER_PACKET]
        assert {row[3]: row[4] for row in batch} == expected_values(index), f"packet {index}"
        described = {(row[2], row[3], row[5], row[6]) for row in batch}
        assert described == {("edr", channel, unit, 0) for channel, unit in UNITS.items()}

    assert inbox.seqs() == list(range(1, total + 1))
    published = inbox.readings()
    for index in range(PACKETS):
        message = published[index * PER_PACKET : (index + 1) * PER_PACKET]
        values = {reading["channel"]: reading["value"] for reading in message}
        assert values == expected_values(index), f"packet {index}"
        assert {r["unit"] for r in message} == {UNITS[r["channel"]] for r in message}
        assert {r["quality"] for r in message} == {"good"}
