"""Request planning and decoding: a device's points grouped into as few Modbus reads as possible."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from config.model import ModbusPoint, ModbusSource
from drivers.modbus_decode import (
    apply_scale,
    decode_registers,
    engineering_value,
    round_scaled,
    shortest_float32,
    value_struct,
)
from drivers.modbus_types import DATA_TYPES, MAX_READ_BITS, MAX_READ_REGISTERS, TABLES, DataType

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
    _decoder: _RequestDecoder = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Plans the decoding of every response once, when the read is planned.
        object.__setattr__(self, "_decoder", _RequestDecoder.for_request(self))

    def __reduce__(self) -> tuple[type[ReadRequest], tuple[str, int, int, tuple[ModbusPoint, ...]]]:
        # The decoder contains struct.Struct methods, which pickle cannot copy, so a
        # pickled read rebuilds it.
        return ReadRequest, (self.table, self.address, self.count, self.points)

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


class PointValue(NamedTuple):
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
    is shorter than the request, or when a register that a point reads is
    outside 0..65535.
    """
    if len(data) < request.count or (not request.is_bits and len(data) != request.count):
        unit = "bits" if request.is_bits else "registers"
        msg = f"read of {request.span} returned {len(data)} {unit}, expected {request.count}"
        raise ValueError(msg)
    return request._decoder.decode(request, data)


# Point kinds, which choose the steps of `_RequestDecoder.decode` from raw value to PointValue.
_INTEGER = 0
"""An integer type with no scale, offset or null_value: the value is float(raw)."""
_FLOAT32 = 1
"""A float32 with no scale, offset or null_value: the shortest decimal, checked finite."""
_FLOAT64 = 2
"""A float64 with no scale, offset or null_value: the raw value, checked finite."""
_GENERAL = 3
"""Anything else, done by `_finish_value` with the point's `_ValueSteps`."""
_REFERENCE = 4
"""A point without a plan, decoded by `_decode_point` (see `_RequestDecoder`)."""

_new_point_value = tuple.__new__
"""Builds a PointValue from one tuple, in about half the time of `PointValue(...)` (timeit,
CPython 3.11)."""


class _ValueSteps(NamedTuple):
    """The steps from raw value to PointValue of a point of kind _GENERAL."""

    bit: int
    """Bit of the register that a bool in a register reads, or -1."""
    null_is_nan: bool
    """Whether the null_value is NaN, which any NaN raw value matches."""
    null: float | None
    """The raw null value, or None. For float32, the float32 nearest to the null_value."""
    shortest: bool
    """Whether the raw value is a float32, which becomes its shortest decimal first."""
    scaled: bool
    """Whether scale or offset change the value, which then loses its rounding noise."""


_NO_STEPS = _ValueSteps(-1, False, None, False, False)
"""The steps of a point of kind _REFERENCE, which uses none of them."""


class _PointPlan(NamedTuple):
    """The decoding of one point of a read, worked out once when the read is planned."""

    point: ModbusPoint
    kind: int
    """_INTEGER, _FLOAT32, _FLOAT64, _GENERAL or _REFERENCE."""
    unpack_from: Callable[[bytes, int], tuple[Any, ...]] | None
    """Reads the raw value from a packed response, or None for a coil or discrete input."""
    swapped: bool
    """Whether the value reads from the response packed with each register's bytes swapped."""
    position: int
    """Byte offset of the value in the packed response, or index of the bit for bit tables."""
    steps: _ValueSteps
    """The steps of a point of kind _GENERAL."""


@dataclass(frozen=True, slots=True)
class _RequestDecoder:
    """Decodes the responses of one read with the work per point planned once.

    Registers decode from the response packed into bytes once, or twice
    when a point's byte and word orders differ (see `value_struct`). A point
    that the plan cannot serve, such as one built without config validation
    with an invalid order, decodes with `_decode_point`, which raises the
    same errors as `decode_registers`.
    """

    plans: tuple[_PointPlan, ...]
    pack_plain: Callable[..., bytes] | None
    """Packs the registers high byte first, or None for bit tables."""
    pack_swapped: Callable[..., bytes] | None
    """Packs the registers low byte first, or None when no point reads the swapped bytes."""

    @classmethod
    def for_request(cls, request: ReadRequest) -> _RequestDecoder:
        plans = tuple(_plan_point(request, point) for point in request.points)
        if request.is_bits:
            return cls(plans, None, None)
        swapped = any(plan.swapped for plan in plans)
        pack_plain = struct.Struct(f">{request.count}H").pack
        pack_swapped = struct.Struct(f"<{request.count}H").pack if swapped else None
        return cls(plans, pack_plain, pack_swapped)

    def decode(
        self, request: ReadRequest, data: Sequence[int] | Sequence[bool]
    ) -> list[PointValue]:
        """Decode a response whose length `decode_request` has checked."""
        plain = swapped = b""
        if self.pack_plain is not None:
            try:
                plain = self.pack_plain(*data)
                if self.pack_swapped is not None:
                    swapped = self.pack_swapped(*data)
            except struct.error:
                # A register outside 0..65535, or not an int. `_decode_point` raises the
                # error of the first point that reads such a register, and ignores one in
                # a gap between points.
                return [_decode_point(request, point, data) for point in request.points]

        isfinite = math.isfinite
        values: list[PointValue] = []
        append = values.append
        for point, kind, unpack_from, from_swapped, position, steps in self.plans:
            raw: Any
            if unpack_from is not None:
                raw = unpack_from(swapped if from_swapped else plain, position)[0]
            elif kind == _REFERENCE:
                append(_decode_point(request, point, data))
                continue
            else:
                raw = 1 if data[position] else 0

            # float(raw) * 1.0 + 0.0, as engineering_value computes it, is raw + 0.0.
            # The + 0.0 turns an int into a float, and -0.0 into 0.0.
            if kind == _INTEGER:
                append(_new_point_value(PointValue, (point, raw + 0.0, "good")))
                continue
            if kind == _FLOAT32:
                value = shortest_float32(raw) + 0.0
            elif kind == _FLOAT64:
                value = raw + 0.0
            else:
                append(_finish_value(point, raw, steps))
                continue
            if isfinite(value):
                append(_new_point_value(PointValue, (point, value, "good")))
            else:
                append(_new_point_value(PointValue, (point, None, "not_finite")))
        return values


def _finish_value(point: ModbusPoint, raw: Any, steps: _ValueSteps) -> PointValue:
    """Turn the raw value of a point of kind _GENERAL into its PointValue, as _decode_point does."""
    if steps.bit >= 0:
        raw = (raw >> steps.bit) & 1
    if steps.null_is_nan:
        if isinstance(raw, float) and math.isnan(raw):
            return PointValue(point, None, "null")
    elif steps.null is not None and raw == steps.null:
        return PointValue(point, None, "null")
    if steps.shortest:
        raw = shortest_float32(raw)
    value = apply_scale(raw, point.scale, point.offset)
    if steps.scaled:
        value = round_scaled(value)
    if not math.isfinite(value):
        return PointValue(point, None, "not_finite")
    return PointValue(point, value, "good")


def _plan_point(request: ReadRequest, point: ModbusPoint) -> _PointPlan:
    """Work out how one point of a read decodes."""
    reference = _PointPlan(point, _REFERENCE, None, False, 0, _NO_STEPS)
    start = point.address - request.address
    data_type = DATA_TYPES.get(point.type)
    steps = _plan_steps(point)
    if data_type is None or steps is None:
        return reference

    if request.is_bits:
        if not 0 <= start < request.count:
            return reference
        return _PointPlan(point, _GENERAL, None, False, start, steps)

    if start < 0 or start + data_type.registers > request.count:
        return reference
    try:
        unpacker, swapped = value_struct(point.type, point.word_order, point.byte_order)
    except ValueError:
        return reference
    if data_type.is_bit:
        if not isinstance(point.bit, int) or not 0 <= point.bit <= 15:
            return reference
        steps = steps._replace(bit=point.bit)
    return _PointPlan(
        point,
        _choose_kind(data_type, point, steps),
        unpacker.unpack_from,
        swapped,
        2 * start,
        steps,
    )


def _choose_kind(data_type: DataType, point: ModbusPoint, steps: _ValueSteps) -> int:
    """Return the kind of a point in a register table: one of the fast kinds, or _GENERAL."""
    if data_type.is_bit or steps.scaled or steps.null_is_nan or steps.null is not None:
        return _GENERAL
    # With offset -0.0, a raw -0.0 stays -0.0, which the fast kinds do not do.
    if math.copysign(1.0, point.offset) < 0:
        return _GENERAL
    if data_type.name == "float32":
        return _FLOAT32
    if data_type.is_float:
        return _FLOAT64
    return _INTEGER


def _plan_steps(point: ModbusPoint) -> _ValueSteps | None:
    """Plan the steps after the raw value, or return None when `_is_null` would raise."""
    null_is_nan = False
    null = point.null_value
    if isinstance(null, float) and math.isnan(null):
        null_is_nan, null = True, None
    elif null is not None and point.type == "float32":
        try:
            null = struct.unpack(">f", struct.pack(">f", null))[0]
        except (OverflowError, struct.error):
            return None
    scaled = point.scale != 1.0 or point.offset != 0.0
    return _ValueSteps(-1, null_is_nan, null, point.type == "float32", scaled)


def _decode_point(
    request: ReadRequest, point: ModbusPoint, data: Sequence[int] | Sequence[bool]
) -> PointValue:
    """Decode one point with `decode_registers`: the reference that `_RequestDecoder` matches."""
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
