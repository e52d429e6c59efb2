"""WITSML 1.4.1.1 time logs: rows from readings, documents, the server-rule checks and times."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from lxml import etree

from buffer.reading import Quality, StoredReading
from uplink.witsml_doc import (
    MAX_ROW_PROBLEMS,
    WITSML_NS,
    Curve,
    LogHeader,
    Problem,
    Row,
    build_document,
    build_rows,
    check_log_document,
    format_number,
    format_time,
    parse_log_documents,
    parse_time,
    schema_problems,
    split_rows,
)

T0_US = 1_714_543_200_000_000
"""2024-05-01T06:00:00Z in microseconds since the epoch."""

HEADER = LogHeader(
    well_uid="W-001",
    well_name="Example 1H",
    wellbore_uid="WB-001",
    wellbore_name="Example 1H OH",
    log_uid="rig-07-time",
    log_name="Rig 07 time log",
    null_value="-999.25",
)
CURVES = (
    Curve("SPPA", "psi", "SPPA", "standpipe pressure"),
    Curve("DBTM", "m", "DBTM"),
    Curve("RPM", "", "RPM"),
)

Validator = Callable[[bytes], None]


def ns(name: str) -> str:
    return f"{{{WITSML_NS}}}{name}"


def at(seconds: float) -> int:
    """Return T0 plus `seconds`, in microseconds."""
    return T0_US + round(seconds * 1_000_000)


def texts(document: bytes, path: str) -> list[str]:
    root = etree.fromstring(document)
    return [str(e.text or "") for e in root.iterfind(path, namespaces={"w": WITSML_NS})]


# build_rows


class ReadingLog:
    """Readings in arrival order: each gets the next seq, as the buffer gives it."""

    def __init__(self) -> None:
        self.readings: list[StoredReading] = []

    def add(
        self,
        seconds: float,
        source: str,
        channel: str,
        value: float | None,
        quality: Quality = Quality.GOOD,
    ) -> None:
        seq = len(self.readings) + 1
        self.readings.append(StoredReading(seq, at(seconds), source, channel, value, "u", quality))


COLUMNS = {("plc", "spp"): 0, ("wits", "0108"): 1}


def column_of(source: str, channel: str) -> int | None:
    return COLUMNS.get((source, channel))


def two_rate_readings() -> list[StoredReading]:
    """Pressure every 250 ms with a gap from 3 s to 6 s, bit depth every 2 s, and oddities."""
    log = ReadingLog()
    for step in range(12):  # pressure at 0.0 s .. 2.75 s, value 100 + step
        seconds = step * 0.25
        if seconds == 0.0:
            log.add(0.0, "wits", "0108", 1500.0)
        if seconds == 2.0:
            log.add(2.0, "wits", "0108", 1500.5)
        log.add(seconds, "plc", "spp", 100.0 + step)
        if step == 4:
            log.add(1.0, "plc", "motor_temp", 55.0)  # unmapped: ignored
    log.add(1.875, "plc", "spp", 555.0, Quality.BAD)  # bad: never a value
    log.add(2.9, "plc", "spp", None, Quality.BAD)  # start of an outage
    log.add(4.0, "wits", "0108", math.nan)  # NaN: never a value
    log.add(0.6, "plc", "spp", 91.0)  # arrives last but 0.75 s is newer in its period
    for step in range(24, 28):  # pressure again at 6.0 s .. 6.75 s
        log.add(step * 0.25, "plc", "spp", 100.0 + step)
    log.add(6.0, "wits", "0108", 1501.5, Quality.UNCERTAIN)  # uncertain: used
    log.add(6.9, "plc", "spp", math.inf)  # infinite: never a value
    log.add(8.0, "wits", "0108", 1502.0)
    log.add(8.0, "wits", "0108", 1502.25)  # same time: the higher seq wins
    return log.readings


def as_text(rows: list[Row]) -> list[tuple[str, tuple[float | str | None, ...]]]:
    return [(format_time(row.ts_us), row.values) for row in rows]


def test_build_rows_two_rates_one_second() -> None:
    rows = build_rows(two_rate_readings(), column_of, 2, 1_000_000)
    assert as_text(rows) == [
        ("2024-05-01T06:00:00Z", (103.0, 1500.0)),
        ("2024-05-01T06:00:01Z", (107.0, None)),
        ("2024-05-01T06:00:02Z", (111.0, 1500.5)),
        ("2024-05-01T06:00:06Z", (127.0, 1501.5)),
        ("2024-05-01T06:00:08Z", (None, 1502.25)),
    ]


def test_build_rows_two_rates_five_seconds() -> None:
    rows = build_rows(two_rate_readings(), column_of, 2, 5_000_000)
    assert as_text(rows) == [
        ("2024-05-01T06:00:00Z", (111.0, 1500.5)),
        ("2024-05-01T06:00:05Z", (127.0, 1502.25)),
    ]


def test_build_rows_ignores_arrival_order() -> None:
    readings = two_rate_readings()
    expected = build_rows(readings, column_of, 2, 1_000_000)
    assert build_rows(reversed(readings), column_of, 2, 1_000_000) == expected


def test_build_rows_quarter_second_period() -> None:
    log = ReadingLog()
    log.add(0.1, "plc", "spp", 1.0)
    log.add(0.2, "plc", "spp", 2.0)
    log.add(0.3, "plc", "spp", 3.0)
    rows = build_rows(log.readings, column_of, 2, 250_000)
    assert as_text(rows) == [
        ("2024-05-01T06:00:00Z", (2.0, None)),
        ("2024-05-01T06:00:00.25Z", (3.0, None)),
    ]


def test_build_rows_before_epoch_floors() -> None:
    reading = StoredReading(1, -1_500_000, "plc", "spp", 4.0, "u", Quality.GOOD)
    rows = build_rows([reading], column_of, 2, 1_000_000)
    assert rows == [Row(-2_000_000, (4.0, None))]


def test_build_rows_rejects_bad_arguments() -> None:
    reading = StoredReading(1, T0_US, "plc", "spp", 4.0, "u", Quality.GOOD)
    with pytest.raises(ValueError, match="positive"):
        build_rows([reading], column_of, 2, 0)
    with pytest.raises(ValueError, match="outside the 1 curves"):
        build_rows(
            [StoredReading(1, T0_US, "wits", "0108", 1.0, "u", Quality.GOOD)], column_of, 1, 1
        )


def test_split_rows() -> None:
    rows = [Row(at(n), (float(n),)) for n in range(5)]
    assert split_rows(rows, 2) == [rows[0:2], rows[2:4], rows[4:5]]
    assert split_rows(rows, 5) == [rows]
    assert split_rows([], 3) == []
    with pytest.raises(ValueError, match="at least 1"):
        split_rows(rows, 0)


# Values


@pytest.mark.parametrize(
    ("ts_us", "text"),
    [
        (T0_US, "2024-05-01T06:00:00Z"),
        (T0_US + 250_000, "2024-05-01T06:00:00.25Z"),
        (T0_US + 1, "2024-05-01T06:00:00.000001Z"),
        (T0_US + 100_000, "2024-05-01T06:00:00.1Z"),
        (0, "1970-01-01T00:00:00Z"),
        (-500_000, "1969-12-31T23:59:59.5Z"),
    ],
)
def test_format_time(ts_us: int, text: str) -> None:
    assert format_time(ts_us) == text


def test_format_time_out_of_range() -> None:
    with pytest.raises(ValueError, match="years 1 to 9999"):
        format_time(10**18)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1e-07, "1e-07"),
        (12345678.9, "12345678.9"),
        (-0.0, "-0.0"),
        (0.0, "0.0"),
        (1523.4, "1523.4"),
        (0.1 + 0.2, "0.30000000000000004"),
        (float(2**53), "9007199254740992.0"),
        (1e22, "1e+22"),
        (-2.5e-300, "-2.5e-300"),
        (5, "5.0"),
    ],
)
def test_format_number(value: float, text: str) -> None:
    assert format_number(value) == text
    assert float(text) == value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_format_number_rejects_non_finite(value: float) -> None:
    with pytest.raises(ValueError, match="NaN and infinity"):
        format_number(value)


@pytest.mark.parametrize(
    ("fraction", "micros"),
    [
        ("", 0),
        (".1", 100_000),
        (".12", 120_000),
        (".123", 123_000),
        (".1234", 123_400),
        (".12345", 123_450),
        (".123456", 123_456),
        (".1234567", 123_456),
        (".12345678", 123_456),
        (".123456789", 123_456),
        (".0000000", 0),
    ],
)
def test_parse_time_fraction_digits(fraction: str, micros: int) -> None:
    assert parse_time(f"2024-05-01T06:00:00{fraction}Z") == T0_US + micros


@pytest.mark.parametrize(
    "text",
    [
        "2024-05-01T06:00:00Z",
        "2024-05-01T06:00:00+00:00",
        "2024-05-01T06:00:00-00:00",
        "2024-05-01T07:00:00+01:00",
        "2024-05-01T11:30:00+05:30",
        "2024-05-01T01:00:00.0000000-05:00",
        "2024-04-30T16:00:00-14:00",
        " 2024-05-01T06:00:00Z\n",
        "2024-04-30T24:00:00-06:00",
    ],
)
def test_parse_time_zones_equal(text: str) -> None:
    assert parse_time(text) == T0_US


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("2024-05-01T06:00:00", "has no time zone"),
        ("2024-05-01T06:00:00.5", "has no time zone"),
        ("2024-05-01 06:00:00Z", "invalid date-time"),
        ("2024-05-01T06:00Z", "invalid date-time"),
        ("2024-05-01T06:00:00.Z", "invalid date-time"),
        ("2024-05-01T06:00:00.1234567890Z", "invalid date-time"),
        ("2024-05-01T06:00:00z", "invalid date-time"),
        ("2024-05-01T06:00:00+0100", "invalid date-time"),
        ("2024-02-30T06:00:00Z", "the date does not exist"),
        ("2024-13-01T06:00:00Z", "the date does not exist"),
        ("2024-05-01T25:00:00Z", "the time of day does not exist"),
        ("2024-05-01T24:00:01Z", "the time of day does not exist"),
        ("2024-05-01T06:60:00Z", "the time of day does not exist"),
        ("2024-05-01T06:00:60Z", "the time of day does not exist"),
        ("2024-05-01T06:00:00+14:30", "outside -14:00 to +14:00"),
        ("2024-05-01T06:00:00+01:60", "outside -14:00 to +14:00"),
        ("", "invalid date-time"),
        ("-999.25", "invalid date-time"),
    ],
)
def test_parse_time_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_time(text)


def test_parse_time_leap_day() -> None:
    assert parse_time("2024-02-29T00:00:00Z") == 1_709_164_800_000_000


@given(st.integers(min_value=-(10**16), max_value=10**17))
def test_format_time_round_trips(ts_us: int) -> None:
    assert parse_time(format_time(ts_us)) == ts_us


# build_document


ROWS = [
    Row(at(0), (1523.4, 1e-07, None)),
    Row(at(1.25), (12345678.9, -0.0, 120.0)),
    Row(at(2), (None, 1e22, float(2**53))),
]


def test_document_valid(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES, ROWS)
    assert_witsml_valid(document)
    assert check_log_document(document) == []
    assert document.startswith(b'<?xml version="1.0" encoding="UTF-8"?>\n<logs xmlns=')


def test_document_element_order(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES, ROWS)
    assert_witsml_valid(document)
    root = etree.fromstring(document)
    assert root.tag == ns("logs")
    assert root.get("version") == "1.4.1.1"
    log = root[0]
    assert dict(log.attrib) == {"uidWell": "W-001", "uidWellbore": "WB-001", "uid": "rig-07-time"}
    assert [etree.QName(child).localname for child in log] == [
        "nameWell",
        "nameWellbore",
        "name",
        "indexType",
        "startDateTimeIndex",
        "endDateTimeIndex",
        "direction",
        "indexCurve",
        "nullValue",
        "logCurveInfo",
        "logCurveInfo",
        "logCurveInfo",
        "logCurveInfo",
        "logData",
    ]
    infos = log.findall(ns("logCurveInfo"))
    layout = [
        (info.get("uid"), [(etree.QName(c).localname, c.text) for c in info]) for info in infos
    ]
    assert layout == [
        ("TIME", [("mnemonic", "TIME"), ("unit", "s"), ("typeLogData", "date time")]),
        (
            "SPPA",
            [
                ("mnemonic", "SPPA"),
                ("unit", "psi"),
                ("curveDescription", "standpipe pressure"),
                ("typeLogData", "double"),
            ],
        ),
        ("DBTM", [("mnemonic", "DBTM"), ("unit", "m"), ("typeLogData", "double")]),
        ("RPM", [("mnemonic", "RPM"), ("typeLogData", "double")]),
    ]


def test_document_values(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES, ROWS)
    assert_witsml_valid(document)
    assert texts(document, "w:log/w:indexType") == ["date time"]
    assert texts(document, "w:log/w:startDateTimeIndex") == ["2024-05-01T06:00:00Z"]
    assert texts(document, "w:log/w:endDateTimeIndex") == ["2024-05-01T06:00:02Z"]
    assert texts(document, "w:log/w:direction") == ["increasing"]
    assert texts(document, "w:log/w:indexCurve") == ["TIME"]
    assert texts(document, "w:log/w:nullValue") == ["-999.25"]
    assert texts(document, "w:log/w:logData/w:mnemonicList") == ["TIME,SPPA,DBTM,RPM"]
    assert texts(document, "w:log/w:logData/w:unitList") == ["s,psi,m,"]
    assert texts(document, "w:log/w:logData/w:data") == [
        "2024-05-01T06:00:00Z,1523.4,1e-07,-999.25",
        "2024-05-01T06:00:01.25Z,12345678.9,-0.0,120.0",
        "2024-05-01T06:00:02Z,-999.25,1e+22,9007199254740992.0",
    ]
    assert b"NaN" not in document
    assert b"nan" not in document.lower()


def test_document_no_rows(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES, [])
    assert_witsml_valid(document)
    assert check_log_document(document) == []
    assert texts(document, "w:log/w:startDateTimeIndex") == []
    assert texts(document, "w:log/w:endDateTimeIndex") == []
    assert texts(document, "w:log/w:logData/w:data") == []
    assert texts(document, "w:log/w:logData/w:mnemonicList") == ["TIME,SPPA,DBTM,RPM"]


def test_document_one_row(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES[:1], [Row(at(0.5), (7.0,))])
    assert_witsml_valid(document)
    assert check_log_document(document) == []
    assert texts(document, "w:log/w:startDateTimeIndex") == ["2024-05-01T06:00:00.5Z"]
    assert texts(document, "w:log/w:endDateTimeIndex") == ["2024-05-01T06:00:00.5Z"]
    assert texts(document, "w:log/w:logData/w:data") == ["2024-05-01T06:00:00.5Z,7.0"]


def test_document_split_at_max_rows(assert_witsml_valid: Validator) -> None:
    rows = [Row(at(n), (float(n), None, None)) for n in range(5)]
    chunks = split_rows(rows, 2)
    documents = [build_document(HEADER, CURVES, chunk) for chunk in chunks]
    for document in documents:
        assert_witsml_valid(document)
        assert check_log_document(document) == []
    ranges = [
        texts(d, "w:log/w:startDateTimeIndex") + texts(d, "w:log/w:endDateTimeIndex")
        for d in documents
    ]
    assert ranges == [
        ["2024-05-01T06:00:00Z", "2024-05-01T06:00:01Z"],
        ["2024-05-01T06:00:02Z", "2024-05-01T06:00:03Z"],
        ["2024-05-01T06:00:04Z", "2024-05-01T06:00:04Z"],
    ]
    assert [len(texts(d, "w:log/w:logData/w:data")) for d in documents] == [2, 2, 1]


def test_document_empty_null_value(assert_witsml_valid: Validator) -> None:
    header = LogHeader("W-1", "w", "WB-1", "wb", "L-1", "l", "")
    document = build_document(header, CURVES, [Row(at(0), (1.0, None, None))])
    assert_witsml_valid(document)
    assert check_log_document(document) == []
    assert texts(document, "w:log/w:nullValue") == []
    assert texts(document, "w:log/w:logData/w:data") == ["2024-05-01T06:00:00Z,1.0,,"]


def test_document_text_values_kept(assert_witsml_valid: Validator) -> None:
    document = build_document(HEADER, CURVES, [Row(at(0), ("1523.40", " 12 ", "-1.5E3"))])
    assert_witsml_valid(document)
    assert texts(document, "w:log/w:logData/w:data") == ["2024-05-01T06:00:00Z,1523.40,12,-1.5E3"]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([Row(at(0), (math.nan, None, None))], "NaN and infinity"),
        ([Row(at(0), (None, math.inf, None))], "NaN and infinity"),
        ([Row(at(0), ("NaN", None, None))], "not a number"),
        ([Row(at(0), ("1,5", None, None))], "not a number"),
        ([Row(at(0), (1.0, None))], "has 2 values but the log has 3 curves"),
        ([Row(at(1), (1.0, None, None)), Row(at(1), (2.0, None, None))], "strictly increasing"),
        ([Row(at(1), (1.0, None, None)), Row(at(0), (2.0, None, None))], "strictly increasing"),
    ],
)
def test_document_rejects_bad_rows(rows: list[Row], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_document(HEADER, CURVES, rows)


def test_document_round_trips() -> None:
    document = build_document(HEADER, CURVES, ROWS)
    [parsed] = parse_log_documents(document)
    assert parsed.header == HEADER
    assert parsed.curves == CURVES
    assert parsed.rows == (
        (at(0), ("1523.4", "1e-07", None)),
        (at(1.25), ("12345678.9", "-0.0", "120.0")),
        (at(2), (None, "1e+22", "9007199254740992.0")),
    )


# check_log_document: a hand-made document and variants that break one rule each

BASE = """\
<?xml version="1.0" encoding="UTF-8"?>
<logs xmlns="http://www.witsml.org/schemas/1series" version="1.4.1.1">
  <log uidWell="W-001" uidWellbore="WB-001" uid="rig-07-time">
    <nameWell>Example 1H</nameWell>
    <nameWellbore>Example 1H OH</nameWellbore>
    <name>Rig 07 time log</name>
    <indexType>date time</indexType>
    <startDateTimeIndex>2024-05-01T06:00:00Z</startDateTimeIndex>
    <direction>increasing</direction>
    <indexCurve>TIME</indexCurve>
    <nullValue>-999.25</nullValue>
    <logCurveInfo uid="TIME">
      <mnemonic>TIME</mnemonic>
      <unit>s</unit>
      <typeLogData>date time</typeLogData>
    </logCurveInfo>
    <logCurveInfo uid="SPPA">
      <mnemonic>SPPA</mnemonic>
      <unit>psi</unit>
      <typeLogData>double</typeLogData>
    </logCurveInfo>
    <logCurveInfo uid="RPM">
      <mnemonic>RPM</mnemonic>
      <typeLogData>double</typeLogData>
    </logCurveInfo>
    <logData>
      <mnemonicList>TIME,SPPA,RPM</mnemonicList>
      <unitList>s,psi,</unitList>
      <data>2024-05-01T06:00:00Z,1523.4,-999.25</data>
      <data>2024-05-01T06:00:01.5+00:00,1523.6,</data>
      <data>2024-05-01T08:00:02+02:00,1e-07,120</data>
    </logData>
  </log>
</logs>
"""
"""Lines: 3 log, 13 TIME mnemonic, 17 SPPA info, 22 RPM info, 26 logData, 27 mnemonicList,
28 unitList, 29-31 rows."""


def variant(*replacements: tuple[str, str]) -> bytes:
    text = BASE
    for old, new in replacements:
        assert old in text, f"{old!r} is not in the base document"
        text = text.replace(old, new)
    assert text.count("\n") == BASE.count("\n"), "a variant must keep every line where it is"
    return text.encode()


def test_base_document_passes(assert_witsml_valid: Validator) -> None:
    assert_witsml_valid(BASE.encode())
    assert check_log_document(BASE.encode()) == []


LONG_UID = "U" * 65
LONG_MNEMONIC = "M" * 33
RULE_VARIANTS: list[tuple[str, tuple[tuple[str, str], ...], int | None, str]] = [
    (
        "root_not_plural",
        (("<logs ", "<log "), ("</logs>", "</log>")),
        2,
        "the root element is <log>: a log document starts with <logs>",
    ),
    (
        "no_namespace",
        ((' xmlns="http://www.witsml.org/schemas/1series"', ""),),
        2,
        "<logs> is in no namespace",
    ),
    (
        "other_namespace",
        (("schemas/1series", "schemas/141"),),
        2,
        "<logs> is in namespace http://www.witsml.org/schemas/141",
    ),
    ("no_version", ((' version="1.4.1.1"', ""),), 2, "<logs> has no version attribute"),
    ("old_version", (('version="1.4.1.1"', 'version="1.3.1.1"'),), 2, "has version '1.3.1.1'"),
    ("no_uid_well", ((' uidWell="W-001"', ""),), 3, "<log> has no uidWell attribute"),
    ("no_uid_wellbore", ((' uidWellbore="WB-001"', ""),), 3, "<log> has no uidWellbore"),
    ("no_log_uid", ((' uid="rig-07-time"', ""),), 3, "<log> has no uid attribute"),
    ("log_uid_space", (('uid="rig-07-time"', 'uid="rig 07"'),), 3, "contains whitespace"),
    ("log_uid_long", (('uidWell="W-001"', f'uidWell="{LONG_UID}"'),), 3, "65 characters"),
    (
        "empty_name_well",
        (("<nameWell>Example 1H</nameWell>", "<nameWell> </nameWell>"),),
        4,
        "<log> has no nameWell",
    ),
    (
        "no_name_wellbore",
        (("<nameWellbore>Example 1H OH</nameWellbore>", "<!-- -->"),),
        3,
        "<log> has no nameWellbore",
    ),
    ("long_name", (("Rig 07 time log", "R" * 65),), 6, "name has 65 characters"),
    (
        "no_index_type",
        (("<indexType>date time</indexType>", "<!-- -->"),),
        3,
        "<log> has no indexType",
    ),
    (
        "start_without_zone",
        (("06:00:00Z</startDateTimeIndex>", "06:00:00</startDateTimeIndex>"),),
        8,
        "startDateTimeIndex: date-time '2024-05-01T06:00:00' has no time zone",
    ),
    (
        "no_index_curve",
        (("<indexCurve>TIME</indexCurve>", "<!-- -->"),),
        3,
        "<log> has no indexCurve",
    ),
    (
        "index_curve_unknown",
        (("<indexCurve>TIME</indexCurve>", "<indexCurve>DT</indexCurve>"),),
        10,
        "indexCurve 'DT' has no logCurveInfo",
    ),
    (
        "index_curve_unknown_list",
        (("<indexCurve>TIME</indexCurve>", "<indexCurve>DT</indexCurve>"),),
        27,
        "mnemonicList starts with 'TIME': the index curve 'DT' must be the first column",
    ),
    (
        "index_not_first",
        (("TIME,SPPA,RPM", "SPPA,TIME,RPM"), ("s,psi,", "psi,s,")),
        27,
        "mnemonicList starts with 'SPPA'",
    ),
    (
        "index_typed_double",
        (("<typeLogData>date time</typeLogData>", "<typeLogData>double</typeLogData>"),),
        15,
        "index curve 'TIME' has typeLogData 'double'",
    ),
    (
        "index_unit_length",
        (("<unit>s</unit>", "<unit>m</unit>"), ("s,psi,", "m,psi,")),
        14,
        "index curve 'TIME' has unit 'm', which is not a unit of time",
    ),
    (
        "row_without_zone",
        (("06:00:00Z,1523.4", "06:00:00,1523.4"),),
        29,
        "date-time '2024-05-01T06:00:00' has no time zone",
    ),
    ("row_bad_time", (("06:00:00Z,1523.4", "06:00:00 UTC,1523.4"),), 29, "invalid date-time"),
    (
        "row_same_instant",
        (("08:00:02+02:00", "07:00:01.5+01:00"),),
        31,
        "index '2024-05-01T07:00:01.5+01:00' does not come after the previous row",
    ),
    ("row_earlier", (("08:00:02+02:00", "06:00:00Z"),), 31, "does not come after the previous row"),
    (
        "decreasing_rows_increase",
        (("<direction>increasing", "<direction>decreasing"),),
        30,
        "rows of a decreasing log must be in strictly decreasing order",
    ),
    (
        "duplicate_mnemonic",
        (("<mnemonic>RPM</mnemonic>", "<mnemonic>SPPA</mnemonic>"),),
        23,
        "mnemonic 'SPPA' is used twice in this log (first on line 18)",
    ),
    (
        "duplicate_in_list",
        (("TIME,SPPA,RPM", "TIME,SPPA,SPPA"),),
        27,
        "mnemonicList names 'SPPA' more than once",
    ),
    (
        "long_mnemonic",
        (("<mnemonic>RPM<", f"<mnemonic>{LONG_MNEMONIC}<"), (",RPM<", f",{LONG_MNEMONIC}<")),
        23,
        f"mnemonic '{LONG_MNEMONIC}' has 33 characters: at most 32 are allowed",
    ),
    (
        "mnemonic_slash",
        (("<mnemonic>RPM<", "<mnemonic>RPM/2<"), (",RPM<", ",RPM/2<")),
        23,
        "mnemonic 'RPM/2' contains /",
    ),
    ("mnemonic_ampersand", (("<mnemonic>RPM<", "<mnemonic>R&amp;D<"),), 23, "contains &"),
    ("mnemonic_quote", (("<mnemonic>RPM<", "<mnemonic>R'D<"),), 23, "contains '"),
    (
        "no_mnemonic",
        (("<mnemonic>RPM</mnemonic>", "<!-- -->"),),
        22,
        "logCurveInfo has no mnemonic",
    ),
    (
        "no_type_log_data",
        (
            (
                "<typeLogData>double</typeLogData>\n    </logCurveInfo>\n    <logData>",
                "<!-- -->\n    </logCurveInfo>\n    <logData>",
            ),
        ),
        22,
        "logCurveInfo 'RPM' has no typeLogData",
    ),
    ("no_curve_uid", ((' uid="RPM"', ""),), 22, "logCurveInfo has no uid attribute"),
    (
        "duplicate_curve_uid",
        (('uid="RPM"', 'uid="SPPA"'),),
        22,
        "logCurveInfo uid 'SPPA' is used twice in this log (first on line 17)",
    ),
    (
        "curve_uid_space",
        (('uid="RPM"', 'uid="R P M"'),),
        22,
        "logCurveInfo uid 'R P M' contains whitespace",
    ),
    (
        "list_without_curve",
        (("TIME,SPPA,RPM", "TIME,SPPA,ROP"),),
        27,
        "mnemonicList names 'ROP', which has no logCurveInfo",
    ),
    (
        "no_mnemonic_list",
        (("<mnemonicList>TIME,SPPA,RPM</mnemonicList>", "<!-- -->"),),
        26,
        "logData has no mnemonicList",
    ),
    ("no_unit_list", (("<unitList>s,psi,</unitList>", "<!-- -->"),), 26, "logData has no unitList"),
    (
        "unit_list_short",
        (("s,psi,<", "s,psi<"),),
        28,
        "unitList has 2 entries but mnemonicList has 3",
    ),
    (
        "unit_mismatch",
        (("s,psi,<", "s,kPa,<"),),
        28,
        "unitList entry 2 ('SPPA') is 'kPa' but its logCurveInfo on line 17 has unit 'psi'",
    ),
    (
        "unitless_given_unit",
        (("s,psi,<", "s,psi,rpm<"),),
        28,
        "unitList entry 3 ('RPM') is 'rpm' but its logCurveInfo on line 22 has unit ''",
    ),
    ("row_short", (("1523.6,<", "1523.6<"),), 30, "data row has 2 values but mnemonicList names 3"),
    ("row_long", (("1e-07,120<", "1e-07,120,5<"),), 31, "data row has 4 values"),
    ("value_nan", (("1523.4,", "NaN,"),), 29, "value 'NaN' in column 2 ('SPPA') is not a number"),
    ("value_inf", (("1523.4,", "INF,"),), 29, "value 'INF' in column 2 ('SPPA') is not a number"),
    ("value_grouped", (("1523.4,", "1_523.4,"),), 29, "value '1_523.4' in column 2"),
    ("value_text", (("120<", "fast<"),), 31, "value 'fast' in column 3 ('RPM') is not a number"),
    ("value_arabic_digits", (("120<", "١٢٠<"),), 31, "value '١٢٠' in column 3"),
    (
        "empty_null_value",
        (("<nullValue>-999.25</nullValue>", "<nullValue></nullValue>"),),
        11,
        "nullValue is empty",
    ),
]


@pytest.mark.parametrize(
    ("replacements", "line", "message"),
    [case[1:] for case in RULE_VARIANTS],
    ids=[case[0] for case in RULE_VARIANTS],
)
def test_check_reports_broken_rule(
    replacements: tuple[tuple[str, str], ...], line: int | None, message: str
) -> None:
    problems = check_log_document(variant(*replacements))
    matching = [p for p in problems if p.line == line and message in p.message]
    assert matching, f"no problem on line {line} containing {message!r} in {problems}"


def test_check_energistics_rules_in_one_document() -> None:
    """Duplicated mnemonics: the k-th column maps to the k-th logCurveInfo with that name."""
    document = variant(
        ("<mnemonic>RPM</mnemonic>", "<mnemonic>SPPA</mnemonic>"),
        ("TIME,SPPA,RPM", "TIME,SPPA,SPPA"),
    )
    assert check_log_document(document) == [
        Problem(
            23,
            "mnemonic 'SPPA' is used twice in this log (first on line 18): "
            "mnemonics must be unique",
        ),
        Problem(27, "mnemonicList names 'SPPA' more than once: each curve may have one column"),
    ]


def test_check_problems_sorted() -> None:
    document = variant(
        ("120<", "fast<"), ("<mnemonic>RPM<", "<mnemonic>R/M<"), (' version="1.4.1.1"', "")
    )
    lines = [p.line for p in check_log_document(document)]
    assert lines == sorted(line or 0 for line in lines)
    assert lines[0] == 2


def test_check_delimiter_honoured() -> None:
    document = variant(
        (
            "<name>Rig 07 time log</name>",
            "<name>Rig 07 time log</name><dataDelimiter>;</dataDelimiter>",
        ),
        ("06:00:00Z,1523.4,-999.25<", "06:00:00Z;1523.4;-999.25<"),
        ("+00:00,1523.6,<", "+00:00;1523.6;<"),
        ("+02:00,1e-07,120<", "+02:00;1e-07;120<"),
    )
    assert check_log_document(document) == []
    comma_rows = variant(
        (
            "<name>Rig 07 time log</name>",
            "<name>Rig 07 time log</name><dataDelimiter>;</dataDelimiter>",
        ),
    )
    assert [p.line for p in check_log_document(comma_rows)] == [29, 30, 31]


def test_check_curve_null_value() -> None:
    document = variant(
        ("<mnemonic>RPM</mnemonic>", "<mnemonic>RPM</mnemonic><nullValue>none</nullValue>"),
        ("120<", "none<"),
    )
    assert check_log_document(document) == []


def test_check_time_unit_minutes() -> None:
    document = variant(("<unit>s</unit>", "<unit>min</unit>"), ("s,psi,", "min,psi,"))
    assert check_log_document(document) == []


def test_check_decreasing_log() -> None:
    document = variant(
        ("<direction>increasing", "<direction>decreasing"),
        ("06:00:00Z,1523.4", "06:00:09Z,1523.4"),
        ("08:00:02+02:00", "06:00:00+00:00"),
    )
    assert check_log_document(document) == []


def test_check_depth_log_rows() -> None:
    document = variant(
        ("<indexType>date time<", "<indexType>measured depth<"),
        ("<startDateTimeIndex>2024-05-01T06:00:00Z</startDateTimeIndex>", "<!-- -->"),
        ("<typeLogData>date time<", "<typeLogData>double<"),
        ("<unit>s</unit>", "<unit>m</unit>"),
        ("s,psi,", "m,psi,"),
        ("2024-05-01T06:00:00Z,", "100.5,"),
        ("2024-05-01T06:00:01.5+00:00,", "101,"),
        ("2024-05-01T08:00:02+02:00,", "101,"),
    )
    assert check_log_document(document) == [
        Problem(
            31,
            "index '101' does not come after the previous row: rows of an increasing "
            "log must be in strictly increasing order",
        ),
    ]


def test_check_row_problems_capped() -> None:
    rows = [Row(at(n), (float(n),)) for n in range(MAX_ROW_PROBLEMS + 5)]
    document = build_document(HEADER, [Curve("A", "m", "A")], rows)
    broken = document.replace(b"</data>", b",1</data>")
    problems = check_log_document(broken)
    assert len(problems) == MAX_ROW_PROBLEMS + 1
    assert problems[0] == Problem(None, "log 'rig-07-time': 5 more data row problems not listed")
    assert all("data row has 3 values" in p.message for p in problems[1:])


def test_check_bom_and_encoding() -> None:
    assert check_log_document(b"\xef\xbb\xbf" + BASE.encode()) == []


@pytest.mark.parametrize(
    ("data", "line", "message"),
    [
        (b"", 1, "the file is not well-formed XML: Document is empty"),
        (b"time,value\n1,2\n", 1, "the file is not well-formed XML: Start tag expected"),
        (
            BASE.encode().replace(b"</logData>", b"</logdata>"),
            32,
            "Opening and ending tag mismatch",
        ),
    ],
    ids=["empty", "csv", "mismatched_tag"],
)
def test_check_not_xml(data: bytes, line: int, message: str) -> None:
    [problem] = check_log_document(data)
    assert problem.line == line
    assert message in problem.message


def test_check_no_log() -> None:
    data = b'<logs xmlns="http://www.witsml.org/schemas/1series" version="1.4.1.1"/>'
    assert check_log_document(data) == [
        Problem(1, "<logs> contains no <log> element: a document holds one or more")
    ]


def test_check_external_entity_not_loaded(tmp_path: Path) -> None:
    """An external entity gets the DOCTYPE problem, and the file it names is never read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("do-not-read-me")
    data = (
        b'<?xml version="1.0"?>\n<!DOCTYPE logs [<!ENTITY x SYSTEM "'
        + secret.as_uri().encode()
        + b'">]>\n'
        + BASE.encode().split(b"\n", 1)[1].replace(b"Example 1H<", b"&x;<")
    )

    problems = check_log_document(data)

    assert len(problems) == 1
    assert problems[0].line == 1
    assert problems[0].message.startswith("the document has a DOCTYPE declaration")
    assert "do-not-read-me" not in repr(problems)


# schema_problems


def test_schema_accepts_own_document(witsml_xsd_dir: Path) -> None:
    assert schema_problems(build_document(HEADER, CURVES, ROWS), witsml_xsd_dir) == []


def test_schema_reports_lines(witsml_xsd_dir: Path) -> None:
    document = variant(
        ("<indexType>date time<", "<indexType>datetime<"),
        (
            "<typeLogData>double</typeLogData>\n    </logCurveInfo>\n    <logData>",
            "<typeLogData>real</typeLogData>\n    </logCurveInfo>\n    <logData>",
        ),
    )
    problems = schema_problems(document, witsml_xsd_dir)
    assert [p.line for p in problems] == [7, 24]
    assert "'indexType': [facet 'enumeration'] The value 'datetime'" in problems[0].message
    assert WITSML_NS not in problems[0].message


def test_schema_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"the schema folder {tmp_path} has no obj_log.xsd"):
        schema_problems(BASE.encode(), tmp_path)


# parse_log_documents


def test_parse_merges_zones_and_nulls() -> None:
    [parsed] = parse_log_documents(BASE.encode())
    assert parsed.header == HEADER
    assert parsed.curves == (Curve("SPPA", "psi", "SPPA"), Curve("RPM", "", "RPM"))
    assert parsed.rows == (
        (T0_US, ("1523.4", None)),
        (T0_US + 1_500_000, ("1523.6", None)),
        (T0_US + 2_000_000, ("1e-07", "120")),
    )


def test_parse_accepts_bom() -> None:
    assert parse_log_documents(b"\xef\xbb\xbf" + BASE.encode()) == parse_log_documents(
        BASE.encode()
    )


def test_parse_rejects_problem() -> None:
    with pytest.raises(ValueError, match=r"on line 27: mnemonicList names 'ROP', which has no"):
        parse_log_documents(variant(("TIME,SPPA,RPM", "TIME,SPPA,ROP")))


def test_parse_rejects_depth_log() -> None:
    document = variant(
        ("<indexType>date time<", "<indexType>measured depth<"),
        ("<startDateTimeIndex>2024-05-01T06:00:00Z</startDateTimeIndex>", "<!-- -->"),
        ("<typeLogData>date time<", "<typeLogData>double<"),
        ("<unit>s</unit>", "<unit>m</unit>"),
        ("s,psi,", "m,psi,"),
        ("2024-05-01T06:00:00Z,", "100.5,"),
        ("2024-05-01T06:00:01.5+00:00,", "101,"),
        ("2024-05-01T08:00:02+02:00,", "102,"),
    )
    assert check_log_document(document) == []
    with pytest.raises(ValueError, match="has indexType 'measured depth': only logs indexed by"):
        parse_log_documents(document)


def test_parse_rejects_string_curve() -> None:
    document = variant(
        (
            "<typeLogData>double</typeLogData>\n    </logCurveInfo>\n    <logData>",
            "<typeLogData>string</typeLogData>\n    </logCurveInfo>\n    <logData>",
        ),
    )
    with pytest.raises(ValueError, match="curve 'RPM' of log 'rig-07-time' on line 22"):
        parse_log_documents(document)


def test_parse_curve_without_column() -> None:
    document = variant(
        ("TIME,SPPA,RPM", "TIME,RPM"),
        ("s,psi,", "s,"),
        ("Z,1523.4,-999.25<", "Z,-999.25<"),
        ("+00:00,1523.6,<", "+00:00,<"),
        ("+02:00,1e-07,120<", "+02:00,120<"),
    )
    [parsed] = parse_log_documents(document)
    assert [c.mnemonic for c in parsed.curves] == ["RPM", "SPPA"]
    assert parsed.rows[2] == (T0_US + 2_000_000, ("120", None))
