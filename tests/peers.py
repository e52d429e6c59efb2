"""Real peers for tests: a private mosquitto on a free loopback port, and a subscriber."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt


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

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "-c", str(self.config)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

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
