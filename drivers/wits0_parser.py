"""Incremental parser of WITS level 0 packets, fed bytes as they arrive from a link."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = [
    "SOURCE_TAG_CODE",
    "ParserCounters",
    "Wits0Item",
    "Wits0Packet",
    "Wits0Parser",
    "encode_packet",
    "parse_data_line",
    "parse_number",
]

SOURCE_TAG_CODE = "1984"
"""Code of the line that names the sender, such as `1984PASON/EDR` from a Pason EDR."""

_START = b"&&"
_END = b"!!"
_LINE_END = re.compile(rb"[\r\n]")
# Whitespace inside a line; CR and LF never reach a line because they end it.
_SPACE = b" \t\v\f"
# A decimal number with an optional sign and exponent. A decimal comma, nan and inf do not match.
_NUMBER = re.compile(rb"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


@dataclass(frozen=True, slots=True)
class Wits0Item:
    """One data line of a packet: a record and item code and its value."""

    code: str
    """The 4 digits of record and item number, such as "0108"."""
    text: str
    """The value as sent, with surrounding spaces removed; "" for a bare code."""
    value: float | None
    """The value as a number; None for a bare code."""


@dataclass(frozen=True, slots=True)
class Wits0Packet:
    """The data lines between one `&&` line and the next `!!` line."""

    items: tuple[Wits0Item, ...]
    """Items in order of first appearance; a code sent twice keeps its last value."""
    source_tag: str | None
    """Text after "1984" on a source tag line such as `1984PASON/EDR`, or None."""
    malformed_lines: int
    """Lines of this packet that were skipped because they are not valid data lines."""
    repeated_items: int
    """Data lines whose code appeared earlier in this packet."""

    def get(self, code: str) -> Wits0Item | None:
        """Return the item with this code, or None if the packet has none."""
        for item in self.items:
            if item.code == code:
                return item
        return None


@dataclass
class ParserCounters:
    """Running totals of what the parser has seen since it was created."""

    packets: int = 0
    junk_bytes: int = 0
    """Non-whitespace bytes outside packets, such as noise before `&&`. Blank lines count 0."""
    discarded_packets: int = 0
    """Packets dropped without their `!!`: a new `&&` arrived, or the parser was reset."""
    malformed_lines: int = 0
    repeated_items: int = 0
    oversize_packets: int = 0
    """Packets dropped because a line or the line count exceeded the parser's limits."""


def parse_number(text: bytes) -> float | None:
    """Return the decimal number in `text`, or None when it is not one (or not finite).

    A decimal comma ("3650,40") is not a number here: guessing whether the comma
    separates decimals or thousands could silently scale a value by 1000.
    """
    if _NUMBER.fullmatch(text) is None:
        return None
    value = float(text)
    # A long exponent such as 1e999 overflows to inf, which no sensor sends.
    return value if math.isfinite(value) else None


def parse_data_line(line: bytes) -> Wits0Item | None:
    """Parse one stripped data line: 4 ASCII digits, then a number or nothing.

    Returns None for a malformed line: shorter than 4 bytes, a code that is not
    4 digits, or a value that is not a decimal number. Text values, such as the
    well identifier of item 0101, count as malformed because the agent stores
    numbers only.
    """
    code = line[:4]
    if len(code) < 4 or not code.isdigit():
        return None
    text = line[4:].strip(_SPACE)
    if not text:
        return Wits0Item(code.decode("ascii"), "", None)
    value = parse_number(text)
    if value is None:
        return None
    return Wits0Item(code.decode("ascii"), text.decode("ascii"), value)


@dataclass
class _OpenPacket:
    """The lines of the packet being received, before its `!!` arrives."""

    items: dict[str, Wits0Item] = field(default_factory=dict)
    source_tag: str | None = None
    lines: int = 0
    malformed_lines: int = 0
    repeated_items: int = 0


class Wits0Parser:
    """Incremental parser that splits a byte stream into WITS level 0 packets.

    `feed` accepts any bytes and never raises. Lines end with CR LF, LF or a
    lone CR. A packet starts at a line that ends with `&&` (bytes before the
    marker on that line count as junk) and ends as soon as a line inside it
    starts with `!!`, so a final `!!` without a line end still completes the
    packet. A line longer than `max_line_bytes`, or a packet of more than
    `max_packet_lines` non-blank lines, drops the packet; parsing resumes at
    the next `&&` line. The result of a stream does not depend on how it is
    split into chunks. Data lines with a text value, such as the well
    identifier 0101, are skipped as malformed because text channels are out of
    scope: readings carry numbers only.
    """

    def __init__(self, *, max_line_bytes: int = 256, max_packet_lines: int = 4096) -> None:
        if max_line_bytes < 4 or max_packet_lines < 1:
            msg = (
                f"invalid parser limits max_line_bytes={max_line_bytes}, "
                f"max_packet_lines={max_packet_lines}: expected at least 4 and 1"
            )
            raise ValueError(msg)
        self.max_line_bytes = max_line_bytes
        self.max_packet_lines = max_packet_lines
        self.counters = ParserCounters()
        self._line = bytearray()
        self._packet: _OpenPacket | None = None
        self._done: list[Wits0Packet] = []

    def feed(self, data: bytes) -> list[Wits0Packet]:
        """Consume the next bytes of the stream; return the packets they complete."""
        # CR and LF each end a line, so CR LF also ends an empty line, which is
        # ignored like every blank line. A CR LF split across two chunks
        # therefore gives the same result as one that is not.
        position = 0
        size = len(data)
        while position < size:
            match = _LINE_END.search(data, position)
            end = size if match is None else match.start()
            if end > position:
                self._add_bytes(data[position:end])
            if match is None:
                break
            self._end_line()
            position = end + 1
        done, self._done = self._done, []
        return done

    def reset(self) -> None:
        """Drop a partial packet and line, as after a reconnect; a started packet is discarded."""
        if self._packet is not None:
            self.counters.discarded_packets += 1
            self._packet = None
        else:
            self.counters.junk_bytes += _visible_length(self._line)
        self._line.clear()

    # --- bytes of the current line ----------------------------------------------

    def _add_bytes(self, chunk: bytes) -> None:
        self._line += chunk
        if self._packet is None:
            self._trim_junk()
            return
        head = bytes(self._line[: self.max_line_bytes]).lstrip(_SPACE)
        if head.startswith(_END):
            # End the packet now: a sender may omit the line end after the last `!!`.
            marker_end = len(self._line) - len(self._line.lstrip(_SPACE)) + len(_END)
            rest = bytes(self._line[marker_end:])
            self._line.clear()
            self._close_packet()
            if rest:
                self._add_bytes(rest)
            return
        if len(self._line) > self.max_line_bytes:
            self._drop_packet()

    def _trim_junk(self) -> None:
        """Keep only the tail of a long line outside packets, which may still end with `&&`."""
        excess = len(self._line) - self.max_line_bytes
        if excess > 0:
            self.counters.junk_bytes += _visible_length(self._line[:excess])
            del self._line[:excess]

    def _drop_packet(self) -> None:
        """Drop the open packet over a size limit; its remaining lines are junk until `&&`."""
        self.counters.oversize_packets += 1
        self._packet = None
        self._trim_junk()

    # --- complete lines ---------------------------------------------------------

    def _end_line(self) -> None:
        line = bytes(self._line).strip(_SPACE)
        self._line.clear()
        if line.endswith(_START):
            prefix = _visible_length(line[: -len(_START)])
            self.counters.junk_bytes += prefix
            if self._packet is not None:
                self.counters.discarded_packets += 1
            self._packet = _OpenPacket()
            return
        if self._packet is None:
            self.counters.junk_bytes += _visible_length(line)
        elif line:
            self._add_line(self._packet, line)

    def _add_line(self, packet: _OpenPacket, line: bytes) -> None:
        packet.lines += 1
        if packet.lines > self.max_packet_lines:
            self._drop_packet()
            return
        if packet.lines == 1 and _is_source_tag(line):
            packet.source_tag = line[4:].decode("ascii", errors="replace").strip()
            return
        item = parse_data_line(line)
        if item is None:
            packet.malformed_lines += 1
            self.counters.malformed_lines += 1
            return
        if item.code in packet.items:
            packet.repeated_items += 1
            self.counters.repeated_items += 1
        packet.items[item.code] = item

    def _close_packet(self) -> None:
        packet = self._packet
        self._packet = None
        if packet is None:
            return
        self.counters.packets += 1
        self._done.append(
            Wits0Packet(
                items=tuple(packet.items.values()),
                source_tag=packet.source_tag,
                malformed_lines=packet.malformed_lines,
                repeated_items=packet.repeated_items,
            )
        )


def _is_source_tag(line: bytes) -> bool:
    """Return whether a first line is `1984<text>`; `1984` with a number stays a data item."""
    if not line.startswith(SOURCE_TAG_CODE.encode("ascii")):
        return False
    rest = line[4:].strip(_SPACE)
    return bool(rest) and parse_number(rest) is None


def _visible_length(data: bytes | bytearray) -> int:
    """Return the number of bytes in `data` that are not whitespace."""
    return len(bytes(data).translate(None, _SPACE + b"\r\n"))


def encode_packet(items: Sequence[tuple[str, str]], *, source_tag: str | None = None) -> bytes:
    """Build a packet with CR LF line ends from (code, value text) pairs.

    Raises ValueError for a code that is not 4 ASCII digits or a value that
    contains a line break, because a receiver would split such a line.
    """
    lines = [b"&&"]
    if source_tag is not None:
        lines.append(_encode_line(SOURCE_TAG_CODE, source_tag))
    lines.extend(_encode_line(code, text) for code, text in items)
    lines.append(b"!!")
    return b"\r\n".join(lines) + b"\r\n"


def _encode_line(code: str, text: str) -> bytes:
    if len(code) != 4 or not code.isascii() or not code.isdigit():
        msg = f"invalid WITS code {code!r}: expected 4 ASCII digits, such as '0108'"
        raise ValueError(msg)
    if "\r" in text or "\n" in text or not text.isascii():
        msg = f"invalid WITS value {text!r} for code {code}: expected ASCII text on one line"
        raise ValueError(msg)
    return (code + text).encode("ascii")
