"""WITSML sink that turns buffered readings into WITSML 1.4.1.1 time logs and uploads them."""

from __future__ import annotations

import asyncio
import bisect
import gzip
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from buffer.reading import StoredReading
from config.model import CloudSection, WitsmlColumn, WitsmlSection
from uplink.auth import DeviceAuth, TokenMinter
from uplink.cloud import (
    _SPLIT_STATUSES,
    _THROTTLE_STATUSES,
    RETRY_AFTER_MAX,
    RETRY_BASE_DELAY,
    RETRY_MAX_DELAY,
    CloudBufferLike,
    UploadOutage,
    _reason,
    _ssl_context,
    parse_retry_after,
)
from uplink.mqtt import Beat, await_beating, no_beat, reconnect_delay
from uplink.witsml_doc import (
    Curve,
    LogHeader,
    Row,
    build_document,
    build_rows,
    check_log_document,
    format_time,
    split_rows,
)

__all__ = ["FUTURE_LIMIT", "READ_LIMIT", "WITSML_PATH", "WitsmlSink", "closed_prefix"]

log = structlog.get_logger(__name__)

WITSML_PATH = "/v1/witsml/logs"
READ_LIMIT = 20_000
"""Maximum readings taken from the buffer in one pass."""
FUTURE_LIMIT = 600.0
"""Seconds ahead of the clock beyond which a reading's period counts as closed.

Such a timestamp comes from a device with a wrong clock. Waiting for its
period to end would hold back every later reading, so it is uploaded at
once. The service merges rows, so a later upload completes the row.
"""

_US = 1_000_000


def closed_prefix(
    readings: Sequence[StoredReading], now: float, *, period: float, settle: float
) -> list[StoredReading]:
    """Return the leading readings, in seq order, whose row period is closed at `now`.

    A row period is closed once it ended at least `settle` seconds before
    `now`. A reading more than FUTURE_LIMIT seconds ahead of `now` counts as
    closed too. The prefix stops at the first reading of a period still open.
    """
    period_us = _to_us(period)
    now_us = _to_us(now)
    closed_end = (now_us - _to_us(settle)) // period_us * period_us
    future_us = now_us + _to_us(FUTURE_LIMIT)
    for index, reading in enumerate(readings):
        if closed_end <= reading.ts_us <= future_us:
            return list(readings[:index])
    return list(readings)


@dataclass(frozen=True, slots=True)
class _Rejected:
    """A response that splits the document: 400, 413 or 422, with the service's reason."""

    status: int
    reason: str


class _Pass:
    """The readings and rows of one pass, and how many rows are done (uploaded or rejected).

    Every reading belongs to one row: the last row that starts at or before
    its timestamp, or the first row for earlier readings. So readings of
    periods without a row (unmapped, bad or null readings only) go with the
    row before them. Parts are uploaded in row order, so the done rows are
    always the first `delivered` rows, and the cursor may move up to the
    last reading before the first one of a row not yet done.
    """

    def __init__(self, readings: Sequence[StoredReading], rows: Sequence[Row]) -> None:
        self.readings = readings
        self.rows = rows
        starts = [row.ts_us for row in rows]
        self.row_of = [max(0, bisect.bisect_right(starts, r.ts_us) - 1) for r in readings]
        self.first_seq = [0] * len(rows)
        self.last_seq = [0] * len(rows)
        for reading, row in zip(readings, self.row_of, strict=True):
            if self.first_seq[row] == 0 or reading.seq < self.first_seq[row]:
                self.first_seq[row] = reading.seq
            self.last_seq[row] = max(self.last_seq[row], reading.seq)
        self.delivered = 0
        self._next = 0

    def seq_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Return the lowest and highest seq of the readings that belong to rows lo..hi-1."""
        firsts = [seq for seq in self.first_seq[lo:hi] if seq]
        return min(firsts), max(self.last_seq[lo:hi])

    def deliver(self, hi: int) -> int | None:
        """Mark rows below `hi` done; return the seq the cursor may move to, if any."""
        self.delivered = max(self.delivered, hi)
        while self._next < len(self.readings) and self.row_of[self._next] < self.delivered:
            self._next += 1
        return self.readings[self._next - 1].seq if self._next else None


@dataclass(frozen=True, slots=True)
class _Quarantine:
    readings: list[StoredReading]
    rejected: _Rejected
    row_ts_us: int


class WitsmlSink:
    """Sink that uploads closed row periods of the mapped channels as WITSML 1.4.1.1 logs.

    The sink has its own cursor, "witsml", in the buffer. Every `interval`
    seconds it takes the readings after the cursor whose row period is
    closed. Each period becomes one row with the last usable reading of each
    curve, and the rows go to the cloud service in documents of at most
    `max_rows` rows. The cursor moves after each 2xx, past every reading
    whose row period was delivered. A row that the service rejects on its own
    has its readings copied to the quarantine table, so nothing is dropped
    silently.
    """

    name = "witsml"

    def __init__(
        self,
        cfg: WitsmlSection,
        cloud: CloudSection,
        *,
        columns: Sequence[WitsmlColumn],
        buffer: CloudBufferLike,
        key: EllipticCurvePrivateKey,
        max_delay: float = RETRY_MAX_DELAY,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        beat: Beat | None = None,
    ) -> None:
        """Prepare the sink; `beat` is called at least once a second while it makes progress."""
        if not columns:
            msg = "the witsml sink needs at least one curve: add one to [witsml.curves]"
            raise ValueError(msg)
        self._cfg = cfg
        self._cloud = cloud
        self._buffer = buffer
        self._max_delay = max_delay
        self._clock = clock
        self._sleep = sleep
        self._beat: Beat = beat if beat is not None else no_beat
        self._period_us = _to_us(cfg.row_period)
        self._columns = tuple(columns)
        self._curves = tuple(Curve(c.mnemonic, c.unit, c.uid, c.description) for c in columns)
        self._header = LogHeader(
            well_uid=cfg.well_uid,
            well_name=cfg.well_name,
            wellbore_uid=cfg.wellbore_uid,
            wellbore_name=cfg.wellbore_name,
            log_uid=cfg.log_uid,
            log_name=cfg.log_name,
            null_value=cfg.null_value,
        )
        self._column_by_key: dict[tuple[str | None, str], int] = {
            (c.source, c.channel): index for index, c in enumerate(columns)
        }
        self._log = log.bind(sink=self.name, url=cloud.base_url, log_uid=cfg.log_uid)
        minter = TokenMinter(
            key,
            device_id=cloud.device_id,
            audience=cloud.audience,
            lifetime=cloud.token_lifetime,
        )
        self._auth = DeviceAuth(minter)
        # Built now, so that a bad ca_file stops the agent at start rather than at upload.
        self._verify = _ssl_context(cloud.ca_file)

        self._connected = False
        self._last_success: float | None = None
        self._requests = 0
        self._last_error: str | None = None
        self._rows_uploaded = 0
        self._documents_uploaded = 0
        self._rejected_rows = 0
        self._outage = UploadOutage(self._log, "witsml")

    @property
    def connected(self) -> bool:
        """True while the last request got an HTTP response from the service."""
        return self._connected

    @property
    def last_success(self) -> float | None:
        """Unix time of the last 2xx response, or None before the first one."""
        return self._last_success

    @property
    def requests(self) -> int:
        """HTTP requests made since the sink started, retries included."""
        return self._requests

    @property
    def last_error(self) -> str | None:
        """The most recent network error or failure response, if any."""
        return self._last_error

    @property
    def rows_uploaded(self) -> int:
        """Rows in documents the service acknowledged since the sink started."""
        return self._rows_uploaded

    @property
    def documents_uploaded(self) -> int:
        """Documents the service acknowledged since the sink started."""
        return self._documents_uploaded

    @property
    def rejected_rows(self) -> int:
        """Rows the service rejected on their own since the sink started (readings quarantined)."""
        return self._rejected_rows

    async def run(self) -> None:
        """Upload closed row periods after the witsml cursor until cancelled."""
        async with httpx.AsyncClient(
            base_url=self._cloud.base_url,
            auth=self._auth,
            verify=self._verify,
            timeout=self._cloud.timeout,
            # NOTE: as in the cloud sink, proxy settings from the environment are ignored.
            trust_env=False,
        ) as client:
            self._log.info(
                "witsml_sink_started",
                cursor=await self._buffer.cursor(self.name),
                curves=[c.mnemonic for c in self._curves],
                row_period_s=self._cfg.row_period,
                interval_s=self._cfg.interval,
                settle_s=self._cfg.settle,
            )
            while True:
                self._beat()
                if not await self._sync_once(client):
                    pause = self._sleep(self._cfg.interval)
                    await await_beating(pause, self._beat, self._cfg.interval)

    async def _sync_once(self, client: httpx.AsyncClient) -> bool:
        """Upload the closed readings of one buffer read; return True if more may be waiting."""
        cursor = await self._buffer.cursor(self.name)
        batch = await self._buffer.read_batch(self.name, READ_LIMIT, after_seq=cursor)
        closed = closed_prefix(
            batch, self._clock(), period=self._cfg.row_period, settle=self._cfg.settle
        )
        if not closed:
            return False
        await self._deliver(client, closed)
        return len(closed) == READ_LIMIT

    def _column_of(self, source: str, channel: str) -> int | None:
        index = self._column_by_key.get((source, channel))
        if index is None:
            index = self._column_by_key.get((None, channel))
        return index

    async def _deliver(self, client: httpx.AsyncClient, readings: list[StoredReading]) -> None:
        """Upload the rows of `readings`, splitting on 400, 413 and 422, and move the cursor.

        Parts are handled in row order. A rejected single row is quarantined
        only once the cursor may move past all of its readings, because the
        buffer moves the cursor to the highest quarantined seq.
        """
        rows = build_rows(readings, self._column_of, len(self._columns), self._period_us)
        if not rows:
            await self._buffer.commit_cursor(self.name, readings[-1].seq)
            return
        state = _Pass(readings, rows)
        parts: list[tuple[int, int]] = []
        start = 0
        for chunk in split_rows(rows, self._cfg.max_rows):
            parts.append((start, start + len(chunk)))
            start += len(chunk)
        parts.reverse()
        waiting: list[_Quarantine] = []
        quarantined = 0
        while parts:
            self._beat()
            lo, hi = parts.pop()
            rejected = await self._upload(client, state, lo, hi)
            if rejected is not None and hi - lo > 1:
                middle = (lo + hi) // 2
                # Pushed in reverse, so the earlier rows are uploaded first.
                parts += [(middle, hi), (lo, middle)]
                continue
            if rejected is not None:
                waiting.append(self._rejected_row(state, lo, rejected))
            safe_seq = state.deliver(hi)
            if safe_seq is None:
                continue
            ready = [w for w in waiting if w.readings[-1].seq <= safe_seq]
            # NOTE: each quarantine call moves the cursor to its highest seq. When the
            # readings of two rejected rows interleave in seq order, a crash between the
            # two calls leaves the other row's lower readings neither uploaded nor kept.
            for entry in sorted(ready, key=lambda w: w.readings[-1].seq):
                await self._quarantine(entry, first_in_pass=quarantined == 0)
                quarantined += 1
                waiting.remove(entry)
            # The cursor stays below rejected readings that are not yet in quarantine.
            limit = min((w.readings[0].seq - 1 for w in waiting), default=safe_seq)
            await self._buffer.commit_cursor(self.name, min(safe_seq, limit))

    def _rejected_row(self, state: _Pass, index: int, rejected: _Rejected) -> _Quarantine:
        """Collect the mapped readings of a rejected row's period, in seq order."""
        row_ts = state.rows[index].ts_us
        end = row_ts + self._period_us
        readings = [
            r
            for r in state.readings
            if row_ts <= r.ts_us < end and self._column_of(r.source, r.channel) is not None
        ]
        return _Quarantine(readings, rejected, row_ts)

    async def _quarantine(self, entry: _Quarantine, *, first_in_pass: bool) -> None:
        """Quarantine a rejected row's readings; log the first of a pass as an error."""
        rejected = entry.rejected
        await self._buffer.quarantine(self.name, entry.readings, rejected.status, rejected.reason)
        self._rejected_rows += 1
        emit = self._log.error if first_in_pass else self._log.debug
        emit(
            "witsml_row_quarantined",
            rejected_rows=self._rejected_rows,
            row_time=format_time(entry.row_ts_us),
            readings=len(entry.readings),
            first_seq=entry.readings[0].seq,
            last_seq=entry.readings[-1].seq,
            status=rejected.status,
            reason=rejected.reason,
        )

    async def _upload(
        self, client: httpx.AsyncClient, state: _Pass, lo: int, hi: int
    ) -> _Rejected | None:
        """POST rows lo..hi-1 until acknowledged (None) or rejected in a way a split can fix."""
        rows = state.rows[lo:hi]
        document = build_document(self._header, self._curves, rows)
        problems = check_log_document(document)
        if problems:
            listed = "; ".join(f"line {p.line}: {p.message}" for p in problems[:5])
            msg = f"the witsml sink built an invalid document ({len(problems)} problems): {listed}"
            raise RuntimeError(msg)
        first_seq, last_seq = state.seq_range(lo, hi)
        headers = {
            "Content-Type": "application/xml",
            "Content-Encoding": "gzip",
            "Idempotency-Key": (
                f"{self._cloud.device_id}:witsml:{self._cfg.log_uid}:{first_seq}-{last_seq}"
            ),
        }
        body = gzip.compress(document)
        fields: dict[str, Any] = {
            "first_row": format_time(rows[0].ts_us),
            "last_row": format_time(rows[-1].ts_us),
            "rows": len(rows),
            "first_seq": first_seq,
            "last_seq": last_seq,
        }
        attempt = 0
        while True:
            self._beat()
            self._requests += 1
            try:
                # As in the cloud sink: httpx times out each step, not the whole request.
                post = client.post(WITSML_PATH, content=body, headers=headers)
                response = await await_beating(post, self._beat, None)
            except httpx.TransportError as exc:
                self._connected = False
                delay = reconnect_delay(attempt, RETRY_BASE_DELAY, self._max_delay)
                self._on_failure(fields, str(exc) or type(exc).__name__, None, delay)
            else:
                self._connected = True
                status = response.status_code
                if response.is_success:
                    self._on_success(fields, response)
                    return None
                if status == 422 and _response_reason(response) == LOG_CONFLICT_REASON:
                    # The config no longer matches the log the service stores (a curve
                    # unit, the well uid or the null value changed). No row can be
                    # stored until someone fixes one of the two, so the readings stay
                    # in the buffer and the upload is retried as after an outage.
                    delay = self._max_delay
                    if not self._outage.active:
                        self._log.error(
                            "witsml_log_conflict",
                            reason=_reason(response),
                            fix="make [witsml] match the stored log, or use a new log_uid, "
                            "then reload the config",
                            **fields,
                        )
                    self._on_failure(fields, _reason(response), status, delay)
                    attempt += 1
                    await await_beating(self._sleep(delay), self._beat, delay)
                    continue
                if status in _SPLIT_STATUSES:
                    self._on_recovered()
                    rejected = _Rejected(status, _reason(response))
                    self._log.warning(
                        "witsml_document_rejected", status=status, reason=rejected.reason, **fields
                    )
                    return rejected
                delay = self._retry_delay(response, attempt)
                self._on_failure(fields, _reason(response), status, delay)
            attempt += 1
            await await_beating(self._sleep(delay), self._beat, delay)

    def _retry_delay(self, response: httpx.Response, attempt: int) -> float:
        if response.status_code in _THROTTLE_STATUSES:
            requested = parse_retry_after(response.headers.get("Retry-After"))
            if requested is not None:
                return min(requested, RETRY_AFTER_MAX)
        return reconnect_delay(attempt, RETRY_BASE_DELAY, self._max_delay)

    def _on_success(self, fields: dict[str, Any], response: httpx.Response) -> None:
        self._on_recovered()
        self._last_success = time.time()
        self._rows_uploaded += int(fields["rows"])
        self._documents_uploaded += 1
        answer = _json_object(response)
        self._log.debug(
            "witsml_document_uploaded",
            new_rows=answer.get("new_rows"),
            duplicate=answer.get("duplicate"),
            **fields,
        )

    def _on_failure(
        self, fields: dict[str, Any], error: str, status: int | None, delay: float
    ) -> None:
        self._last_error = error
        self._outage.failed(**fields, status=status, error=error, retry_in_s=round(delay, 2))

    def _on_recovered(self) -> None:
        self._outage.recovered()


LOG_CONFLICT_REASON = "log_conflict"
"""`reason` of a 422 that rejects the whole log rather than a row."""


def _response_reason(response: httpx.Response) -> str | None:
    """Return the `reason` field of a JSON error response, or None."""
    try:
        document = response.json()
    except ValueError:
        return None
    reason = document.get("reason") if isinstance(document, dict) else None
    return reason if isinstance(reason, str) else None


def _to_us(seconds: float) -> int:
    """Convert seconds to whole microseconds, rounding to the nearest."""
    return math.floor(seconds * _US + 0.5)


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        document = response.json()
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
