"""Real peers for tests: a private mosquitto, a subscriber, socat serial pairs, Modbus servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiomqtt
import httpx
from pymodbus import FramerType
from pymodbus.pdu import ModbusPDU
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from buffer.reading import Reading
from cloud.auth import register_key, unregister_key
from drivers.base import Driver
from drivers.wits0_parser import Wits0Packet, Wits0Parser


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


class Mosquitto:
    """A private mosquitto broker on 127.0.0.1 that a test can stop and start again."""

    def __init__(self, port: int | None = None) -> None:
        binary = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if binary is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto")
        self.binary = binary
        self.port = port or free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="rig-agent-mosquitto-")
        # Run as root, mosquitto drops to its own user, which must be able to write
        # the persistence file; persistence keeps subscriber sessions across restarts.
        Path(self._dir.name).chmod(0o777)
        self.conf = Path(self._dir.name) / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self._dir.name}/\n"
            "log_dest stderr\n"
            "log_type error\n"
            "max_inflight_messages 0\n"
            "max_queued_messages 0\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


@dataclass
class Collected:
    """Messages a subscriber received, decoded from the readings payload."""

    messages: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    def readings(self) -> list[dict[str, Any]]:
        """Return every reading of every `readings` message, in arrival order."""
        out: list[dict[str, Any]] = []
        for topic, payload in self.messages:
            if "/readings/" in topic:
                out.extend(payload["readings"])
        return out

    def seqs(self) -> list[int]:
        return [int(r["seq"]) for r in self.readings()]


@asynccontextmanager
async def subscriber(port: int, topic: str) -> AsyncIterator[Collected]:
    """Subscribe with QoS 1 on a persistent session and collect messages in the background.

    The broker persists the session, so messages published while this subscriber
    is away (broker restarted, subscriber not yet back) are queued for it.
    """
    collected = Collected()

    async def listen() -> None:
        while True:
            try:
                async with aiomqtt.Client(
                    "127.0.0.1", port, identifier=f"test-sub-{port}", clean_session=False
                ) as client:
                    await client.subscribe(topic, qos=1)
                    collected.connected.set()
                    async for message in client.messages:
                        body = message.payload
                        assert isinstance(body, bytes | bytearray)
                        collected.messages.append((str(message.topic), json.loads(body)))
            except aiomqtt.MqttError:
                collected.connected.clear()
                await asyncio.sleep(0.2)

    task = asyncio.create_task(listen())
    try:
        async with asyncio.timeout(10):
            await collected.connected.wait()
        yield collected
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class AgentProcess:
    """`rig-agent run -c CONFIG` in a child process, with its output in a file."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self, wait_s: float = 20.0) -> None:
        """Start the agent; wait until it logs `agent_started`, when its signal handlers are set."""
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - Popen returns at once
                [sys.executable, "-m", "agent.cli", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        async with asyncio.timeout(wait_s):
            while b'"agent_started"' not in self.log.read_bytes()[offset:]:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"agent exited with {self.proc.returncode}; see {self.log}")
                await asyncio.sleep(0.05)

    def kill(self) -> None:
        """Kill with SIGKILL: no shutdown code runs."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 10.0) -> int:
        """Send SIGTERM and return the exit code; raise if it takes longer than `timeout`."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class SerialPair:
    """Two linked pseudo-terminals from socat, at fixed link paths that survive a restart.

    Stopping socat makes both ports vanish, as an unplugged USB adapter does;
    starting it again creates new ptys behind the same two paths.
    """

    def __init__(self, directory: Path) -> None:
        binary = shutil.which("socat")
        if binary is None:
            raise RuntimeError("socat is not installed: apt-get install socat")
        self.binary = binary
        self.a = directory / "ttyA"
        self.b = directory / "ttyB"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> None:
        """Start socat and wait until both link paths lead to a pty."""
        self.proc = subprocess.Popen(
            [
                self.binary,
                "-d",
                "-d",
                f"pty,raw,echo=0,link={self.a}",
                f"pty,raw,echo=0,link={self.b}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not (self.a.exists() and self.b.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"socat exited with code {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"socat did not create {self.a} and {self.b} in {timeout}s")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop socat and remove the link paths, so the ports are gone."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        # socat removes its links on SIGTERM; this covers a socat that was killed.
        self.a.unlink(missing_ok=True)
        self.b.unlink(missing_ok=True)


@dataclass
class FrameEvent:
    """A request arriving at or a response leaving a Modbus test server."""

    time: float
    """time.monotonic() when the frame was decoded or sent."""
    unit_id: int
    kind: Literal["request", "response"]


def sim_device(
    unit_id: int, *, registers: int = 300, bits: int = 64, registers_from: int = 0
) -> SimDevice:
    """A simulated device whose four tables are separate and start at address 0.

    Holding and input registers cover `registers_from` to `registers - 1`;
    reads outside that get exception code 2 (illegal data address).
    """
    count = registers - registers_from
    return SimDevice(
        id=unit_id,
        simdata=(
            [SimData(0, count=bits, datatype=DataType.BITS)],
            [SimData(0, count=bits, datatype=DataType.BITS)],
            [SimData(registers_from, count=count, datatype=DataType.REGISTERS)],
            [SimData(registers_from, count=count, datatype=DataType.REGISTERS)],
        ),
    )


class ModbusPeer:
    """A pymodbus server for several unit ids, on TCP or on a serial port, that tests observe.

    It counts requests per unit id and function code, records when each
    request arrived and each response left, and can mute unit ids: a muted
    unit's responses are dropped, as on a real bus when a device stops
    responding.
    """

    def __init__(
        self, devices: list[SimDevice], *, tcp_port: int = 0, serial_port: Path | None = None
    ) -> None:
        if (tcp_port == 0) == (serial_port is None):
            raise ValueError("give exactly one of tcp_port and serial_port")
        self.devices = devices
        self.tcp_port = tcp_port
        self.serial_port = serial_port
        self.requests: Counter[tuple[int, int]] = Counter()
        """Requests received, by (unit id, function code)."""
        self.events: list[FrameEvent] = []
        self.connections: list[bool] = []
        """One entry per client connect (True) and disconnect (False)."""
        self.muted: set[int] = set()
        self.server: ModbusTcpServer | ModbusSerialServer | None = None

    async def start(self) -> None:
        if self.serial_port is not None:
            self.server = ModbusSerialServer(
                self.devices,
                port=str(self.serial_port),
                framer=FramerType.RTU,
                baudrate=115200,
                trace_pdu=self._trace_pdu,
                trace_packet=self._trace_packet,
                trace_connect=self.connections.append,
            )
        else:
            self.server = ModbusTcpServer(
                self.devices,
                address=("127.0.0.1", self.tcp_port),
                trace_pdu=self._trace_pdu,
                trace_packet=self._trace_packet,
                trace_connect=self.connections.append,
            )
        await self.server.serve_forever(background=True)

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.shutdown()  # type: ignore[no-untyped-call]
            self.server = None

    async def write(self, unit_id: int, table: str, address: int, values: Sequence[Any]) -> None:
        """Set registers or bits of one table of one unit."""
        assert self.server is not None
        codes = {"coil": 1, "discrete": 2, "holding": 3, "input": 4}
        await self.server.async_setValues(unit_id, codes[table], address, list(values))

    def total(self, unit_id: int) -> int:
        """Return the number of requests that unit has received."""
        return sum(n for (unit, _), n in self.requests.items() if unit == unit_id)

    def request_times(self, unit_id: int) -> list[float]:
        return [e.time for e in self.events if e.kind == "request" and e.unit_id == unit_id]

    def _trace_pdu(self, sending: bool, pdu: ModbusPDU) -> ModbusPDU:
        if not sending:
            self.requests[(pdu.dev_id, pdu.function_code)] += 1
            self.events.append(FrameEvent(time.monotonic(), pdu.dev_id, "request"))
        return pdu

    def _trace_packet(self, sending: bool, data: bytes) -> bytes:
        if not sending or not data:
            return data
        # The unit id is the first byte of an RTU frame and the seventh of a TCP (MBAP) frame.
        unit_id = data[0] if self.serial_port is not None else data[6]
        if unit_id in self.muted:
            return b""
        self.events.append(FrameEvent(time.monotonic(), unit_id, "response"))
        return data


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


@asynccontextmanager
async def running(driver: Driver, emit: Collector) -> AsyncIterator[asyncio.Task[None]]:
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


class WitsDevice:
    """A WITS level 0 device on 127.0.0.1 that a `tcp://` source connects to.

    It keeps every connection, parses what the agent sends on each, and
    writes test packets to the newest one. With `handshake=True` it acts as
    an EDR in send-and-receive mode: it streams `packets` (one every
    `interval` seconds) to a connection only after that connection has sent
    a valid WITS packet.
    """

    def __init__(
        self,
        *,
        handshake: bool = False,
        packets: Sequence[bytes] = (),
        interval: float = 0.02,
    ) -> None:
        self.port = free_port()
        self.handshake = handshake
        self.packets = list(packets)
        self.interval = interval
        self.connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.received: list[Wits0Packet] = []
        """Packets the agent sent, over all connections."""
        self.sent_packets = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for _, writer in self.connections:
            writer.close()
        for _, writer in self.connections:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def wait_connections(self, count: int, within: float = 5.0) -> None:
        async with asyncio.timeout(within), self._changed:
            await self._changed.wait_for(lambda: len(self.connections) >= count)

    async def write(self, data: bytes) -> None:
        """Write bytes to the newest connection."""
        _, writer = self.connections[-1]
        writer.write(data)
        async with asyncio.timeout(10):
            await writer.drain()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async with self._changed:
            self.connections.append((reader, writer))
            self._changed.notify_all()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            # The agent closing or resetting its end is a normal way for a connection to end.
            with contextlib.suppress(OSError):
                await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = Wits0Parser()
        streaming: asyncio.Task[None] | None = None
        try:
            while data := await reader.read(4096):
                packets = parser.feed(data)
                self.received.extend(packets)
                if packets and self.handshake and streaming is None:
                    streaming = asyncio.create_task(self._stream(writer))
        finally:
            if streaming is not None:
                streaming.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await streaming

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        for packet in self.packets:
            writer.write(packet)
            await writer.drain()
            self.sent_packets += 1
            await asyncio.sleep(self.interval)


class CloudService:
    """The reference ingest service under uvicorn in a child process, on a fixed 127.0.0.1 port.

    The database and key folder live in a temporary directory that outlasts
    `stop()`, so a test can stop the service and start it again on the same
    port with the same stored readings. Fault injection is on by default.
    """

    def __init__(
        self,
        *,
        audience: str = "rig-cloud",
        test_faults: bool = True,
        max_body_bytes: int | None = None,
    ) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="rig-agent-cloud-")
        root = Path(self._dir.name)
        self.port = free_port()
        self.db = root / "cloud.db"
        self.keys_dir = root / "keys"
        self.keys_dir.mkdir()
        self.log = root / "cloud.log"
        self.audience = audience
        self.test_faults = test_faults
        self.max_body_bytes = max_body_bytes
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20.0) -> None:
        """Start the service and wait until it accepts connections on its port."""
        command = [sys.executable, "-m", "cloud.cli", "serve", "--port", str(self.port)]
        command += ["--db", str(self.db), "--keys-dir", str(self.keys_dir)]
        command += ["--audience", self.audience, "--log-level", "warning"]
        if self.max_body_bytes is not None:
            command += ["--max-body-bytes", str(self.max_body_bytes)]
        env = {**os.environ, "RIG_CLOUD_TEST_FAULTS": "1" if self.test_faults else "0"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        # uvicorn opens its socket only after the app's startup (database, keys) is done.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cloud service exited with {self.proc.returncode}; see {self.log}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cloud service not listening after {timeout}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop with SIGTERM (uvicorn finishes open requests), or SIGKILL after 10 s."""
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def kill(self) -> None:
        """Kill with SIGKILL: no shutdown code runs."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def register_key(self, public_pem: bytes | str) -> str:
        """Register a device public key (PEM) with the service and return its kid."""
        return register_key(self.keys_dir, public_pem)

    def unregister_key(self, kid: str) -> None:
        """Remove a registered key: tokens with this kid get 401 until it is registered again."""
        if not unregister_key(self.keys_dir, kid):
            raise KeyError(f"no key with kid {kid} in {self.keys_dir}")

    async def stats(self) -> dict[str, Any]:
        """Return `GET /v1/stats`."""
        stats: dict[str, Any] = await self._request("GET", "/v1/stats")
        return stats

    async def device_stats(self, device_id: str) -> dict[str, Any]:
        """Return the stats of one device (empty counters when it sent nothing)."""
        devices = (await self.stats())["devices"]
        return dict(devices.get(device_id, {"readings": 0, "duplicates": 0, "rejected": {}}))

    async def readings(self, device_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Return every stored reading of a device with seq above `after_seq`, in seq order."""
        out: list[dict[str, Any]] = []
        next_after: int | None = after_seq
        while next_after is not None:
            page = await self._request(
                "GET",
                f"/v1/devices/{device_id}/readings",
                params={"after_seq": next_after, "limit": 100_000},
            )
            out.extend(page["readings"])
            next_after = page["next_after_seq"]
        return out

    async def inject_fault(
        self,
        *,
        status: int | None = None,
        retry_after: int | None = None,
        count: int | None = None,
        reject_seq: int | None = None,
        reject_time: str | None = None,
        route: str | None = None,
        after_store: bool = False,
    ) -> list[dict[str, Any]]:
        """Queue one fault (see `cloud.faults.Fault`) and return the faults pending."""
        fault: dict[str, Any] = {"status": status, "retry_after": retry_after, "count": count}
        fault |= {"reject_seq": reject_seq, "reject_time": reject_time, "route": route}
        fault |= {"after_store": after_store}
        body = {key: value for key, value in fault.items() if value is not None}
        return list((await self._request("POST", "/_test/faults", json=body))["pending"])

    async def clear_faults(self) -> None:
        await self._request("DELETE", "/_test/faults")

    async def witsml_logs(self) -> list[dict[str, Any]]:
        """Return `GET /v1/witsml/logs`: uid, uid_well, uid_wellbore, name and rows of each log."""
        return list((await self._request("GET", "/v1/witsml/logs"))["logs"])

    async def witsml_log(self, uid: str) -> bytes:
        """Return a stored log as a WITSML 1.4.1.1 document (raises for an unknown uid)."""
        from urllib.parse import quote

        async with (
            asyncio.timeout(30),
            httpx.AsyncClient(base_url=self.base_url, timeout=30) as client,
        ):
            response = await client.get(f"/v1/witsml/logs/{quote(uid, safe='')}")
        response.raise_for_status()
        return response.content

    async def witsml_documents(self) -> list[bytes]:
        """Return every WITSML request body the service accepted, decompressed, in order."""
        import base64

        bodies: list[bytes] = []
        after_id: int | None = 0
        while after_id is not None:
            page = await self._request(
                "GET", "/v1/witsml/documents", params={"after_id": after_id, "limit": 1000}
            )
            bodies.extend(base64.b64decode(d["body_base64"]) for d in page["documents"])
            after_id = page["next_after_id"]
        return bodies

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        async with (
            asyncio.timeout(30),
            httpx.AsyncClient(base_url=self.base_url, timeout=30) as client,
        ):
            response = await client.request(method, path, **kwargs)
        response.raise_for_status()
        return response.json()
