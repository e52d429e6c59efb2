"""The WITS level 0 parser: captures, framing, malformed lines, limits and chunk boundaries."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.wits0 import is_null
from drivers.wits0_items import STANDARD_01, describe_code, standard_item
from drivers.wits0_parser import (
    ParserCounters,
    Wits0Item,
    Wits0Packet,
    Wits0Parser,
    encode_packet,
    parse_number,
)

DEFAULT_NULLS = [-9999.0, -8888.0, -999.25]


def samples_dir() -> Path:
    """Return the folder of the WITS0 captures, next to the repository or from the environment."""
    beside = Path(__file__).parents[2] / "shared" / "samples" / "wits0"
    if beside.is_dir():
        return beside
    shared = os.environ.get("RIG_AGENT_SHARED_DIR")
    if shared:
        return Path(shared) / "samples" / "wits0"
    return beside


def capture(name: str) -> bytes:
    path = samples_dir() / name
    if not path.is_file():
        pytest.skip(f"capture {path} not found; set RIG_AGENT_SHARED_DIR to the shared folder")
    return path.read_bytes()


def parse(data: bytes, **limits: int) -> tuple[list[Wits0Packet], ParserCounters]:
    parser = Wits0Parser(**limits)
    return parser.feed(data), parser.counters


def pairs(packet: Wits0Packet) -> list[tuple[str, str]]:
    return [(item.code, item.text) for item in packet.items]


def values(packet: Wits0Packet) -> dict[str, float | None]:
    return {item.code: item.value for item in packet.items}


def feed_in_chunks(data: bytes, cuts: list[int]) -> tuple[list[Wits0Packet], ParserCounters]:
    parser = Wits0Parser()
    packets: list[Wits0Packet] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        packets.extend(parser.feed(data[start:cut]))
        start = max(start, cut)
    return packets, parser.counters


# --- The two captures ----------------------------------------------------------

# Read by eye from the first packet of the Pason EDR capture.
PASON_FIRST = [
    ("0108", "5871.95"),
    ("0110", "5893.00"),
    ("0112", "110.00"),
    ("0113", "0.00"),
    ("0115", "44.38"),
    ("0117", "0.00"),
    ("0119", "0.00"),
    ("0120", "0.00"),
    ("0121", "0.00"),
    ("0122", "0.00"),
    ("0123", "0.00"),
    ("0124", "0.00"),
    ("0125", "-9999.00"),
    ("0126", "718.42"),
    ("0127", "17.50"),
    ("0128", "1.06"),
    ("0130", "0.00"),
    ("0137", "4483.00"),
    ("0139", "-8888.00"),
    ("0140", "-9999.00"),
    ("0141", "-9999.00"),
    ("0142", "313557.96"),
    ("0143", "0.00"),
    ("0144", "4483.24"),
    ("0145", "0.00"),
    ("0169", "5896.69"),
    ("0170", "23.30"),
    ("0171", "-4066.40"),
    ("0172", "-9999.00"),
    ("0173", "-9999.00"),
]
# The second packet differs from the first in these items only.
PASON_SECOND_CHANGES = {
    "0112": "108.46",
    "0115": "44.79",
    "0119": "0.01",
    "0126": "718.03",
    "0127": "17.12",
    "0170": "23.37",
}
PASON_THIRD = [("6310", "70.53"), ("6311", "70.53"), ("6339", "70.53"), ("6340", "70.53")]

WITSKIT = [
    [
        ("0108", "3650.40"),
        ("0113", "3.5"),
        ("0114", "2850.7"),
        ("0121", "12750"),
        ("0123", "4568"),
        ("0815", "4.2"),
        ("0816", "15.8"),
        ("0823", "9.7"),
        ("0824", "1.3"),
        ("0844", "2.15"),
        ("1511", "5"),
        ("1512", "1000"),
        ("1513", "8"),
    ],
    [
        ("0208", "3652.20"),
        ("0210", "8.2"),
        ("0211", "2840.5"),
        ("0213", "6790"),
        ("0815", "3.8"),
        ("0816", "2.1"),
    ],
    [("1308", "8652.10"), ("1310", "15.2"), ("1311", "14.8"), ("1316", "20.5"), ("1318", "12.1")],
    [("1908", "4000.5"), ("1910", "1"), ("1911", "5.25"), ("1912", "5.75")],
]


def test_pason_capture_items() -> None:
    """The Pason EDR capture decodes to its three packets, item for item."""
    packets, _ = parse(capture("pason_edr_capture_from_flogo_test.wits"))
    second = [(code, PASON_SECOND_CHANGES.get(code, text)) for code, text in PASON_FIRST]
    assert [pairs(packet) for packet in packets] == [PASON_FIRST, second, PASON_THIRD]


def test_pason_capture_values() -> None:
    """Values of the Pason capture are numbers, including the sentinels and negative values."""
    packets, _ = parse(capture("pason_edr_capture_from_flogo_test.wits"))
    first = values(packets[0])
    assert first["0108"] == 5871.95
    assert first["0142"] == 313557.96
    assert first["0171"] == -4066.4
    assert first["0125"] == -9999.0
    assert first["0139"] == -8888.0
    assert values(packets[1])["0119"] == 0.01


def test_pason_tag_recognised() -> None:
    """Every Pason packet names its sender PASON/EDR, and 1984 is not an item."""
    packets, _ = parse(capture("pason_edr_capture_from_flogo_test.wits"))
    assert [packet.source_tag for packet in packets] == ["PASON/EDR"] * 3
    assert all(packet.get("1984") is None for packet in packets)


def test_pason_capture_clean() -> None:
    """The Pason capture has no junk, malformed lines, repeats or discarded packets."""
    _, counters = parse(capture("pason_edr_capture_from_flogo_test.wits"))
    assert counters == ParserCounters(packets=3)


def test_pason_sentinels_found() -> None:
    """The default null values match exactly the sentinel items of the first Pason packet."""
    packets, _ = parse(capture("pason_edr_capture_from_flogo_test.wits"))
    nulls = {
        item.code
        for item in packets[0].items
        if item.value is not None and is_null(item.value, DEFAULT_NULLS)
    }
    assert nulls == {"0125", "0139", "0140", "0141", "0172", "0173"}


def test_witskit_capture_items() -> None:
    """The LF-only WitsKit capture decodes to its four packets, item for item."""
    packets, _ = parse(capture("witskit_sample_comprehensive.wits"))
    assert [pairs(packet) for packet in packets] == WITSKIT


def test_witskit_capture_untagged() -> None:
    """The WitsKit capture has no source tag and no junk."""
    packets, counters = parse(capture("witskit_sample_comprehensive.wits"))
    assert [packet.source_tag for packet in packets] == [None] * 4
    assert counters == ParserCounters(packets=4)


def test_final_end_without_line_end() -> None:
    """A last `!!` with no line end after it completes its packet at once."""
    data = capture("witskit_sample_comprehensive.wits")
    assert data.rstrip(b" ").endswith(b"!!")
    packets, _ = parse(data)
    assert pairs(packets[-1]) == WITSKIT[-1]


# --- Chunk boundaries ----------------------------------------------------------

MESSY = (
    b"\x00\xffnoise before the first packet\r\n"
    b"&&\r\n1984PASON/EDR\r\n01083650.40\r\n\r\n0113 3.5\r\n!!\r\n"
    b"\n\n"
    b"&&\n0108 1\n0108 2\n0110\n01\n01A8 5\n01083650,40\n0121 7e2\n!!\n"
    b"&&\r0120 120\r!!\r"
    b"&&\r\n0121 99\r\n"
    b"junk&&\r\n0121 100\r\n" + b"0122 " + b"9" * 300 + b"\r\n!!\r\n"
    b"  &&  \r\n  0123  4  \r\n  !!  trailing\r\n"
    b"&&\r\n0124 -1.5e-3\r\n!!"
)


def test_messy_stream_packets() -> None:
    """The messy stream decodes to the packets that survive its faults."""
    packets, _ = parse(MESSY)
    assert [pairs(packet) for packet in packets] == [
        [("0108", "3650.40"), ("0113", "3.5")],
        [("0108", "2"), ("0110", ""), ("0121", "7e2")],
        [("0120", "120")],
        [("0123", "4")],
        [("0124", "-1.5e-3")],
    ]


def test_messy_stream_counters() -> None:
    """The messy stream counts each fault it contains."""
    _, counters = parse(MESSY)
    assert counters.packets == 5
    assert counters.discarded_packets == 1
    assert counters.malformed_lines == 3
    assert counters.repeated_items == 1
    assert counters.oversize_packets == 1


def test_every_split_position() -> None:
    """The messy stream and both captures give the same result wherever one split falls."""
    streams = [
        MESSY,
        capture("pason_edr_capture_from_flogo_test.wits"),
        capture("witskit_sample_comprehensive.wits"),
    ]
    for data in streams:
        whole = parse(data)
        for cut in range(len(data) + 1):
            assert feed_in_chunks(data, [cut]) == whole, f"split at byte {cut}"


def test_one_byte_chunks() -> None:
    """Feeding the messy stream one byte at a time gives the same result as feeding it whole."""
    assert feed_in_chunks(MESSY, list(range(len(MESSY)))) == parse(MESSY)


def test_crlf_split_across_reads() -> None:
    """A CR at the end of one read and its LF at the start of the next end one line."""
    parser = Wits0Parser()
    packets = [*parser.feed(b"&&\r"), *parser.feed(b"\n0108 1\r"), *parser.feed(b"\n!!\r")]
    packets += parser.feed(b"\n")
    assert [pairs(packet) for packet in packets] == [[("0108", "1")]]


# --- Line ends, junk and framing -----------------------------------------------

CRLF_PACKET = b"&&\r\n1984WITSKIT\r\n0108 1.5\r\n0110 2\r\n!!\r\n"


@pytest.mark.parametrize("line_end", [b"\r", b"\n", b"\n\r", b"\r\r\n"], ids=repr)
def test_other_line_ends(line_end: bytes) -> None:
    """CR-only, LF-only and doubled line ends give the same packet as CR LF."""
    expected, _ = parse(CRLF_PACKET)
    packets, _ = parse(CRLF_PACKET.replace(b"\r\n", line_end))
    assert packets == expected


def test_junk_counted_in_bytes() -> None:
    """Visible bytes before `&&` count as junk; blank lines and line ends do not."""
    _, counters = parse(b"garbage\r\n\r\n  \r\nab cd&&\r\n0108 1\r\n!!\r\n")
    assert counters.junk_bytes == len("garbage") + len("abcd")


def test_junk_before_marker_same_line() -> None:
    """A packet whose `&&` follows noise on the same line is still decoded."""
    packets, _ = parse(b"\x00\x13\x11&&\r\n0108 1\r\n!!\r\n")
    assert pairs(packets[0]) == [("0108", "1")]


def test_long_junk_then_packet() -> None:
    """Junk longer than a line's limit before `&&` is counted, and the packet still decodes."""
    packets, counters = parse(b"x" * 1000 + b"&&\r\n0108 1\r\n!!\r\n")
    assert pairs(packets[0]) == [("0108", "1")]
    assert counters.junk_bytes == 1000


def test_unterminated_packet_discarded() -> None:
    """A packet cut off by the next `&&` is discarded and counted, and the next one decodes."""
    packets, counters = parse(b"&&\r\n0108 1\r\n0110 2\r\n&&\r\n0113 3\r\n!!\r\n")
    assert [pairs(packet) for packet in packets] == [[("0113", "3")]]
    assert counters.discarded_packets == 1


def test_reset_discards_open_packet() -> None:
    """reset() drops a started packet and counts it, so bytes after a reconnect start clean."""
    parser = Wits0Parser()
    parser.feed(b"&&\r\n0108 1\r\n01")
    parser.reset()
    packets = parser.feed(b"10 5\r\n!!\r\n&&\r\n0113 3\r\n!!\r\n")
    assert [pairs(packet) for packet in packets] == [[("0113", "3")]]
    assert parser.counters.discarded_packets == 1


def test_end_outside_packet_is_junk() -> None:
    """A `!!` line with no open packet yields nothing and counts as junk."""
    packets, counters = parse(b"!!\r\n")
    assert packets == []
    assert counters.junk_bytes == 2


def test_empty_packet() -> None:
    """A packet with no data lines is a packet with no items."""
    packets, _ = parse(b"&&\r\n!!\r\n")
    assert packets == [Wits0Packet((), None, 0, 0)]


# --- Data lines ----------------------------------------------------------------


def one_packet(*lines: bytes) -> Wits0Packet:
    packets, _ = parse(b"&&\r\n" + b"".join(line + b"\r\n" for line in lines) + b"!!\r\n")
    assert len(packets) == 1
    return packets[0]


def test_repeated_item_keeps_last() -> None:
    """A code sent twice keeps its last value and its first place, and is counted."""
    packet = one_packet(b"0108 1", b"0110 2", b"0108 3")
    assert pairs(packet) == [("0108", "3"), ("0110", "2")]
    assert packet.repeated_items == 1


def test_decimal_comma_rejected() -> None:
    """A value with a decimal comma is a malformed line, and the rest of the packet is kept."""
    packet = one_packet(b"01083650,40", b"0110 2")
    assert pairs(packet) == [("0110", "2")]
    assert packet.malformed_lines == 1


@pytest.mark.parametrize(
    "line",
    [
        b"01",
        b"010",
        b"01A8 5",
        b"0101WELL-A1",
        b"0108nan",
        b"0108inf",
        b"0108-inf",
        b"01081e999",
        b"0108 1.2.3",
        b"0108 --1",
        b"0108 0x10",
        b"0108 1_000",
        b"\xd9\xa1\xd9\xa2\xd9\xa3\xd9\xa4 5",
        b"0108 \xff",
    ],
    ids=repr,
)
def test_malformed_line_skipped(line: bytes) -> None:
    """A malformed line is skipped and counted, and the packet keeps its other items."""
    packet = one_packet(b"0110 2", line)
    assert pairs(packet) == [("0110", "2")]
    assert packet.malformed_lines == 1


@pytest.mark.parametrize(
    ("text", "value"),
    [
        (b"12", 12.0),
        (b"-12.5", -12.5),
        (b"+3", 3.0),
        (b".5", 0.5),
        (b"5.", 5.0),
        (b"1e3", 1000.0),
        (b"-2.5E-2", -0.025),
        (b"-999.25", -999.25),
    ],
    ids=repr,
)
def test_number_forms(text: bytes, value: float) -> None:
    """Signs, a missing integer or fraction part and exponents are accepted."""
    assert parse_number(text) == value


def test_bare_code_is_null() -> None:
    """A code with no value is an item whose value is None."""
    packet = one_packet(b"0110")
    assert packet.items == (Wits0Item("0110", "", None),)


def test_tag_only_first_line() -> None:
    """A `1984<text>` line after the first line is a malformed line, not the tag."""
    packet = one_packet(b"0108 1", b"1984PASON/EDR")
    assert packet.source_tag is None
    assert packet.malformed_lines == 1


def test_numeric_1984_is_item() -> None:
    """A first line of 1984 followed by a number is item 1984, not a tag."""
    packet = one_packet(b"19841.5")
    assert packet.source_tag is None
    assert pairs(packet) == [("1984", "1.5")]


def test_counters_sum_packets() -> None:
    """The parser's counters add up the malformed and repeated lines of every packet."""
    packets, counters = parse(
        b"&&\r\n0108 1\r\n0108 2\r\nx\r\n!!\r\n&&\r\n0110 1\r\n0110 2\r\nyy\r\n!!\r\n"
    )
    assert counters.malformed_lines == sum(packet.malformed_lines for packet in packets)
    assert counters.repeated_items == sum(packet.repeated_items for packet in packets)


# --- Size limits ---------------------------------------------------------------


def test_oversize_line_drops_packet() -> None:
    """A line over max_line_bytes drops its packet, and parsing resumes at the next `&&`."""
    data = b"&&\r\n0108 " + b"1" * 300 + b"\r\n0110 2\r\n!!\r\n&&\r\n0113 3\r\n!!\r\n"
    packets, counters = parse(data)
    assert [pairs(packet) for packet in packets] == [[("0113", "3")]]
    assert counters.oversize_packets == 1


def test_endless_line_bounded() -> None:
    """Megabytes without a line end keep the parser's line buffer within max_line_bytes."""
    parser = Wits0Parser(max_line_bytes=64)
    parser.feed(b"&&\r\n")
    for _ in range(100):
        parser.feed(b"7" * 10_000)
    assert len(parser._line) <= 64
    assert parser.counters.oversize_packets == 1


def test_too_many_lines_drops_packet() -> None:
    """A packet of more than max_packet_lines lines is dropped; the next one decodes."""
    lines = b"".join(b"%04d 1\r\n" % code for code in range(101, 106))
    data = b"&&\r\n" + lines + b"!!\r\n&&\r\n0113 3\r\n!!\r\n"
    packets, counters = parse(data, max_packet_lines=4)
    assert [pairs(packet) for packet in packets] == [[("0113", "3")]]
    assert counters.oversize_packets == 1


def test_limits_validated() -> None:
    """A line limit too short for a code is rejected when the parser is created."""
    with pytest.raises(ValueError, match="max_line_bytes"):
        Wits0Parser(max_line_bytes=3)


# --- Encoding ------------------------------------------------------------------


def test_encode_handshake() -> None:
    """encode_packet builds the keep-alive packet with CR LF line ends."""
    assert encode_packet([("0111", "-9999")]) == b"&&\r\n0111-9999\r\n!!\r\n"


def test_encode_with_tag() -> None:
    """encode_packet puts a source tag on the first line."""
    data = encode_packet([("0108", "1.5")], source_tag="SIM/EDR")
    assert data == b"&&\r\n1984SIM/EDR\r\n01081.5\r\n!!\r\n"


@pytest.mark.parametrize(
    ("code", "text"), [("108", "1"), ("01a8", "1"), ("0108", "1\r\n0110 2"), ("0108", "\u00b5")]
)
def test_encode_rejects_bad_line(code: str, text: str) -> None:
    """encode_packet rejects a code that is not 4 digits and a value that would split a line."""
    with pytest.raises(ValueError, match="invalid WITS"):
        encode_packet([(code, text)])


# --- Property tests ------------------------------------------------------------

PIECES = [b"&&", b"!!", b"\r", b"\n", b"\r\n", b"0108", b"1984", b"1.5", b",", b" ", b"-", b"\xff"]
wits_like = st.lists(st.sampled_from(PIECES), max_size=80).map(b"".join)
any_stream = st.one_of(st.binary(max_size=600), wits_like)


@settings(max_examples=300, deadline=None)
@given(data=any_stream, cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=6))
def test_any_bytes_never_raise(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes, cut into arbitrary chunks, never raise and give the unsplit result."""
    assert feed_in_chunks(data, cuts) == parse(data)


codes = st.integers(min_value=0, max_value=9999).map(lambda number: f"{number:04d}")
numbers = st.one_of(
    st.integers(min_value=-(10**12), max_value=10**12).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.just(""),
)
packet_items = st.dictionaries(codes, numbers, max_size=12).map(lambda table: list(table.items()))
tags = st.none() | st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ/", min_size=1, max_size=12)
# Junk contains no `&` or `!`, so it can neither open nor close a packet.
junk = st.binary(max_size=40).map(lambda raw: raw.replace(b"&", b"").replace(b"!", b""))


@settings(max_examples=200, deadline=None)
@given(
    sent=st.lists(st.tuples(packet_items, tags, junk), max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=6),
)
def test_encoded_packets_round_trip(
    sent: list[tuple[list[tuple[str, str]], str | None, bytes]], cuts: list[int]
) -> None:
    """Packets from encode_packet, with junk between them, decode to the same items and tags."""
    stream = b"".join(noise + encode_packet(items, source_tag=tag) for items, tag, noise in sent)
    packets, counters = feed_in_chunks(stream, cuts)
    assert [(pairs(packet), packet.source_tag) for packet in packets] == [
        (items, tag) for items, tag, _ in sent
    ]
    visible = b"".join(b"".join(noise.split()) for _, _, noise in sent)
    assert counters.junk_bytes == len(visible)


# --- Standard items ------------------------------------------------------------


def test_standard_table_complete() -> None:
    """The standard table contains every record 01 code from 0101 to 0145."""
    assert list(STANDARD_01) == [f"01{item:02d}" for item in range(1, 46)]


@pytest.mark.parametrize(
    ("code", "mnemonic", "metric", "fps"),
    [
        ("0105", "DATE", "", ""),
        ("0106", "TIME", "", ""),
        ("0108", "DBTM", "m", "ft"),
        ("0113", "ROPA", "m/h", "ft/h"),
        ("0114", "HKLA", "kdaN", "klb"),
        ("0118", "TQA", "kN.m", "kft.lbf"),
        ("0121", "SPPA", "kPa", "psi"),
        ("0126", "TVA", "m3", "bbl"),
        ("0130", "MFIA", "L/min", "gal/min"),
        ("0131", "MDOA", "kg/m3", "ppg"),
        ("0133", "MTOA", "degC", "degF"),
        ("0140", "GASA", "%", "%"),
    ],
)
def test_standard_item_units(code: str, mnemonic: str, metric: str, fps: str) -> None:
    """Standard items carry the dictionary's mnemonic and both unit sets."""
    item = standard_item(code)
    assert item is not None
    assert (item.mnemonic, item.metric_unit, item.fps_unit) == (mnemonic, metric, fps)


def test_describe_code() -> None:
    """describe_code returns the mnemonic of a standard code and "" for any other."""
    assert describe_code("0121") == "SPPA"
    assert describe_code("0169") == ""


def test_null_value_matching() -> None:
    """Sentinels match to within half a unit of the second decimal; a value 0.01 away does not."""
    assert is_null(-9999.0, DEFAULT_NULLS)
    assert is_null(-999.25, DEFAULT_NULLS)
    assert not is_null(-9999.01, DEFAULT_NULLS)
    assert not is_null(-9999.0, [])
