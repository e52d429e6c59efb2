"""Request planning and decoding: a device's points grouped into as few Modbus reads as possible."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from config.model import ModbusPoint, ModbusSource
from drivers.modbus_decode import decode_registers, engineering_value
from drivers.modbus_types import MAX_READ_BITS, MAX_READ_REGISTERS, TABLES

__all__ = [
    "MAX_REGISTERS_PER_READ",
    "PointStatus",
    "PointValue",
    "ReadRequest",
    "decode_request",
    "describe_plan",
    "plan_for_source",
    "plan_requests",
]

MAX_REGISTERS_PER_READ = MAX_READ_REGISTERS
"""Protocol limit for one read of holding or input registers (function codes 3 and 4)."""

PointStatus = Literal["good", "null", "not_finite"]

_SPANS_IN_DESCRIPTION = 8


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read of a contiguous range of one table that serves one or more points."""

    table: str
    """holding, input, coil or discrete."""
    address: int
    """0-based address of the first register or bit read."""
    count: int
    """Number of registers, or bits for coil and discrete, read."""
    points: tuple[ModbusPoint, ...]
    """The points the read serves, by address."""

    @property
    def span(self) -> str:
        """The range as written in logs, such as "holding 100..109"."""
        return f"{self.table} {self.address}..{self.address + self.count - 1}"

    @property
    def is_bits(self) -> bool:
        """Whether the read returns bits (coil, discrete) rather than registers."""
        return TABLES[self.table].is_bits

    @property
    def function_code(self) -> int:
        """Modbus function code of the read: 1 coil, 2 discrete, 3 holding, 4 input."""
        return TABLES[self.table].function_code

    @property
    def discarded(self) -> int:
        """Registers or bits read only to merge points into one read, and thrown away."""
        covered: set[int] = set()
        for point in self.points:
            covered.update(range(point.address, point.address + point.span))
        return self.count - len(covered)


@dataclass(frozen=True, slots=True)
class PointValue:
    """The outcome of one point in a decoded read."""

    point: ModbusPoint
    value: float | None
    """Value after scale and offset; None when status is not "good"."""
    status: PointStatus
    """good; null (the raw value equals the point's null_value); not_finite (NaN or infinity)."""


def plan_requests(
    points: Sequence[ModbusPoint],
    *,
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
    max_gap: int = 0,
) -> list[ReadRequest]:
    """Group one device's points into the fewest reads, table by table.

    Within a table, points are taken by address. A point joins the current
    read when at most `max_gap` addresses lie between the read's end and the
    point's start (none when they touch or overlap). The merged read must
    also stay within `max_registers`, or `max_bits` for coils and discrete
    inputs. Otherwise the point starts a new read. A point is never split.

    Each read is extended as far as the caps allow. Once a point cannot join
    the read, because its start is too far from the read's end or its end too
    far from the read's start, no later point can join either, since later
    points start no earlier. That
    this also gives the fewest reads is checked rather than proven: tests
    compare the count with a brute-force search over every partition of
    random layouts of up to 8 points.

    Raises ValueError if a point spans more registers than `max_registers`.
    """
    requests: list[ReadRequest] = []
    for name, table in TABLES.items():
        cap = max_bits if table.is_bits else max_registers
        in_table = sorted(
            (point for point in points if point.table == name),
            key=lambda point: (point.address, -point.span),
        )
        requests.extend(_plan_table(name, in_table, cap, max_gap))
    return requests


def _plan_table(
    table: str, points: Sequence[ModbusPoint], cap: int, max_gap: int
) -> list[ReadRequest]:
    """Plan the reads of points of one table, sorted by address."""
    requests: list[ReadRequest] = []
    group: list[ModbusPoint] = []
    start = end = 0
    for point in points:
        if point.span > cap:
            msg = (
                f"point {point.channel!r} spans {point.span} registers, more than the "
                f"{cap} one read may return: raise max_request_registers to at least {point.span}"
            )
            raise ValueError(msg)
        point_end = point.address + point.span
        gap = point.address - end
        if group and gap <= max_gap and max(end, point_end) - start <= cap:
            group.append(point)
            end = max(end, point_end)
            continue
        if group:
            requests.append(ReadRequest(table, start, end - start, tuple(group)))
        group, start, end = [point], point.address, point_end
    if group:
        requests.append(ReadRequest(table, start, end - start, tuple(group)))
    return requests


def plan_for_source(source: ModbusSource) -> list[ReadRequest]:
    """Plan the reads of a source with its own read limits and gap."""
    return plan_requests(
        source.points,
        max_registers=source.max_request_registers,
        max_bits=source.max_request_bits,
        max_gap=source.max_gap,
    )


def describe_plan(source: ModbusSource, requests: Sequence[ReadRequest]) -> str:
    """Describe a plan in one line, such as "12 points in 3 requests (holding 0..40, ...)"."""
    points = sum(len(request.points) for request in requests)
    spans = [request.span for request in requests[:_SPANS_IN_DESCRIPTION]]
    if len(requests) > _SPANS_IN_DESCRIPTION:
        spans.append(f"and {len(requests) - _SPANS_IN_DESCRIPTION} more")
    text = f"{_plural(points, 'point')} in {_plural(len(requests), 'request')}"
    if spans:
        text += f" ({', '.join(spans)})"
    discarded = sum(request.discarded for request in requests)
    if discarded:
        addresses = _plural(discarded, "address", "addresses")
        text += f", {addresses} read only to fill gaps (max_gap = {source.max_gap})"
    return text


def _plural(count: int, noun: str, plural: str = "") -> str:
    return f"{count} {noun if count == 1 else plural or noun + 's'}"


def decode_request(request: ReadRequest, data: Sequence[int] | Sequence[bool]) -> list[PointValue]:
    """Decode the response of a read into one value per point, in the request's point order.

    `data` is the response's registers (exactly `count` of them), or its
    bits for coils and discrete inputs, which pymodbus pads to a multiple of
    8; only the first `count` bits are used. Raises ValueError when `data`
    is shorter than the request.
    """
    if len(data) < request.count or (not request.is_bits and len(data) != request.count):
        unit = "bits" if request.is_bits else "registers"
        msg = f"read of {request.span} returned {len(data)} {unit}, expected {request.count}"
        raise ValueError(msg)
    return [_decode_point(request, point, data) for point in request.points]


def _decode_point(
    request: ReadRequest, point: ModbusPoint, data: Sequence[int] | Sequence[bool]
) -> PointValue:
    start = point.address - request.address
    raw: int | float
    if request.is_bits:
        raw = 1 if data[start] else 0
    else:
        words = [int(word) for word in data[start : start + point.registers]]
        raw = decode_registers(words, point.type, point.word_order, point.byte_order, bit=point.bit)

    if _is_null(raw, point):
        return PointValue(point, None, "null")
    value = engineering_value(raw, point.type, point.scale, point.offset)
    if not math.isfinite(value):
        return PointValue(point, None, "not_finite")
    return PointValue(point, value, "good")


def _is_null(raw: float, point: ModbusPoint) -> bool:
    """Return whether a raw value equals the point's null_value, as the device's type stores it."""
    null = point.null_value
    if null is None:
        return False
    if isinstance(null, float) and math.isnan(null):
        return isinstance(raw, float) and math.isnan(raw)
    if point.type == "float32":
        # A float32 register pair cannot hold most decimal values exactly, so
        # compare with the float32 nearest to the configured null_value.
        null = struct.unpack(">f", struct.pack(">f", null))[0]
    return raw == null
