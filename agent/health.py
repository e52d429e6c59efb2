"""Health rules and the small HTTP server behind /metrics and /healthz.

The server speaks just enough HTTP/1.1 for Prometheus and load-balancer
checks: one GET or HEAD request per connection, then the connection closes.
Every connection has a size limit and deadlines, so a slow or broken client
cannot hold the agent or block other clients.
"""

from __future__ import annotations

import asyncio
import errno
import json
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from agent.metrics import METRICS_CONTENT_TYPE, AgentSnapshot, render_metrics
from drivers.retry import Outage

__all__ = [
    "DISK_FULL_WINDOW",
    "SOURCE_SILENCE_LIMIT",
    "MetricsListenError",
    "MetricsServer",
    "health",
    "health_document",
    "parse_listen",
    "serve_metrics",
]

log = structlog.get_logger(__name__)

SOURCE_SILENCE_LIMIT = 120.0
"""Default seconds without any reading, while sources are configured, before /healthz fails.

NOTE: a guess, not a measurement. Pass a larger limit when a source polls less
often than about once a minute.
"""
DISK_FULL_WINDOW = 60.0
"""Seconds during which a reading dropped for a full disk keeps /healthz failing."""

MAX_REQUEST_BYTES = 8192
"""Largest request head (request line and headers) accepted; larger requests get 431."""
READ_TIMEOUT = 5.0
"""Seconds a client has to send its whole request head; slower clients get 408."""
WRITE_TIMEOUT = 10.0
"""Seconds a client has to read the response before the connection is aborted."""
MAX_CONNECTIONS = 32
"""Connections served at once. Each connection over the limit gets 503 at once and is closed."""

_READ_CHUNK = 4096
# A prefix of "METHOD SP request-target SP HTTP-version": uppercase method, then
# visible ASCII. Anything else (TLS handshakes, binary noise) is rejected at once.
_REQUEST_LINE_PREFIX = re.compile(rb"[A-Z]{0,20}(?: [\x21-\x7e]*(?: [\x21-\x7e]*)?)?")
_HTTP_VERSION = re.compile(r"HTTP/\d\.\d")
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


# --- health rules ---------------------------------------------------------------------------


def health(
    snapshot: AgentSnapshot, now: float, *, source_silence_limit: float = SOURCE_SILENCE_LIMIT
) -> tuple[bool, list[str]]:
    """Apply the health rules to `snapshot` at Unix time `now`; return (ok, reasons).

    The agent is unhealthy when the watchdog finds a part stale or the buffer
    is not open. It is also unhealthy when a reading was dropped for a full disk
    within DISK_FULL_WINDOW seconds, or when sources are configured but none
    produced a reading for more than `source_silence_limit` seconds. A
    disconnected sink is not a reason, because link outages are normal on a rig
    and the buffer keeps the readings until the link returns.
    """
    reasons = [f"{part} made no progress within the watchdog interval" for part in snapshot.stale]

    buffer = snapshot.buffer
    if not buffer.open:
        reasons.append("the buffer database is not open")
    if buffer.last_disk_full_unix is not None:
        since_drop = now - buffer.last_disk_full_unix
        if since_drop <= DISK_FULL_WINDOW:
            reasons.append(
                f"readings were dropped because the disk is full, the last one "
                f"{max(since_drop, 0.0):.0f} s ago ({buffer.disk_full_dropped} dropped in total)"
            )

    if snapshot.sources:
        times = [s.last_reading_unix for s in snapshot.sources if s.last_reading_unix is not None]
        # Before the first reading, the silence is counted from the agent's start.
        newest = max(times) if times else snapshot.start_unix
        silence = now - newest
        if silence > source_silence_limit:
            reasons.append(
                f"no source produced a reading for {silence:.0f} s "
                f"(limit {source_silence_limit:.0f} s)"
            )
    return not reasons, reasons


def health_document(
    snapshot: AgentSnapshot, now: float, *, source_silence_limit: float = SOURCE_SILENCE_LIMIT
) -> tuple[int, dict[str, Any]]:
    """Build the /healthz response: HTTP status (200 or 503) and the JSON object to send."""
    ok, reasons = health(snapshot, now, source_silence_limit=source_silence_limit)
    document: dict[str, Any] = {
        "status": "ok" if ok else "unhealthy",
        "reasons": reasons,
        "rig_id": snapshot.rig_id,
        "version": snapshot.version,
        "uptime_seconds": round(now - snapshot.start_unix, 3),
        "stale": list(snapshot.stale),
        "buffer": {
            "open": snapshot.buffer.open,
            "last_seq": snapshot.buffer.last_seq,
            "size_bytes": snapshot.buffer.size_bytes,
            "disk_full_dropped": snapshot.buffer.disk_full_dropped,
        },
        "clock": {
            "synchronized": snapshot.clock.synchronized,
            "jumps": snapshot.clock.jumps,
        },
        "sources": [
            {
                "name": source.name,
                "protocol": source.protocol,
                "connected": source.connected,
                "errors": source.errors,
                "last_reading_age_seconds": _age(now, source.last_reading_unix),
            }
            for source in snapshot.sources
        ],
        "sinks": [
            {
                "name": sink.name,
                "connected": sink.connected,
                "backlog_readings": sink.depth,
                "oldest_unacknowledged_age_seconds": sink.oldest_unacknowledged_age_seconds,
                "last_success_age_seconds": _age(now, sink.last_success_unix),
            }
            for sink in snapshot.sinks
        ],
    }
    return (200 if ok else 503), document


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else round(now - then, 3)


# --- listen address -------------------------------------------------------------------------


class MetricsListenError(Exception):
    """The metrics server cannot listen on the configured address."""


def parse_listen(value: str) -> tuple[str, int]:
    """Split a "HOST:PORT" or "[IPV6]:PORT" listen address; raise ValueError when invalid.

    An empty string turns the metrics server off, so the caller must not start
    the server with it. This function rejects it like any other invalid value.
    """
    if value == "":
        msg = (
            'agent.metrics_listen is "", which turns metrics off; '
            "do not start the metrics server for it"
        )
        raise ValueError(msg)
    host, sep, port_text = value.rpartition(":")
    if not sep:
        msg = (
            f'agent.metrics_listen = "{value}" has no port; write HOST:PORT, '
            'for example "127.0.0.1:9108"'
        )
        raise ValueError(msg)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        msg = (
            f'agent.metrics_listen = "{value}": put an IPv6 address in brackets, '
            'for example "[::1]:9108"'
        )
        raise ValueError(msg)
    if not host:
        msg = (
            f'agent.metrics_listen = "{value}" has no host; write "127.0.0.1:{port_text}" '
            f'for this machine only or "0.0.0.0:{port_text}" for every interface'
        )
        raise ValueError(msg)
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        msg = (
            f'agent.metrics_listen = "{value}": the port "{port_text}" is not a number '
            "from 1 to 65535"
        )
        raise ValueError(msg)
    return host, int(port_text)


def _listen_error(value: str, exc: OSError) -> MetricsListenError:
    turn_off = 'or set agent.metrics_listen = "" to turn metrics off'
    if isinstance(exc, socket.gaierror):
        detail = f"the host could not be resolved ({exc.strerror})"
        fix = f"use an IP address of this machine, such as 127.0.0.1, {turn_off}"
    elif exc.errno == errno.EADDRINUSE:
        detail = "the address is already in use by another process"
        fix = f"stop that process or choose a free port in agent.metrics_listen, {turn_off}"
    elif exc.errno == errno.EADDRNOTAVAIL:
        detail = "the host is not an address of this machine"
        fix = f"use 127.0.0.1 or an address of one of its interfaces, {turn_off}"
    elif exc.errno == errno.EACCES:
        detail = "permission denied"
        fix = f"choose a port of 1024 or higher, {turn_off}"
    else:
        detail = exc.strerror or str(exc)
        fix = f"check agent.metrics_listen, {turn_off}"
    return MetricsListenError(f'cannot serve metrics on "{value}": {detail}; {fix}')


# --- HTTP server ----------------------------------------------------------------------------


class _RequestError(Exception):
    """A request that gets an error status and a closed connection."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Request:
    method: str
    path: str


class MetricsServer:
    """The /metrics and /healthz HTTP server, fed by a snapshot function.

    `snapshot` is called once per request on the event loop, so it must be
    fast and must not block.
    """

    def __init__(
        self,
        snapshot: Callable[[], AgentSnapshot],
        *,
        source_silence_limit: float = SOURCE_SILENCE_LIMIT,
    ) -> None:
        self._snapshot = snapshot
        self._source_silence_limit = source_silence_limit
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._failures = Outage()
        self._overload = Outage()

    @property
    def address(self) -> tuple[str, int]:
        """Host and port of the first bound socket; raise RuntimeError before `start`."""
        if self._server is None or not self._server.sockets:
            msg = "the metrics server is not started"
            raise RuntimeError(msg)
        sockname = self._server.sockets[0].getsockname()
        return str(sockname[0]), int(sockname[1])

    async def start(self, listen: str) -> None:
        """Bind to `listen` ("HOST:PORT"); raise MetricsListenError when that fails."""
        try:
            host, port = parse_listen(listen)
        except ValueError as exc:
            raise MetricsListenError(str(exc)) from exc
        try:
            self._server = await asyncio.start_server(
                self._handle, host, port, limit=MAX_REQUEST_BYTES
            )
        except OSError as exc:
            raise _listen_error(listen, exc) from exc
        log.info("metrics_server_started", listen=listen)

    async def serve_forever(self) -> None:
        """Accept connections until cancelled; `start` must have been called."""
        if self._server is None:
            msg = "call start() before serve_forever()"
            raise RuntimeError(msg)
        await self._server.serve_forever()

    async def aclose(self) -> None:
        """Stop listening and cancel the requests in progress."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=1.0)
        await self._server.wait_closed()
        self._server = None
        log.info("metrics_server_stopped")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            if len(self._handlers) > MAX_CONNECTIONS:
                self._overload.fail(log, "metrics_connections_over_limit", limit=MAX_CONNECTIONS)
                await _send(writer, 503, "text/plain; charset=utf-8", b"too many connections\n")
                return
            self._overload.recover(log, "metrics_connections_under_limit")
            await self._serve_one(reader, writer)
        finally:
            if task is not None:
                self._handlers.discard(task)

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await _read_head(reader)
            if head is None:
                writer.transport.abort()
                return
            request = _parse_request(head)
            status, content_type, body = self._respond(request)
        except TimeoutError:
            log.debug("metrics_request_timed_out", peer=peer, timeout_s=READ_TIMEOUT)
            status, content_type, body = 408, "text/plain; charset=utf-8", b"request timed out\n"
            request = None
        except _RequestError as exc:
            log.debug("metrics_request_rejected", peer=peer, status=exc.status, error=exc.message)
            status, content_type = exc.status, "text/plain; charset=utf-8"
            body = (exc.message + "\n").encode()
            request = None
        except ConnectionError:
            writer.transport.abort()
            return
        head_only = request is not None and request.method == "HEAD"
        await _send(writer, status, content_type, body, head_only=head_only)

    def _respond(self, request: _Request) -> tuple[int, str, bytes]:
        if request.path not in ("/metrics", "/healthz"):
            raise _RequestError(404, f"not found: {request.path}; try /metrics or /healthz")
        if request.method not in ("GET", "HEAD"):
            raise _RequestError(405, f"method {request.method} not allowed; use GET or HEAD")
        try:
            snapshot = self._snapshot()
            if request.path == "/metrics":
                response = (200, METRICS_CONTENT_TYPE, render_metrics(snapshot))
            else:
                status, document = health_document(
                    snapshot, time.time(), source_silence_limit=self._source_silence_limit
                )
                response = (status, "application/json", json.dumps(document).encode())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            self._failures.fail(log, "metrics_response_failed", path=request.path, error=error)
            if request.path == "/metrics":
                return 500, "text/plain; charset=utf-8", b"building the metrics failed\n"
            document = {
                "status": "unhealthy",
                "reasons": [f"building the health report failed: {type(exc).__name__}"],
            }
            return 503, "application/json", json.dumps(document).encode()
        self._failures.recover(log, "metrics_response_recovered", path=request.path)
        return response


async def serve_metrics(
    listen: str,
    snapshot: Callable[[], AgentSnapshot],
    *,
    source_silence_limit: float = SOURCE_SILENCE_LIMIT,
) -> None:
    """Serve /metrics and /healthz on `listen` ("HOST:PORT") until cancelled.

    Raises MetricsListenError at once when the address is invalid or cannot be
    bound. The caller skips this function when agent.metrics_listen is "".
    """
    server = MetricsServer(snapshot, source_silence_limit=source_silence_limit)
    await server.start(listen)
    try:
        await server.serve_forever()
    finally:
        await server.aclose()


async def _read_head(reader: asyncio.StreamReader) -> bytes | None:
    """Read up to the blank line that ends the request head; None if the client sent nothing.

    Raises _RequestError as soon as the request line cannot be HTTP, or when
    the head grows past MAX_REQUEST_BYTES.
    """
    data = bytearray()
    while True:
        line_end = data.find(b"\r\n")
        request_line = data if line_end < 0 else data[:line_end]
        if not _REQUEST_LINE_PREFIX.fullmatch(request_line):
            raise _RequestError(400, "bad request: the request line is not HTTP")
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return bytes(data[:end])
        if len(data) > MAX_REQUEST_BYTES:
            raise _RequestError(431, f"request head larger than {MAX_REQUEST_BYTES} bytes")
        chunk = await reader.read(_READ_CHUNK)
        if not chunk:
            if data:
                raise _RequestError(400, "bad request: the connection closed mid-request")
            return None
        data += chunk


def _parse_request(head: bytes) -> _Request:
    request_line = head.split(b"\r\n", 1)[0].decode("ascii")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[0] or not parts[1].startswith("/"):
        raise _RequestError(400, "bad request: expected METHOD /path HTTP/1.1")
    method, target, version = parts
    if not _HTTP_VERSION.fullmatch(version):
        raise _RequestError(400, f"bad request: {version!r} is not an HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _RequestError(505, f"{version} is not supported; use HTTP/1.1")
    path = target.split("?", 1)[0]
    return _Request(method=method, path=path)


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    content_type: str,
    body: bytes,
    *,
    head_only: bool = False,
) -> None:
    """Send one response and close the connection; abort it if the client does not read."""
    headers = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
    ]
    if status == 405:
        headers.append("Allow: GET, HEAD")
    payload = ("\r\n".join(headers) + "\r\n\r\n").encode("ascii")
    if not head_only:
        payload += body
    try:
        writer.write(payload)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        writer.close()
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, ConnectionError):
        writer.transport.abort()
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
