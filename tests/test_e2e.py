"""End to end: a real pymodbus server, the agent as a child process, a private mosquitto."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from buffer.store import read_stats
from drivers.modbus_decode import encode_value
from tests.peers import AgentProcess, Mosquitto, free_port, subscriber

pytestmark = pytest.mark.e2e

TYPES = ["int16", "uint16", "int32", "uint32", "float32", "float64"]
ORDERS = [("big", "big"), ("little", "big"), ("big", "little"), ("little", "little")]
POINT_COUNT = 50


def make_points() -> tuple[list[dict[str, Any]], list[int]]:
    """Build 50 points of every type and order, back to back, and the registers that hold them."""
    points: list[dict[str, Any]] = []
    registers: list[int] = []
    for index in range(POINT_COUNT):
        type_name = TYPES[index % len(TYPES)]
        word_order, byte_order = ORDERS[(index // len(TYPES)) % len(ORDERS)]
        value = sample_value(type_name, index)
        words = encode_value(value, type_name, word_order, byte_order)
        points.append(
            {
                "channel": f"ch{index:02d}_{type_name}",
                "address": len(registers),
                "type": type_name,
                "word_order": word_order,
                "byte_order": byte_order,
                "unit": "u",
                "expected": float(value),
            }
        )
        registers.extend(words)
    return points, registers


def sample_value(type_name: str, index: int) -> float:
    """Return a value that exercises the sign and the high words of the type."""
    match type_name:
        case "int16":
            return -1000 - index
        case "uint16":
            return 60000 + index
        case "int32":
            return -2_000_000_000 + index
        case "uint32":
            return 4_000_000_000 + index
        case "float32":
            return -1234.5 - index * 0.25
        case _:
            return 98765.4321 + index


def write_config(
    path: Path,
    data_dir: Path,
    modbus_port: int | None,
    mqtt_port: int,
    points: list[dict[str, Any]],
) -> None:
    lines = [
        "[agent]",
        'rig_id = "rig-e2e"',
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
    ]
    if modbus_port is not None:
        lines += [
            "[[sources.modbus]]",
            'name = "pumps"',
            f'url = "tcp://127.0.0.1:{modbus_port}"',
            "unit_id = 1",
            'poll_interval = "100ms"',
            'timeout = "500ms"',
        ]
        for point in points:
            lines += [
                "[[sources.modbus.points]]",
                f'channel = "{point["channel"]}"',
                f"address = {point['address']}",
                f'type = "{point["type"]}"',
                f'word_order = "{point["word_order"]}"',
                f'byte_order = "{point["byte_order"]}"',
                'unit = "u"',
            ]
    path.write_text("\n".join(lines) + "\n")


class Rig:
    """The peers of one test: modbus server, broker, subscriber inbox, agent process."""

    def __init__(self, tmp_path: Path, broker: Mosquitto) -> None:
        self.tmp_path = tmp_path
        self.broker = broker
        self.points, self.registers = make_points()
        self.modbus_port = free_port()
        self.data_dir = tmp_path / "data"
        self.config = tmp_path / "agent.toml"
        write_config(self.config, self.data_dir, self.modbus_port, broker.port, self.points)
        self.agent = AgentProcess(self.config, tmp_path / "agent.log")
        self.server: ModbusTcpServer | None = None

    async def start_server(self) -> None:
        device = SimDevice(
            id=1, simdata=[SimData(0, values=self.registers, datatype=DataType.REGISTERS)]
        )
        self.server = ModbusTcpServer(device, address=("127.0.0.1", self.modbus_port))
        await self.server.serve_forever(background=True)

    async def stop_server(self) -> None:
        if self.server is not None:
            await self.server.shutdown()
            self.server = None

    def stats(self) -> dict[str, Any]:
        """Read the agent's state with `rig-agent status --json`, as a technician would."""
        out = subprocess.run(
            [sys.executable, "-m", "agent.cli", "status", "-c", str(self.config), "--json"],
            capture_output=True,
            check=True,
            timeout=30,
        )
        return dict(json.loads(out.stdout))

    def mqtt_depth(self) -> int:
        sinks = {s["name"]: s for s in self.stats()["sinks"]}
        return int(sinks["mqtt"]["depth"])


@pytest.fixture
async def rig(tmp_path: Path, mosquitto: Mosquitto) -> AsyncIterator[Rig]:
    setup = Rig(tmp_path, mosquitto)
    await setup.start_server()
    try:
        yield setup
    finally:
        setup.agent.close()
        await setup.stop_server()


async def wait_until(check: Callable[[], bool], seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def assert_contiguous(seqs: list[int], last: int) -> None:
    missing = sorted(set(range(1, last + 1)) - set(seqs))
    assert missing == [], f"{len(missing)} seq missing, first {missing[:10]}"


async def test_every_seq_arrives_with_decoded_values(rig: Rig) -> None:
    """50 points polled at 100 ms for 20 s: each seq arrives once, in order, with its value."""
    topic = "rigs/rig-e2e/readings/#"
    async with subscriber(rig.broker.port, topic) as inbox:
        await rig.agent.start()
        await asyncio.sleep(20)
        started_stop = time.monotonic()
        assert rig.agent.terminate(timeout=10) == 0
        assert time.monotonic() - started_stop < 10

        last_seq = read_stats(rig.data_dir, ["mqtt"]).last_seq
        assert last_seq >= POINT_COUNT * 100, f"only {last_seq} readings in 20 s"

        # A restart without sources drains what the first run had not yet published.
        write_config(rig.config, rig.data_dir, None, rig.broker.port, rig.points)
        await rig.agent.start()
        await wait_until(lambda: max(inbox.seqs(), default=0) >= last_seq, 30, "the drain")
        assert rig.agent.terminate(timeout=10) == 0

    seqs = inbox.seqs()
    assert seqs == list(range(1, last_seq + 1))
    expected = {p["channel"]: p["expected"] for p in rig.points}
    for reading in inbox.readings():
        assert reading["quality"] == "good", reading
        assert reading["value"] == expected[reading["channel"]], reading
        assert reading["unit"] == "u"
        assert reading["ts"].endswith("Z")


async def test_broker_outage_loses_nothing(rig: Rig) -> None:
    """A broker stopped for 10 s loses no seq, and the mqtt depth returns to 0 afterwards."""
    async with subscriber(rig.broker.port, "rigs/rig-e2e/readings/#") as inbox:
        await rig.agent.start()
        await wait_until(lambda: len(inbox.seqs()) > 0, 15, "the first readings")
        rig.broker.stop()
        await asyncio.sleep(10)
        assert rig.mqtt_depth() >= POINT_COUNT * 50, "the backlog did not grow during the outage"
        rig.broker.start()

        await wait_until(lambda: rig.mqtt_depth() <= 2 * POINT_COUNT, 30, "the backlog to drain")
        await rig.stop_server()  # no new good readings: one bad reading per point, then none
        await wait_until(lambda: rig.mqtt_depth() == 0, 15, "mqtt depth 0")
        last_seq = int(rig.stats()["last_seq"])
        await wait_until(lambda: max(inbox.seqs(), default=0) >= last_seq, 15, "the last seq")
        assert rig.agent.terminate(timeout=10) == 0

    assert_contiguous(inbox.seqs(), last_seq)
    bad = [r for r in inbox.readings() if r["quality"] == "bad"]
    assert {r["channel"] for r in bad} == {p["channel"] for p in rig.points}
    assert all(r["value"] is None for r in bad)


async def test_sigkill_and_restart_lose_nothing(rig: Rig) -> None:
    """After SIGKILL and a restart no seq is missing at the subscriber; duplicates are counted."""
    async with subscriber(rig.broker.port, "rigs/rig-e2e/readings/#") as inbox:
        await rig.agent.start()
        await wait_until(lambda: len(inbox.seqs()) > 20 * POINT_COUNT, 20, "readings to flow")
        rig.agent.kill()
        killed_at_seq = read_stats(rig.data_dir, ["mqtt"]).last_seq

        await rig.agent.start()
        await wait_until(
            lambda: max(inbox.seqs(), default=0) > killed_at_seq + 10 * POINT_COUNT,
            20,
            "readings after the restart",
        )
        await rig.stop_server()
        await wait_until(lambda: rig.mqtt_depth() == 0, 15, "mqtt depth 0")
        last_seq = int(rig.stats()["last_seq"])
        await wait_until(lambda: max(inbox.seqs(), default=0) >= last_seq, 15, "the last seq")
        assert rig.agent.terminate(timeout=10) == 0

    seqs = inbox.seqs()
    assert_contiguous(seqs, last_seq)
    duplicates = sum(n - 1 for n in Counter(seqs).values())
    print(f"SIGKILL restart: {last_seq} seqs, {duplicates} duplicates at the subscriber")
    assert duplicates <= 100 * POINT_COUNT, "far more duplicates than one in-flight window"
