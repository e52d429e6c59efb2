"""Commissioning tool `rig-agent wits0 listen`: print WITS level 0 packets live as they arrive."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TextIO

import pydantic
import structlog

from buffer.reading import format_ts, now_us
from config.model import Wits0Source
from config.units import format_duration
from drivers.wits0 import (
    Wits0LinkError,
    Wits0Listener,
    close_link,
    device_time_us,
    is_null,
    open_link,
)
from drivers.wits0_items import standard_item
from drivers.wits0_link import Wits0Link
from drivers.wits0_parser import ParserCounters, Wits0Item, Wits0Packet, Wits0Parser

__all__ = [
    "EXIT_LINK",
    "EXIT_OK",
    "EXIT_USAGE",
    "UsageError",
    "build_listen_source",
    "describe_open_error",
    "escape_bytes",
    "format_item",
    "format_raw",
    "run_listen",
]

EXIT_OK = 0
EXIT_USAGE = 1
"""Exit code for invalid arguments: the link was not opened."""
EXIT_LINK = 2
"""Exit code for a link that cannot be opened: connection refused, port missing or in use."""

REOPEN_DELAY = 2.0
"""Seconds between attempts to reopen a link that dropped after it was open."""
READ_SIZE = 4096
RAW_LINE_WIDTH = 76
"""Characters of escaped bytes per line of `--raw` output."""
HEX_THRESHOLD = 0.25
"""Share of non-text bytes above which `--raw` shows a chunk in hex instead of escaped text."""

_SOURCE_NAME = "wits0-listen"
# Fields of the source model and the command line arguments that set them, for error messages.
_ARGUMENT_NAMES = {
    "url": "URL",
    "timezone": "--timezone",
    "transmit_packet": "--transmit",
    "transmit_interval": "--transmit-interval",
}
_TEXT_BYTES = frozenset(range(0x20, 0x7F)) | {0x09, 0x0A, 0x0D}
_ESCAPES = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x5C: "\\\\"}


class UsageError(ValueError):
    """An invalid argument, found before anything is opened."""


# Arguments


def build_listen_source(
    url: str,
    *,
    timezone: str | None = None,
    transmit: str | None = None,
    transmit_interval: str = "30s",
) -> Wits0Source:
    """Build the source config `listen` reads with, validated as the agent validates a config.

    `timezone` turns on the device's date and time items. `transmit` contains
    the data lines of the packet to send periodically, separated by newlines
    or semicolons. An empty `transmit` sends the source's default keep-alive
    packet, and None sends nothing.
    """
    fields: dict[str, object] = {
        "name": _SOURCE_NAME,
        "url": url,
        "items": "standard-01",
        # The config requires transmit_interval below silence_timeout, for the
        # driver's read watchdog. listen has no watchdog, so a long
        # silence_timeout lets --transmit-interval be anything up to a day.
        "silence_timeout": "1d",
        "transmit_interval": transmit_interval,
    }
    if timezone is not None:
        fields |= {"use_device_time": True, "timezone": timezone}
    if transmit is not None:
        fields["transmit"] = True
        lines = [line.strip() for line in transmit.replace(";", "\n").splitlines()]
        if any(lines):
            fields["transmit_packet"] = "\n".join(line for line in lines if line)
    try:
        return Wits0Source.model_validate(fields)
    except pydantic.ValidationError as exc:
        raise UsageError(_describe_validation(exc)) from None


def _describe_validation(exc: pydantic.ValidationError) -> str:
    messages = []
    for error in exc.errors():
        field_name = str(error["loc"][0]) if error["loc"] else ""
        argument = _ARGUMENT_NAMES.get(field_name, field_name)
        message = str(error["msg"]).removeprefix("Value error, ")
        messages.append(f"{argument}: {message}" if argument else message)
    return "; ".join(messages)


def _check_duration(duration: float | None) -> None:
    if duration is not None and not duration > 0:
        msg = (
            f"--duration {duration:g} is not a positive number of seconds: use, say, --duration 60"
        )
        raise UsageError(msg)


# Output formatting


def escape_bytes(data: bytes) -> str:
    r"""Return bytes as text: printable ASCII as is, `\r` `\n` `\t` escaped, others as `\xNN`."""
    parts = []
    for byte in data:
        if byte in _ESCAPES:
            parts.append(_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            parts.append(chr(byte))
        else:
            parts.append(f"\\x{byte:02x}")
    return "".join(parts)


def format_raw(data: bytes, marker: str) -> list[str]:
    r"""Return the output lines that show one chunk of bytes, each line starting with `marker`.

    Text is escaped and broken after each line feed, so `\r\n` stays visible
    at the end of its line. A chunk that is mostly not text, as at a wrong
    baud rate, is shown in hex, 16 bytes a line.
    """
    binary = sum(1 for byte in data if byte not in _TEXT_BYTES)
    if binary > HEX_THRESHOLD * len(data):
        return [
            f"{marker} hex {data[start : start + 16].hex(' ')}" for start in range(0, len(data), 16)
        ]
    lines: list[str] = []
    for piece in data.splitlines(keepends=True):
        text = escape_bytes(piece)
        for start in range(0, len(text), RAW_LINE_WIDTH):
            lines.append(f"{marker} {text[start : start + RAW_LINE_WIDTH]}")
    return lines


def format_item(code: str, text: str, *, null: bool) -> str:
    """Return the line of one item: code, mnemonic, description, value, and units or null mark."""
    standard = standard_item(code)
    if standard is None:
        mnemonic, description, units = "-", "(not a standard record 01 item)", ""
    else:
        mnemonic, description = standard.mnemonic, standard.description
        units = _format_units(standard.metric_unit, standard.fps_unit)
    value = text if text else "(empty)"
    note = "null (no data)" if null else units
    return f"  {code}  {mnemonic:<5} {description:<34} {value:>14}  {note}".rstrip()


def _format_units(metric: str, fps: str) -> str:
    if not metric and not fps:
        return ""
    if metric == fps:
        return metric
    return f"{metric} or {fps}"


# The listening session


@dataclass
class _Totals:
    """Totals of one `listen` run, for the summary at the end."""

    started: float = field(default_factory=time.monotonic)
    bytes_received: int = 0
    items: int = 0
    null_items: Counter[str] = field(default_factory=Counter)
    source_tags: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0
    transmitted_packets: int = 0
    connected: bool = False


class _Session:
    """One `listen` run: opens the link, prints what arrives and keeps the totals."""

    def __init__(self, source: Wits0Source, *, raw: bool, out: TextIO) -> None:
        self.source = source
        self.link = source.link
        self.raw = raw
        self.out = out
        self.parser = Wits0Parser()
        self.totals = _Totals()
        self._seen = ParserCounters()
        self._transmit_data = source.transmit_bytes if source.transmit else b""

    def say(self, line: str) -> None:
        self.out.write(line + "\n")
        self.out.flush()

    async def listen(self) -> None:
        """Open the link, then print until cancelled, reopening the link after it drops.

        Raises Wits0LinkError only when the first open fails, so a wrong URL
        or a missing port ends the command at once.
        """
        listener = Wits0Listener(self.link) if self.link.kind == "tcp-listen" else None
        try:
            while True:
                opened = await self._open(listener)
                if opened is not None:
                    reader, writer = opened
                    ended = await self._read_until_closed(reader, writer, listener)
                    self.parser.reset()
                    if listener is not None:
                        # The listener is still up: wait for the next connection at once.
                        self.say(ended)
                        continue
                    self.say(f"{ended}; opening the link again in {REOPEN_DELAY:g} s")
                await asyncio.sleep(REOPEN_DELAY)
        finally:
            if listener is not None:
                listener.close()

    async def _open(
        self, listener: Wits0Listener | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """Open the link; return None when a reopen fails, and raise when the first open fails."""
        if listener is not None:
            self.say(f"waiting for the device to connect to {self.link.describe()}")
        else:
            self.say(f"opening {self.link.describe()}")
        try:
            reader, writer = await open_link(self.link, listener=listener)
        except Wits0LinkError as exc:
            message = describe_open_error(self.link, exc)
            if not self.totals.connected:
                raise Wits0LinkError(message, link=exc.link) from None
            self.say(f"{message}; trying again in {REOPEN_DELAY:g} s")
            return None
        if self.totals.connected:
            self.totals.reconnects += 1
        self.totals.connected = True
        self.say(f"connected: {_describe_peer(self.link, writer)}")
        return reader, writer

    async def _read_until_closed(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        listener: Wits0Listener | None,
    ) -> str:
        """Print what arrives until the link ends; return how it ended."""
        transmit = None
        if self._transmit_data:
            transmit = asyncio.create_task(self._transmit(writer), name="wits0-listen-transmit")
        try:
            while True:
                try:
                    data = await reader.read(READ_SIZE)
                except OSError as exc:
                    # pyserial's SerialException is an OSError: the port vanished.
                    return f"the link failed: {exc}"
                if not data and listener is not None and listener.has_pending:
                    return "a new device connection replaced this one"
                if not data:
                    return "the device closed the connection"
                self._receive(data)
        finally:
            if transmit is not None:
                transmit.cancel()
                await asyncio.wait([transmit])
            await close_link(writer)

    async def _transmit(self, writer: asyncio.StreamWriter) -> None:
        """Send the transmit packet now and every interval, and show each send."""
        interval = self.source.transmit_interval
        packet_text = self.source.transmit_packet.replace("\n", " ")
        while True:
            try:
                writer.write(self._transmit_data)
                await writer.drain()
            except OSError as exc:
                self.say(f"sending the transmit packet failed: {exc}")
                return
            self.totals.transmitted_packets += 1
            if self.raw:
                for line in format_raw(self._transmit_data, ">>"):
                    self.say(line)
            else:
                self.say(f"sent packet {packet_text}; next in {format_duration(interval)}")
            await asyncio.sleep(interval)

    def _receive(self, data: bytes) -> None:
        received_us = now_us()
        self.totals.bytes_received += len(data)
        if self.raw:
            for line in format_raw(data, "<<"):
                self.say(line)
        # Feeding line by line completes at most one packet per feed, so the
        # junk and discarded counts reported in a packet's header are its own.
        for piece in data.splitlines(keepends=True):
            for packet in self.parser.feed(piece):
                self._count(packet)
                if not self.raw:
                    self._print_packet(packet, received_us)

    def _count(self, packet: Wits0Packet) -> None:
        self.totals.items += len(packet.items)
        if packet.source_tag is not None:
            self.totals.source_tags[packet.source_tag] += 1
        for item in packet.items:
            if self._is_null(item):
                self.totals.null_items[item.code] += 1

    def _is_null(self, item: Wits0Item) -> bool:
        """Return whether the agent would drop the item's value as a null sentinel."""
        return item.value is not None and is_null(item.value, self.source.null_values)

    def _print_packet(self, packet: Wits0Packet, received_us: int) -> None:
        self.say(self._header(packet, received_us))
        for item in packet.items:
            self.say(format_item(item.code, item.text, null=self._is_null(item)))

    def _header(self, packet: Wits0Packet, received_us: int) -> str:
        counters = self.parser.counters
        parts = [_plural(len(packet.items), "item")]
        if packet.malformed_lines:
            parts.append(_plural(packet.malformed_lines, "malformed line"))
        if packet.repeated_items:
            parts.append(_plural(packet.repeated_items, "repeated item"))
        # Junk and discarded packets are counted between packets, so the header
        # reports the increase since the previous packet.
        junk = counters.junk_bytes - self._seen.junk_bytes
        if junk:
            parts.append(f"{_plural(junk, 'junk byte')} before it")
        discarded = counters.discarded_packets - self._seen.discarded_packets
        if discarded:
            parts.append(f"{_plural(discarded, 'unterminated packet')} discarded before it")
        self._seen = dataclasses.replace(counters)
        if self.source.use_device_time:
            parts.append(self._device_time(packet, received_us))
        sender = "" if packet.source_tag is None else f" from {packet.source_tag}"
        return f"{format_ts(received_us)}  packet {counters.packets}{sender}: {', '.join(parts)}"

    def _device_time(self, packet: Wits0Packet, received_us: int) -> str:
        """Describe the time of the packet's first record with date and time items, in UTC."""
        zone = self.source.tzinfo
        for item in packet.items:
            record, number = item.code[:2], item.code[2:]
            time_item = packet.get(f"{record}06")
            if number != "05" or time_item is None:
                continue
            if item.value is None or time_item.value is None:
                return f"device date or time of record {record} is empty"
            try:
                device_us = device_time_us(item.value, time_item.value, zone)
            except ValueError:
                return f"device date {item.text} or time {time_item.text} is invalid"
            offset = (device_us - received_us) / 1e6
            return f"device time {format_ts(device_us)} ({offset:+.1f} s from receive time)"
        return "no date and time items (xx05, xx06): the agent uses the receive time"

    def summary(self) -> list[str]:
        """Return the lines of the closing summary."""
        totals, counters = self.totals, self.parser.counters
        elapsed = time.monotonic() - totals.started
        nulls = sum(totals.null_items.values())
        lines = [
            "",
            f"Listened {elapsed:.1f} s to {self.link.describe()}: "
            f"{_plural(counters.packets, 'packet')}, {_plural(totals.items, 'item')} "
            f"({nulls} null), {_plural(totals.bytes_received, 'byte')} received.",
        ]
        if totals.source_tags:
            tags = ", ".join(f"{tag} ({count})" for tag, count in totals.source_tags.items())
            lines.append(f"Source tags: {tags}.")
        if totals.null_items:
            by_code = ", ".join(f"{code} x{n}" for code, n in sorted(totals.null_items.items()))
            lines.append(f"Null values by code: {by_code}.")
        lines.append(
            f"Malformed lines {counters.malformed_lines}, junk bytes {counters.junk_bytes}, "
            f"discarded packets {counters.discarded_packets}, repeated items "
            f"{counters.repeated_items}, oversize packets {counters.oversize_packets}, "
            f"reconnects {totals.reconnects}, packets sent {totals.transmitted_packets}."
        )
        hint = self._silence_hint()
        if hint:
            lines.append(hint)
        return lines

    def _silence_hint(self) -> str:
        if not self.totals.connected or self.parser.counters.packets:
            return ""
        if self.totals.bytes_received == 0:
            hint = "No bytes arrived. Check that the device sends WITS on this link"
            if not self._transmit_data:
                hint += (
                    "; an EDR in send and receive mode sends only after it receives a "
                    "valid packet, so try --transmit"
                )
            return hint + "."
        if self.link.is_serial:
            return (
                "Bytes arrived but no packet: check the baud rate, parity and stop bits "
                "(--raw shows the bytes)."
            )
        return "Bytes arrived but no packet: --raw shows the bytes."


def _describe_peer(link: Wits0Link, writer: asyncio.StreamWriter) -> str:
    """Return the link, and for `tcp-listen` the address of the device that connected."""
    peer = writer.get_extra_info("peername")
    if link.kind == "tcp-listen" and isinstance(peer, tuple) and len(peer) >= 2:
        return f"{link.describe()}, device {peer[0]}:{peer[1]}"
    return link.describe()


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def describe_open_error(link: Wits0Link, exc: Wits0LinkError) -> str:
    """Return why the link could not be opened and what to check.

    The driver's message is kept, unless the underlying OSError has an errno
    for which there is a more specific fix.
    """
    cause = exc.__cause__
    code = cause.errno if isinstance(cause, OSError) else None
    if code is None:
        return str(exc)
    reason = os.strerror(code)
    if link.is_serial:
        return _serial_hint(link, reason, code) or str(exc)
    if link.kind == "tcp-listen":
        return _listen_hint(link, reason, code) or str(exc)
    if code == errno.ECONNREFUSED:
        return (
            f"could not connect to {link.describe()}: {reason}. Nothing listens on that port: "
            "check the port and that the device's WITS output is a TCP server. If the "
            f"device connects to the agent instead, use tcp-listen://0.0.0.0:{link.port}"
        )
    return str(exc)


def _serial_hint(link: Wits0Link, reason: str, code: int) -> str:
    where = f"could not open serial port {link.path}: {reason}"
    if code == errno.ENOENT:
        return (
            f"{where}. Check the path (ls -l /dev/serial/by-id/ lists USB adapters) "
            "and that the adapter is plugged in"
        )
    if code in (errno.EACCES, errno.EPERM):
        return (
            f"{where}. Add this user to the dialout group "
            "(sudo usermod -aG dialout $USER, then log in again)"
        )
    if code == errno.EBUSY:
        return f"{where}. Another program, such as a running rig-agent, holds the port"
    return ""


def _listen_hint(link: Wits0Link, reason: str, code: int) -> str:
    where = f"could not listen on {link.describe()}: {reason}"
    if code == errno.EADDRINUSE:
        return (
            f"{where}. Another program, such as a running rig-agent, listens on this "
            "port: stop it or choose another port"
        )
    if code in (errno.EACCES, errno.EPERM):
        return f"{where}. Ports below 1024 need root: choose a port from 1024 up"
    if code == errno.EADDRNOTAVAIL:
        return f"{where}. The address is not one of this machine's: use 0.0.0.0 for all"
    return ""


# Entry point


def run_listen(
    url: str,
    *,
    raw: bool = False,
    timezone: str | None = None,
    duration: float | None = None,
    transmit: str | None = None,
    transmit_interval: str = "30s",
) -> int:
    """Print decoded packets (or raw bytes) until Ctrl-C or `duration`; return the exit code."""
    try:
        _check_duration(duration)
        source = build_listen_source(
            url, timezone=timezone, transmit=transmit, transmit_interval=transmit_interval
        )
    except UsageError as exc:
        print(f"rig-agent wits0 listen: {exc}", file=sys.stderr)
        return EXIT_USAGE

    session = _Session(source, raw=raw, out=sys.stdout)
    try:
        with _warnings_only_logs():
            asyncio.run(_listen_until_stopped(session, duration))
    except Wits0LinkError as exc:
        print(f"rig-agent wits0 listen: {exc}", file=sys.stderr)
        return EXIT_LINK
    for line in session.summary():
        session.say(line)
    return EXIT_OK


@contextlib.contextmanager
def _warnings_only_logs() -> Iterator[None]:
    """Send the driver's log events to stderr, warnings and errors only, for one command.

    The live listing is the output; the driver's INFO events (listening,
    connected) would only repeat it.
    """
    saved = structlog.get_config()
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
    try:
        yield
    finally:
        structlog.configure(**saved)


async def _listen_until_stopped(session: _Session, duration: float | None) -> None:
    """Run the session until Ctrl-C, SIGTERM or `duration`; re-raise an error of the first open."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Only the main thread may install signal handlers; tests may run this elsewhere.
    signals = (signal.SIGINT, signal.SIGTERM)
    handles_signals = threading.current_thread() is threading.main_thread()
    if handles_signals:
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
    timer = loop.call_later(duration, stop.set) if duration is not None else None
    listen = asyncio.create_task(session.listen(), name="wits0-listen")
    stopped = asyncio.create_task(stop.wait(), name="wits0-listen-stop")
    try:
        await asyncio.wait({listen, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listen.cancel()
        stopped.cancel()
        if timer is not None:
            timer.cancel()
        if handles_signals:
            for signum in signals:
                loop.remove_signal_handler(signum)
    with contextlib.suppress(asyncio.CancelledError):
        await listen
