"""MQTT sink that publishes buffered readings and moves its cursor on PUBACK.

After an outage with more than `backlog_threshold` readings waiting, the sink
runs two lanes on one connection: a live lane that publishes new readings on
the readings topic, and a backlog lane that publishes the older ones, in seq
order and within `backlog_rate`, on {topic_prefix}/backfill/{source}.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import operator
import os
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

import aiomqtt
import orjson
import structlog

from buffer.reading import StoredReading, format_ts, now_us, reading_to_json
from config.model import BacklogRate, MqttSection
from uplink.auth import CREDENTIALS_VARIABLE
from uplink.lanes import BacklogBudget, LaneBufferLike, plan_lanes

__all__ = [
    "BEAT_GRACE",
    "BEAT_INTERVAL",
    "Beat",
    "BufferLike",
    "MqttBufferLike",
    "MqttSink",
    "PasswordFileError",
    "await_beating",
    "build_payload",
    "group_readings",
    "no_beat",
    "read_password_file",
    "reconnect_delay",
]

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

RECONNECT_BASE_DELAY = 0.5
RECONNECT_MAX_DELAY = 30.0
CONNECT_TIMEOUT = 10.0
"""Seconds to wait for CONNACK, and for the client to finish a disconnect."""
PUBLISH_TIMEOUT = 10.0
"""Seconds a publish may wait for its PUBACK before the link is considered broken."""
IDLE_WAIT = 1.0
"""Seconds between checks of the buffer and the link while nothing is in flight."""
COMMIT_INTERVAL = 0.1
"""Minimum seconds between two cursor commits while publishes are acknowledged."""
READ_LIMIT = 5000
"""Maximum readings taken from the buffer in one read."""
STOP_GRACE = 0.5
"""Seconds a clean stop waits for in-flight PUBACKs before abandoning them."""
STATUS_TIMEOUT = 1.0
"""Seconds a clean stop waits for the offline status PUBACK, and again for the disconnect."""
CONNECT_LIMIT = CONNECT_TIMEOUT + 10.0
"""Maximum seconds a connect takes: paho-mqtt 2.2 allows 5 s each for the TCP connect and the
TLS handshake, then aiomqtt waits CONNECT_TIMEOUT for CONNACK."""

BEAT_INTERVAL = 1.0
"""Maximum seconds between two heartbeats of a sink that waits on bounded work."""
BEAT_GRACE = 5.0
"""Seconds that bounded work may run past its own limit before the heartbeats stop."""

Beat = Callable[[], None]
"""Records that a sink made progress; the agent passes the `beat` of the sink's Heartbeat."""


def no_beat() -> None:
    """Record nothing: the heartbeat of a sink that runs without the agent's liveness checks."""


async def await_beating(work: Awaitable[_T], beat: Beat, limit: float | None) -> _T:
    """Await `work` and call `beat` every BEAT_INTERVAL seconds while it runs.

    `limit` is the maximum time the work takes through its own timeouts,
    such as the length of a sleep. Once the work has run BEAT_GRACE seconds past
    it, the beats stop, so a wait that hangs shows in the agent's liveness
    checks. None suits work that has no total limit but fails when one step
    makes no progress, such as an HTTP request with per-operation timeouts.
    Cancelling the caller cancels the work.
    """
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    deadline = math.inf if limit is None else loop.time() + limit + BEAT_GRACE
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=BEAT_INTERVAL)
            if done:
                return task.result()
            if loop.time() < deadline:
                beat()
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class BufferLike(Protocol):
    """Buffer methods that the sink calls, as provided by `buffer.store.Buffer`."""

    async def cursor(self, sink: str) -> int: ...

    async def read_batch(
        self, sink: str, limit: int, after_seq: int | None = None
    ) -> list[StoredReading]: ...

    async def commit_cursor(self, sink: str, seq: int) -> None: ...

    async def wait_for_data(self, after_seq: int, timeout: float) -> bool: ...  # noqa: ASYNC109 - fixed by the Buffer API


class MqttBufferLike(BufferLike, LaneBufferLike, Protocol):
    """Buffer methods that the MQTT sink calls, with those of the backlog lane."""


class PasswordFileError(Exception):
    """The MQTT password file is missing or unreadable."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"failed to read the MQTT password file {path!r} (mqtt.password_file): {reason}. "
            "Create the file with the broker password, readable by the agent's user, "
            "or set mqtt.password_file to the right path"
        )


def read_password_file(path: str) -> str:
    """Read a password from `path`, dropping one trailing newline.

    A bare file name such as "mqtt-password" is looked up in
    $CREDENTIALS_DIRECTORY when systemd set it (`LoadCredential=`), and in
    the working directory otherwise.
    """
    directory = os.environ.get(CREDENTIALS_VARIABLE)
    if directory and os.sep not in path and path not in (".", ".."):
        path = str(Path(directory) / path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise PasswordFileError(path, exc.strerror or type(exc).__name__) from None
    except UnicodeDecodeError:
        raise PasswordFileError(path, "the file is not UTF-8 text") from None
    if text.endswith("\r\n"):
        return text[:-2]
    return text.removesuffix("\n")


def reconnect_delay(
    attempt: int, base: float = RECONNECT_BASE_DELAY, cap: float = RECONNECT_MAX_DELAY
) -> float:
    """Return a full-jitter backoff delay in seconds for a 0-based retry attempt."""
    ceiling = min(cap, base * 2 ** min(attempt, 32))
    return random.uniform(0.0, ceiling)  # noqa: S311 - jitter, not cryptography


def group_readings(
    readings: Sequence[StoredReading], max_per_message: int
) -> list[list[StoredReading]]:
    """Split readings, in seq order, into the groups that each become one message.

    A group is a run of consecutive readings from one source, cut at
    `max_per_message`. The writer stores a poll's readings together, so live
    traffic gives one group per poll (a poll of several requests may carry a
    few distinct timestamps). A backlog packs several polls of one source
    into each group, which cuts the message count while catching up.
    """
    groups: list[list[StoredReading]] = []
    for _source, run in itertools.groupby(readings, key=_SOURCE):
        same_source = list(run)
        groups.extend(
            same_source[start : start + max_per_message]
            for start in range(0, len(same_source), max_per_message)
        )
    return groups


_SOURCE = operator.attrgetter("source")


def build_payload(rig_id: str, readings: Sequence[StoredReading]) -> bytes:
    """Encode one group of readings from a single source as the JSON message body."""
    body = {
        "rig_id": rig_id,
        "source": readings[0].source,
        "readings": [reading_to_json(r) for r in readings],
    }
    return orjson.dumps(body)


@dataclass(slots=True)
class _Pending:
    """One message handed to the client and not yet known to be acknowledged."""

    last_seq: int
    count: int
    acked: bool = False


class _AckTracker:
    """Tracker of the highest seq up to which every message is acknowledged, in any PUBACK order."""

    def __init__(self, start: int) -> None:
        self.acked_seq = start
        self._order: deque[_Pending] = deque()

    def add(self, last_seq: int, count: int) -> _Pending:
        pending = _Pending(last_seq, count)
        self._order.append(pending)
        return pending

    def ack(self, pending: _Pending) -> None:
        pending.acked = True
        while self._order and self._order[0].acked:
            self.acked_seq = self._order.popleft().last_seq


class _LinkLost(aiomqtt.MqttError):
    """Connection loss noticed while no publish was waiting on the link."""


def _status_payload(state: str, rig_id: str, *, with_ts: bool = True) -> bytes:
    body: dict[str, Any] = {"state": state, "rig_id": rig_id}
    if with_ts:
        body["ts"] = format_ts(now_us())
    return json.dumps(body).encode()


@dataclass(frozen=True, slots=True)
class _Settings:
    """Sink settings that every connection uses, fixed for the sink's lifetime."""

    sink: str
    rig_id: str
    prefix: str
    qos: int
    max_inflight: int
    max_per_message: int
    publish_timeout: float
    buffer: MqttBufferLike
    log: Any
    beat: Beat
    backlog_threshold: int
    backlog_rate: BacklogRate | None

    @property
    def status_topic(self) -> str:
        return f"{self.prefix}/status"

    def readings_topic(self, source: str) -> str:
        return f"{self.prefix}/readings/{source}"

    def backfill_topic(self, source: str) -> str:
        return f"{self.prefix}/backfill/{source}"


class MqttSink:
    """Sink that delivers buffered readings to an MQTT broker, at least once.

    Readings go in seq order, except after an outage with a large backlog: then
    new readings go first on the readings topic and the backlog drains behind
    them on the backfill topic, each lane in seq order.

    With QoS 1 a message counts as acknowledged when its PUBACK arrives. With
    QoS 0 it counts as acknowledged once the client has written it to the
    socket, which does not guarantee delivery: readings lost on a dropped link
    are not sent again.
    """

    name = "mqtt"

    def __init__(
        self,
        cfg: MqttSection,
        *,
        rig_id: str,
        topic_prefix: str,
        buffer: MqttBufferLike,
        publish_timeout: float = PUBLISH_TIMEOUT,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        beat: Beat | None = None,
    ) -> None:
        """Prepare the sink; `beat` is called at least once a second while it makes progress."""
        if cfg.password_file and not cfg.username:
            msg = (
                f"mqtt.password_file is set to {cfg.password_file!r} but mqtt.username is "
                "empty, and the client sends a password only together with a user name. "
                "Set mqtt.username, or clear mqtt.password_file"
            )
            raise ValueError(msg)
        self._cfg = cfg
        self._client_id = cfg.client_id or f"rig-agent-{rig_id}"
        self._sleep = sleep
        self._log = log.bind(sink=self.name, broker=f"{cfg.host}:{cfg.port}")
        self._settings = _Settings(
            sink=self.name,
            rig_id=rig_id,
            prefix=topic_prefix,
            qos=cfg.qos,
            max_inflight=cfg.max_inflight,
            max_per_message=cfg.max_readings_per_message,
            publish_timeout=publish_timeout,
            buffer=buffer,
            log=self._log,
            beat=no_beat if beat is None else beat,
            backlog_threshold=cfg.backlog_threshold,
            backlog_rate=cfg.backlog_limit,
        )

        self._connected = False
        self._last_success: float | None = None
        self._published = 0
        self._backfilled = 0
        self._messages = 0
        self._reconnects = 0
        self._last_error: str | None = None
        self._failures = 0
        self._outage_started: float | None = None

    @property
    def connected(self) -> bool:
        """True while a broker connection is up."""
        return self._connected

    @property
    def last_success(self) -> float | None:
        """Unix time of the last message the broker acknowledged, or None before the first."""
        return self._last_success

    @property
    def published(self) -> int:
        """Readings acknowledged by the broker since the sink started."""
        return self._published

    @property
    def backfilled(self) -> int:
        """Readings of those that went on the backfill topic."""
        return self._backfilled

    @property
    def messages(self) -> int:
        """Messages acknowledged by the broker since the sink started."""
        return self._messages

    @property
    def reconnects(self) -> int:
        """Connections made after a failed attempt or a lost link."""
        return self._reconnects

    @property
    def last_error(self) -> str | None:
        """The most recent connection or publish error, if any."""
        return self._last_error

    @property
    def status_topic(self) -> str:
        """Retained topic of the birth and last will messages."""
        return self._settings.status_topic

    def readings_topic(self, source: str) -> str:
        """Return the topic that readings of `source` are published on."""
        return self._settings.readings_topic(source)

    def backfill_topic(self, source: str) -> str:
        """Return the topic that the backlog lane publishes older readings of `source` on."""
        return self._settings.backfill_topic(source)

    async def run(self) -> None:
        """Connect, publish and reconnect with backoff until cancelled.

        Raises PasswordFileError when mqtt.password_file cannot be read. The
        file is read before every connection attempt, so a changed password
        takes effect at the next reconnect.
        """
        beat = self._settings.beat
        attempt = 0
        while True:
            beat()
            password = None
            if self._cfg.password_file:
                password = read_password_file(self._cfg.password_file)
            session = _Session(self._settings, self._new_client(password), self._on_acked)
            try:
                await session.run(self._on_connected)
            except aiomqtt.MqttError as exc:
                failure = exc
            finally:
                self._connected = False

            if session.entered:
                attempt = 0
            delay = reconnect_delay(attempt)
            attempt += 1
            self._on_failure(failure, delay)
            await await_beating(self._sleep(delay), beat, delay)

    def _new_client(self, password: str | None) -> aiomqtt.Client:
        # A fresh client per attempt: a reused paho client re-sends every
        # unacknowledged message on reconnect, and keeps everything published
        # during an outage in an unbounded memory queue.
        offline = _status_payload("offline", self._settings.rig_id, with_ts=False)
        client = aiomqtt.Client(
            self._cfg.host,
            self._cfg.port,
            identifier=self._client_id,
            username=self._cfg.username or None,
            password=password,
            will=aiomqtt.Will(self.status_topic, offline, qos=1, retain=True),
            keepalive=max(1, round(self._cfg.keepalive)),
            timeout=CONNECT_TIMEOUT,
            max_inflight_messages=self._cfg.max_inflight,
            tls_context=ssl.create_default_context() if self._cfg.tls else None,
        )
        # aiomqtt logs a warning for every publish beyond this many pending
        # calls, but a full window plus one status message is normal here.
        client.pending_calls_threshold = self._cfg.max_inflight + 1
        return client

    def _on_connected(self) -> None:
        self._connected = True
        if self._outage_started is None:
            self._log.info("mqtt_connected", client_id=self._client_id)
            return
        self._reconnects += 1
        outage = time.monotonic() - self._outage_started
        self._log.info(
            "mqtt_reconnected", outage_s=round(outage, 1), failed_attempts=self._failures
        )
        self._outage_started = None
        self._failures = 0

    def _on_failure(self, exc: BaseException, delay: float) -> None:
        self._last_error = str(exc) or type(exc).__name__
        self._failures += 1
        fields = {"error": self._last_error, "retry_in_s": round(delay, 2)}
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self._log.warning("mqtt_unavailable", **fields)
        else:
            self._log.debug("mqtt_still_unavailable", failed_attempts=self._failures, **fields)

    def _on_acked(self, pending: _Pending, backfill: bool) -> None:
        self._published += pending.count
        if backfill:
            self._backfilled += pending.count
        self._messages += 1
        self._last_success = time.time()


@contextlib.asynccontextmanager
async def _connection(client: aiomqtt.Client, beat: Beat) -> AsyncIterator[None]:
    """Connect and disconnect like `async with client`, beating while either waits."""
    await await_beating(client.__aenter__(), beat, CONNECT_LIMIT)
    try:
        yield
    finally:
        # aiomqtt's __aexit__ does not look at the exception, and never suppresses it.
        await await_beating(client.__aexit__(None, None, None), beat, client.timeout)


class _Lane:
    """The publishes of one lane in a session: its window, acknowledgements and commits.

    `start` is the seq after which the lane's acknowledgements begin. A lane
    that acknowledges by range records `start + 1` to its acknowledged seq with
    `ack_range`; otherwise it moves the cursor with `commit_cursor`.
    """

    def __init__(self, start: int, window: int, *, by_range: bool) -> None:
        self.tracker = _AckTracker(start)
        self.committed = start
        self.handed_out = start
        self.window = window
        self.by_range = by_range
        self.inflight: dict[asyncio.Task[None], _Pending] = {}
        self.last_commit = 0.0

    @property
    def free(self) -> int:
        """Messages the lane may still hand to the client before its window is full."""
        return self.window - len(self.inflight)


class _BacklogLane(_Lane):
    """The backlog lane: the ranges it still has to read, and messages waiting for budget."""

    def __init__(
        self, ranges: Sequence[tuple[int, int]], window: int, rate: BacklogRate | None
    ) -> None:
        super().__init__(ranges[0][0] - 1, window, by_range=True)
        self.ranges: deque[tuple[int, int]] = deque(ranges)
        self.read_up_to = ranges[0][0] - 1
        self.ready: deque[tuple[list[StoredReading], bytes]] = deque()
        self.budget = None if rate is None else BacklogBudget(rate)
        self.started = time.monotonic()
        self.sent = 0

    @property
    def done(self) -> bool:
        """True once every range is read, published, acknowledged and committed."""
        return (
            not self.ranges
            and not self.ready
            and not self.inflight
            and self.committed == self.tracker.acked_seq
        )


class _Session:
    """One broker connection: the publish windows, acknowledgements and cursor commits."""

    def __init__(
        self,
        settings: _Settings,
        client: aiomqtt.Client,
        on_acked: Callable[[_Pending, bool], None],
    ) -> None:
        self._s = settings
        self._client = client
        self._on_acked = on_acked
        self.entered = False
        self._live = _Lane(0, settings.max_inflight, by_range=False)
        self._backlog: _BacklogLane | None = None

    def _lanes(self) -> list[_Lane]:
        return [self._live] if self._backlog is None else [self._live, self._backlog]

    async def run(self, on_connected: Callable[[], None]) -> NoReturn:
        """Deliver until the link breaks (raises MqttError) or the task is cancelled."""
        stopping = False
        try:
            async with _connection(self._client, self._s.beat):
                self.entered = True
                on_connected()
                watcher = asyncio.create_task(self._watch_link())
                try:
                    await self._start()
                    await self._deliver(watcher)
                except asyncio.CancelledError:
                    stopping = True
                    await self._stop_cleanly()
                    raise
                finally:
                    watcher.cancel()
                    await asyncio.gather(watcher, return_exceptions=True)
                    await self._abandon_inflight()
                    await self._commit(force=True)
        except aiomqtt.MqttError:
            # A failed disconnect during a stop must not turn the cancellation
            # into an ordinary link failure that the caller would retry.
            if stopping:
                raise asyncio.CancelledError from None
            raise

    async def _start(self) -> None:
        cursor = await self._s.buffer.cursor(self._s.sink)
        self._live = _Lane(cursor, self._s.max_inflight, by_range=False)
        online = self._client.publish(
            self._s.status_topic,
            _status_payload("online", self._s.rig_id),
            qos=1,
            retain=True,
            timeout=self._s.publish_timeout,
        )
        await await_beating(online, self._s.beat, self._s.publish_timeout)

        state = await plan_lanes(self._s.buffer, self._s.sink, self._s.backlog_threshold)
        if state is None:
            return
        # The backlog lane gets half of the window, so the live lane always has room.
        backlog_window = max(1, self._s.max_inflight // 2)
        live_window = max(1, self._s.max_inflight - backlog_window)
        self._live = _Lane(state.live_position, live_window, by_range=True)
        if state.pending_ranges:
            self._backlog = _BacklogLane(state.pending_ranges, backlog_window, self._s.backlog_rate)

    async def _watch_link(self) -> None:
        # The sink subscribes to nothing, so this loop only ends with the
        # MqttError that the client raises when the link drops. Without it an
        # idle sink would notice a drop only at its next publish.
        async for _message in self._client.messages:
            pass
        msg = "connection closed"
        raise _LinkLost(msg)

    async def _deliver(self, watcher: asyncio.Task[None]) -> NoReturn:
        live = self._live
        while True:
            # Each pass waits at most IDLE_WAIT, so an idle sink beats about once a second.
            self._s.beat()
            self._raise_if_broken(watcher)
            await self._commit()
            # The live lane is served first in each pass and does not draw on the
            # backlog lane's rate budget.
            free = live.free
            batch: list[StoredReading] = []
            if free > 0:
                limit = min(READ_LIMIT, free * self._s.max_per_message)
                batch = await self._s.buffer.read_batch(
                    self._s.sink, limit, after_seq=live.handed_out
                )
                if batch:
                    self._publish_live(batch, limit, free)
            backlog_delay = await self._feed_backlog()
            if batch:
                continue

            idle = None
            if free > 0:
                idle = self._s.buffer.wait_for_data(live.handed_out, IDLE_WAIT)
            await self._wait(watcher, idle, backlog_delay)

    def _publish_live(self, batch: list[StoredReading], limit: int, free: int) -> None:
        groups = group_readings(batch, self._s.max_per_message)
        if len(batch) == limit and len(groups) > 1:
            # The last run may continue past this read, so read it again whole.
            groups.pop()
        # Groups beyond the free window slots are read again on a later pass.
        for group in groups[:free]:
            payload = build_payload(self._s.rig_id, group)
            self._publish(self._live, group, self._s.readings_topic(group[0].source), payload)

    async def _feed_backlog(self) -> float | None:
        """Publish backlog messages while the lane has window and budget.

        Returns the seconds until the budget allows the next message, or None
        when the lane waits for acknowledgements or has nothing left to send.
        """
        lane = self._backlog
        if lane is None:
            return None
        while lane.free > 0:
            if not lane.ready and not await self._read_backlog(lane):
                break
            group, payload = lane.ready[0]
            if lane.budget is not None:
                cost = lane.budget.cost(len(group), len(payload))
                delay = lane.budget.delay(cost)
                if delay > 0:
                    return delay
                lane.budget.take(cost)
            lane.ready.popleft()
            self._publish(lane, group, self._s.backfill_topic(group[0].source), payload)
            lane.sent += len(group)
        if lane.done:
            await self._finish_backlog(lane)
        return None

    async def _read_backlog(self, lane: _BacklogLane) -> bool:
        """Read the next messages of the backlog into `lane.ready`; False when none is left."""
        while lane.ranges:
            first, last = lane.ranges[0]
            first = max(first, lane.read_up_to + 1)
            per_message = self._s.max_per_message
            if lane.budget is not None:
                per_message = lane.budget.max_readings(per_message)
            limit = min(READ_LIMIT, lane.window * per_message)
            batch = await self._s.buffer.read_range(first, last, limit) if first <= last else []
            if not batch:
                lane.ranges.popleft()
                continue
            groups = group_readings(batch, per_message)
            if len(batch) == limit and len(groups) > 1:
                groups.pop()
            for group in groups:
                lane.ready.append((group, build_payload(self._s.rig_id, group)))
            lane.read_up_to = groups[-1][-1].seq
            return True
        return False

    async def _finish_backlog(self, lane: _BacklogLane) -> None:
        await self._s.buffer.end_split(self._s.sink)
        self._backlog = None
        self._live.window = self._s.max_inflight
        self._s.log.info(
            "lanes_drained",
            readings=lane.sent,
            drain_s=round(time.monotonic() - lane.started, 1),
            cursor=await self._s.buffer.cursor(self._s.sink),
        )

    def _publish(self, lane: _Lane, group: list[StoredReading], topic: str, payload: bytes) -> None:
        pending = lane.tracker.add(group[-1].seq, len(group))
        call = self._client.publish(
            topic, payload, qos=self._s.qos, timeout=self._s.publish_timeout
        )
        lane.inflight[asyncio.create_task(call)] = pending
        lane.handed_out = pending.last_seq

    async def _wait(
        self,
        watcher: asyncio.Task[None],
        idle: Awaitable[bool] | None,
        backlog_delay: float | None,
    ) -> None:
        """Wait for a PUBACK, new data, a lost link, backlog budget or the next commit slot."""
        waiting: set[asyncio.Future[Any]] = {watcher}
        for lane in self._lanes():
            waiting.update(lane.inflight)
        idle_task = asyncio.ensure_future(idle) if idle is not None else None
        if idle_task is not None:
            waiting.add(idle_task)
        timeout = IDLE_WAIT
        for lane in self._lanes():
            if lane.tracker.acked_seq > lane.committed:
                due = max(0.0, lane.last_commit + COMMIT_INTERVAL - time.monotonic())
                timeout = min(timeout, due)
        if backlog_delay is not None:
            timeout = min(timeout, backlog_delay)
        try:
            await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if idle_task is not None and not idle_task.done():
                idle_task.cancel()
                await asyncio.gather(idle_task, return_exceptions=True)

    def _collect_finished(self) -> BaseException | None:
        """Record finished publishes as acknowledged and return the first failure."""
        failure: BaseException | None = None
        for lane in self._lanes():
            for task in [t for t in lane.inflight if t.done()]:
                pending = lane.inflight.pop(task)
                if task.cancelled():
                    failure = failure or aiomqtt.MqttError("publish cancelled")
                    continue
                error = task.exception()
                if error is not None:
                    failure = failure or error
                    continue
                lane.tracker.ack(pending)
                self._on_acked(pending, lane is self._backlog)
        return failure

    def _raise_if_broken(self, watcher: asyncio.Task[None]) -> None:
        failure = self._collect_finished()
        if failure is not None:
            raise failure
        if watcher.done():
            error = None if watcher.cancelled() else watcher.exception()
            raise error or _LinkLost("connection closed")

    async def _commit(self, *, force: bool = False) -> None:
        for lane in self._lanes():
            acked = lane.tracker.acked_seq
            if acked <= lane.committed:
                continue
            if not force and time.monotonic() - lane.last_commit < COMMIT_INTERVAL:
                continue
            if lane.by_range:
                await self._s.buffer.ack_range(self._s.sink, lane.committed + 1, acked)
            else:
                await self._s.buffer.commit_cursor(self._s.sink, acked)
            lane.committed = acked
            lane.last_commit = time.monotonic()

    async def _abandon_inflight(self) -> None:
        for lane in self._lanes():
            for task in lane.inflight:
                task.cancel()
            await asyncio.gather(*lane.inflight, return_exceptions=True)
        # Publishes that finished before the cancel still count as acknowledged.
        self._collect_finished()
        for lane in self._lanes():
            lane.inflight.clear()

    async def _stop_cleanly(self) -> None:
        """Collect PUBACKs for a moment, commit, then retain the offline status."""
        inflight = [task for lane in self._lanes() for task in lane.inflight]
        if inflight:
            await asyncio.wait(inflight, timeout=STOP_GRACE)
        await self._abandon_inflight()
        await self._commit(force=True)
        # The client's exit waits this long for its disconnect to finish.
        self._client.timeout = STATUS_TIMEOUT
        try:
            await self._client.publish(
                self._s.status_topic,
                _status_payload("offline", self._s.rig_id),
                qos=1,
                retain=True,
                timeout=STATUS_TIMEOUT,
            )
        except aiomqtt.MqttError as exc:
            self._s.log.debug("mqtt_offline_status_failed", error=str(exc))
        self._s.log.info("mqtt_stopped", cursor=await self._s.buffer.cursor(self._s.sink))
