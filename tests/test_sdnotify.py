"""Tests of the sd_notify client and the watchdog task, against real Unix datagram sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.sdnotify import MAX_STATUS_CHARS, Liveness, Notifier, run_watchdog


class Receiver:
    """A bound Unix datagram socket that plays the part of systemd's notification socket."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        target = "\0" + address[1:] if address.startswith("@") else address
        self.sock.bind(target)
        self.sock.setblocking(False)
        self.messages: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def drain(self) -> list[bytes]:
        """Read every datagram waiting now, keep it in `messages`, and return them."""
        new: list[bytes] = []
        while True:
            try:
                data = self.sock.recv(8192)
            except BlockingIOError:
                return new
            self.messages.append(data)
            new.append(data)

    def start_reading(self) -> None:
        """Collect datagrams as they arrive, from the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.sock.fileno(), self.drain)

    def mark(self, label: str) -> None:
        """Queue a MARK= datagram, which orders the messages before and after this moment."""
        target = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(f"MARK={label}".encode(), target)

    def count(self, payload: bytes, after: str | None = None, before: str | None = None) -> int:
        """Return how many datagrams equal `payload` between the marks `after` and `before`.

        Marks split the datagrams in the order the socket queued them, which
        is the order they were sent, whenever the test happened to read them.
        """
        order = self.messages
        start = order.index(f"MARK={after}".encode()) + 1 if after is not None else 0
        end = order.index(f"MARK={before}".encode()) if before is not None else len(order)
        return order[start:end].count(payload)

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.sock.fileno())
        self.sock.close()


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    receiver = Receiver(str(tmp_path / "notify"))
    yield receiver
    receiver.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    receiver = Receiver(f"@rig-agent-test-{uuid.uuid4().hex}")
    yield receiver
    receiver.close()


_open_notifiers: list[Notifier] = []


@pytest.fixture(autouse=True)
def close_notifiers() -> Iterator[None]:
    """Close the socket of every notifier that a test built, so none leaks into the next test."""
    yield
    while _open_notifiers:
        _open_notifiers.pop().close()


def _track(notifier: Notifier | None) -> Notifier:
    assert notifier is not None
    _open_notifiers.append(notifier)
    return notifier


def _notifier(receiver: Receiver, watchdog_usec: int | None = None) -> Notifier:
    env = {"NOTIFY_SOCKET": receiver.address}
    if watchdog_usec is not None:
        env["WATCHDOG_USEC"] = str(watchdog_usec)
    return _track(Notifier.from_environment(env))


# --- Notifier ---------------------------------------------------------------------


def test_from_environment_without_socket() -> None:
    assert Notifier.from_environment({}) is None
    assert Notifier.from_environment({"NOTIFY_SOCKET": ""}) is None
    assert Notifier.from_environment({"WATCHDOG_USEC": "30000000"}) is None


def test_from_environment_rejects_relative_socket() -> None:
    with capture_logs() as logs:
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": "run/notify"})
    assert notifier is None
    assert [e["event"] for e in logs] == ["sd_notify_disabled"]
    assert "run/notify" in logs[0]["error"]


@pytest.mark.parametrize("which", ["path", "abstract"])
def test_messages_arrive_exactly(
    which: str, path_receiver: Receiver, abstract_receiver: Receiver
) -> None:
    receiver = path_receiver if which == "path" else abstract_receiver
    notifier = _notifier(receiver)

    assert notifier.ready() is True
    assert notifier.ready("buffer open") is True
    assert notifier.status("3 sources, 2 sinks") is True
    assert notifier.watchdog() is True
    assert notifier.stopping() is True
    notifier.close()

    assert receiver.drain() == [
        b"READY=1",
        b"READY=1\nSTATUS=buffer open",
        b"STATUS=3 sources, 2 sinks",
        b"WATCHDOG=1",
        b"STOPPING=1",
    ]


def test_reloading_carries_monotonic_time(path_receiver: Receiver) -> None:
    notifier = _notifier(path_receiver)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    [message] = path_receiver.drain()
    first, second = message.split(b"\n")
    assert first == b"RELOADING=1"
    key, _, value = second.partition(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_is_one_line_and_capped(path_receiver: Receiver) -> None:
    notifier = _notifier(path_receiver)
    notifier.status("line one\nline two\r\nthree\0four")
    notifier.status("x" * (MAX_STATUS_CHARS + 500))
    notifier.ready("a\nb")

    flat, long, ready = path_receiver.drain()
    assert flat == b"STATUS=line one line two three four"
    assert long == b"STATUS=" + b"x" * MAX_STATUS_CHARS
    assert ready == b"READY=1\nSTATUS=a b"


def test_watchdog_interval_from_environment(path_receiver: Receiver) -> None:
    base = {"NOTIFY_SOCKET": path_receiver.address}
    cases: list[tuple[dict[str, str], float | None]] = [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
    ]
    for extra, expected in cases:
        notifier = _track(Notifier.from_environment({**base, **extra}))
        assert notifier.watchdog_interval == expected, extra


def test_watchdog_pid_compared_with_given_pid(path_receiver: Receiver) -> None:
    env = {
        "NOTIFY_SOCKET": path_receiver.address,
        "WATCHDOG_USEC": "1000000",
        "WATCHDOG_PID": "4242",
    }
    ours = _track(Notifier.from_environment(env, pid=4242))
    other = _track(Notifier.from_environment(env, pid=4243))
    assert ours.watchdog_interval == 0.5
    assert other.watchdog_interval is None


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    address = str(tmp_path / "missing")
    notifier = _track(Notifier(address))

    with capture_logs() as logs:
        results = [notifier.ready(), notifier.status("x"), notifier.watchdog()]
    assert results == [False, False, False]
    failures = [e for e in logs if e["event"] == "sd_notify_failed"]
    assert len(failures) == 1, "repeated failures within a minute must log once"
    assert failures[0]["socket"] == address
    assert failures[0]["log_level"] == "warning"

    receiver = Receiver(address)
    try:
        with capture_logs() as logs:
            assert notifier.watchdog() is True
        assert receiver.drain() == [b"WATCHDOG=1"]
        assert [e["event"] for e in logs] == ["sd_notify_recovered"]
        assert logs[0]["failed_messages"] == 3
    finally:
        receiver.close()


def test_flapping_socket_logs_once_a_minute(tmp_path: Path) -> None:
    address = str(tmp_path / "flapping")
    notifier = _track(Notifier(address))

    with capture_logs() as logs:
        for _ in range(5):
            assert notifier.watchdog() is False
            receiver = Receiver(address)
            assert notifier.watchdog() is True
            receiver.close()
            Path(address).unlink()

    events = [e["event"] for e in logs]
    assert events == ["sd_notify_failed", "sd_notify_recovered"]


def test_full_receiver_queue_does_not_block(path_receiver: Receiver) -> None:
    notifier = _notifier(path_receiver)
    started = time.monotonic()
    with capture_logs():
        results = [notifier.watchdog() for _ in range(5000)]
    elapsed = time.monotonic() - started

    assert results[0] is True
    assert False in results, "a receiver that never reads must fill up within 5000 datagrams"
    assert elapsed < 2.0


# --- Liveness ---------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_liveness_reports_stale_parts() -> None:
    clock = FakeClock()
    liveness = Liveness(clock)
    writer = liveness.register("buffer-writer")
    mqtt = liveness.register("sink:mqtt")
    assert liveness.stale(5.0) == []

    clock.now += 4.0
    writer.beat()
    clock.now += 2.0
    assert liveness.stale(5.0) == ["sink:mqtt"]

    mqtt.beat()
    assert liveness.stale(5.0) == []
    clock.now += 10.0
    assert liveness.stale(5.0) == ["buffer-writer", "sink:mqtt"]


def test_liveness_register_and_unregister() -> None:
    clock = FakeClock()
    liveness = Liveness(clock)
    liveness.register("sink:cloud")
    with pytest.raises(ValueError, match="sink:cloud"):
        liveness.register("sink:cloud")

    clock.now += 60.0
    assert liveness.stale(1.0) == ["sink:cloud"]
    liveness.unregister("sink:cloud")
    liveness.unregister("never-registered")
    assert liveness.stale(1.0) == []
    assert liveness.names() == []


# --- run_watchdog -----------------------------------------------------------------

WATCHDOG_USEC = 200_000
"""A 0.2 s watchdog timeout, so pings are due every 0.1 s."""
PING = b"WATCHDOG=1"


async def _beat(liveness: Liveness, name: str, stop: asyncio.Event) -> None:
    heartbeat = liveness.register(name)
    while not stop.is_set():
        heartbeat.beat()
        await asyncio.sleep(0.02)


async def test_watchdog_pings_follow_heartbeats(path_receiver: Receiver) -> None:
    path_receiver.start_reading()
    notifier = _notifier(path_receiver, WATCHDOG_USEC)
    liveness = Liveness()
    writer_stop = asyncio.Event()
    sink_stop = asyncio.Event()
    beaters = [
        asyncio.create_task(_beat(liveness, "buffer-writer", writer_stop)),
        asyncio.create_task(_beat(liveness, "sink:mqtt", sink_stop)),
    ]
    await asyncio.sleep(0)

    with capture_logs() as logs:
        task = asyncio.create_task(
            run_watchdog(notifier, liveness, 0.3, lambda: "ok", status_every=0.2)
        )
        await asyncio.sleep(0.6)
        path_receiver.mark("healthy")

        sink_stop.set()
        await beaters[1]
        await asyncio.sleep(0.4)  # longer than max_age, so the sink is now stale
        path_receiver.mark("stale")
        await asyncio.sleep(0.6)
        path_receiver.mark("beating again")

        sink_stop.clear()
        beaters[1] = asyncio.create_task(_beat_again(liveness, "sink:mqtt", sink_stop))
        await asyncio.sleep(0.6)

        task.cancel()
        writer_stop.set()
        sink_stop.set()
        await asyncio.gather(task, *beaters, return_exceptions=True)

    assert path_receiver.count(PING, before="healthy") >= 3
    assert path_receiver.count(PING, after="stale", before="beating again") == 0
    assert path_receiver.count(PING, after="beating again") >= 3

    withheld = [e for e in logs if e["event"] == "watchdog_pings_withheld"]
    resumed = [e for e in logs if e["event"] == "watchdog_pings_resumed"]
    assert len(withheld) == 1
    assert withheld[0]["reasons"] == ["sink:mqtt stale"]
    assert len(resumed) == 1

    statuses = [data for data in path_receiver.messages if data.startswith(b"STATUS=")]
    assert b"STATUS=ok" in statuses
    assert b"STATUS=unhealthy (sink:mqtt stale): ok" in statuses


async def _beat_again(liveness: Liveness, name: str, stop: asyncio.Event) -> None:
    liveness.unregister(name)
    await _beat(liveness, name, stop)


async def test_watchdog_withholds_pings_while_loop_lags(path_receiver: Receiver) -> None:
    path_receiver.start_reading()
    notifier = _notifier(path_receiver, WATCHDOG_USEC)
    liveness = Liveness()
    hog_stop = asyncio.Event()

    async def hog() -> None:
        # Blocks the event loop for 0.3 s at a time, as a synchronous call would.
        while not hog_stop.is_set():
            time.sleep(0.3)  # noqa: ASYNC251 - the blocking call is what this test needs
            await asyncio.sleep(0)

    with capture_logs() as logs:
        task = asyncio.create_task(
            run_watchdog(notifier, liveness, 5.0, lambda: "ok", max_loop_lag=0.15)
        )
        await asyncio.sleep(0.3)
        path_receiver.mark("responsive")

        hog_task = asyncio.create_task(hog())
        await asyncio.sleep(0.1)
        path_receiver.mark("lagging")
        await asyncio.sleep(0.7)
        hog_stop.set()
        await hog_task
        path_receiver.mark("responsive again")

        await asyncio.sleep(0.4)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert path_receiver.count(PING, before="responsive") >= 2
    assert path_receiver.count(PING, after="lagging", before="responsive again") == 0
    assert path_receiver.count(PING, after="responsive again") >= 2
    withheld = [e for e in logs if e["event"] == "watchdog_pings_withheld"]
    assert len(withheld) == 1
    assert withheld[0]["reasons"] == ["event loop late"]
    assert withheld[0]["loop_lag_s"] > 0.15


async def test_watchdog_off_sends_status_only(path_receiver: Receiver) -> None:
    path_receiver.start_reading()
    env = {
        "NOTIFY_SOCKET": path_receiver.address,
        "WATCHDOG_USEC": str(WATCHDOG_USEC),
        "WATCHDOG_PID": str(os.getpid() + 1),
    }
    notifier = _track(Notifier.from_environment(env))
    calls = 0

    def summary() -> str:
        nonlocal calls
        calls += 1
        return f"summary {calls}"

    task = asyncio.create_task(run_watchdog(notifier, Liveness(), 0.3, summary, status_every=0.1))
    await asyncio.sleep(0.55)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)

    messages = path_receiver.messages
    assert PING not in messages
    assert messages[:3] == [b"STATUS=summary 1", b"STATUS=summary 2", b"STATUS=summary 3"]


async def test_failing_status_text_is_logged_once(path_receiver: Receiver) -> None:
    path_receiver.start_reading()
    notifier = _notifier(path_receiver, WATCHDOG_USEC)

    def broken() -> str:
        raise KeyError("depth")

    with capture_logs() as logs:
        task = asyncio.create_task(
            run_watchdog(notifier, Liveness(), 0.3, broken, status_every=0.05)
        )
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    assert path_receiver.count(b"STATUS=status unavailable") >= 3
    assert path_receiver.count(PING) >= 2
    assert [e["event"] for e in logs] == ["status_text_failed"]


async def test_watchdog_rejects_bad_settings(path_receiver: Receiver) -> None:
    notifier = _notifier(path_receiver, WATCHDOG_USEC)
    with pytest.raises(ValueError, match="max_age=0"):
        await run_watchdog(notifier, Liveness(), 0, lambda: "ok")
