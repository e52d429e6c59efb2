"""systemd service notifications (sd_notify) and the liveness checks behind the watchdog.

`Notifier` sends READY=1, STATUS=, WATCHDOG=1, STOPPING=1 and RELOADING=1 to
the datagram socket that systemd names in $NOTIFY_SOCKET. `Liveness` tracks a
heartbeat per part of the agent, and `run_watchdog` sends WATCHDOG=1 only while
every heartbeat is recent and the event loop wakes up on time, so that systemd
restarts an agent that hangs.

The protocol is one Unix datagram per message, so this module uses the
standard library. The agent needs non-blocking sends and failures logged
through its own logger. The bindings to libsystemd (systemd-python,
cysystemd) would add a compiled dependency for that.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Mapping

import structlog

__all__ = [
    "FAILURE_LOG_INTERVAL",
    "MAX_STATUS_CHARS",
    "Heartbeat",
    "Liveness",
    "Notifier",
    "run_watchdog",
]

log = structlog.get_logger(__name__)

FAILURE_LOG_INTERVAL = 60.0
"""Minimum seconds between two warnings about failed notifications."""

MAX_STATUS_CHARS = 1000
"""Longest STATUS= text sent; systemd reads at most 4096 bytes of one notification."""

_MAX_TICK = 1.0
"""Maximum sleep, in seconds, between two checks of the watchdog task."""


class Notifier:
    """A client of the systemd notification socket.

    Each message is one datagram on a non-blocking socket. When the service
    manager is busy or gone, the message is dropped and the send method
    returns False after a rate-limited warning. The socket does not block the
    event loop, and send errors (OSError) are caught, not raised.
    """

    def __init__(self, address: str, *, watchdog_usec: int | None = None) -> None:
        """Prepare to send to `address`: a file path, or "@name" for an abstract socket.

        `watchdog_usec` is the watchdog timeout that systemd set for this
        process (WATCHDOG_USEC), or None when the watchdog is off. Raises
        ValueError for an address that is neither absolute nor abstract.
        """
        if address.startswith("@") and len(address) > 1:
            self._target = "\0" + address[1:]
        elif address.startswith("/"):
            self._target = address
        else:
            msg = (
                f"unsupported notification socket {address!r}: expected an absolute path "
                'or an abstract name that starts with "@"'
            )
            raise ValueError(msg)
        if watchdog_usec is not None and watchdog_usec <= 0:
            msg = f"invalid watchdog timeout {watchdog_usec} µs: expected a positive number"
            raise ValueError(msg)
        self.address = address
        self._watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        # Failed sends since the last successful one, and whether they were logged.
        self._failures = 0
        self._warned = False
        self._failures_since_warning = 0
        self._last_warning: float | None = None

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier | None:
        """Build a notifier from $NOTIFY_SOCKET, or return None when systemd set none.

        The watchdog is on when $WATCHDOG_USEC is a positive number and
        $WATCHDOG_PID is unset or equals `pid` (default: this process). An
        unusable value is logged and the affected feature is left off, so the
        agent still runs.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if not address:
            return None
        watchdog_usec = _watchdog_usec(env, os.getpid() if pid is None else pid)
        try:
            return cls(address, watchdog_usec=watchdog_usec)
        except ValueError as exc:
            log.warning("sd_notify_disabled", error=str(exc))
            return None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two WATCHDOG=1 pings (half the timeout), or None when it is off."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def send(self, message: str) -> bool:
        """Send one notification of newline-separated KEY=VALUE fields; return whether it left.

        Failures are logged at warning level at most once per
        FAILURE_LOG_INTERVAL seconds, with the count of failures since the
        previous warning, and the first success after a warning is logged too.
        """
        data = message.encode("utf-8", errors="replace")
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._socket.setblocking(False)
            self._socket.sendto(data, self._target)
        except OSError as exc:
            self._record_failure(exc)
            return False
        if self._warned:
            log.info("sd_notify_recovered", socket=self.address, failed_messages=self._failures)
        self._failures = 0
        self._warned = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Send READY=1, with STATUS= when `status` is given."""
        if status is None:
            return self.send("READY=1")
        return self.send(f"READY=1\nSTATUS={_one_line(status)}")

    def status(self, text: str) -> bool:
        """Send STATUS= with `text` on one line, cut to MAX_STATUS_CHARS characters."""
        return self.send(f"STATUS={_one_line(text)}")

    def watchdog(self) -> bool:
        """Send WATCHDOG=1, which restarts the watchdog timeout of systemd."""
        return self.send("WATCHDOG=1")

    def stopping(self) -> bool:
        """Send STOPPING=1 at the start of shutdown."""
        return self.send("STOPPING=1")

    def reloading(self) -> bool:
        """Send RELOADING=1 with the CLOCK_MONOTONIC time in µs; send ready() when done.

        For a Type=notify-reload service (systemd 253 and newer), systemd
        ignores RELOADING=1 without MONOTONIC_USEC=. Other services and older
        versions ignore the extra field.
        """
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")

    def close(self) -> None:
        """Close the socket; a later send opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _record_failure(self, exc: OSError) -> None:
        self._failures += 1
        self._failures_since_warning += 1
        now = time.monotonic()
        if self._last_warning is not None and now - self._last_warning < FAILURE_LOG_INTERVAL:
            return
        log.warning(
            "sd_notify_failed",
            socket=self.address,
            error=exc.strerror or type(exc).__name__,
            failed_messages=self._failures_since_warning,
        )
        self._last_warning = now
        self._failures_since_warning = 0
        self._warned = True


def _watchdog_usec(env: Mapping[str, str], pid: int) -> int | None:
    text = env.get("WATCHDOG_USEC", "")
    if not text:
        return None
    try:
        usec = int(text)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("sd_watchdog_disabled", reason=f"invalid WATCHDOG_USEC {text!r}")
        return None
    owner = env.get("WATCHDOG_PID", "")
    if owner and owner != str(pid):
        # The watchdog belongs to another process, such as the parent that started us.
        return None
    return usec


def _one_line(text: str) -> str:
    """Return `text` without line breaks or NUL bytes, which would end the field early."""
    flat = " ".join(text.replace("\0", " ").splitlines())
    return flat[:MAX_STATUS_CHARS]


class Heartbeat:
    """The last time one part of the agent showed progress, on a monotonic clock.

    A part calls beat() whenever it completes a step, and at least once per
    max_age while idle. A single float assignment is atomic in CPython, so a
    worker thread may call beat() too.
    """

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self._clock = clock
        self.last_beat = clock()

    def beat(self) -> None:
        """Record progress now."""
        self.last_beat = self._clock()


class Liveness:
    """The heartbeats of the parts that must make progress for the agent to be healthy."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """Track heartbeats on `clock`, a monotonic clock in seconds."""
        self._clock = clock
        self._heartbeats: dict[str, Heartbeat] = {}

    def register(self, name: str) -> Heartbeat:
        """Add a part that counts as beating now; raise ValueError if `name` is taken."""
        if name in self._heartbeats:
            msg = f"heartbeat {name!r} is already registered: give each part its own name"
            raise ValueError(msg)
        heartbeat = Heartbeat(name, self._clock)
        self._heartbeats[name] = heartbeat
        return heartbeat

    def unregister(self, name: str) -> None:
        """Stop tracking a part, such as a sink removed by a config reload; unknown names pass."""
        self._heartbeats.pop(name, None)

    def names(self) -> list[str]:
        """Return the names of the registered parts, in registration order."""
        return list(self._heartbeats)

    def stale(self, max_age: float) -> list[str]:
        """Return the names of the parts whose last beat is more than `max_age` seconds old."""
        now = self._clock()
        return [name for name, hb in self._heartbeats.items() if now - hb.last_beat > max_age]


async def run_watchdog(
    notifier: Notifier,
    liveness: Liveness,
    max_age: float,
    status_text: Callable[[], str],
    status_every: float = 5.0,
    *,
    max_loop_lag: float = 5.0,
) -> None:
    """Send WATCHDOG=1 while the agent is healthy and STATUS= regularly, until cancelled.

    STATUS= goes out every `status_every` seconds, starting at once. The task
    wakes up at least once a second. A ping is due every
    `notifier.watchdog_interval` seconds and is sent only if no heartbeat in
    `liveness` is older than `max_age` seconds and this wakeup came at most
    `max_loop_lag` seconds late, which shows that the event loop runs
    callbacks promptly. A withheld ping is retried at every later wakeup, so
    systemd restarts the agent only if the problem lasts until its watchdog
    timeout. The first withheld ping, each change in its reasons and the
    recovery are logged. Without a watchdog the task sends only STATUS=.
    """
    if max_age <= 0 or status_every <= 0 or max_loop_lag <= 0:
        msg = (
            f"invalid watchdog settings: max_age={max_age}, status_every={status_every}, "
            f"max_loop_lag={max_loop_lag}; expected positive seconds"
        )
        raise ValueError(msg)
    loop = asyncio.get_running_loop()
    watchdog = _Watchdog(notifier, liveness, max_age, max_loop_lag, status_text)
    interval = notifier.watchdog_interval
    tick = min(_MAX_TICK, status_every)
    if interval is not None:
        tick = min(tick, interval / 4)

    next_ping = loop.time()
    next_status = loop.time()
    lag = 0.0
    while True:
        now = loop.time()
        if interval is not None and now >= next_ping and watchdog.ping(now, lag):
            next_ping = now + interval
        if now >= next_status:
            watchdog.send_status()
            next_status = now + status_every

        await asyncio.sleep(tick)
        lag = max(0.0, loop.time() - now - tick)


class _Watchdog:
    """The state of run_watchdog: why pings are withheld, and since when."""

    def __init__(
        self,
        notifier: Notifier,
        liveness: Liveness,
        max_age: float,
        max_loop_lag: float,
        status_text: Callable[[], str],
    ) -> None:
        self.notifier = notifier
        self.liveness = liveness
        self.max_age = max_age
        self.max_loop_lag = max_loop_lag
        self.status_text = status_text
        self.withheld: list[str] = []
        self.withheld_since = 0.0
        self.status_failed = False

    def ping(self, now: float, lag: float) -> bool:
        """Send WATCHDOG=1 if the agent is healthy; return whether it did."""
        reasons = [f"{name} stale" for name in self.liveness.stale(self.max_age)]
        if lag > self.max_loop_lag:
            reasons.append("event loop late")
        if not reasons:
            self.notifier.watchdog()
            if self.withheld:
                log.info("watchdog_pings_resumed", withheld_s=round(now - self.withheld_since, 1))
                self.withheld = []
            return True
        if reasons != self.withheld:
            log.warning(
                "watchdog_pings_withheld",
                reasons=reasons,
                max_age_s=self.max_age,
                loop_lag_s=round(lag, 2),
            )
            if not self.withheld:
                self.withheld_since = now
            self.withheld = reasons
        return False

    def send_status(self) -> None:
        """Send STATUS= with the caller's summary, led by the reasons for withheld pings."""
        try:
            text = self.status_text()
        except Exception as exc:
            if not self.status_failed:
                log.exception("status_text_failed", error=f"{type(exc).__name__}: {exc}")
            self.status_failed = True
            text = "status unavailable"
        else:
            self.status_failed = False
        if self.withheld:
            text = f"unhealthy ({', '.join(self.withheld)}): {text}"
        self.notifier.status(text)
