"""Register decoding and encoding for every type in the four word and byte orders."""

from __future__ import annotations

import math
import re
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drivers.modbus_decode import (
    apply_scale,
    decode_registers,
    encode_value,
    engineering_value,
    read_bit,
    round_scaled,
    shortest_float32,
    unscale,
    value_struct,
    write_bit,
)
from drivers.modbus_types import DATA_TYPES, ORDER_NAMES, fold_order, order_name

# Where each byte of the big-endian value (A = most significant) sits on the
# wire, for each (word_order, byte_order) and register count.
LAYOUTS: dict[tuple[str, str], dict[int, str]] = {
    ("big", "big"): {1: "AB", 2: "ABCD", 4: "ABCDEFGH"},
    ("little", "big"): {1: "AB", 2: "CDAB", 4: "GHEFCDAB"},
    ("big", "little"): {1: "BA", 2: "BADC", 4: "BADCFEHG"},
    ("little", "little"): {1: "BA", 2: "DCBA", 4: "HGFEDCBA"},
}

# (type, big-endian bytes as hex, expected value)
CASES: list[tuple[str, str, float]] = [
    ("int16", "0000", 0),
    ("int16", "7fff", 32767),
    ("int16", "8000", -32768),
    ("int16", "fffe", -2),
    ("uint16", "ffff", 65535),
    ("uint16", "1234", 0x1234),
    ("int32", "fffe1dc0", -123456),
    ("int32", "7fffffff", 2**31 - 1),
    ("int32", "80000000", -(2**31)),
    ("uint32", "b2d05e00", 3_000_000_000),
    ("uint32", "00010002", 65538),
    ("int64", "ffffffffffffffff", -1),
    ("int64", "8000000000000000", -(2**63)),
    ("int64", "0000000100000002", 2**32 + 2),
    ("uint64", "ffffffffffffffff", 2**64 - 1),
    ("uint64", "0123456789abcdef", 0x0123456789ABCDEF),
    ("float32", "449a5000", 1234.5),
    ("float32", "c0000000", -2.0),
    ("float32", "00000000", 0.0),
    ("float32", "7f800000", math.inf),
    ("float32", "ff800000", -math.inf),
    ("float32", "7fc00000", math.nan),
    ("float64", "c0f81cd6e9e1b08a", -98765.4321),
    ("float64", "3ff8000000000000", 1.5),
    ("float64", "7ff0000000000000", math.inf),
    ("float64", "fff0000000000000", -math.inf),
    ("float64", "7ff8000000000000", math.nan),
]


# (register value as sent, bit, expected bool): bit 0 is the least significant.
BIT_CASES: list[tuple[int, int, int]] = [
    (0x0001, 0, 1),
    (0x0001, 1, 0),
    (0x8000, 15, 1),
    (0x8000, 14, 0),
    (0x7FFF, 15, 0),
    (0xFFFF, 7, 1),
    (0x0100, 8, 1),
    (0x0100, 0, 0),
    (0x0000, 3, 0),
]


def test_tables_cover_every_type() -> None:
    """The raw-words tables hold a case for every type of the data-type table."""
    covered = {type_name for type_name, _, _ in CASES} | {"bool"}
    assert covered == set(DATA_TYPES)


def test_layouts_match_order_names() -> None:
    """The layouts used by the tables are the ones the four-letter names stand for."""
    assert {LAYOUTS[orders][2] for orders in ORDER_NAMES.values()} == set(ORDER_NAMES)


def wire_words(big_endian_hex: str, word_order: str, byte_order: str) -> list[int]:
    """Lay the value's bytes out as a device in this order sends them."""
    data = bytes.fromhex(big_endian_hex)
    layout = LAYOUTS[(word_order, byte_order)][len(data) // 2]
    wire = bytes(data[ord(letter) - ord("A")] for letter in layout)
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


ORDER_PAIRS = [pytest.param(w, b, id=LAYOUTS[(w, b)][2]) for (w, b) in LAYOUTS]


@pytest.mark.parametrize(("word_order", "byte_order"), ORDER_PAIRS)
@pytest.mark.parametrize(("type_name", "hex_value", "expected"), CASES)
def test_decode_table(
    type_name: str, hex_value: str, expected: float, word_order: str, byte_order: str
) -> None:
    """Raw words in each layout decode to the value they encode."""
    words = wire_words(hex_value, word_order, byte_order)
    value = decode_registers(words, type_name, word_order, byte_order)
    if math.isnan(expected):
        assert math.isnan(value)
    else:
        assert value == expected


@pytest.mark.parametrize(("word_order", "byte_order"), ORDER_PAIRS)
@pytest.mark.parametrize(("type_name", "hex_value", "expected"), CASES)
def test_encode_table(
    type_name: str, hex_value: str, expected: float, word_order: str, byte_order: str
) -> None:
    """A value encodes to the raw words a device in that layout holds."""
    words = encode_value(expected, type_name, word_order, byte_order)
    assert words == wire_words(hex_value, word_order, byte_order)


@pytest.mark.parametrize(
    ("word_order", "byte_order", "words"),
    [
        ("big", "big", [0x449A, 0x5000]),
        ("little", "big", [0x5000, 0x449A]),
        ("big", "little", [0x9A44, 0x0050]),
        ("little", "little", [0x0050, 0x9A44]),
    ],
)
def test_float32_literal_layouts(word_order: str, byte_order: str, words: list[int]) -> None:
    """1234.5 written out by hand in ABCD, CDAB, BADC and DCBA decodes in each order."""
    assert decode_registers(words, "float32", word_order, byte_order) == 1234.5


@pytest.mark.parametrize(("word_order", "byte_order"), ORDER_PAIRS)
@pytest.mark.parametrize(("word", "bit", "expected"), BIT_CASES)
def test_decode_bit_table(
    word: int, bit: int, expected: int, word_order: str, byte_order: str
) -> None:
    """A bool reads one bit of the register as sent, whatever the orders."""
    assert decode_registers([word], "bool", word_order, byte_order, bit=bit) == expected


@pytest.mark.parametrize("bit", [None, -1, 16])
def test_decode_bool_needs_bit(bit: int | None) -> None:
    """A bool in a register without a bit from 0 to 15 raises."""
    with pytest.raises(ValueError, match="bit number from 0 to 15"):
        decode_registers([1], "bool", "big", "big", bit=bit)


def test_write_bit_keeps_other_bits() -> None:
    """Setting and clearing one bit leaves the other bits of the register as they were."""
    word = write_bit(0xF0F0, 0, True)
    assert word == 0xF0F1
    assert write_bit(word, 15, False) == 0x70F1


def test_encode_bool_sets_only_its_bit() -> None:
    """A true bool encodes as a register with only its bit set."""
    assert encode_value(1, "bool", "big", "big", bit=9) == [0x0200]


def test_encode_bool_rejects_two() -> None:
    """A bool value other than 0 or 1 raises."""
    with pytest.raises(ValueError, match="bool needs 0 or 1, got 2"):
        encode_value(2, "bool", "big", "big", bit=0)


@pytest.mark.parametrize("type_name", ["int16", "uint16"])
def test_one_register_ignores_word_order(type_name: str) -> None:
    """Word order has no effect on a one-register value, while byte order swaps its bytes."""
    big = decode_registers([0x0102], type_name, "big", "big")
    assert decode_registers([0x0102], type_name, "little", "big") == big
    assert decode_registers([0x0102], type_name, "little", "little") == 0x0201


@pytest.mark.parametrize(
    ("order", "word_order", "byte_order", "expected"),
    [
        ("ABCD", None, None, ("big", "big")),
        ("cdab", None, None, ("little", "big")),
        (" BaDc ", None, None, ("big", "little")),
        ("DCBA", "little", "little", ("little", "little")),
        ("CDAB", "little", None, ("little", "big")),
        (None, "little", None, ("little", "big")),
        (None, None, None, ("big", "big")),
    ],
)
def test_fold_order(
    order: str | None, word_order: str | None, byte_order: str | None, expected: tuple[str, str]
) -> None:
    """A layout name folds into word and byte order, case-insensitively."""
    assert fold_order(order, word_order, byte_order) == expected


@pytest.mark.parametrize(
    ("order", "word_order", "byte_order", "fragment"),
    [
        ("ABDC", None, None, "unknown order 'ABDC': expected one of ABCD, CDAB, BADC, DCBA"),
        ("CDAB", "big", None, 'order "CDAB" means word_order = "little", but word_order = "big"'),
        ("ABCD", None, "little", 'order "ABCD" means byte_order = "big", but byte_order'),
    ],
)
def test_fold_order_rejects(
    order: str, word_order: str | None, byte_order: str | None, fragment: str
) -> None:
    """An unknown layout name, or one that contradicts a given order, raises."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        fold_order(order, word_order, byte_order)


@pytest.mark.parametrize(("name", "orders"), list(ORDER_NAMES.items()))
def test_order_name_inverts_fold(name: str, orders: tuple[str, str]) -> None:
    """order_name returns the layout name that a pair of orders folds from."""
    assert order_name(*orders) == name


def test_int_types_return_int() -> None:
    """Integer types decode to int, so 64-bit counters keep every digit."""
    value = decode_registers([0xFFFF] * 4, "uint64", "big", "big")
    assert isinstance(value, int)


def _value_strategy(type_name: str) -> st.SearchStrategy[float]:
    if type_name == "bool":
        return st.integers(0, 1)
    fmt = DATA_TYPES[type_name].struct_format
    if fmt == "f":
        return st.floats(width=32, allow_nan=False)
    if fmt == "d":
        return st.floats(allow_nan=False)
    bits = DATA_TYPES[type_name].registers * 16
    if fmt.islower():
        return st.integers(-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return st.integers(0, 2**bits - 1)


@st.composite
def typed_values(draw: st.DrawFn) -> tuple[str, float, str, str, int | None]:
    type_name = draw(st.sampled_from(sorted(DATA_TYPES)))
    value = draw(_value_strategy(type_name))
    word_order = draw(st.sampled_from(["big", "little"]))
    byte_order = draw(st.sampled_from(["big", "little"]))
    bit = draw(st.integers(0, 15)) if type_name == "bool" else None
    return type_name, value, word_order, byte_order, bit


@given(typed_values())
def test_round_trip(case: tuple[str, float, str, str, int | None]) -> None:
    """Encoding then decoding returns the same value for every type and order."""
    type_name, value, word_order, byte_order, bit = case
    words = encode_value(value, type_name, word_order, byte_order, bit=bit)
    assert decode_registers(words, type_name, word_order, byte_order, bit=bit) == value


@given(st.integers(0, 0xFFFF), st.integers(0, 15), st.booleans())
def test_bit_round_trip(word: int, bit: int, value: bool) -> None:
    """A bit written into any register value reads back, and the other bits are unchanged."""
    written = write_bit(word, bit, value)
    assert read_bit(written, bit) == int(value)
    assert written & ~(1 << bit) == word & ~(1 << bit)


@given(st.lists(st.integers(0, 0xFFFF), min_size=2, max_size=2))
def test_float32_nan_round_trip(words: list[int]) -> None:
    """Every float32 bit pattern, NaN included, survives decode then encode."""
    value = decode_registers(words, "float32", "little", "little")
    if math.isnan(value):
        return
    assert encode_value(value, "float32", "little", "little") == words


@pytest.mark.parametrize(
    ("type_name", "count"),
    [("int16", 2), ("uint16", 0), ("float32", 1), ("int32", 3), ("float64", 2), ("uint64", 5)],
)
def test_wrong_word_count(type_name: str, count: int) -> None:
    """A register count that does not match the type raises, naming type and counts."""
    expected = DATA_TYPES[type_name].registers
    with pytest.raises(
        ValueError, match=rf"{type_name} needs {expected} register\(s\), got {count}"
    ):
        decode_registers([0] * count, type_name, "big", "big")


def test_register_out_of_range() -> None:
    """A word above 65535 is not a register value and raises."""
    with pytest.raises(ValueError, match=r"70000 is outside 0\.\.65535"):
        decode_registers([70000], "uint16", "big", "big")


def test_unknown_type() -> None:
    """An unknown type name raises and lists the known ones."""
    with pytest.raises(ValueError, match=r"unknown Modbus type 'float16'.*float32"):
        decode_registers([0], "float16", "big", "big")


def test_unknown_order() -> None:
    """An order other than big or little raises, naming the field."""
    with pytest.raises(ValueError, match="invalid byte_order 'middle'"):
        encode_value(1, "uint16", "big", "middle")


def test_encode_out_of_range() -> None:
    """A value outside the type's range raises and names the type."""
    with pytest.raises(ValueError, match="70000 does not fit in uint16"):
        encode_value(70000, "uint16", "big", "big")


def test_encode_fraction_for_int() -> None:
    """A fractional value for an integer type raises."""
    with pytest.raises(ValueError, match=r"int16 needs a whole number, got 1\.5"):
        encode_value(1.5, "int16", "big", "big")


def test_encode_whole_float_for_int() -> None:
    """A float with no fractional part is accepted for an integer type."""
    assert encode_value(-2.0, "int16", "big", "big") == [0xFFFE]


def test_apply_scale() -> None:
    """Scaling multiplies by scale, then adds offset."""
    assert apply_scale(1500, 0.1, -10.0) == pytest.approx(140.0)


def test_unscale_inverts_apply_scale() -> None:
    """unscale returns the raw value that apply_scale maps to the given value."""
    assert unscale(140.0, 0.1, -10.0) == pytest.approx(1500)


def test_unscale_zero_scale() -> None:
    """A zero scale cannot be inverted and raises."""
    with pytest.raises(ValueError, match="scale 0"):
        unscale(1.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        (3017.2, 3017.2),
        (155.45586, 155.45586),
        (0.1, 0.1),
        (-2.5, -2.5),
        (1e-45, 1e-45),
        (3.4028234663852886e38, 3.4028235e38),
    ],
)
def test_float32_shortest_decimal(written: float, expected: float) -> None:
    widened = struct.unpack(">f", struct.pack(">f", written))[0]

    assert shortest_float32(widened) == expected
    assert struct.pack(">f", shortest_float32(widened)) == struct.pack(">f", widened)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (937 * 0.01, 9.37),
        (1166 * 0.1, 116.6),
        (-158029.69136000003, -158029.69136),
        (9.223372036854776e17, 9.223372036854776e17),
        (1.0000000000000002, 1.0),
        (123456789.12345679, 123456789.12345679),
        (0.0, 0.0),
    ],
)
def test_scaled_noise_dropped(value: float, expected: float) -> None:
    assert round_scaled(value) == expected


def test_engineering_value_float32_scaled() -> None:
    widened = struct.unpack(">f", struct.pack(">f", 3017.2))[0]

    assert engineering_value(widened, "float32", 1.0, 0.0) == 3017.2
    assert engineering_value(937, "int16", 0.01, 0.0) == 9.37
    assert engineering_value(widened, "float64", 1.0, 0.0) == widened


@given(st.integers(min_value=0, max_value=0xFFFFFFFF))
def test_float32_shortest_round_trips(bits: int) -> None:
    widened = struct.unpack(">f", bits.to_bytes(4, "big"))[0]
    shortest = shortest_float32(widened)

    if math.isnan(widened):
        assert math.isnan(shortest)
        return
    assert struct.pack(">f", shortest) == struct.pack(">f", widened)
    digits = repr(shortest).split("e")[0].replace("-", "").replace(".", "").strip("0")
    assert len(digits) <= 9


# --- Whole-response decoding with value_struct ------------------------------------------


@st.composite
def packed_values(draw: st.DrawFn) -> tuple[str, str, str, list[int], int]:
    """A type, its orders, a response of random registers, and the offset of the value in it."""
    type_name = draw(st.sampled_from(sorted(name for name in DATA_TYPES if name != "bool")))
    word_order = draw(st.sampled_from(["big", "little"]))
    byte_order = draw(st.sampled_from(["big", "little"]))
    registers = DATA_TYPES[type_name].registers
    before = draw(st.integers(0, 3))
    after = draw(st.integers(0, 3))
    words = draw(
        st.lists(
            st.integers(0, 0xFFFF),
            min_size=before + registers + after,
            max_size=before + registers + after,
        )
    )
    return type_name, word_order, byte_order, words, before


def same_value(first: float, second: float) -> bool:
    """Return whether two values are equal and of one type, NaN equal to NaN, -0.0 not to 0.0."""
    if isinstance(first, float) and isinstance(second, float):
        return struct.pack(">d", first) == struct.pack(">d", second) or (
            math.isnan(first) and math.isnan(second)
        )
    return type(first) is type(second) and first == second


@settings(max_examples=400)
@given(packed_values())
@example(("float32", "little", "big", [0x0000, 0x8000], 0))
@example(("float64", "big", "little", [0x00FF, 0, 0, 0xF07F], 0))
def test_value_struct_matches_decode_registers(case: tuple[str, str, str, list[int], int]) -> None:
    """Reading a value from the packed response gives what decode_registers gives."""
    type_name, word_order, byte_order, words, offset = case
    registers = DATA_TYPES[type_name].registers
    expected = decode_registers(
        words[offset : offset + registers], type_name, word_order, byte_order
    )

    unpacker, swapped = value_struct(type_name, word_order, byte_order)
    buffer = struct.pack(f"{'<' if swapped else '>'}{len(words)}H", *words)
    (value,) = unpacker.unpack_from(buffer, 2 * offset)

    assert swapped == (word_order != byte_order)
    assert same_value(value, expected)


@given(st.integers(0, 0xFFFF))
def test_value_struct_bool_reads_register(word: int) -> None:
    """A bool reads its whole register as sent, from the plain buffer, whatever the orders."""
    for word_order in ("big", "little"):
        for byte_order in ("big", "little"):
            unpacker, swapped = value_struct("bool", word_order, byte_order)
            assert not swapped
            assert unpacker.unpack_from(struct.pack(">H", word), 0) == (word,)


def test_value_struct_invalid_type_or_order() -> None:
    """An unknown type or order raises the same error in both."""
    with pytest.raises(ValueError, match=r"unknown Modbus type 'float16'.*float32"):
        value_struct("float16", "big", "big")
    with pytest.raises(ValueError, match="invalid word_order 'middle'"):
        value_struct("uint16", "middle", "big")


# --- Float32 and scaling results against the former implementations -------------------


def shortest_float32_reference(value: float) -> float:
    """Former shortest_float32, with f-strings and struct.pack: the reference for the faster one."""
    if not math.isfinite(value):
        return value
    packed = struct.pack(">f", value)
    first = 6 if abs(value) >= 1.1754943508222875e-38 else 1
    for digits in range(first, 10):
        candidate = float(f"{value:.{digits}g}")
        try:
            if struct.pack(">f", candidate) == packed:
                return candidate
        except OverflowError:
            continue
    return value


def round_scaled_reference(value: float) -> float:
    """Former round_scaled, with an f-string: the reference for the faster one."""
    if not math.isfinite(value) or value == 0:
        return value
    rounded = float(f"{value:.15g}")
    if abs(rounded - value) <= 2 * math.ulp(value):
        return rounded
    return value


# Any bit pattern, and more with a zero exponent (zero and subnormals), which take the long loop.
FLOAT32_BITS = st.one_of(
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.builds(int.__or__, st.integers(0, 0x007FFFFF), st.sampled_from([0, 0x80000000])),
)


@settings(max_examples=2000)
@given(FLOAT32_BITS)
@example(0x80000000)
@example(0x00000001)
@example(0x7F7FFFFF)
@example(0x7F800000)
@example(0x7FC00000)
def test_shortest_float32_matches_reference(bits: int) -> None:
    """shortest_float32 gives the same float as the reference for any float32 bit pattern."""
    widened = struct.unpack(">f", bits.to_bytes(4, "big"))[0]

    assert same_value(shortest_float32(widened), shortest_float32_reference(widened))


@settings(max_examples=1000)
@given(
    st.one_of(
        st.floats(),
        st.builds(
            lambda raw, scale: raw * scale,
            st.integers(-(2**31), 2**31),
            st.sampled_from([0.1, 0.01, 0.001, 2.5, 1e-5]),
        ),
    )
)
def test_round_scaled_matches_reference(value: float) -> None:
    """round_scaled gives the same float as the reference for any double."""
    assert same_value(round_scaled(value), round_scaled_reference(value))
