"""WITS level 0 driver: reads packets from a serial port or TCP link and emits readings."""

from __future__ import annotations

import asyncio
import datetime as dt
import termios
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from serial_asyncio_fast import open_serial_connection
from structlog.typing import FilteringBoundLogger

from buffer.reading import Reading, now_us
from config.model import Wits0Source
from config.units import format_duration
from drivers.base import Emit
from drivers.retry import Backoff, Outage
from drivers.wits0_link import Wits0Link
from drivers.wits0_parser import ParserCounters, Wits0Item, Wits0Packet, Wits0Parser

__all__ = [
    "CONNECT_TIMEOUT",
    "NULL_TOLERANCE",
    "READ_SIZE",
    "RECONNECT_DELAY_MAX",
    "RECONNECT_DELAY_MIN",
    "Wits0Counters",
    "Wits0Driver",
    "Wits0LinkError",
    "Wits0Listener",
    "close_link",
    "device_time_us",
    "is_null",
    "open_link",
    "packet_readings",
]

log = structlog.get_logger(__name__)

READ_SIZE = 4096
"""Bytes asked for per read; a read returns whatever has arrived, up to this."""

CONNECT_TIMEOUT = 10.0
"""Seconds a TCP connect or a serial port open may take before it counts as failed."""

RECONNECT_DELAY_MIN = 0.5
RECONNECT_DELAY_MAX = 30.0
"""Bounds in seconds of the jittered, doubling wait before reopening a failed link."""

NULL_TOLERANCE = 0.005
"""Largest difference at which a value still equals a null sentinel.

Senders write sentinels with two decimals ("-9999.00", "-999.25"). Half a unit
of the second decimal matches any rendering of the sentinel, while a value
that differs in the second decimal is data.
"""

DATE_ITEM = "05"
TIME_ITEM = "06"
"""Item numbers of the date (YYMMDD) and time (HHMMSS) header items of every record."""

CLOSE_TIMEOUT = 1.0
"""Seconds to wait for a link to close cleanly before it is aborted."""

BAD_DATA_LOG_INTERVAL = 60.0
"""Seconds between two warnings about junk bytes, malformed lines or oversize packets."""
_BAD_DATA_COUNTERS = ("junk_bytes", "malformed_lines", "oversize_packets")

_PARSER_COUNTERS = (
    "packets",
    "junk_bytes",
    "discarded_packets",
    "malformed_lines",
    "repeated_items",
    "oversize_packets",
)


class Wits0LinkError(OSError):
    """Raised when a WITS level 0 link cannot be opened.

    The serial port is missing or rejects its settings, the TCP connect was
    refused or timed out, or the listening port is taken. `link` is the link
    as logs show it. It is an OSError, like the failures it replaces.
    """

    def __init__(self, message: str, *, link: str) -> None:
        super().__init__(message)
        self.link = link


@dataclass
class Wits0Counters:
    """Totals of the bytes, packets and drops of a WITS0 source since its driver started."""

    bytes_received: int = 0
    packets: int = 0
    malformed_lines: int = 0
    """Data lines skipped: too short, a code that is not 4 digits, or a value that is no number."""
    junk_bytes: int = 0
    """Bytes outside packets, such as line noise before `&&`."""
    discarded_packets: int = 0
    """Packets without their `!!`: a new `&&` arrived first, or the link was lost."""
    repeated_items: int = 0
    """Codes sent twice in one packet. The last value is kept."""
    oversize_packets: int = 0
    """Packets dropped because a line or the line count exceeded the parser's limits."""
    reconnects: int = 0
    """Times the link was opened again after it had been lost, replaced or silent."""
    open_failures: int = 0
    """Attempts to open the link that failed."""
    watchdog_timeouts: int = 0
    """Times no byte arrived for `silence_timeout`, so the link was closed and reopened."""
    null_values: Counter[str] = field(default_factory=Counter)
    """Values equal to a null sentinel, by channel. None of them produced a reading."""
    bare_items: int = 0
    """Items sent as a code without a value. None of them produced a reading."""
    device_time_fallbacks: int = 0
    """Records stamped with the receive time because their device date or time was invalid."""
    packets_without_device_time: int = 0
    """Packets stamped with the receive time because no record carried both date and time."""
    transmitted_packets: int = 0
    links_lost: int = 0
    """Times an open link failed or was closed by the other end."""

    @property
    def failures(self) -> int:
        """Failed opens, lost and silent links, and data that could not be read as packets."""
        return (
            self.open_failures
            + self.links_lost
            + self.watchdog_timeouts
            + self.malformed_lines
            + self.discarded_packets
            + self.oversize_packets
        )

    def update_from(self, parser: ParserCounters) -> None:
        """Copy the parser's running totals."""
        for name in _PARSER_COUNTERS:
            setattr(self, name, getattr(parser, name))


# --- mapping ----------------------------------------------------------------------


def is_null(value: float, null_values: list[float]) -> bool:
    """Return whether a value equals one of the null sentinels, within NULL_TOLERANCE."""
    return any(abs(value - null) < NULL_TOLERANCE for null in null_values)


def device_time_us(date_value: float, time_value: float, zone: dt.tzinfo) -> int:
    """Convert WITS date (YYMMDD) and time (HHMMSS) values in local time to UTC microseconds.

    The values are integers that may have lost their leading zeros, such as
    50102 for 2005-01-02, so they are padded back to 6 digits. Two-digit years
    are 2000 to 2099. A local time that occurs twice when clocks go back is
    taken as the first occurrence. Raises ValueError for a date or time that
    does not exist.
    """
    date_digits = _six_digits(date_value, "date")
    time_digits = _six_digits(time_value, "time")
    local = dt.datetime(
        2000 + int(date_digits[0:2]),
        int(date_digits[2:4]),
        int(date_digits[4:6]),
        int(time_digits[0:2]),
        int(time_digits[2:4]),
        int(time_digits[4:6]),
        tzinfo=zone,
    )
    return round(local.timestamp()) * 1_000_000


def _six_digits(value: float, what: str) -> str:
    if not value.is_integer() or not 0 <= value <= 999_999:
        msg = f"invalid WITS {what} {value!r}: expected an integer of up to 6 digits"
        raise ValueError(msg)
    return f"{int(value):06d}"


def packet_readings(
    source: Wits0Source,
    packet: Wits0Packet,
    received_us: int,
    counters: Wits0Counters | None = None,
) -> list[Reading]:
    """Map the items of one packet to readings, all with the packet's timestamp.

    The timestamp is `received_us`, unless `use_device_time` is set and the
    packet carries a date (xx05) and time (xx06) item. Items of a record then
    take the device time of that same record. Items of a record without its
    own date and time take the first record's device time. A record whose date
    or time is invalid falls back to `received_us`, counted in
    `device_time_fallbacks`. The date and time items that set a timestamp are
    not readings themselves. The other header items (xx01 to xx04, xx07) are
    mapped like any item. Values equal to a null sentinel and bare codes
    produce no reading and are counted.
    """
    counters = Wits0Counters() if counters is None else counters
    times: dict[str, int | None] = {}
    if source.use_device_time:
        times = _record_times(source, packet, counters)
        if not times:
            _count_missing_time(source, counters)
    first_time = next((ts for ts in times.values() if ts is not None), received_us)
    readings: list[Reading] = []
    for item in packet.items:
        record, number = item.code[:2], item.code[2:]
        own_time = times.get(record)
        if own_time is not None and number in (DATE_ITEM, TIME_ITEM):
            continue
        mapped = source.map_code(item.code)
        if mapped is None:
            continue
        if item.value is None:
            counters.bare_items += 1
        elif is_null(item.value, source.null_values):
            _count_null(source, counters, mapped.channel, item.value)
        else:
            if record not in times:
                ts_us = first_time
            else:
                ts_us = received_us if own_time is None else own_time
            readings.append(Reading(ts_us, source.name, mapped.channel, item.value, mapped.unit))
    return readings


def _record_times(
    source: Wits0Source, packet: Wits0Packet, counters: Wits0Counters
) -> dict[str, int | None]:
    """Return the device time of each record that sent both date and time, or None if invalid."""
    zone = source.tzinfo
    times: dict[str, int | None] = {}
    for item in packet.items:
        record, number = item.code[:2], item.code[2:]
        if number != DATE_ITEM or record in times:
            continue
        time_item = packet.get(record + TIME_ITEM)
        if time_item is None:
            continue
        try:
            times[record] = _items_time_us(item, time_item, zone)
        except ValueError as exc:
            times[record] = None
            counters.device_time_fallbacks += 1
            level = log.warning if counters.device_time_fallbacks == 1 else log.debug
            level(
                "wits0_device_time_invalid",
                source=source.name,
                date=item.text,
                time=time_item.text,
                error=str(exc),
                count=counters.device_time_fallbacks,
            )
    return times


def _items_time_us(date_item: Wits0Item, time_item: Wits0Item, zone: dt.tzinfo) -> int:
    if date_item.value is None or time_item.value is None:
        msg = "the date or time item has no value"
        raise ValueError(msg)
    return device_time_us(date_item.value, time_item.value, zone)


def _count_missing_time(source: Wits0Source, counters: Wits0Counters) -> None:
    counters.packets_without_device_time += 1
    if counters.packets_without_device_time == 1:
        log.warning(
            "wits0_device_time_missing",
            source=source.name,
            hint="the sender includes no date (xx05) and time (xx06) items; "
            "readings get the receive time. Set use_device_time = false to silence this",
        )


def _count_null(source: Wits0Source, counters: Wits0Counters, channel: str, value: float) -> None:
    counters.null_values[channel] += 1
    if counters.null_values[channel] == 1:
        # Logged once per channel, because a sensor that is not fitted sends it in every packet.
        log.info("wits0_null_value", source=source.name, channel=channel, value=value)


# --- links ------------------------------------------------------------------------


class Wits0Listener:
    """The TCP server of a `tcp-listen://` link: the device connects to the agent.

    One device is served at a time. A newer connection replaces the older
    one, which is closed, because a device that lost its link usually
    reconnects before the agent notices the old connection is dead.
    """

    def __init__(self, link: Wits0Link, logger: FilteringBoundLogger | None = None) -> None:
        self.link = link
        self._log = logger if logger is not None else log.bind(link=link.describe())
        self._server: asyncio.Server | None = None
        self._pending: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._current: asyncio.StreamWriter | None = None
        self._arrived = asyncio.Event()

    @property
    def has_pending(self) -> bool:
        """Whether a connection is waiting to be accepted."""
        return self._pending is not None

    async def start(self) -> None:
        """Listen on the link's address if not listening yet. Raise Wits0LinkError if it fails."""
        if self._server is not None:
            return
        try:
            self._server = await asyncio.start_server(
                self._on_connect, self.link.host, self.link.port
            )
        except OSError as exc:
            msg = (
                f"cannot listen on {self.link.describe()}: {exc}. Check that no other "
                "program uses the port and that the address belongs to this machine"
            )
            raise Wits0LinkError(msg, link=self.link.describe()) from exc
        self._log.info("wits0_listening")

    async def accept(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Wait for the next device connection and return its streams."""
        await self.start()
        while self._pending is None:
            self._arrived.clear()
            await self._arrived.wait()
        streams, self._pending = self._pending, None
        self._current = streams[1]
        return streams

    def stop_listening(self) -> None:
        """Stop accepting connections; connections already accepted stay open."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        """Stop listening and close any connection not yet handed out."""
        self.stop_listening()
        if self._pending is not None:
            self._pending[1].close()
            self._pending = None

    def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        older = self._pending[1] if self._pending is not None else self._current
        if older is not None and not older.is_closing():
            self._log.info("wits0_connection_replaced", old_peer=_peer(older), new_peer=peer)
            older.close()
        self._pending = (reader, writer)
        self._arrived.set()


async def open_link(
    link: Wits0Link | Wits0Source,
    *,
    connect_timeout: float = CONNECT_TIMEOUT,
    listener: Wits0Listener | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open a link and return its streams: open the serial port, connect, or accept one device.

    For `tcp-listen` without a `listener`, this listens until one device
    connects and then stops listening. Raises Wits0LinkError when the port or
    connection cannot be opened.
    """
    if isinstance(link, Wits0Source):
        link = link.link
    if link.kind == "serial":
        return await _open_serial(link, connect_timeout)
    if link.kind == "tcp":
        return await _connect_tcp(link, connect_timeout)
    if listener is not None:
        return await listener.accept()
    one_shot = Wits0Listener(link)
    try:
        return await one_shot.accept()
    finally:
        one_shot.stop_listening()


async def _connect_tcp(
    link: Wits0Link, open_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(open_timeout):
            return await asyncio.open_connection(link.host, link.port)
    except TimeoutError as exc:
        msg = f"connect to {link.describe()} timed out after {format_duration(open_timeout)}"
        raise Wits0LinkError(msg, link=link.describe()) from exc
    except OSError as exc:
        msg = (
            f"cannot connect to {link.describe()}: {exc}. Check that the device serves "
            "WITS on this address and port"
        )
        raise Wits0LinkError(msg, link=link.describe()) from exc


async def _open_serial(
    link: Wits0Link, open_timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        async with asyncio.timeout(open_timeout):
            return await open_serial_connection(
                url=link.path,
                baudrate=link.baudrate,
                parity=link.parity,
                stopbits=link.stopbits,
                bytesize=link.bytesize,
            )
    except TimeoutError as exc:
        msg = f"opening {link.describe()} timed out after {format_duration(open_timeout)}"
        raise Wits0LinkError(msg, link=link.describe()) from exc
    except termios.error as exc:
        # The traceback's frames keep the opened port alive; dropping it closes the port now.
        exc.__traceback__ = None
        msg = f"serial port {link.path} rejected the settings {link.describe()}: {exc}"
        raise Wits0LinkError(msg, link=link.describe()) from None
    except (OSError, ValueError) as exc:
        raise Wits0LinkError(_serial_open_error(link, exc), link=link.describe()) from exc


def _serial_open_error(link: Wits0Link, exc: Exception) -> str:
    if not Path(link.path).exists():
        return f"serial port {link.path} not found (unplugged, or a wrong path?)"
    return f"cannot open serial port {link.path}: {exc}"


async def close_link(writer: asyncio.StreamWriter) -> None:
    """Close a link's streams, aborting if it does not close within CLOSE_TIMEOUT."""
    writer.close()
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await writer.wait_closed()
    except (TimeoutError, OSError):
        writer.transport.abort()


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


# --- driver -----------------------------------------------------------------------


class Wits0Driver:
    """Reads WITS level 0 packets from one link and emits one batch of readings per packet.

    The link is a serial port, a TCP connection the agent opens, or a TCP
    port the device connects to. A link that fails (port vanished, connection
    refused or closed) is reopened by path or address with a jittered,
    doubling backoff. When no byte arrives for `silence_timeout`, the read
    watchdog closes the link and opens it again. A partial packet is
    discarded whenever the link closes. With `transmit` set, the configured
    packet is sent right after each open and then every `transmit_interval`,
    for senders that send only while they receive valid packets.
    """

    def __init__(
        self,
        source: Wits0Source,
        *,
        reconnect_delay_min: float = RECONNECT_DELAY_MIN,
        reconnect_delay_max: float = RECONNECT_DELAY_MAX,
        connect_timeout: float = CONNECT_TIMEOUT,
    ) -> None:
        self.name = source.name
        self.source = source
        self.link = source.link
        self.counters = Wits0Counters()
        self.source_tag: str | None = None
        self.connected = asyncio.Event()
        """Set while the link is open."""
        self._connect_timeout = connect_timeout
        self._parser = Wits0Parser()
        self._backoff = Backoff(reconnect_delay_min, reconnect_delay_max)
        self._link_outage = Outage()
        self._silence = Outage()
        self._bad_data_reported: dict[str, int] = {}
        self._bad_data_logged_at = -BAD_DATA_LOG_INTERVAL
        self._opened_before = False
        self._write_error = ""
        self._transmit_bytes = source.transmit_bytes if source.transmit else b""
        self._log: FilteringBoundLogger = log.bind(source=source.name, link=self.link.describe())

    async def run(self, emit: Emit) -> None:
        """Read the link until cancelled, reopening it whenever it fails.

        Link failures are logged and retried. An exception raised by `emit` ends the run.
        """
        listener = None
        if self.link.kind == "tcp-listen":
            listener = Wits0Listener(self.link, self._log)
        try:
            while True:
                reader, writer = await self._open(listener)
                ended = await self._session(reader, writer, emit, listener)
                if ended == "lost":
                    await asyncio.sleep(self._backoff.next_delay())
        finally:
            if listener is not None:
                listener.close()

    async def _open(
        self, listener: Wits0Listener | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Open the link, retrying with backoff until it opens."""
        while True:
            try:
                reader, writer = await open_link(
                    self.link, connect_timeout=self._connect_timeout, listener=listener
                )
            except Wits0LinkError as exc:
                self.counters.open_failures += 1
                delay = self._backoff.next_delay()
                self._link_outage.fail(
                    self._log, "wits0_open_failed", error=str(exc), retry_in_s=round(delay, 3)
                )
                await asyncio.sleep(delay)
                continue
            self._opened(writer)
            return reader, writer

    def _opened(self, writer: asyncio.StreamWriter) -> None:
        fields = {} if self.link.is_serial else {"peer": _peer(writer)}
        if self._opened_before:
            self.counters.reconnects += 1
            self._log.debug("wits0_connected", reconnects=self.counters.reconnects, **fields)
        else:
            self._log.info("wits0_connected", **fields)
        self._opened_before = True
        self._write_error = ""
        self.connected.set()

    async def _session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        emit: Emit,
        listener: Wits0Listener | None,
    ) -> str:
        """Read one open link until it ends, and return why: "lost", "silent" or "replaced"."""
        transmit = None
        if self._transmit_bytes:
            transmit = asyncio.create_task(self._transmit_loop(writer), name=f"{self.name}:tx")
        try:
            return await self._read_until_end(reader, emit, listener)
        finally:
            self.connected.clear()
            if transmit is not None:
                transmit.cancel()
                await asyncio.wait([transmit])
            await close_link(writer)
            self._parser.reset()
            self.counters.update_from(self._parser.counters)

    async def _read_until_end(
        self, reader: asyncio.StreamReader, emit: Emit, listener: Wits0Listener | None
    ) -> str:
        silence_timeout = self.source.silence_timeout
        while True:
            try:
                async with asyncio.timeout(silence_timeout):
                    data = await reader.read(READ_SIZE)
            except TimeoutError:
                self.counters.watchdog_timeouts += 1
                self._silence.fail(
                    self._log,
                    "wits0_watchdog_timeout",
                    silence_s=silence_timeout,
                    count=self.counters.watchdog_timeouts,
                )
                return "silent"
            except OSError as exc:
                # A vanished serial port raises pyserial's SerialException, which is an OSError.
                self.counters.links_lost += 1
                self._link_outage.fail(self._log, "wits0_link_lost", error=str(exc))
                return "lost"
            if not data:
                if listener is not None and listener.has_pending:
                    return "replaced"
                error = self._write_error or "the link was closed by the other end"
                self.counters.links_lost += 1
                self._link_outage.fail(self._log, "wits0_link_lost", error=error)
                return "lost"
            await self._received(data, emit)

    async def _received(self, data: bytes, emit: Emit) -> None:
        """Parse the bytes of one read and emit the readings of each packet they complete."""
        received_us = now_us()
        self.counters.bytes_received += len(data)
        self._silence.recover(self._log, "wits0_data_resumed")
        packets = self._parser.feed(data)
        self.counters.update_from(self._parser.counters)
        self._report_bad_data()
        if not packets:
            return
        self._link_outage.recover(self._log, "wits0_link_recovered")
        self._backoff.reset()
        for packet in packets:
            self._note_source_tag(packet.source_tag)
            readings = packet_readings(self.source, packet, received_us, self.counters)
            if readings:
                await emit(readings)

    def _report_bad_data(self) -> None:
        """Log growth of the junk and malformed counters at most once per interval.

        A wrong baud rate or parity shows up only as junk, so it must reach
        the log, but not once per read.
        """
        now = time.monotonic()
        if now - self._bad_data_logged_at < BAD_DATA_LOG_INTERVAL:
            return
        current = {name: getattr(self.counters, name) for name in _BAD_DATA_COUNTERS}
        grown = {
            name: value - self._bad_data_reported.get(name, 0)
            for name, value in current.items()
            if value > self._bad_data_reported.get(name, 0)
        }
        if not grown:
            return
        self._bad_data_logged_at = now
        self._bad_data_reported = current
        self._log.warning(
            "wits0_bad_data",
            hint="check the baud rate, parity and line settings of the link",
            **{f"new_{name}": count for name, count in grown.items()},
        )

    def _note_source_tag(self, tag: str | None) -> None:
        if tag is None or tag == self.source_tag:
            return
        self._log.info("wits0_source_tag", tag=tag, previous=self.source_tag)
        self.source_tag = tag

    async def _transmit_loop(self, writer: asyncio.StreamWriter) -> None:
        """Send the transmit packet now and every interval. A failed write closes the link."""
        while True:
            try:
                writer.write(self._transmit_bytes)
                async with asyncio.timeout(self.source.silence_timeout):
                    await writer.drain()
            except OSError as exc:
                # A drain that times out (a stuck link) raises TimeoutError, also an OSError.
                self._write_error = f"write failed: {exc or 'timed out'}"
                writer.transport.abort()
                return
            self.counters.transmitted_packets += 1
            await asyncio.sleep(self.source.transmit_interval)
