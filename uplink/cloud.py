"""Cloud sink that uploads buffered readings in gzip JSON batches over HTTPS."""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import json
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import structlog
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from buffer.reading import StoredReading, reading_to_json
from config.model import CloudSection
from uplink.auth import DeviceAuth, TokenMinter
from uplink.mqtt import Beat, BufferLike, await_beating, no_beat, reconnect_delay

__all__ = [
    "READINGS_PATH",
    "CloudBufferLike",
    "CloudSink",
    "build_body",
    "idempotency_key",
    "parse_retry_after",
]

log = structlog.get_logger(__name__)

READINGS_PATH = "/v1/readings"
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


def build_body(device_id: str, rig_id: str, readings: Sequence[StoredReading]) -> bytes:
    """Encode readings as the uncompressed JSON body of `POST /v1/readings`."""
    body = {
        "device_id": device_id,
        "rig_id": rig_id,
        "readings": [reading_to_json(r) for r in readings],
    }
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


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
    """Sink that uploads buffered readings to the cloud ingest service, at least once, in seq order.

    The cursor moves after each 2xx. A reading that the service rejects on its
    own (400 or 422) is copied to the buffer's quarantine table together with
    the cursor move past it, so it is kept and counted, never dropped silently.
    """

    name = "cloud"

    def __init__(
        self,
        cfg: CloudSection,
        *,
        rig_id: str,
        buffer: CloudBufferLike,
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
        self._duplicates = 0
        self._quarantined = 0
        self._requests = 0
        self._last_error: str | None = None
        self._failures = 0
        self._outage_started: float | None = None

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
        """Upload batches after the cloud cursor until cancelled."""
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
                self._beat()
                batch = await self._buffer.read_batch(self.name, limit, after_seq=cursor)
                if not batch:
                    idle = self._buffer.wait_for_data(cursor, timeout=self._cfg.interval)
                    await await_beating(idle, self._beat, self._cfg.interval)
                    continue
                await self._deliver(client, batch)
                cursor = batch[-1].seq

    async def _deliver(self, client: httpx.AsyncClient, batch: list[StoredReading]) -> None:
        """Upload a batch, split on 400, 413 and 422, until every part is stored or quarantined.

        Parts are handled in seq order, so the cursor always moves forward over
        readings that are acknowledged or quarantined.
        """
        parts = [batch]
        while parts:
            self._beat()
            part = parts.pop()
            rejected = await self._upload(client, part)
            if rejected is None:
                await self._buffer.commit_cursor(self.name, part[-1].seq)
                continue
            if len(part) == 1:
                await self._quarantine(part, rejected)
                continue
            # Pushed in reverse, so the lowest seqs are uploaded first.
            parts.extend(reversed(_split(part, rejected.seq if rejected.status != 413 else None)))

    async def _quarantine(self, part: list[StoredReading], rejected: _Rejected) -> None:
        await self._buffer.quarantine(self.name, part, rejected.status, rejected.reason)
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
        self, client: httpx.AsyncClient, part: list[StoredReading]
    ) -> _Rejected | None:
        """POST one batch until it is acknowledged (None) or rejected in a way a split can fix."""
        body = gzip.compress(build_body(self._cfg.device_id, self._rig_id, part))
        headers = {
            "Content-Type": "application/json",
            "Content-Encoding": "gzip",
            "Idempotency-Key": idempotency_key(self._cfg.device_id, part),
        }
        attempt = 0
        while True:
            self._beat()
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
                done, rejected = self._classify(part, response)
                if done:
                    return rejected
                delay = self._retry_delay(response, attempt)
                self._on_failure(part, _reason(response), response.status_code, delay)
            attempt += 1
            await await_beating(self._sleep(delay), self._beat, delay)

    def _classify(
        self, part: list[StoredReading], response: httpx.Response
    ) -> tuple[bool, _Rejected | None]:
        """Return (True, None) for a 2xx, (True, rejection) for a split, (False, None) to retry."""
        status = response.status_code
        if response.is_success:
            self._on_success(part, response)
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

    def _on_success(self, part: list[StoredReading], response: httpx.Response) -> None:
        self._on_recovered()
        self._last_success = time.time()
        self._uploaded += len(part)
        duplicates = _int_field(response, "duplicates")
        self._duplicates += duplicates
        self._log.debug(
            "cloud_batch_uploaded",
            first_seq=part[0].seq,
            last_seq=part[-1].seq,
            readings=len(part),
            duplicates=duplicates,
        )

    def _on_failure(
        self, part: list[StoredReading], error: str, status: int | None, delay: float
    ) -> None:
        self._last_error = error
        self._failures += 1
        fields: dict[str, Any] = {
            "first_seq": part[0].seq,
            "last_seq": part[-1].seq,
            "status": status,
            "error": error,
            "retry_in_s": round(delay, 2),
        }
        if self._outage_started is None:
            self._outage_started = time.monotonic()
            self._log.warning("cloud_upload_failed", **fields)
        else:
            self._log.debug("cloud_upload_failed", failed_attempts=self._failures, **fields)

    def _on_recovered(self) -> None:
        if self._outage_started is None:
            return
        outage = time.monotonic() - self._outage_started
        self._log.info(
            "cloud_upload_recovered", outage_s=round(outage, 1), failed_attempts=self._failures
        )
        self._outage_started = None
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
