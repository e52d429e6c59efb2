"""Cloud sink that uploads buffered readings in gzip JSON batches over HTTPS.

When more than `backlog_threshold` readings wait at start or after an outage,
the sink runs two lanes. A live lane uploads new readings. A backlog lane
uploads the older ones in seq order, within `backlog_rate`, in batches marked
with the header `X-Rig-Backlog: 1`.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import orjson
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from buffer.reading import StoredReading, reading_to_json
from buffer.store import LaneState
from config.model import CloudSection
from uplink.auth import DeviceAuth, TokenMinter
from uplink.lanes import BacklogBudget, LaneBufferLike, plan_lanes
from uplink.mqtt import Beat, BufferLike, await_beating, no_beat, reconnect_delay

__all__ = [
    "BACKLOG_HEADER",
    "READINGS_PATH",
    "CloudBufferLike",
    "CloudLaneBufferLike",
    "CloudSink",
    "build_body",
    "idempotency_key",
    "parse_retry_after",
]

log = structlog.get_logger(__name__)

READINGS_PATH = "/v1/readings"
BACKLOG_HEADER = "X-Rig-Backlog"
"""Header with the value "1" on every batch of the backlog lane."""
GZIP_LEVEL = 6
"""gzip level of batch bodies: a third of the CPU of level 9 for a body about 4 % larger."""
RETRY_BASE_DELAY = 0.5
RETRY_MAX_DELAY = 60.0
"""Ceiling in seconds of the jittered backoff after network errors and 5xx responses."""
RETRY_AFTER_MAX = 300.0
"""Longest Retry-After in seconds that the sink honours. A longer one is cut to this."""
_SPLIT_STATUSES = frozenset({400, 413, 422})
"""Statuses that retrying the same batch cannot fix, so the batch is split instead."""
_THROTTLE_STATUSES = frozenset({429, 503})
_MAX_REASON_CHARS = 300


class CloudBufferLike(BufferLike, Protocol):
    """Buffer methods that the cloud sink calls, as provided by `buffer.store.Buffer`."""

    async def quarantine(
        self, sink: str, readings: Sequence[StoredReading], status: int, reason: str
    ) -> None: ...


class CloudLaneBufferLike(CloudBufferLike, LaneBufferLike, Protocol):
    """Buffer methods that the cloud sink calls, with those of the backlog lane."""

    async def quarantine(
        self,
        sink: str,
        readings: Sequence[StoredReading],
        status: int,
        reason: str,
        *,
        as_range: bool = False,
    ) -> None: ...


class _Replan(Exception):
    """An upload failed while so many readings wait that the sink should split them into lanes."""


@dataclass(slots=True)
class _Lane:
    """Marking and acknowledgement of the uploads of one lane."""

    backlog: bool
    """Whether the batches carry the X-Rig-Backlog header."""
    position: int | None
    """Last seq the lane acknowledged by range; None for a lane that moves the cursor."""
    live_ok: asyncio.Event | None = None
    """Set while the live lane's uploads succeed; the backlog lane uploads only then."""

    def report(self, *, success: bool) -> None:
        """Record the outcome of an upload of the live lane in `live_ok`."""
        if self.backlog or self.live_ok is None:
            return
        if success:
            self.live_ok.set()
        else:
            self.live_ok.clear()


def build_body(device_id: str, rig_id: str, readings: Sequence[StoredReading]) -> bytes:
    """Encode readings as the uncompressed JSON body of `POST /v1/readings`."""
    body = {
        "device_id": device_id,
        "rig_id": rig_id,
        "readings": [reading_to_json(r) for r in readings],
    }
    return orjson.dumps(body)


def idempotency_key(device_id: str, readings: Sequence[StoredReading]) -> str:
    """Return the `Idempotency-Key` of a batch: `{device_id}:{first_seq}-{last_seq}`."""
    return f"{device_id}:{readings[0].seq}-{readings[-1].seq}"


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Return the seconds a `Retry-After` header requests, or None when absent or invalid.

    The header contains either whole seconds or an HTTP date. A date in the past gives 0.
    """
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _ssl_context(ca_file: str) -> ssl.SSLContext:
    """Build a verifying TLS context, trusting `ca_file` in place of the system store if set."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except OSError as exc:
        msg = (
            f"cannot load the CA bundle {ca_file} (ca_file in [cloud]): {exc}. "
            "Expected a readable PEM file of CA certificates, or an empty ca_file for the "
            "system store"
        )
        raise OSError(msg) from exc


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A response that splits the batch: 400, 413 or 422, with the reading the service named."""

    status: int
    reason: str
    seq: int | None


class CloudSink:
    """Sink that uploads buffered readings to the cloud ingest service, at least once.

    Readings go in seq order, except after an outage with a large backlog: then
    new readings go first and the backlog follows in batches marked with
    X-Rig-Backlog: 1, each lane in seq order.

    While one batch is uploaded, each lane reads and encodes its next batch,
    which it sends once the first is acknowledged.

    The cursor moves, or the lane's range is acknowledged, after each 2xx. A
    reading that the service rejects on its own (400 or 422) is copied to the
    buffer's quarantine table together with its acknowledgement, so it is kept
    and counted, never dropped silently.
    """

    name = "cloud"

    def __init__(
        self,
        cfg: CloudSection,
        *,
        rig_id: str,
        buffer: CloudLaneBufferLike,
        key: EllipticCurvePrivateKey,
        max_delay: float = RETRY_MAX_DELAY,
        max_retry_after: float = RETRY_AFTER_MAX,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        beat: Beat | None = None,
    ) -> None:
        """Prepare the sink; `beat` is called at least once a second while it makes progress."""
        self._cfg = cfg
        self._rig_id = rig_id
        self._buffer = buffer
        self._max_delay = max_delay
        self._max_retry_after = max_retry_after
        self._sleep = sleep
        self._beat: Beat = beat if beat is not None else no_beat
        self._log = log.bind(sink=self.name, url=cfg.base_url)
        minter = TokenMinter(
            key, device_id=cfg.device_id, audience=cfg.audience, lifetime=cfg.token_lifetime
        )
        self._auth = DeviceAuth(minter)
        # Built now, so that a bad ca_file stops the agent at start rather than at upload.
        self._verify = _ssl_context(cfg.ca_file)

        self._connected = False
        self._last_success: float | None = None
        self._uploaded = 0
        self._backfilled = 0
        self._duplicates = 0
        self._quarantined = 0
        self._requests = 0
        self._last_error: str | None = None
        self._outage = UploadOutage(self._log, "cloud")

    @property
    def connected(self) -> bool:
        """True while the last request got an HTTP response from the service."""
        return self._connected

    @property
    def last_success(self) -> float | None:
        """Unix time of the last 2xx response, or None before the first one."""
        return self._last_success

    @property
    def uploaded(self) -> int:
        """Readings the service acknowledged since the sink started, duplicates included."""
        return self._uploaded

    @property
    def backfilled(self) -> int:
        """Readings of those that went in batches of the backlog lane."""
        return self._backfilled

    @property
    def duplicates(self) -> int:
        """Readings the service reported as already stored, since the sink started."""
        return self._duplicates

    @property
    def quarantined(self) -> int:
        """Readings moved to quarantine since the sink started."""
        return self._quarantined

    @property
    def requests(self) -> int:
        """HTTP requests made since the sink started, retries included."""
        return self._requests

    @property
    def last_error(self) -> str | None:
        """The most recent network error or failure response, if any."""
        return self._last_error

    async def run(self) -> None:
        """Upload batches until cancelled, in one lane or, with a large backlog, in two."""
        limit = self._cfg.batch_max_readings
        async with httpx.AsyncClient(
            base_url=self._cfg.base_url,
            auth=self._auth,
            verify=self._verify,
            timeout=self._cfg.timeout,
            # NOTE: HTTP(S)_PROXY and the other environment settings are ignored, so an
            # edge box that reaches the service only through a proxy cannot upload yet.
            trust_env=False,
        ) as client:
            cursor = await self._buffer.cursor(self.name)
            self._log.info("cloud_sink_started", cursor=cursor, batch_max_readings=limit)
            while True:
                state = await plan_lanes(self._buffer, self.name, self._cfg.backlog_threshold)
                if state is None:
                    await self._run_plain(client)
                else:
                    await self._run_lanes(client, state)

    async def _run_plain(self, client: httpx.AsyncClient) -> None:
        """Upload after the cursor in seq order; return once an outage leaves a large backlog."""
        lane = _Lane(backlog=False, position=None)
        cursor = await self._buffer.cursor(self.name)

        def backlog_too_large() -> bool:
            return self._buffer.last_seq - cursor > self._cfg.backlog_threshold

        batch, body = await self._prepare(self._read_after, cursor)
        while True:
            self._beat()
            if not batch:
                idle = self._buffer.wait_for_data(cursor, timeout=self._cfg.interval)
                await await_beating(idle, self._beat, self._cfg.interval)
                batch, body = await self._prepare(self._read_after, cursor)
                continue
            try:
                following = await self._deliver_reading_ahead(
                    client, batch, body, lane, self._read_after, abort_if=backlog_too_large
                )
            except _Replan:
                return
            cursor = batch[-1].seq
            batch, body = following

    async def _run_lanes(self, client: httpx.AsyncClient, state: LaneState) -> None:
        """Run the live lane and the backlog lane until the backlog is sent, or a new outage."""
        # Set while the live lane's uploads succeed. The backlog lane uploads only then,
        # so that after an outage the live lane's first upload goes first.
        live_ok = asyncio.Event()
        live_ok.set()
        backlog = asyncio.create_task(self._backlog_lane(client, state, live_ok))
        live = asyncio.create_task(self._live_lane(client, state.live_position, live_ok, backlog))
        try:
            await asyncio.gather(backlog, live)
        except _Replan:
            return
        finally:
            for task in (live, backlog):
                task.cancel()
            await asyncio.gather(live, backlog, return_exceptions=True)

    async def _live_lane(
        self,
        client: httpx.AsyncClient,
        position: int,
        live_ok: asyncio.Event,
        backlog: asyncio.Task[None],
    ) -> None:
        """Upload readings above `position` until the backlog lane is done.

        Raises _Replan when an upload fails while more than backlog_threshold
        readings wait above the lane's position, so that the sink splits again.
        """
        lane = _Lane(backlog=False, position=position, live_ok=live_ok)

        def backlog_too_large() -> bool:
            return self._buffer.last_seq - (lane.position or 0) > self._cfg.backlog_threshold

        batch, body = await self._prepare(self._read_after, position)
        while not backlog.done():
            self._beat()
            if batch:
                batch, body = await self._deliver_reading_ahead(
                    client, batch, body, lane, self._read_after, abort_if=backlog_too_large
                )
                continue
            idle = asyncio.ensure_future(
                self._buffer.wait_for_data(lane.position or 0, timeout=self._cfg.interval)
            )
            try:
                done = asyncio.wait({idle, backlog}, return_when=asyncio.FIRST_COMPLETED)
                await await_beating(done, self._beat, self._cfg.interval)
            finally:
                idle.cancel()
                await asyncio.gather(idle, return_exceptions=True)
            batch, body = await self._prepare(self._read_after, lane.position or 0)

    async def _backlog_lane(
        self, client: httpx.AsyncClient, state: LaneState, live_ok: asyncio.Event
    ) -> None:
        """Upload the unacknowledged readings up to the live position, then clear the split."""
        ranges = state.pending_ranges
        start_position = ranges[0][0] - 1 if ranges else state.cursor
        lane = _Lane(backlog=True, position=start_position, live_ok=live_ok)
        rate = self._cfg.backlog_limit
        budget = None if rate is None else BacklogBudget(rate)
        started = time.monotonic()
        sent = 0

        async def read_after(seq: int) -> list[StoredReading]:
            """Read the next batch above `seq` in the pending ranges, or [] if none is left."""
            # The limit is taken when the read starts, so that a lookahead read uses the
            # bytes per reading that the budget learned from the batch before it.
            limit = self._cfg.batch_max_readings
            if budget is not None:
                limit = budget.max_readings(limit)
            for first, last in ranges:
                if last <= seq:
                    continue
                batch = await self._buffer.read_range(max(first, seq + 1), last, limit)
                if batch:
                    return batch
            return []

        batch, body = await self._prepare(read_after, start_position)
        while batch:
            self._beat()
            following = await self._deliver_reading_ahead(
                client, batch, body, lane, read_after, budget=budget
            )
            sent += len(batch)
            batch, body = following
        await self._buffer.end_split(self.name)
        self._log.info(
            "lanes_drained",
            readings=sent,
            drain_s=round(time.monotonic() - started, 1),
            cursor=await self._buffer.cursor(self.name),
        )

    async def _read_after(self, seq: int) -> list[StoredReading]:
        """Read the next batch of the plain lane or the live lane: the readings above `seq`."""
        return await self._buffer.read_batch(self.name, self._cfg.batch_max_readings, after_seq=seq)

    async def _prepare(
        self, read_after: Callable[[int], Awaitable[list[StoredReading]]], seq: int
    ) -> tuple[list[StoredReading], bytes]:
        """Read the batch after `seq` and build its gzip body. An empty batch gets an empty body."""
        batch = await read_after(seq)
        if not batch:
            return batch, b""
        return batch, self._encode(batch)

    def _encode(self, part: Sequence[StoredReading]) -> bytes:
        """Return the gzip body of a batch or part of one."""
        body = build_body(self._cfg.device_id, self._rig_id, part)
        return gzip.compress(body, compresslevel=GZIP_LEVEL)

    async def _deliver_reading_ahead(
        self,
        client: httpx.AsyncClient,
        batch: list[StoredReading],
        body: bytes,
        lane: _Lane,
        read_after: Callable[[int], Awaitable[list[StoredReading]]],
        *,
        abort_if: Callable[[], bool] | None = None,
        budget: BacklogBudget | None = None,
    ) -> tuple[list[StoredReading], bytes]:
        """Deliver a batch while reading and encoding the next one, and return the next one.

        The next batch is prepared in a task that runs while the request awaits the
        service, so the agent's CPU work overlaps the service's. The task only reads.
        Its batch is returned, and so sent, only after every reading of `batch` is
        acknowledged or quarantined. When the delivery raises, the task is cancelled.
        """
        ahead = asyncio.create_task(self._prepare(read_after, batch[-1].seq))
        try:
            await self._deliver(client, batch, lane, body=body, abort_if=abort_if, budget=budget)
            return await ahead
        finally:
            # cancel() also marks the exception of a finished task as retrieved, so asyncio
            # does not log it, and gather() waits until a pending task has ended.
            ahead.cancel()
            await asyncio.gather(ahead, return_exceptions=True)

    async def _deliver(
        self,
        client: httpx.AsyncClient,
        batch: list[StoredReading],
        lane: _Lane,
        *,
        body: bytes | None = None,
        abort_if: Callable[[], bool] | None = None,
        budget: BacklogBudget | None = None,
    ) -> None:
        """Upload a batch, split on 400, 413 and 422, until every part is stored or quarantined.

        `body` is the gzip body of the whole batch if already built. The bodies of
        parts after a split are built here. Parts are handled in seq order, so the
        lane's acknowledgements always move forward over readings that are
        acknowledged or quarantined.
        """
        parts: list[tuple[list[StoredReading], bytes | None]] = [(batch, body)]
        while parts:
            self._beat()
            part, part_body = parts.pop()
            if part_body is None:
                part_body = self._encode(part)
            if budget is not None:
                cost = budget.cost(len(part), len(part_body))
                delay = budget.delay(cost)
                if delay > 0:
                    await await_beating(self._sleep(delay), self._beat, delay)
                budget.take(cost)
            rejected = await self._upload(client, part, part_body, lane, abort_if)
            if rejected is None:
                await self._acknowledge(lane, part)
                continue
            if len(part) == 1:
                await self._quarantine(lane, part, rejected)
                continue
            # Pushed in reverse, so the lowest seqs are uploaded first.
            pieces = _split(part, rejected.seq if rejected.status != 413 else None)
            parts.extend((piece, None) for piece in reversed(pieces))

    async def _acknowledge(self, lane: _Lane, part: list[StoredReading]) -> None:
        if lane.position is None:
            await self._buffer.commit_cursor(self.name, part[-1].seq)
            return
        # The range starts right after the lane's last acknowledgement, so readings in
        # between that are acknowledged already or deleted leave no gap.
        await self._buffer.ack_range(self.name, lane.position + 1, part[-1].seq)
        lane.position = part[-1].seq

    async def _quarantine(
        self, lane: _Lane, part: list[StoredReading], rejected: _Rejected
    ) -> None:
        if lane.position is None:
            await self._buffer.quarantine(self.name, part, rejected.status, rejected.reason)
        else:
            await self._buffer.quarantine(
                self.name, part, rejected.status, rejected.reason, as_range=True
            )
            await self._acknowledge(lane, part)
        self._quarantined += len(part)
        reading = part[0]
        self._log.error(
            "cloud_reading_quarantined",
            seq=reading.seq,
            source=reading.source,
            channel=reading.channel,
            status=rejected.status,
            reason=rejected.reason,
        )

    async def _upload(
        self,
        client: httpx.AsyncClient,
        part: list[StoredReading],
        body: bytes,
        lane: _Lane,
        abort_if: Callable[[], bool] | None,
    ) -> _Rejected | None:
        """POST one batch until it is acknowledged (None) or rejected in a way a split can fix.

        Raises _Replan when an attempt fails and `abort_if` returns True.
        """
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Idempotency-Key": idempotency_key(self._cfg.device_id, part),
        }
        if lane.backlog:
            headers[BACKLOG_HEADER] = "1"
        attempt = 0
        while True:
            self._beat()
            if lane.backlog and lane.live_ok is not None:
                await await_beating(lane.live_ok.wait(), self._beat, None)
            self._requests += 1
            try:
                # httpx applies the timeout to each step (connect, write, read), so a slow
                # but moving upload keeps beating for as long as it takes.
                post = client.post(READINGS_PATH, content=body, headers=headers)
                response = await await_beating(post, self._beat, None)
            except httpx.TransportError as exc:
                self._connected = False
                delay = reconnect_delay(attempt, RETRY_BASE_DELAY, self._max_delay)
                self._on_failure(part, str(exc) or type(exc).__name__, None, delay)
            else:
                self._connected = True
                done, rejected = self._classify(part, response, backlog=lane.backlog)
                if done:
                    lane.report(success=True)
                    return rejected
                delay = self._retry_delay(response, attempt)
                self._on_failure(part, _reason(response), response.status_code, delay)
            lane.report(success=False)
            if abort_if is not None and abort_if():
                raise _Replan
            attempt += 1
            await await_beating(self._sleep(delay), self._beat, delay)

    def _classify(
        self, part: list[StoredReading], response: httpx.Response, *, backlog: bool = False
    ) -> tuple[bool, _Rejected | None]:
        """Return (True, None) for a 2xx, (True, rejection) for a split, (False, None) to retry."""
        status = response.status_code
        if response.is_success:
            self._on_success(part, response, backlog=backlog)
            return True, None
        if status in _SPLIT_STATUSES:
            self._on_recovered()
            rejected = _Rejected(status, _reason(response), _named_seq(response))
            self._log.warning(
                "cloud_batch_rejected",
                first_seq=part[0].seq,
                last_seq=part[-1].seq,
                readings=len(part),
                status=status,
                reason=rejected.reason,
                named_seq=rejected.seq,
            )
            return True, rejected
        return False, None

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float:
        if response.status_code in _THROTTLE_STATUSES:
            asked = parse_retry_after(response.headers.get("Retry-After"))
            if asked is not None:
                return min(asked, self._max_retry_after)
        return reconnect_delay(attempt, RETRY_BASE_DELAY, self._max_delay)

    def _on_success(
        self, part: list[StoredReading], response: httpx.Response, *, backlog: bool
    ) -> None:
        self._on_recovered()
        self._last_success = time.time()
        self._uploaded += len(part)
        if backlog:
            self._backfilled += len(part)
        duplicates = _int_field(response, "duplicates")
        self._duplicates += duplicates
        self._log.debug(
            "cloud_batch_uploaded",
            first_seq=part[0].seq,
            last_seq=part[-1].seq,
            readings=len(part),
            duplicates=duplicates,
            backlog=backlog,
        )

    def _on_failure(
        self, part: list[StoredReading], error: str, status: int | None, delay: float
    ) -> None:
        self._last_error = error
        self._outage.failed(
            first_seq=part[0].seq,
            last_seq=part[-1].seq,
            status=status,
            error=error,
            retry_in_s=round(delay, 2),
        )

    def _on_recovered(self) -> None:
        self._outage.recovered()


class UploadOutage:
    """Failed attempts since the last success, logged at warning once per outage.

    The first failure after a success is a warning, later ones are debug
    lines with the attempt count, and the next success logs the outage length.
    """

    def __init__(self, logger: Any, event_prefix: str) -> None:
        self._log = logger
        self._prefix = event_prefix
        self._failures = 0
        self._started: float | None = None

    @property
    def active(self) -> bool:
        """True between a failed attempt and the next success."""
        return self._started is not None

    def failed(self, **fields: Any) -> None:
        """Count a failed attempt and log it."""
        self._failures += 1
        event = f"{self._prefix}_upload_failed"
        if self._started is None:
            self._started = time.monotonic()
            self._log.warning(event, **fields)
        else:
            self._log.debug(event, failed_attempts=self._failures, **fields)

    def recovered(self) -> None:
        """End the outage, if any, and log how long it lasted."""
        if self._started is None:
            return
        outage = time.monotonic() - self._started
        self._log.info(
            f"{self._prefix}_upload_recovered",
            outage_s=round(outage, 1),
            failed_attempts=self._failures,
        )
        self._started = None
        self._failures = 0


def _split(part: list[StoredReading], seq: int | None) -> list[list[StoredReading]]:
    """Split a batch around the named reading if it is in the batch, else in halves."""
    index = next((i for i, r in enumerate(part) if r.seq == seq), None)
    if index is None:
        middle = len(part) // 2
        return [part[:middle], part[middle:]]
    pieces = [part[:index], part[index : index + 1], part[index + 1 :]]
    return [piece for piece in pieces if piece]


def _detail(response: httpx.Response) -> Any:
    try:
        document = response.json()
    except ValueError:
        return None
    return document.get("detail") if isinstance(document, dict) else None


def _named_seq(response: httpx.Response) -> int | None:
    """Return the seq that a 422 detail names as the invalid reading, if any."""
    detail = _detail(response)
    seq = detail.get("seq") if isinstance(detail, dict) else None
    if isinstance(seq, int) and not isinstance(seq, bool):
        return seq
    return None


def _reason(response: httpx.Response) -> str:
    """Return the reason in a failure response, shortened, or the status phrase."""
    detail = _detail(response)
    if isinstance(detail, dict):
        detail = detail.get("message", "")
    text = str(detail or "") or response.reason_phrase or str(response.status_code)
    return text[:_MAX_REASON_CHARS]


def _int_field(response: httpx.Response, name: str) -> int:
    try:
        value = response.json().get(name, 0)
    except (ValueError, AttributeError):
        return 0
    return value if isinstance(value, int) else 0
