"""End to end: the agent under a stand-in for systemd, with /metrics, SIGHUP and full disks.

Each test runs `rig-agent run` as a child process against real peers on
loopback: a pymodbus server, a private mosquitto or a TCP listener that never
responds, and a Unix datagram socket in place of systemd's notification socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from buffer.reader import iter_readings
from buffer.store import DB_FILENAME
from tests.peers import AgentProcess, ModbusPeer, Mosquitto, free_port, sim_device

pytestmark = pytest.mark.e2e

WATCHDOG_USEC = 2_000_000
"""Watchdog timeout the tests give the agent: it pings every second."""
MAX_AGE = 5.1
"""The agent's heartbeat limit with commit_interval 100 ms (LIVENESS_MAX_AGE + 0.1)."""
MQTT = (("sink", "mqtt"),)
"""Labels of the MQTT sink's series."""

HANG_LAUNCHER = '''\
"""Run `rig-agent` with the MQTT sink's cursor commit made to hang once a file exists."""
import asyncio
import sys
from pathlib import Path

import uplink.mqtt
from agent.cli import main

trigger = Path(sys.argv[1])
commit = uplink.mqtt._Session._commit


async def hanging_commit(self, *, force=False):
    if trigger.exists() and not force:
        # An await that never completes, as a bug in a sink would leave it.
        await asyncio.get_running_loop().create_future()
    await commit(self, force=force)


uplink.mqtt._Session._commit = hanging_commit
sys.exit(main(sys.argv[2:]))
'''


# --- peers and helpers -----------------------------------------------------------------------


class NotifySocket:
    """A Unix datagram socket that receives the agent's sd_notify messages, as systemd would."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "notify"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)
        self.messages: list[tuple[float, str]] = []
        """Each datagram with the time.monotonic() at which the test read it."""
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self._drain)

    def _drain(self) -> None:
        while True:
            try:
                data = self.sock.recv(8192)
            except BlockingIOError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, text: str) -> list[float]:
        """Return the arrival times of the messages equal to `text`."""
        return [at for at, message in self.messages if message == text]

    def first(self, prefix: str) -> float:
        """Return the arrival time of the first message that starts with `prefix`."""
        return next(at for at, message in self.messages if message.startswith(prefix))

    def starting_with(self, prefix: str) -> list[str]:
        return [message for _, message in self.messages if message.startswith(prefix)]

    async def wait_for(self, prefix: str, count: int = 1, within: float = 20.0) -> None:
        async with asyncio.timeout(within):
            while len(self.starting_with(prefix)) < count:  # noqa: ASYNC110 - filled by a reader callback
                await asyncio.sleep(0.02)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
def notify(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifySocket]:
    """A notification socket named in $NOTIFY_SOCKET, with WATCHDOG_USEC set, for child agents."""
    # A short directory, because a Unix socket path may have at most 107 bytes.
    directory = Path(tempfile.mkdtemp(prefix="rig-notify-"))
    receiver = NotifySocket(directory)
    monkeypatch.setenv("NOTIFY_SOCKET", str(receiver.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        yield receiver
    finally:
        receiver.close()
        shutil.rmtree(directory, ignore_errors=True)


class LaunchedAgent(AgentProcess):
    """An agent process started through a launcher script that the test wrote."""

    def __init__(self, config: Path, log: Path, launcher: Path, launcher_args: list[str]) -> None:
        super().__init__(config, log)
        self.command = [sys.executable, str(launcher), *launcher_args, "run", "-c", str(config)]

    async def start(self, wait_s: float = 20.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).parents[1],
            )
        async with asyncio.timeout(wait_s):
            while b'"agent_started"' not in self.log.read_bytes():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.log}")
                await asyncio.sleep(0.05)


def events(log: Path, name: str | None = None) -> list[dict[str, Any]]:
    """Return the agent's JSON log lines, optionally only the events called `name`."""
    found = []
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        event = json.loads(line)
        if name is None or event.get("event") == name:
            found.append(event)
    return found


async def wait_for_event(log: Path, name: str, count: int = 1, within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while len(events(log, name)) < count:  # noqa: ASYNC110 - written by another process
            await asyncio.sleep(0.05)


async def wait_until(condition: Callable[[], bool], within: float = 15.0) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - the state belongs to other processes
            await asyncio.sleep(0.05)


def write_config(path: Path, *tables: str, agent: str = "", buffer: str = "") -> None:
    """Write a config with data_dir beside it; `agent` and `buffer` add keys to those tables."""
    path.write_text(
        f'[agent]\nrig_id = "rig-ops"\ndata_dir = "{path.parent / "data"}"\n'
        f'log_format = "json"\nclock_check = "off"\n{agent}'
        f'[buffer]\ncommit_interval = "100ms"\n{buffer}' + "".join(tables)
    )


def modbus_source(
    name: str, port: int, unit: int = 1, *, points: int = 2, poll: str = "100ms"
) -> str:
    text = (
        f'[[sources.modbus]]\nname = "{name}"\nurl = "tcp://127.0.0.1:{port}"\n'
        f'unit_id = {unit}\npoll_interval = "{poll}"\ntimeout = "300ms"\n'
    )
    for index in range(points):
        text += f'[[sources.modbus.points]]\nchannel = "{name}-{index}"\naddress = {index}\n'
    return text


def mqtt_table(port: int) -> str:
    return f'[mqtt]\nurl = "mqtt://127.0.0.1:{port}"\n'


@contextlib.asynccontextmanager
async def modbus_peer(*units: int) -> AsyncIterator[ModbusPeer]:
    peer = ModbusPeer([sim_device(unit) for unit in units], tcp_port=free_port())
    await peer.start()
    try:
        yield peer
    finally:
        await peer.stop()


@contextlib.contextmanager
def agent_process(agent: AgentProcess) -> Iterator[AgentProcess]:
    try:
        yield agent
    finally:
        agent.close()


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Samples of /metrics by name and sorted labels."""


async def scrape(port: int) -> Samples:
    """Return every sample of /metrics by name and sorted labels, parsed by prometheus_client."""
    async with httpx.AsyncClient(timeout=5) as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics")
    response.raise_for_status()
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def series(samples: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Return the values of one sample name by their sorted labels."""
    return {labels: value for (sample, labels), value in samples.items() if sample == name}


async def wait_for_metric(
    port: int,
    name: str,
    labels: tuple[tuple[str, str], ...],
    condition: Callable[[float], bool],
    within: float = 20.0,
) -> float:
    """Scrape /metrics until the sample `name` with `labels` meets `condition`; return it."""
    async with asyncio.timeout(within):
        while True:
            value = series(await scrape(port), name).get(labels)
            if value is not None and condition(value):
                return value
            await asyncio.sleep(0.1)


def size_on_disk(data_dir: Path) -> int:
    total = 0
    for name in (DB_FILENAME, DB_FILENAME + "-wal"):
        with contextlib.suppress(FileNotFoundError):
            total += (data_dir / name).stat().st_size
    return total


# --- systemd notifications and the watchdog --------------------------------------------------


async def test_watchdog_stops_when_sink_hangs(
    tmp_path: Path, mosquitto: Mosquitto, notify: NotifySocket
) -> None:
    """READY, then pings while healthy; a hung MQTT sink stops them; SIGTERM sends STOPPING.

    Every wait of the sink has a timeout, so no broker can hang it. The
    launcher makes one await in the sink never complete once the test
    creates a file, as a bug would.
    """
    launcher = tmp_path / "hang_launcher.py"
    launcher.write_text(HANG_LAUNCHER)
    trigger = tmp_path / "hang-now"
    config = tmp_path / "agent.toml"
    write_config(config, mqtt_table(mosquitto.port), agent='metrics_listen = ""\n')
    log = tmp_path / "agent.log"
    notify.start()
    with agent_process(LaunchedAgent(config, log, launcher, [str(trigger)])) as agent:
        await agent.start()
        await notify.wait_for("READY=1")
        await wait_for_event(log, "mqtt_connected")
        await asyncio.sleep(3.0)
        healthy_pings = notify.times("WATCHDOG=1")
        assert len(healthy_pings) >= 2

        trigger.touch()
        hung_at = time.monotonic()
        await asyncio.sleep(MAX_AGE + 3.5)
        pings = notify.times("WATCHDOG=1")
        assert [at for at in pings if at > hung_at + MAX_AGE + 2.1] == []
        assert any(
            text.startswith("STATUS=unhealthy (sink:mqtt stale)")
            for text in notify.starting_with("STATUS=")
        )
        withheld = events(log, "watchdog_pings_withheld")
        assert [event["reasons"] for event in withheld] == [["sink:mqtt stale"]]

        assert agent.terminate() == 0
    await notify.wait_for("STOPPING=1", within=2)
    assert notify.messages[-1][1] == "STOPPING=1"


async def test_silent_broker_pings_and_metrics(tmp_path: Path, notify: NotifySocket) -> None:
    """A broker that never responds to CONNECT stalls nothing; /metrics counts what was stored.

    The MQTT sink waits 10 s for CONNACK, longer than the heartbeat limit, so
    the pings continue only because the sink beats while it waits.
    """
    received = bytearray()
    handlers: list[asyncio.Task[None]] = []

    async def never_respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.append(task)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while data := await reader.read(4096):
                received.extend(data)
        writer.close()

    broker = await asyncio.start_server(never_respond, "127.0.0.1", 0)
    broker_port = broker.sockets[0].getsockname()[1]
    metrics_port = free_port()
    config = tmp_path / "agent.toml"
    log = tmp_path / "agent.log"
    notify.start()
    try:
        async with modbus_peer(1) as peer:
            write_config(
                config,
                mqtt_table(broker_port),
                modbus_source("pumps", peer.tcp_port, points=3, poll="50ms"),
                agent=f'metrics_listen = "127.0.0.1:{metrics_port}"\n',
            )
            with agent_process(AgentProcess(config, log)) as agent:
                await agent.start()
                await notify.wait_for("READY=1")
                ready_at = notify.first("READY=1")
                await asyncio.sleep(MAX_AGE + 3.0)
                # The sink sent CONNECT (packet type 1) and still waits for CONNACK.
                assert received[:1] == b"\x10"
                assert events(log, "mqtt_unavailable") == []
                pings = [at for at in notify.times("WATCHDOG=1") if at > ready_at]
                gaps = [b - a for a, b in zip([ready_at, *pings], pings, strict=False)]
                assert len(pings) >= MAX_AGE + 1
                assert max(gaps) < 1.6
                assert events(log, "watchdog_pings_withheld") == []

                await peer.stop()
                pumps = (("source", "pumps"),)
                connected = "rig_agent_source_connected"
                await wait_for_metric(metrics_port, connected, pumps, lambda up: up == 0)
                samples = await settled_metrics(metrics_port)
                assert agent.terminate() == 0

        stored = [r for r in iter_readings(config.parent / "data")]
        readings = series(samples, "rig_agent_source_readings_total")
        assert sum(readings.values()) == len(stored)
        for channel in ("pumps-0", "pumps-1", "pumps-2"):
            key = (("channel", channel), ("source", "pumps"))
            assert readings[key] == sum(1 for r in stored if r.channel == channel)
        assert series(samples, "rig_agent_buffer_last_seq")[()] == len(stored)
        assert series(samples, "rig_agent_sink_backlog_readings")[(("sink", "mqtt"),)] == len(
            stored
        )
        assert series(samples, "rig_agent_sink_connected")[(("sink", "mqtt"),)] == 0
        assert series(samples, "rig_agent_source_connected")[(("source", "pumps"),)] == 0
        assert series(samples, "rig_agent_source_errors_total")[(("source", "pumps"),)] >= 1
        assert series(samples, "rig_agent_stale_parts")[()] == 0
    finally:
        broker.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await broker.wait_closed()


async def settled_metrics(port: int, within: float = 10.0) -> Samples:
    """Scrape until the counters stop growing and the cached buffer statistics catch up.

    The MQTT sink's cursor stays at 0 in these tests, so its backlog and its
    readings dropped by the size cap add up to last_seq.
    """
    previous = -1.0
    async with asyncio.timeout(within):
        while True:
            samples = await scrape(port)
            produced = sum(series(samples, "rig_agent_source_readings_total").values())
            last_seq = series(samples, "rig_agent_buffer_last_seq")[()]
            backlog = series(samples, "rig_agent_sink_backlog_readings")[MQTT]
            dropped = series(samples, "rig_agent_sink_dropped_readings_total")[MQTT]
            if produced == last_seq == backlog + dropped == previous:
                return samples
            previous = produced
            await asyncio.sleep(0.5)


# --- reload on SIGHUP ------------------------------------------------------------------------


async def test_sighup_reload(
    tmp_path: Path, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broken file keeps the running config; a valid one restarts only the changed source."""
    monkeypatch.delenv("WATCHDOG_USEC")
    metrics_port = free_port()
    config = tmp_path / "agent.toml"
    log = tmp_path / "agent.log"
    notify.start()
    async with modbus_peer(1, 2) as peer:

        def write(mud_poll: str, level: str) -> None:
            write_config(
                config,
                modbus_source("pumps", peer.tcp_port, 1),
                modbus_source("mud", peer.tcp_port, 2, poll=mud_poll),
                agent=f'metrics_listen = "127.0.0.1:{metrics_port}"\nlog_level = "{level}"\n',
            )

        write("100ms", "info")
        with agent_process(AgentProcess(config, log)) as agent:
            await agent.start()
            await notify.wait_for("READY=1")
            await asyncio.sleep(1.0)
            async with httpx.AsyncClient(timeout=5) as client:
                await client.get(f"http://127.0.0.1:{metrics_port}/nothing-here")

            config.write_text(config.read_text().replace('"100ms"', '"fast"', 1))
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGHUP)
            await wait_for_event(log, "config_reload_rejected")
            await notify.wait_for("READY=1", count=2)
            await asyncio.sleep(1.0)

            write("300ms", "debug")
            reload_sent = time.monotonic()
            agent.proc.send_signal(signal.SIGHUP)
            await wait_for_event(log, "config_reloaded")
            await notify.wait_for("READY=1", count=3)
            async with httpx.AsyncClient(timeout=5) as client:
                await client.get(f"http://127.0.0.1:{metrics_port}/nothing-here")
            await asyncio.sleep(1.5)
            assert agent.proc.poll() is None
            assert agent.terminate() == 0

        rejected = events(log, "config_reload_rejected")[0]
        assert len(rejected["errors"]) == 1
        assert rejected["errors"][0].startswith(
            f"{config}:9: buffer.commit_interval = \"fast\": invalid duration 'fast'"
        )
        assert len(notify.starting_with("RELOADING=1\nMONOTONIC_USEC=")) == 2
        reloaded = events(log, "config_reloaded")
        assert len(reloaded) == 1
        assert reloaded[0]["sources_restarted"] == ["mud"]
        assert reloaded[0]["log_level"] == "debug"
        assert "sources_added" not in reloaded[0]
        # The new level applies: a rejected request is logged at debug only after the reload.
        assert len(events(log, "metrics_request_rejected")) == 1

        # Only the changed source was built again: each driver logs its plan once when built.
        plans = [event["source"] for event in events(log, "modbus_plan")]
        assert sorted(plans) == ["mud", "mud", "pumps"]
        pumps = peer.request_times(1)
        assert max(b - a for a, b in itertools.pairwise(pumps)) < 0.35
        mud = peer.request_times(2)
        before = [b - a for a, b in itertools.pairwise(mud) if b < reload_sent]
        after = [b - a for a, b in itertools.pairwise(mud) if a > reload_sent + 0.5]
        assert statistics.median(before) == pytest.approx(0.1, abs=0.03)
        assert statistics.median(after) == pytest.approx(0.3, abs=0.05)


# --- buffer limits ---------------------------------------------------------------------------


async def test_max_bytes_with_broker_down(tmp_path: Path) -> None:
    """A 1 MiB buffer with no broker stays within the cap plus one commit batch on disk.

    The readings dropped for the sink are those produced minus those still stored.
    """
    metrics_port = free_port()
    config = tmp_path / "agent.toml"
    log = tmp_path / "agent.log"
    data_dir = tmp_path / "data"
    sizes: list[int] = []

    async def measure() -> None:
        while True:
            sizes.append(size_on_disk(data_dir))
            await asyncio.sleep(0.02)

    async with modbus_peer(1) as peer:
        write_config(
            config,
            mqtt_table(free_port()),
            modbus_source("pumps", peer.tcp_port, points=120, poll="10ms"),
            agent=f'metrics_listen = "127.0.0.1:{metrics_port}"\n',
            buffer='max_bytes = "1MiB"\n',
        )
        with agent_process(AgentProcess(config, log)) as agent:
            await agent.start()
            measuring = asyncio.create_task(measure())
            try:
                dropped_metric = "rig_agent_sink_dropped_readings_total"
                await wait_for_metric(metrics_port, dropped_metric, MQTT, lambda v: v > 0)
                await asyncio.sleep(1.0)
            finally:
                measuring.cancel()
            await peer.stop()
            pumps = (("source", "pumps"),)
            connected = "rig_agent_source_connected"
            await wait_for_metric(metrics_port, connected, pumps, lambda up: up == 0)
            samples = await settled_metrics(metrics_port)
            assert agent.terminate() == 0

    produced = sum(series(samples, "rig_agent_source_readings_total").values())
    dropped = series(samples, "rig_agent_sink_dropped_readings_total")[MQTT]
    backlog = series(samples, "rig_agent_sink_backlog_readings")[MQTT]
    assert produced > 40_000
    assert dropped == produced - backlog
    # One commit contains about 100 ms of readings, 1200 here, which fit in 64 KiB.
    assert max(sizes) <= 1024**2 + 64 * 1024

    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent.cli", "status", "-c", str(config), "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    stats = json.loads(status.stdout)
    assert stats["last_seq"] == produced
    assert stats["sinks"][0]["dropped_buffer_full"] == produced - stats["rows"]
    assert stats["dropped_disk_full"] == 0


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, mounted for the test and unmounted after it; needs root."""
    if os.geteuid() != 0:
        pytest.fail(
            "this test mounts a 4 MiB tmpfs to fill a disk for real, which needs root: "
            "run pytest as root (as CI does)"
        )
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"mounting a tmpfs on {mount_point} failed: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], check=False).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem has no space left."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        while True:
            try:
                out.write(b"\0" * 65536)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    with contextlib.suppress(OSError), filler.open("ab", buffering=0) as out:
        while out.write(b"\0" * 512):
            pass
    return filler


async def test_full_disk_agent_survives(tmp_path: Path, small_fs: Path) -> None:
    """On a full filesystem the agent keeps running and counts drops; freed space resumes writes."""
    metrics_port = free_port()
    config = small_fs / "agent.toml"
    log = tmp_path / "agent.log"
    async with modbus_peer(1) as peer:
        write_config(
            config,
            modbus_source("pumps", peer.tcp_port, points=20, poll="20ms"),
            agent=f'metrics_listen = "127.0.0.1:{metrics_port}"\n',
            buffer='min_free_bytes = "0B"\n',
        )
        with agent_process(AgentProcess(config, log)) as agent:
            await agent.start()
            await asyncio.sleep(1.0)
            filler = await asyncio.to_thread(fill, small_fs)
            disk_full = "rig_agent_buffer_disk_full_dropped_readings_total"
            await wait_for_metric(metrics_port, disk_full, (), lambda dropped: dropped > 0)
            async with httpx.AsyncClient(timeout=5) as client:
                health = await client.get(f"http://127.0.0.1:{metrics_port}/healthz")
            assert health.status_code == 503
            assert "disk is full" in health.json()["reasons"][0]
            await asyncio.sleep(1.0)
            full_seq = series(await scrape(metrics_port), "rig_agent_buffer_last_seq")[()]
            assert agent.proc is not None
            assert agent.proc.poll() is None

            filler.unlink()
            await wait_for_metric(
                metrics_port, "rig_agent_buffer_last_seq", (), lambda seq: seq > full_seq + 1000
            )
            assert agent.terminate() == 0

    assert events(log, "buffer_disk_full_dropped")
