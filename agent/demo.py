"""`rig-agent demo`: the whole pipeline on this machine against the built-in rig simulators."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import aiomqtt
import httpx
from cryptography.hazmat.primitives import serialization

from agent.logs import configure_logging
from agent.runtime import Agent
from agent.status import format_stats
from config.model import Config
from drivers.simulator import RigSimulator, simulator_points
from drivers.wits0_simulator import Wits0Simulator
from uplink.auth import generate_key_file
from uplink.witsml_doc import format_time, parse_log_documents

__all__ = ["run_demo"]

DEMO_RIG_ID = "demo-rig"
DEMO_POLL_INTERVAL = "500ms"
DEMO_WITS0_INTERVAL = 1.0
"""Seconds between packets of the simulated EDR."""
DEMO_DEVICE_ID = "demo-rig-edge"
DEMO_CLOUD_INTERVAL = "1s"
CLOUD_START_TIMEOUT = 20.0
"""Seconds the reference service may take to respond to /healthz after it is started."""
DEMO_LOG_UID = "demo-rig-time"
DEMO_WITSML_INTERVAL = "2s"
DEMO_WITSML_CURVES: dict[str, dict[str, str]] = {
    "rig-sim/hookload": {"mnemonic": "HKLA"},
    "standpipe_pressure": {"mnemonic": "SPPA"},
    "bit_depth": {"mnemonic": "DBTM"},
    "edr-sim/TVA": {"mnemonic": "TVA", "description": "Active tank volume"},
    "MFIA": {"mnemonic": "MFIA"},
}
"""Log curves from both simulators: three Modbus channels and two WITS0 record 01 items."""
DEMO_WITSML_SHOWN_ROWS = 3
SERVICE_QUERY_TIMEOUT = 0.5
"""Seconds the demo screen waits for the reference service to return the stored log."""


def run_demo(*, duration: float | None, data_dir: Path | None) -> int:
    """Run the demo until Ctrl-C or `duration` seconds; return the exit code."""
    keep_log = data_dir is not None
    with contextlib.ExitStack() as stack:
        if data_dir is None:
            data_dir = Path(
                stack.enter_context(tempfile.TemporaryDirectory(prefix="rig-agent-demo-"))
            )
        data_dir.mkdir(parents=True, exist_ok=True)
        log_path = data_dir / "agent.log"
        log_file = stack.enter_context(log_path.open("a", encoding="utf-8"))
        configure_logging("info", "json", stream=log_file)
        broker = stack.enter_context(_DemoBroker(data_dir))
        cloud = stack.enter_context(_DemoCloud(data_dir))
        return asyncio.run(_demo(duration, data_dir, broker, cloud, log_path, keep_log=keep_log))
    return 0  # pragma: no cover - the with block always returns


@dataclass
class _Counters:
    received: int = 0
    subscriber_connected: bool = False


async def _demo(
    duration: float | None,
    data_dir: Path,
    broker: _DemoBroker,
    cloud: _DemoCloud,
    log_path: Path,
    *,
    keep_log: bool,
) -> int:
    simulator, edr = await _start_simulators()
    config = _demo_config(data_dir, simulator.port, edr.port, broker.port, cloud)
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    counters = _Counters()
    started = time.monotonic()
    out = sys.stdout
    try:
        async with asyncio.TaskGroup() as group:
            agent_task = group.create_task(agent.run(stop))
            subscriber = group.create_task(_subscribe(broker.port, config.topic_prefix(), counters))
            while not stop.is_set():
                elapsed = time.monotonic() - started
                await _render(
                    out, agent, broker, cloud, simulator.port, edr, counters, elapsed, duration
                )
                if duration is not None and elapsed >= duration:
                    stop.set()
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=1.0)
            await agent_task
            subscriber.cancel()
    finally:
        await edr.stop()
        await simulator.stop()

    published = sum(s.published for s in agent.sinks)
    witsml_rows = await _stored_witsml_rows(cloud) if agent.witsml_sink is not None else []
    uploaded = (
        f"{agent.cloud_sink.uploaded} uploaded to the cloud service"
        if agent.cloud_sink is not None
        else "no cloud upload"
    )
    print(
        f"\nDemo finished after {time.monotonic() - started:.0f} s: "
        f"{agent.writer.committed} readings buffered, {published} published to MQTT, "
        f"{uploaded}, {counters.received} received by the demo subscriber.",
        file=out,
    )
    if witsml_rows:
        print("\n".join(witsml_rows), file=out)
    if keep_log:
        print(f"Agent log: {log_path}", file=out)
    return 0


async def _start_simulators() -> tuple[RigSimulator, Wits0Simulator]:
    """Start the Modbus rig simulator and the simulated EDR on free loopback ports."""
    simulator = RigSimulator()
    await simulator.start(host="127.0.0.1", port=0)
    edr = Wits0Simulator(interval=DEMO_WITS0_INTERVAL, model=simulator.model)
    try:
        await edr.start(host="127.0.0.1", port=0)
    except OSError:
        await simulator.stop()
        raise
    return simulator, edr


def _demo_config(
    data_dir: Path, modbus_port: int, wits0_port: int, mqtt_port: int, cloud: _DemoCloud
) -> Config:
    settings: dict[str, object] = {
        "agent": {"rig_id": DEMO_RIG_ID, "data_dir": str(data_dir), "metrics_listen": ""},
        "buffer": {"commit_interval": "100ms"},
        "sources": {
            "modbus": [
                {
                    "name": "rig-sim",
                    "url": f"tcp://127.0.0.1:{modbus_port}",
                    "unit_id": 1,
                    "poll_interval": DEMO_POLL_INTERVAL,
                    "timeout": "500ms",
                    "points": simulator_points(),
                }
            ],
            "wits0": [
                {
                    "name": "edr-sim",
                    "url": f"tcp://127.0.0.1:{wits0_port}",
                    "items": "standard-01",
                }
            ],
        },
        "mqtt": {"url": f"mqtt://127.0.0.1:{mqtt_port}"},
    }
    if cloud.running:
        settings["cloud"] = {
            # Plain http is accepted for a loopback host, so the demo needs no certificate.
            "url": cloud.url,
            "device_id": DEMO_DEVICE_ID,
            "private_key_file": str(cloud.key_file),
            "batch_max_readings": 1000,
            "interval": DEMO_CLOUD_INTERVAL,
        }
        settings["witsml"] = {
            "interval": DEMO_WITSML_INTERVAL,
            "row_period": "1s",
            "settle": "1s",
            "well_uid": "demo-well",
            "well_name": "Demo well 1H",
            "wellbore_uid": "demo-wellbore",
            "wellbore_name": "Demo well 1H OH",
            "log_uid": DEMO_LOG_UID,
            "log_name": "Demo rig time log",
            "curves": DEMO_WITSML_CURVES,
        }
    return Config.model_validate(settings)


async def _subscribe(port: int, topic_prefix: str, counters: _Counters) -> None:
    """Count readings arriving at a plain MQTT subscriber, as a consumer would see them."""
    while True:
        try:
            async with aiomqtt.Client(
                "127.0.0.1", port, identifier="rig-agent-demo-viewer"
            ) as client:
                await client.subscribe(f"{topic_prefix}/readings/#", qos=1)
                counters.subscriber_connected = True
                async for message in client.messages:
                    if isinstance(message.payload, bytes | bytearray):
                        counters.received += len(json.loads(message.payload)["readings"])
        except aiomqtt.MqttError:
            counters.subscriber_connected = False
            await asyncio.sleep(1.0)


async def _render(
    out: TextIO,
    agent: Agent,
    broker: _DemoBroker,
    cloud: _DemoCloud,
    modbus_port: int,
    edr: Wits0Simulator,
    counters: _Counters,
    elapsed: float,
    duration: float | None,
) -> None:
    if not agent.started.is_set():
        return
    stats = await agent.buffer.stats()
    sink = agent.sinks[0]
    if broker.running:
        mqtt_line = f"MQTT: private mosquitto on 127.0.0.1:{broker.port}, " + (
            "connected" if sink.connected else "connecting"
        )
    else:
        mqtt_line = (
            "MQTT: mosquitto is not installed, so nothing is listening on "
            f"127.0.0.1:{broker.port}; the backlog grows until a broker appears"
        )
    left = (
        "Ctrl-C to stop" if duration is None else f"stops in {max(0.0, duration - elapsed):.0f} s"
    )
    screen = [
        f"rig-agent demo: {elapsed:.0f} s ({left})",
        f"Modbus: rig simulator on 127.0.0.1:{modbus_port}, polled every {DEMO_POLL_INTERVAL}",
        f"WITS0: simulated EDR on 127.0.0.1:{edr.port}, one packet every "
        f"{DEMO_WITS0_INTERVAL:g} s, {edr.packets_sent} sent",
        mqtt_line,
        _cloud_line(agent, cloud),
        await _witsml_line(agent, cloud),
        f"buffered {agent.writer.committed}, published {sink.published}, "
        f"received by a subscriber {counters.received}",
        "",
        format_stats(agent.config.agent.rig_id, stats),
    ]
    if out.isatty():
        out.write("\x1b[H\x1b[2J")
    else:
        screen = screen[:7]
    out.write("\n".join(screen) + "\n")
    out.flush()


def _cloud_line(agent: Agent, cloud: _DemoCloud) -> str:
    sink = agent.cloud_sink
    if sink is None:
        return f"Cloud: {cloud.unavailable}, so the demo runs without the cloud uplink"
    state = "connected" if sink.connected else "connecting"
    return (
        f"Cloud: reference service on {cloud.url}, {state}, uploaded {sink.uploaded}, "
        f"quarantined {sink.quarantined}"
    )


async def _witsml_line(agent: Agent, cloud: _DemoCloud) -> str:
    sink = agent.witsml_sink
    if sink is None:
        return "WITSML: off, because the log goes to the cloud service, which is not running"
    try:
        async with httpx.AsyncClient(base_url=cloud.url, timeout=SERVICE_QUERY_TIMEOUT) as client:
            response = await client.get("/v1/witsml/logs")
        response.raise_for_status()
        logs = response.json()["logs"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        stored = f"the service did not return its logs ({type(exc).__name__})"
    else:
        rows = next((entry["rows"] for entry in logs if entry.get("uid") == DEMO_LOG_UID), 0)
        stored = f"the service stores {_count(rows, 'row')}"
    uploaded = _count(sink.rows_uploaded, "row")
    documents = _count(sink.documents_uploaded, "document")
    return (
        f"WITSML: log {DEMO_LOG_UID}, one row per second, {uploaded} uploaded "
        f"in {documents}, {stored}"
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


async def _stored_witsml_rows(cloud: _DemoCloud) -> list[str]:
    """Return the newest rows of the demo log on the service as a small table, or []."""
    try:
        async with httpx.AsyncClient(base_url=cloud.url, timeout=5.0) as client:
            response = await client.get(f"/v1/witsml/logs/{DEMO_LOG_UID}")
        if response.status_code == httpx.codes.NOT_FOUND:
            return [f"WITSML log {DEMO_LOG_UID}: no rows reached the service yet"]
        response.raise_for_status()
        (stored,) = parse_log_documents(response.content)
    except (httpx.HTTPError, ValueError) as exc:
        return [f"WITSML log {DEMO_LOG_UID}: not read from the service ({type(exc).__name__})"]
    heads = ["time (UTC)"] + [f"{c.mnemonic} {c.unit}".strip() for c in stored.curves]
    table = [heads]
    for ts_us, values in stored.rows[-DEMO_WITSML_SHOWN_ROWS:]:
        time_text = format_time(ts_us)
        table.append([time_text, *(stored.header.null_value if v is None else v for v in values)])
    widths = [max(len(line[i]) for line in table) for i in range(len(heads))]
    lines = [
        f"WITSML log {DEMO_LOG_UID} on the service: {len(stored.rows)} rows, the newest "
        f"{min(DEMO_WITSML_SHOWN_ROWS, len(stored.rows))}:"
    ]
    lines += [
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in table
    ]
    return lines


class _DemoBroker:
    """A private mosquitto on a free loopback port, when the binary is installed."""

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None
        )
        self.conf = data_dir / "mosquitto.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> _DemoBroker:
        if self.binary is None:
            return self
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nlog_dest none\n"
        )
        self.proc = subprocess.Popen(  # noqa: S603 - fixed binary, generated config
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, 10.0)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class _DemoCloud:
    """The reference ingest service in a child process on a free loopback port, with a fresh key.

    The service needs the optional `cloud` extra (FastAPI and uvicorn). Without
    it, or when the service does not start, `running` is false and
    `unavailable` contains the reason.
    """

    def __init__(self, data_dir: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key_file = data_dir / "device-key.pem"
        self.keys_dir = data_dir / "keys"
        self.db = data_dir / "cloud.sqlite3"
        self.log_path = data_dir / "cloud.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.unavailable = ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> _DemoCloud:
        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            self.unavailable = (
                f"{' and '.join(missing)} not installed (pip install 'rig-agent[cloud]')"
            )
            return self
        try:
            self._register_fresh_key()
        except (OSError, ValueError) as exc:
            self.unavailable = f"no device key could be made in {self.key_file}: {exc}"
            return self
        command = [sys.executable, "-m", "cloud.cli", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--db", str(self.db)]
        command += ["--keys-dir", str(self.keys_dir), "--log-level", "warning"]
        with self.log_path.open("ab") as log_file:
            self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, fixed arguments
                command, stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            self._wait_until_healthy(self.proc)
        except RuntimeError as exc:
            self.unavailable = str(exc)
            self.__exit__()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def _register_fresh_key(self) -> None:
        from cloud.auth import register_key

        key = generate_key_file(self.key_file, overwrite=True)
        public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.keys_dir.mkdir(exist_ok=True)
        register_key(self.keys_dir, public_pem)

    def _wait_until_healthy(self, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + CLOUD_START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                msg = (
                    f"the reference service exited with code {proc.returncode} "
                    f"(see {self.log_path})"
                )
                raise RuntimeError(msg)
            try:
                if httpx.get(f"{self.url}/healthz", timeout=0.5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        msg = (
            f"the reference service did not respond to {self.url}/healthz within "
            f"{CLOUD_START_TIMEOUT:.0f} s (see {self.log_path})"
        )
        raise RuntimeError(msg)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    msg = f"mosquitto did not start listening on 127.0.0.1:{port} within {timeout:.0f} s"
    raise RuntimeError(msg)
