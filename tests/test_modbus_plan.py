"""Request planning: grouping points into the fewest reads, and decoding the responses."""

from __future__ import annotations

import itertools
import math
import pickle
import struct
from collections.abc import Sequence
from functools import cache
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from config.model import ModbusPoint, ModbusSource
from drivers.modbus_decode import (
    decode_registers,
    encode_value,
    engineering_value,
    shortest_float32,
)
from drivers.modbus_plan import (
    PointValue,
    ReadRequest,
    decode_request,
    describe_plan,
    plan_for_source,
    plan_requests,
)
from drivers.modbus_types import DATA_TYPES, TABLES

Spec = tuple[str, int, str] | tuple[str, int, str, int]
"""(table, address, type) or (table, address, "bool", bit)."""


def make_points(*specs: Spec, **extra: Any) -> list[ModbusPoint]:
    points = []
    for index, spec in enumerate(specs):
        entry: dict[str, Any] = {
            "channel": f"c{index}",
            "table": spec[0],
            "address": spec[1],
            "type": spec[2],
            **extra,
        }
        if len(spec) == 4:
            entry["bit"] = spec[3]
        points.append(ModbusPoint.model_validate(entry))
    return points


def spans(requests: Sequence[ReadRequest]) -> list[tuple[str, int, int]]:
    return [(request.table, request.address, request.count) for request in requests]


def make_source(points: list[dict[str, Any]], **keys: Any) -> ModbusSource:
    return ModbusSource.model_validate(
        {"name": "dev", "url": "tcp://127.0.0.1:5020", "points": points, **keys}
    )


# --- Hand-made layouts -----------------------------------------------------------

# (layout, keyword arguments of plan_requests, expected (table, address, count) reads)
LAYOUTS: list[Any] = [
    pytest.param(
        [("holding", 0, "float32"), ("holding", 2, "uint16"), ("holding", 1, "int16")],
        {},
        [("holding", 0, 3)],
        id="touching-and-overlapping",
    ),
    pytest.param(
        [("holding", 0, "uint16"), ("holding", 2, "uint16")],
        {},
        [("holding", 0, 1), ("holding", 2, 1)],
        id="gap-splits-without-max-gap",
    ),
    pytest.param(
        [("holding", 0, "uint16"), ("holding", 2, "uint16")],
        {"max_gap": 1},
        [("holding", 0, 3)],
        id="gap-of-one-merged",
    ),
    pytest.param(
        [("holding", 0, "uint16"), ("holding", 3, "uint16"), ("holding", 5, "uint16")],
        {"max_gap": 1},
        [("holding", 0, 1), ("holding", 3, 3)],
        id="only-small-gaps-merged",
    ),
    pytest.param(
        [("holding", 0, "float64"), ("holding", 1, "uint16"), ("holding", 5, "uint16")],
        {"max_gap": 1},
        [("holding", 0, 6)],
        id="gap-measured-from-longest-point",
    ),
    pytest.param(
        [("holding", address, "float64") for address in range(0, 400, 4)],
        {},
        [("holding", 0, 124), ("holding", 124, 124), ("holding", 248, 124), ("holding", 372, 28)],
        id="protocol-cap-never-splits-a-point",
    ),
    pytest.param(
        [("input", address, "uint16") for address in range(25)],
        {"max_registers": 10},
        [("input", 0, 10), ("input", 10, 10), ("input", 20, 5)],
        id="device-cap",
    ),
    pytest.param(
        [("holding", 0, "uint16"), ("holding", 9, "uint16")],
        {"max_registers": 9, "max_gap": 20},
        [("holding", 0, 1), ("holding", 9, 1)],
        id="gap-merge-within-cap-only",
    ),
    pytest.param(
        [("coil", address, "bool") for address in range(3000)],
        {},
        [("coil", 0, 2000), ("coil", 2000, 1000)],
        id="bit-cap",
    ),
    pytest.param(
        [("discrete", 0, "bool"), ("discrete", 7, "bool"), ("discrete", 9, "bool")],
        {"max_gap": 6},
        [("discrete", 0, 10)],
        id="bit-gap-merged",
    ),
    pytest.param(
        [("holding", 4, "bool", 0), ("holding", 4, "bool", 15), ("holding", 5, "bool", 3)],
        {},
        [("holding", 4, 2)],
        id="bits-in-registers-share-reads",
    ),
    pytest.param(
        [
            ("discrete", 0, "bool"),
            ("coil", 0, "bool"),
            ("input", 0, "uint16"),
            ("holding", 0, "uint16"),
        ],
        {"max_gap": 100},
        [("holding", 0, 1), ("input", 0, 1), ("coil", 0, 1), ("discrete", 0, 1)],
        id="tables-never-mixed",
    ),
    pytest.param([], {}, [], id="no-points"),
]


@pytest.mark.parametrize(("layout", "caps", "expected"), LAYOUTS)
def test_plan_layout(layout: list[Spec], caps: dict[str, int], expected: list[Any]) -> None:
    """A hand-made layout is planned into the expected reads."""
    assert spans(plan_requests(make_points(*layout), **caps)) == expected


def test_plan_keeps_every_point() -> None:
    """Points at the same address each appear in the read that covers them."""
    points = make_points(("holding", 4, "bool", 0), ("holding", 4, "bool", 1))
    (request,) = plan_requests(points)
    assert request.points == tuple(points)


def test_plan_rejects_point_wider_than_cap() -> None:
    """A point wider than the read limit cannot be read and raises, naming the point."""
    points = make_points(("holding", 0, "float64"))
    with pytest.raises(ValueError, match="point 'c0' spans 4 registers"):
        plan_requests(points, max_registers=3)


def test_plan_for_source_uses_its_limits() -> None:
    """plan_for_source applies the source's max_request_registers and max_gap."""
    source = make_source(
        [{"channel": f"c{i}", "address": 2 * i} for i in range(10)],
        max_request_registers=7,
        max_gap=1,
    )
    assert spans(plan_for_source(source)) == [
        ("holding", 0, 7),
        ("holding", 8, 7),
        ("holding", 16, 3),
    ]


def test_plan_for_source_uses_bit_limit() -> None:
    """plan_for_source applies the source's max_request_bits to coils."""
    source = make_source(
        [{"channel": f"c{i}", "table": "coil", "address": i} for i in range(5)],
        max_request_bits=2,
    )
    assert [request.count for request in plan_for_source(source)] == [2, 2, 1]


def test_request_span_and_kind() -> None:
    """A read shows its range as "table first..last" and reports whether it returns bits."""
    request = ReadRequest("coil", 100, 10, ())
    assert request.span == "coil 100..109"
    assert request.is_bits
    assert request.function_code == 1
    assert not ReadRequest("holding", 0, 1, ()).is_bits


def test_describe_plan() -> None:
    """The plan line counts points and reads, lists the ranges and what gaps cost."""
    source = make_source(
        [
            {"channel": "a", "address": 0, "type": "float32"},
            {"channel": "b", "address": 3},
            {"channel": "c", "table": "coil", "address": 0},
        ],
        max_gap=1,
    )
    text = describe_plan(source, plan_for_source(source))
    assert text == (
        "3 points in 2 requests (holding 0..3, coil 0..0), "
        "1 address read only to fill gaps (max_gap = 1)"
    )


def test_describe_plan_shortens_long_lists() -> None:
    """A plan of many reads lists the first ranges and counts the rest."""
    source = make_source([{"channel": f"c{i}", "address": 2 * i} for i in range(20)])
    text = describe_plan(source, plan_for_source(source))
    assert text.startswith("20 points in 20 requests (holding 0..0, holding 2..2,")
    assert text.endswith("and 12 more)")


# --- Properties on random layouts --------------------------------------------------

REGISTER_TYPES = ("uint16", "float32", "float64", "bool")


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[ModbusPoint], int, int, int]:
    """Up to 8 points in the holding and coil tables, with small caps and gaps."""
    specs: list[Spec] = []
    for _ in range(draw(st.integers(1, 8))):
        table = draw(st.sampled_from(["holding", "coil"]))
        address = draw(st.integers(0, 30))
        if table == "coil":
            specs.append(("coil", address, "bool"))
            continue
        type_name = draw(st.sampled_from(REGISTER_TYPES))
        if type_name == "bool":
            specs.append(("holding", address, "bool", draw(st.integers(0, 15))))
        else:
            specs.append(("holding", address, type_name))
    max_registers = draw(st.integers(4, 16))
    max_bits = draw(st.integers(1, 16))
    max_gap = draw(st.integers(0, 5))
    return make_points(*specs), max_registers, max_bits, max_gap


def covered(points: Sequence[ModbusPoint]) -> set[int]:
    return {a for point in points for a in range(point.address, point.address + point.span)}


def largest_gap(points: Sequence[ModbusPoint]) -> int:
    """Return the longest run of unread addresses between the points of one read."""
    addresses = sorted(covered(points))
    return max((b - a - 1 for a, b in itertools.pairwise(addresses)), default=0)


def brute_force_count(points: Sequence[ModbusPoint], cap: int, max_gap: int) -> int:
    """Return the fewest reads over every partition of the points of one table."""

    def feasible(group: Sequence[ModbusPoint]) -> bool:
        start = min(point.address for point in group)
        end = max(point.address + point.span for point in group)
        return end - start <= cap and largest_gap(group) <= max_gap

    @cache
    def fewest(mask: int) -> int:
        if mask == 0:
            return 0
        lowest = mask & -mask
        best = len(points)
        # Every subset of `mask` that contains its lowest point, as that point's read.
        subset = mask
        while subset:
            if subset & lowest:
                group = [points[i] for i in range(len(points)) if subset >> i & 1]
                if feasible(group):
                    best = min(best, 1 + fewest(mask & ~subset))
            subset = (subset - 1) & mask
        return best

    return fewest((1 << len(points)) - 1)


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_plan_properties(layout: tuple[list[ModbusPoint], int, int, int]) -> None:
    """Each point is in exactly one read, which covers it, stays in its cap and gap, and
    the number of reads equals the brute-force minimum."""
    points, max_registers, max_bits, max_gap = layout
    plan = plan_requests(points, max_registers=max_registers, max_bits=max_bits, max_gap=max_gap)

    assigned = [id(point) for request in plan for point in request.points]
    assert sorted(assigned) == sorted(id(point) for point in points)
    for request in plan:
        cap = max_bits if request.is_bits else max_registers
        assert request.count <= cap
        assert {point.table for point in request.points} == {request.table}
        assert min(point.address for point in request.points) == request.address
        end = max(point.address + point.span for point in request.points)
        assert end == request.address + request.count
        assert largest_gap(request.points) <= max_gap

    for name, table in TABLES.items():
        in_table = [point for point in points if point.table == name]
        cap = max_bits if table.is_bits else max_registers
        planned = sum(1 for request in plan if request.table == name)
        assert planned == brute_force_count(in_table, cap, max_gap)


# --- A rig-sized layout ------------------------------------------------------------


def rig_layout() -> list[dict[str, Any]]:
    """Three devices of 100 points each, with gaps, as [[sources.modbus]] tables.

    Per device: 60 contiguous float32 (holding 0..119), 20 uint16 two
    registers apart (holding 200..238), 10 int16 input registers with a gap
    of 3 after the fifth (input 0..4 and 8..12), and 10 coils 0..9.
    """
    sources = []
    for unit in (1, 2, 3):
        points: list[dict[str, Any]] = []
        points += [{"address": 2 * i, "type": "float32"} for i in range(60)]
        points += [{"address": 200 + 2 * i, "type": "uint16"} for i in range(20)]
        points += [{"table": "input", "address": i + (3 if i >= 5 else 0)} for i in range(10)]
        points += [{"table": "coil", "address": i} for i in range(10)]
        for index, point in enumerate(points):
            point.update(channel=f"u{unit}_p{index:03d}", type=point.get("type", "int16"))
            if point.get("table") == "coil":
                point["type"] = "bool"
        sources.append({"name": f"dev{unit}", "url": "tcp://127.0.0.1:5020", "unit_id": unit})
        sources[-1]["points"] = points
    # Unit 1 reads no spare registers; unit 2 may read one between points; unit 3
    # accepts at most 60 registers per read.
    sources[1]["max_gap"] = 3
    sources[2]["max_gap"] = 1
    sources[2]["max_request_registers"] = 60
    return sources


# Unit 1 (max_gap 0): holding 0..119, then 20 single reads of holding 200..238,
# input 0..4 and input 8..12, coils 0..9: 1 + 20 + 2 + 1 = 24 reads.
# Unit 2 (max_gap 3): holding 0..119, holding 200..238, input 0..12, coils: 4.
# Unit 3 (max_gap 1, 60 registers): holding 0..59 and 60..119, holding 200..238,
# input 0..4 and 8..12 (the gap of 3 is too wide), coils: 6.
RIG_EXPECTED_READS = {"dev1": 24, "dev2": 4, "dev3": 6}


def test_rig_layout_read_counts() -> None:
    """300 points over 3 units with gaps are planned into the minimal number of reads."""
    counts = {}
    for entry in rig_layout():
        source = ModbusSource.model_validate(entry)
        counts[source.name] = len(plan_for_source(source))
    assert counts == RIG_EXPECTED_READS


def test_rig_layout_is_300_points() -> None:
    """The rig layout contains 300 points."""
    assert sum(len(entry["points"]) for entry in rig_layout()) == 300


# --- Decoding a response -----------------------------------------------------------


def registers_of(point: ModbusPoint, raw: float) -> list[int]:
    return encode_value(raw, point.type, point.word_order, point.byte_order, bit=point.bit)


def test_decode_scaled_values() -> None:
    """Each point of a read decodes from its own registers, with scale and offset."""
    source = make_source(
        [
            {"channel": "a", "address": 10, "type": "float32", "order": "CDAB"},
            {"channel": "b", "address": 13, "type": "int16", "scale": 0.1, "offset": -5.0},
        ],
        max_gap=1,
    )
    (request,) = plan_for_source(source)
    a, b = source.points
    data = [*registers_of(a, 1234.5), 0, *registers_of(b, -20)]
    values = decode_request(request, data)
    assert [value.status for value in values] == ["good", "good"]
    assert values[0].value == 1234.5
    assert values[1].value == pytest.approx(-7.0)


@pytest.mark.parametrize(
    ("point", "words", "status"),
    [
        ({"type": "uint16", "null_value": 65535}, [0xFFFF], "null"),
        ({"type": "uint16", "null_value": 65535}, [0xFFFE], "good"),
        ({"type": "int32", "null_value": -1}, [0xFFFF, 0xFFFF], "null"),
        ({"type": "float32", "null_value": -9999.0}, [0xC61C, 0x3C00], "null"),
        ({"type": "float32", "null_value": 1.1}, [0x3F8C, 0xCCCD], "null"),
        ({"type": "float32"}, [0x7FC0, 0x0000], "not_finite"),
        ({"type": "float32"}, [0xFF80, 0x0000], "not_finite"),
        ({"type": "float32", "null_value": math.nan}, [0x7FC0, 0x0000], "null"),
        ({"type": "float64", "scale": 10.0}, [0x7FEF, 0xFFFF, 0xFFFF, 0xFFFF], "not_finite"),
        ({"type": "uint64", "null_value": 2**64 - 1}, [0xFFFF] * 4, "null"),
    ],
)
def test_decode_status(point: dict[str, Any], words: list[int], status: str) -> None:
    """A raw null value, or a NaN or infinite value, gives no value and its status."""
    source = make_source([{"channel": "p", "address": 0, **point}])
    (request,) = plan_for_source(source)
    (value,) = decode_request(request, words)
    assert value.status == status
    assert (value.value is None) == (status != "good")


def test_decode_null_before_scale() -> None:
    """null_value is compared with the raw value, before scale and offset."""
    source = make_source(
        [{"channel": "p", "address": 0, "type": "int16", "null_value": -1, "scale": 0.5}]
    )
    (request,) = plan_for_source(source)
    (value,) = decode_request(request, [0xFFFF])
    assert value.status == "null"


def test_decode_coils_padded() -> None:
    """Coil bits decode from the first `count` bits of a response padded to whole bytes."""
    source = make_source(
        [
            {"channel": "a", "table": "coil", "address": 0},
            {"channel": "b", "table": "coil", "address": 2},
        ],
        max_gap=1,
    )
    (request,) = plan_for_source(source)
    bits = [False, True, True, False, False, False, False, True]
    assert [value.value for value in decode_request(request, bits)] == [0.0, 1.0]


def test_decode_bits_in_registers() -> None:
    """Bools in registers read their own bit of the register."""
    source = make_source(
        [
            {"channel": "a", "address": 7, "type": "bool", "bit": 0},
            {"channel": "b", "address": 7, "type": "bool", "bit": 15},
            {"channel": "c", "address": 8, "type": "bool", "bit": 4},
        ]
    )
    (request,) = plan_for_source(source)
    values = decode_request(request, [0x8000, 0x0010])
    assert [value.value for value in values] == [0.0, 1.0, 1.0]


def test_decode_short_response() -> None:
    """A response shorter than the read raises, naming the range."""
    source = make_source([{"channel": "a", "address": 0, "type": "float32"}])
    (request,) = plan_for_source(source)
    with pytest.raises(ValueError, match=r"holding 0\.\.1 returned 1 registers, expected 2"):
        decode_request(request, [0])


def test_decode_short_bits() -> None:
    """A bit response with fewer bits than the read raises."""
    request = ReadRequest("discrete", 0, 9, ())
    with pytest.raises(ValueError, match="returned 8 bits, expected 9"):
        decode_request(request, [False] * 8)


def test_float32_null_matches_nearest() -> None:
    """A float32 null_value matches the float32 nearest to it, as the device stores it."""
    nearest = struct.unpack(">f", struct.pack(">f", 0.1))[0]
    assert nearest != 0.1
    source = make_source([{"channel": "p", "address": 0, "type": "float32", "null_value": 0.1}])
    (request,) = plan_for_source(source)
    (value,) = decode_request(request, encode_value(nearest, "float32", "big", "big"))
    assert value.status == "null"


# --- Decoding against the reference, decode_registers -----------------------------

ALL_REGISTER_TYPES = sorted(DATA_TYPES)
SCALES = [1.0, 0.1, -2.5]
OFFSETS = [0.0, -0.0, 5.0]
NULL_CHOICES = ["none", "raw", "nan", "other"]
SPECIAL_WORDS = [0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x7FF0, 0xFFF0, 0xFFFF]
"""Words that make zeros, infinities and NaN of float32 and float64 likely."""


def reference_values(
    request: ReadRequest, data: Sequence[int] | Sequence[bool]
) -> list[tuple[str, float | None]]:
    """Decode a response point by point with decode_registers, as decode_request must."""
    results: list[tuple[str, float | None]] = []
    for point in request.points:
        start = point.address - request.address
        raw: float
        if request.is_bits:
            raw = 1 if data[start] else 0
        else:
            words = [int(word) for word in data[start : start + point.registers]]
            raw = decode_registers(
                words, point.type, point.word_order, point.byte_order, bit=point.bit
            )
        null = point.null_value
        if isinstance(null, float) and math.isnan(null):
            is_null = isinstance(raw, float) and math.isnan(raw)
        elif null is not None and point.type == "float32":
            is_null = raw == struct.unpack(">f", struct.pack(">f", null))[0]
        else:
            is_null = null is not None and raw == null
        if is_null:
            results.append(("null", None))
            continue
        value = engineering_value(raw, point.type, point.scale, point.offset)
        if math.isfinite(value):
            results.append(("good", value))
        else:
            results.append(("not_finite", None))
    return results


def same_results(
    decoded: Sequence[PointValue], expected: Sequence[tuple[str, float | None]]
) -> bool:
    """Return whether statuses and values match exactly, telling -0.0 from 0.0."""
    actual = [(value.status, repr(value.value), type(value.value)) for value in decoded]
    return actual == [(status, repr(value), type(value)) for status, value in expected]


@st.composite
def decode_cases(draw: st.DrawFn) -> tuple[list[ModbusPoint], list[list[int] | list[bool]], int]:
    """Random points of every type, order, scale, offset and null_value, and their responses.

    Returns the points, one response per request of `plan_requests(points,
    max_gap=gap)`, and the gap. A null_value is drawn as the point's own raw
    value in the response (so that it matches), as NaN, or as another value.
    """
    entries: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 8))):
        table = draw(st.sampled_from(["holding", "holding", "input", "coil"]))
        entry: dict[str, Any] = {"channel": f"c{index}", "table": table}
        entry["address"] = draw(st.integers(0, 24))
        # Half the points have no scale, offset or null_value, which decode_request
        # decodes on a shorter path.
        entry["plain"] = draw(st.booleans())
        if not entry["plain"]:
            entry["scale"] = draw(st.sampled_from(SCALES))
            entry["offset"] = draw(st.sampled_from(OFFSETS))
        if table != "coil":
            entry["type"] = draw(st.sampled_from(ALL_REGISTER_TYPES))
            if entry["type"] == "bool":
                entry["bit"] = draw(st.integers(0, 15))
            else:
                entry["word_order"] = draw(st.sampled_from(["big", "little"]))
                entry["byte_order"] = draw(st.sampled_from(["big", "little"]))
        entries.append(entry)
    gap = draw(st.integers(0, 4))
    plain = [entry.pop("plain") for entry in entries]
    points = [ModbusPoint.model_validate(entry) for entry in entries]
    requests = plan_requests(points, max_gap=gap)

    responses: list[list[int] | list[bool]] = []
    for request in requests:
        if request.is_bits:
            padded = -(-request.count // 8) * 8
            responses.append(draw(st.lists(st.booleans(), min_size=padded, max_size=padded)))
        else:
            words = st.one_of(st.integers(0, 0xFFFF), st.sampled_from(SPECIAL_WORDS))
            count = request.count
            responses.append(draw(st.lists(words, min_size=count, max_size=count)))

    # Draw null values now that the registers are known.
    raw_values = {
        point.channel: raw
        for request, response in zip(requests, responses, strict=True)
        for point, raw in zip(request.points, raw_values_of(request, response), strict=True)
    }
    for entry, point, is_plain in zip(entries, points, plain, strict=True):
        if point.type == "bool" or is_plain:
            continue
        raw = raw_values[point.channel]
        choice = draw(st.sampled_from(NULL_CHOICES))
        if choice == "raw" and not (isinstance(raw, float) and math.isnan(raw)):
            # For float32, the shortest decimal also stands for the raw value.
            entry["null_value"] = shortest_float32(raw) if point.type == "float32" else raw
        elif choice == "nan" and point.data_type.is_float:
            entry["null_value"] = math.nan
        elif choice == "other":
            entry["null_value"] = 7 if not point.data_type.is_float else 7.5
    points = [ModbusPoint.model_validate(entry) for entry in entries]
    return points, responses, gap


def raw_values_of(request: ReadRequest, data: Sequence[int] | Sequence[bool]) -> list[float]:
    """Return the raw value of each point of a request, with decode_registers."""
    raws: list[float] = []
    for point in request.points:
        start = point.address - request.address
        if request.is_bits:
            raws.append(1 if data[start] else 0)
            continue
        words = [int(word) for word in data[start : start + point.registers]]
        raws.append(
            decode_registers(words, point.type, point.word_order, point.byte_order, bit=point.bit)
        )
    return raws


@settings(max_examples=400, deadline=None)
@given(decode_cases())
def test_decode_matches_reference(
    case: tuple[list[ModbusPoint], list[list[int] | list[bool]], int],
) -> None:
    """decode_request gives the statuses and values that decode_registers gives, for any
    type, order, scale, offset, null_value and registers."""
    points, responses, gap = case
    requests = plan_requests(points, max_gap=gap)

    assert len(requests) == len(responses)
    for request, response in zip(requests, responses, strict=True):
        decoded = decode_request(request, response)
        assert [value.point for value in decoded] == list(request.points)
        assert same_results(decoded, reference_values(request, response))


@pytest.mark.parametrize(
    ("point", "words", "expected"),
    [
        ({"type": "float32"}, [0x8000, 0x0000], "0.0"),
        ({"type": "float32", "offset": -0.0}, [0x8000, 0x0000], "-0.0"),
        ({"type": "float32", "order": "CDAB"}, [0x0000, 0x8000], "0.0"),
        ({"type": "float64", "order": "BADC"}, [0x0080, 0, 0, 0], "0.0"),
        ({"type": "float32", "order": "DCBA"}, [0xCDCC, 0x8C3F], "1.1"),
        ({"type": "int64", "order": "DCBA"}, [0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF], "-1.0"),
        ({"type": "uint32", "order": "BADC"}, [0x3412, 0x7856], "305419896.0"),
        ({"type": "uint16", "byte_order": "little"}, [0x3412], "4660.0"),
    ],
)
def test_decode_orders_and_zero(point: dict[str, Any], words: list[int], expected: str) -> None:
    """Each order decodes its bytes, and -0.0 becomes 0.0 unless the offset is -0.0."""
    source = make_source([{"channel": "p", "address": 0, **point}])
    (request,) = plan_for_source(source)
    (value,) = decode_request(request, words)
    assert value.status == "good"
    assert repr(value.value) == expected


@pytest.mark.parametrize("bad", [70000, -1, 2**70])
def test_decode_register_out_of_range(bad: int) -> None:
    """A point's register outside 0..65535 raises the error decode_registers raises."""
    source = make_source(
        [
            {"channel": "a", "address": 0, "type": "uint16"},
            {"channel": "b", "address": 1, "type": "float32", "order": "BADC"},
        ]
    )
    (request,) = plan_for_source(source)
    with pytest.raises(ValueError, match=rf"register value {bad} is outside 0\.\.65535"):
        decode_request(request, [1, 0, bad])


def test_decode_ignores_bad_register_in_gap() -> None:
    """A register outside 0..65535 that no point reads leaves the points decoded."""
    source = make_source(
        [
            {"channel": "a", "address": 0, "type": "uint16"},
            {"channel": "b", "address": 2, "type": "int16", "byte_order": "little"},
        ],
        max_gap=1,
    )
    (request,) = plan_for_source(source)
    values = decode_request(request, [5, 70000, 0xFFFF])
    assert [value.value for value in values] == [5.0, -1.0]


def test_decode_integral_floats_as_registers() -> None:
    """Registers given as whole floats or bools decode as their integers, as before."""
    source = make_source(
        [
            {"channel": "a", "address": 0, "type": "uint16"},
            {"channel": "b", "address": 1, "type": "bool", "bit": 0},
        ]
    )
    (request,) = plan_for_source(source)
    values = decode_request(request, [3.0, True])  # type: ignore[list-item]
    assert [value.value for value in values] == [3.0, 1.0]


def test_decode_unvalidated_point_raises() -> None:
    """A point built without validation keeps the errors of decode_registers."""
    middle = ModbusPoint.model_construct(channel="a", address=0, word_order="middle")
    request = ReadRequest("holding", 0, 1, (middle,))
    with pytest.raises(ValueError, match="invalid word_order 'middle'"):
        decode_request(request, [0])

    (wide,) = make_points(("holding", 0, "float32"))
    request = ReadRequest("holding", 0, 1, (wide,))
    with pytest.raises(ValueError, match=r"float32 needs 2 register\(s\), got 1"):
        decode_request(request, [0])


def test_point_value_immutable() -> None:
    """A PointValue cannot be changed after decoding."""
    source = make_source([{"channel": "a", "address": 0, "type": "uint16"}])
    (request,) = plan_for_source(source)
    (value,) = decode_request(request, [1])
    assert value == PointValue(source.points[0], 1.0, "good")
    with pytest.raises(AttributeError):
        value.value = 2.0  # type: ignore[misc]


def test_request_pickles() -> None:
    """A pickled read decodes as the original does."""
    source = make_source([{"channel": "a", "address": 0, "type": "int32", "order": "CDAB"}])
    (request,) = plan_for_source(source)
    copied = pickle.loads(pickle.dumps(request))  # noqa: S301 (bytes made just above)
    assert copied == request
    assert decode_request(copied, [1, 0]) == decode_request(request, [1, 0])
