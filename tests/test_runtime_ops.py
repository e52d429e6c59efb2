"""The agent's operations features in one process: clock quality, counters, liveness, status."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

import uplink.mqtt
from agent import runtime
from agent.clock import ClockState, ClockWatch
from agent.runtime import Agent, format_age
from agent.status import format_stats
from buffer.reader import iter_readings
from buffer.reading import Quality, Reading
from buffer.store import BufferStats, SinkStats
from config.loader import ConfigError, load_config
from config.model import Config
from tests.peers import ModbusPeer, free_port, sim_device
from uplink.mqtt import await_beating


def write_config(tmp_path: Path, *sections: str, agent: str = "") -> Path:
    path = tmp_path / "agent.toml"
    head = (
        f'[agent]\nrig_id = "rig-ops"\ndata_dir = "{tmp_path / "data"}"\n'
        f'metrics_listen = ""\n{agent}'
    )
    path.write_text(head + "".join(sections))
    return path


def modbus_source(name: str, port: int, unit: int = 1, points: int = 2) -> str:
    text = (
        f'[[sources.modbus]]\nname = "{name}"\nurl = "tcp://127.0.0.1:{port}"\n'
        f'unit_id = {unit}\npoll_interval = "100ms"\ntimeout = "200ms"\n'
    )
    for index in range(points):
        text += f'[[sources.modbus.points]]\nchannel = "ch{index}"\naddress = {index}\n'
    return text


def clock_in_state(synchronized: bool | None) -> ClockWatch:
    """A ClockWatch whose adjtimex reading is replaced by a fixed state."""

    def read_state() -> ClockState:
        return ClockState(synchronized, 0, 0, 0, "test")

    return ClockWatch(2.0, read_state)


@contextlib.asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(10):
            await agent.started.wait()
        yield stop
    finally:
        stop.set()
        async with asyncio.timeout(15):
            await task


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the state belongs to other tasks and threads
            await asyncio.sleep(0.05)


@pytest.fixture
async def peer() -> AsyncIterator[ModbusPeer]:
    server = ModbusPeer([sim_device(1), sim_device(2)], tcp_port=free_port())
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def stored(config: Config) -> list[tuple[str, str, Quality]]:
    readings = iter_readings(config.agent.data_dir)
    return [(r.source, r.channel, r.quality) for r in readings]


# --- clock and quality -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("synchronized", "quality"),
    [(False, Quality.UNCERTAIN), (True, Quality.GOOD), (None, Quality.GOOD)],
)
async def test_clock_state_sets_quality(
    tmp_path: Path, peer: ModbusPeer, synchronized: bool | None, quality: Quality
) -> None:
    """Readings taken while the clock is unsynchronized are uncertain; bad ones stay bad."""
    config = load_config(write_config(tmp_path, modbus_source("pumps", peer.tcp_port)))
    agent = Agent(config, clock=clock_in_state(synchronized))
    async with running(agent):
        await wait_until(lambda: agent.writer.committed >= 6)
        await peer.stop()
        await wait_until(lambda: agent.snapshot().sources[0].connected is False)

    qualities = [q for _, _, q in stored(config)]
    assert qualities[:6] == [quality] * 6
    # Both points went bad once when the device stopped responding.
    assert qualities[-2:] == [Quality.BAD, Quality.BAD]
    assert set(qualities) == {quality, Quality.BAD}


def test_clock_check_off_and_threshold(tmp_path: Path) -> None:
    """clock_check = "off" runs without a ClockWatch; the threshold reaches the watch."""
    off = load_config(write_config(tmp_path, agent='clock_check = "off"\n'))
    on = load_config(write_config(tmp_path, agent='clock_jump_threshold = "500ms"\n'))

    assert Agent(off).clock is None
    watch = Agent(on).clock
    assert watch is not None
    assert watch.threshold_s == 0.5
    assert on.agent.clock_check == "adjtimex"


def test_metrics_listen_checked_at_load(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('metrics_listen = ""', 'metrics_listen = "9108"'))

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert 'agent.toml:4: agent.metrics_listen = "9108": the address has no port' in str(
        caught.value
    )


# --- counters and snapshots ------------------------------------------------------------------


async def test_snapshot_counts_readings(tmp_path: Path, peer: ModbusPeer) -> None:
    """Per-channel counters equal the buffered readings; errors and link state follow the peer."""
    sources = modbus_source("pumps", peer.tcp_port, 1) + modbus_source("mud", peer.tcp_port, 2, 3)
    config = load_config(write_config(tmp_path, sources, agent='clock_check = "off"\n'))
    agent = Agent(config)
    async with running(agent):
        await wait_until(lambda: agent.writer.committed >= 20)
        await peer.stop()
        await wait_until(lambda: all(s.errors > 0 for s in agent.snapshot().sources))
        await agent.writer.flush()
        await agent.refresh_stats()
        snapshot = agent.snapshot()
        text = agent.status_text()

    counts = Counter((source, channel) for source, channel, _ in stored(config))
    by_source = {s.name: s for s in snapshot.sources}
    assert {("pumps", ch): n for ch, n in by_source["pumps"].readings.items()} == {
        key: n for key, n in counts.items() if key[0] == "pumps"
    }
    assert {("mud", ch): n for ch, n in by_source["mud"].readings.items()} == {
        key: n for key, n in counts.items() if key[0] == "mud"
    }
    assert by_source["mud"].protocol == "modbus"
    assert by_source["pumps"].connected is False
    assert by_source["pumps"].last_reading_unix is not None
    assert snapshot.buffer.open
    assert snapshot.buffer.last_seq == sum(counts.values())
    assert snapshot.stale == ()
    assert snapshot.clock.synchronized is None
    assert text.startswith("0 of 2 sources up, ")


async def test_status_text_shows_sinks(tmp_path: Path, peer: ModbusPeer) -> None:
    mqtt = f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\n'
    config = load_config(write_config(tmp_path, modbus_source("pumps", peer.tcp_port), mqtt))
    agent = Agent(config)
    async with running(agent):
        await wait_until(lambda: agent.writer.committed >= 10)
        await agent.refresh_stats()
        await asyncio.sleep(0.5)
        await agent.refresh_stats()
        text = agent.status_text()
        depth = agent.snapshot().sinks[0].depth

    assert depth >= 10
    assert re.fullmatch(rf"1 source, \d+ readings/s; mqtt depth {depth} \(offline \d+s\)", text), (
        text
    )
    assert not text.startswith("1 source, 0 readings/s")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59.9, "59s"), (60, "1m"), (3599, "59m"), (7200, "2h"), (200000, "2d")],
)
def test_format_age(seconds: float, text: str) -> None:
    assert format_age(seconds) == text


# --- liveness --------------------------------------------------------------------------------


async def test_await_beating_stops_after_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded work beats until it overruns its limit by the grace; then the beats stop."""
    monkeypatch.setattr(uplink.mqtt, "BEAT_INTERVAL", 0.05)
    monkeypatch.setattr(uplink.mqtt, "BEAT_GRACE", 0.2)
    beats: list[float] = []
    started = time.monotonic()

    def beat() -> None:
        beats.append(time.monotonic() - started)

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.8):
            await await_beating(asyncio.Event().wait(), beat, 0.1)

    assert len(beats) >= 4
    assert max(beats) < 0.3 + 0.1
    assert await await_beating(asyncio.sleep(0.12, result="done"), beat, 0.12) == "done"


async def test_await_beating_cancels_work() -> None:
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    task = asyncio.create_task(await_beating(work(), lambda: None, None))
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    assert cancelled.is_set()


async def test_writer_stale_while_appends_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer counts as stale only while readings wait and no append completes."""
    monkeypatch.setattr(runtime, "LIVENESS_TICK", 0.05)
    config = load_config(write_config(tmp_path))
    agent = Agent(config)
    agent.max_age = 0.4
    async with running(agent):
        await asyncio.sleep(0.6)
        assert agent.liveness.stale(agent.max_age) == []

        release = asyncio.Event()
        real_append = agent.buffer.append

        async def hanging_append(
            readings: list[Reading], *, checked: bool = False
        ) -> tuple[int, int]:
            await release.wait()
            return await real_append(readings, checked=checked)

        monkeypatch.setattr(agent.buffer, "append", hanging_append)
        await agent._emit([Reading(1_000_000, "pumps", "spp", 1.0, "psi")])
        await asyncio.sleep(0.8)
        assert agent.liveness.stale(agent.max_age) == ["writer"]

        release.set()
        await wait_until(lambda: agent.writer.pending == 0)
        await asyncio.sleep(0.2)
        assert agent.liveness.stale(agent.max_age) == []


async def test_failing_sink_beats_between_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sink that fails at once and waits in the supervisor's backoff is not stale."""
    monkeypatch.setattr(runtime, "LIVENESS_TICK", 0.05)
    mqtt = (
        f'[mqtt]\nurl = "mqtt://127.0.0.1:{free_port()}"\nusername = "rig"\n'
        f'password_file = "{tmp_path / "missing"}"\n'
    )
    agent = Agent(load_config(write_config(tmp_path, mqtt)))
    agent.max_age = 0.4
    async with running(agent):
        for _ in range(30):
            await asyncio.sleep(0.1)
            assert agent.liveness.stale(agent.max_age) == []
        assert "sink:mqtt" not in agent._running


# --- status command --------------------------------------------------------------------------


def test_status_shows_losses() -> None:
    stats = BufferStats(
        last_seq=500,
        rows=100,
        dropped_rows=400,
        db_bytes=1024**2,
        sinks=[SinkStats("mqtt", 0, 100, 400), SinkStats("cloud", 500, 0, 0)],
        dropped_disk_full=25,
        last_disk_full_us=1_796_000_000_000_000,
        corrupt_databases_set_aside=1,
        set_aside_paths=["/data/buffer-corrupt-20261204T101500Z.db"],
    )

    lines = format_stats("rig-7", stats).splitlines()

    assert lines[1] == (
        "25 readings dropped because the disk was full or short of buffer.min_free_bytes, "
        "the last at 2026-11-30T00:53:20.000000Z"
    )
    assert lines[2] == "1 corrupt buffer database file moved aside and replaced by a new database:"
    assert lines[3] == "  /data/buffer-corrupt-20261204T101500Z.db"
    assert lines[5].split() == ["sink", "cursor", "depth", "dropped", "(buffer", "full)"]
    assert lines[6].split() == ["mqtt", "0", "100", "400"]
    assert lines[7].split() == ["cloud", "500", "0", "0"]


def test_status_hides_zero_losses() -> None:
    stats = BufferStats(
        last_seq=5, rows=5, dropped_rows=0, db_bytes=0, sinks=[SinkStats("mqtt", 5, 0)]
    )

    text = format_stats("rig-7", stats)

    assert "dropped because" not in text
    assert "moved aside" not in text
    assert "buffer full" not in text


# --- the command line ------------------------------------------------------------------------


async def test_busy_metrics_port_stops_start(tmp_path: Path) -> None:
    """A metrics address that cannot be bound stops `rig-agent run` with exit 2 and the reason."""
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace('""', f'"127.0.0.1:{port}"'))
    try:
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "agent.cli", "run", "-c", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
        )
    finally:
        blocker.close()
        await blocker.wait_closed()

    assert result.returncode == 2
    assert (
        f'rig-agent did not start: cannot serve metrics on "127.0.0.1:{port}": '
        "the address is already in use by another process"
    ) in result.stderr
    assert "Traceback" not in result.stderr
