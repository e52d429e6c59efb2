"""WITSML 1.4.1.1 time logs: build rows and documents from readings, and check documents.

This module does no I/O apart from reading the schema files in `schema_problems`.
The sink builds documents with it, the reference service checks and parses what
it receives with it, and `rig-agent witsml validate` reports the problems it finds.

`check_log_document` enforces the rules that WITSML servers apply on top of the
XML schema, such as unique mnemonics, the index curve first in `mnemonicList`,
a `unitList` that matches the curves and rows as wide as `mnemonicList`.
"""

from __future__ import annotations

import datetime as dt
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lxml import etree  # type: ignore[import-untyped]

from buffer.reading import Quality, StoredReading

__all__ = [
    "FORBIDDEN_MNEMONIC_CHARS",
    "INDEX_MNEMONIC",
    "INDEX_UNIT",
    "MAX_ROW_PROBLEMS",
    "NUMERIC_TYPES",
    "TIME_UNITS",
    "WITSML_NS",
    "WITSML_VERSION",
    "Curve",
    "LogHeader",
    "ParsedLog",
    "Problem",
    "Row",
    "build_document",
    "build_rows",
    "check_log_document",
    "format_number",
    "format_time",
    "is_number_text",
    "parse_log_documents",
    "parse_time",
    "schema_problems",
    "split_rows",
]

WITSML_NS = "http://www.witsml.org/schemas/1series"
WITSML_VERSION = "1.4.1.1"
INDEX_MNEMONIC = "TIME"
INDEX_UNIT = "s"
FORBIDDEN_MNEMONIC_CHARS = "'\"<>/\\&,"
"""Characters that WITSML servers reject in a mnemonic."""

NUMERIC_TYPES = frozenset({"double", "float", "int", "long", "short", "byte"})
"""Values of `typeLogData` whose columns contain numbers."""
TIME_UNITS = frozenset(
    {
        "s", "a", "cs", "d", "Ga", "h", "100s", "Ma",
        "min", "ms", "ms/2", "ns", "ps", "us", "wk", "100ka",
    }
)  # fmt: skip
"""Units of time that a date time index curve may have: the type TimeUom of the 1.4.1.1 schema."""
MAX_ROW_PROBLEMS = 100
"""Maximum problems listed for the data rows of one log. One more problem counts the rest."""

MAX_UID_CHARS = 64
MAX_NAME_CHARS = 64
MAX_MNEMONIC_CHARS = 32
VERSION_PATTERN = re.compile(r"1\.[4-9]\.[0-9]\.([0-9]|[1-9][0-9])", re.ASCII)
"""The `version` attribute of `<logs>` as the 1.4.1.x schema restricts it."""

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)
_DATE_TIME = re.compile(
    r"(?P<year>\d{4})-(?P<month>\d{2})-(?P<day>\d{2})"
    r"T(?P<hour>\d{2}):(?P<minute>\d{2}):(?P<second>\d{2})"
    r"(?:\.(?P<fraction>\d{1,9}))?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?",
    re.ASCII,
)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_EPOCH_ORDINAL = _EPOCH.date().toordinal()
_WHITESPACE = re.compile(r"\s")
_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


# Data types


@dataclass(frozen=True, slots=True)
class Curve:
    """One data column of a log. The index curve TIME is not a Curve.

    An empty `unit` means unitless: the `<unit>` element is left out and the
    curve's `unitList` entry is empty.
    """

    mnemonic: str
    unit: str
    uid: str
    description: str = ""


@dataclass(frozen=True, slots=True)
class LogHeader:
    """Identity of a log and the text it writes for a null value.

    An empty `null_value` leaves `<nullValue>` out, so nulls are empty fields,
    which is the WITSML default.
    """

    well_uid: str
    well_name: str
    wellbore_uid: str
    wellbore_name: str
    log_uid: str
    log_name: str
    null_value: str


@dataclass(frozen=True, slots=True)
class Row:
    """One row of a time log: its index and one value per data curve.

    `ts_us` is UTC microseconds since the Unix epoch at the start of the row
    period. A value is a float, the text of a number (written as given, for
    re-emitting stored text unchanged), or None for null.
    """

    ts_us: int
    values: tuple[float | str | None, ...]


@dataclass(frozen=True, slots=True)
class Problem:
    """One broken rule in a document.

    `line` is the 1-based line of the element at fault, or None when the
    problem is not tied to one line. `message` names the element or value and
    the rule.
    """

    line: int | None
    message: str


@dataclass(frozen=True, slots=True)
class ParsedLog:
    """A time log read from a document that `check_log_document` accepted.

    `curves` are the data curves (the index excluded) in `mnemonicList` order,
    followed by curves that have a `logCurveInfo` but no column. Each row is the
    index in UTC microseconds and, per curve, the value's text as written
    (stripped) or None for null.
    """

    header: LogHeader
    curves: tuple[Curve, ...]
    rows: tuple[tuple[int, tuple[str | None, ...]], ...]


# Rows


def build_rows(
    readings: Iterable[StoredReading],
    column_of: Callable[[str, str], int | None],
    width: int,
    period_us: int,
) -> list[Row]:
    """Group readings into rows of `period_us` microseconds, one column per curve.

    `column_of(source, channel)` returns the column of a channel, or None to
    ignore its readings. A row starts at a multiple of `period_us` since the
    epoch. Each cell contains the value of the latest usable reading in that period
    by (ts_us, seq), so arrival order does not matter. A usable reading has
    quality good or uncertain and a finite value. Rows come out in increasing
    time, and a period in which no column has a usable reading gives no row.
    """
    if period_us <= 0:
        message = f"row period must be a positive number of microseconds, got {period_us}"
        raise ValueError(message)
    # For each row start: per column, the (ts_us, seq, value) of the latest usable reading.
    cells: dict[int, list[tuple[int, int, float] | None]] = {}
    for reading in readings:
        column = column_of(reading.source, reading.channel)
        if column is None:
            continue
        if not 0 <= column < width:
            message = (
                f"column {column} of {reading.source}/{reading.channel} is outside "
                f"the {width} curves of the log"
            )
            raise ValueError(message)
        value = reading.value
        if reading.quality is Quality.BAD or value is None or not math.isfinite(value):
            continue
        start = reading.ts_us // period_us * period_us
        row = cells.setdefault(start, [None] * width)
        current = row[column]
        if current is None or (reading.ts_us, reading.seq) > current[:2]:
            row[column] = (reading.ts_us, reading.seq, value)
    return [
        Row(start, tuple(None if cell is None else cell[2] for cell in cells[start]))
        for start in sorted(cells)
    ]


def split_rows(rows: Sequence[Row], max_rows: int) -> list[list[Row]]:
    """Split rows into consecutive chunks of at most `max_rows`. No rows give no chunk."""
    if max_rows < 1:
        message = f"max_rows must be at least 1, got {max_rows}"
        raise ValueError(message)
    return [list(rows[start : start + max_rows]) for start in range(0, len(rows), max_rows)]


# Values


def format_time(ts_us: int) -> str:
    """Write UTC microseconds since the epoch as an xsd:dateTime in UTC.

    The fraction of a second appears only when it is not zero, without trailing
    zeros: 2024-05-01T06:00:00Z, 2024-05-01T06:00:00.25Z.
    """
    seconds, micros = divmod(ts_us, 1_000_000)
    try:
        moment = _EPOCH + dt.timedelta(seconds=seconds)
    except OverflowError:
        message = f"timestamp {ts_us} us is outside the years 1 to 9999 that a log can hold"
        raise ValueError(message) from None
    text = (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}"
        f"T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
    )
    if micros:
        text += "." + f"{micros:06d}".rstrip("0")
    return text + "Z"


def format_number(value: float) -> str:
    """Write a number as the shortest text that reads back as the same float.

    Python's `repr` is used: "." as the decimal point whatever the locale, and
    an exponent for very small or large values (1e-07, 1e+16). NaN and
    infinity raise ValueError because a log must hold the null value instead.
    """
    number = float(value)
    if not math.isfinite(number):
        message = (
            f"cannot write {value!r} in a WITSML log: NaN and infinity are not allowed, "
            "write the null value instead"
        )
        raise ValueError(message)
    return repr(number)


def is_number_text(text: str) -> bool:
    """Return whether `text` is a decimal number with "." as the decimal point.

    Leading and trailing whitespace is allowed. NaN, infinity, a decimal comma,
    digit group separators and non-ASCII digits are not numbers here.
    """
    return _NUMBER.fullmatch(text.strip()) is not None


def parse_time(text: str) -> int:
    """Read an xsd:dateTime that has a time zone and return UTC microseconds since the epoch.

    The zone is Z or an offset of the form +hh:mm or -hh:mm, so equal instants
    written with different zones give the same result. 0 to 9 fraction digits
    are accepted and digits past microseconds are dropped. Surrounding
    whitespace is ignored, as the schema does. Anything else raises ValueError.
    """
    value = text.strip()
    match = _DATE_TIME.fullmatch(value)
    if match is None:
        message = (
            f"invalid date-time {text!r}: expected the form 2024-05-01T06:00:00Z, "
            "with 0 to 9 fraction digits after the seconds and a zone (Z or +hh:mm)"
        )
        raise ValueError(message)
    if match["zone"] is None:
        message = f"date-time {text!r} has no time zone: add Z for UTC or an offset such as +01:00"
        raise ValueError(message)
    try:
        date = dt.date(int(match["year"]), int(match["month"]), int(match["day"]))
    except ValueError:
        message = f"invalid date-time {text!r}: the date does not exist"
        raise ValueError(message) from None
    hour, minute, second = int(match["hour"]), int(match["minute"]), int(match["second"])
    fraction = match["fraction"] or ""
    # The schema allows 24:00:00 for the midnight that ends a day.
    end_of_day = hour == 24 and minute == 0 and second == 0 and not fraction.strip("0")
    if (hour > 23 and not end_of_day) or minute > 59 or second > 59:
        message = f"invalid date-time {text!r}: the time of day does not exist"
        raise ValueError(message)
    offset_seconds = _zone_offset_seconds(match["zone"], text)
    days = date.toordinal() - _EPOCH_ORDINAL
    seconds = days * 86_400 + hour * 3600 + minute * 60 + second - offset_seconds
    return seconds * 1_000_000 + int(fraction[:6].ljust(6, "0"))


def _zone_offset_seconds(zone: str, text: str) -> int:
    if zone == "Z":
        return 0
    hours, minutes = int(zone[1:3]), int(zone[4:6])
    if minutes > 59 or hours > 14 or (hours == 14 and minutes > 0):
        message = f"invalid date-time {text!r}: zone offset {zone} is outside -14:00 to +14:00"
        raise ValueError(message)
    offset = hours * 3600 + minutes * 60
    return -offset if zone[0] == "-" else offset


# Building documents


def build_document(header: LogHeader, curves: Sequence[Curve], rows: Sequence[Row]) -> bytes:
    """Write one time log as a UTF-8 WITSML 1.4.1.1 `<logs>` document.

    The index curve TIME (unit s, typeLogData "date time") comes first, then
    each curve as typeLogData "double". Children follow the schema's order, and
    startDateTimeIndex and endDateTimeIndex are written only when there are rows.
    Raises ValueError for a row whose width differs from `curves`, rows not in
    strictly increasing time, a NaN or infinite value, or text that is not a
    number.
    """
    _check_rows(rows, len(curves))
    root = etree.Element(_tag("logs"), nsmap={None: WITSML_NS})
    root.set("version", WITSML_VERSION)
    log = etree.SubElement(root, _tag("log"))
    log.set("uidWell", header.well_uid)
    log.set("uidWellbore", header.wellbore_uid)
    log.set("uid", header.log_uid)
    _add(log, "nameWell", header.well_name)
    _add(log, "nameWellbore", header.wellbore_name)
    _add(log, "name", header.log_name)
    _add(log, "indexType", "date time")
    if rows:
        _add(log, "startDateTimeIndex", format_time(rows[0].ts_us))
        _add(log, "endDateTimeIndex", format_time(rows[-1].ts_us))
    _add(log, "direction", "increasing")
    _add(log, "indexCurve", INDEX_MNEMONIC)
    if header.null_value:
        _add(log, "nullValue", header.null_value)

    index = Curve(INDEX_MNEMONIC, INDEX_UNIT, INDEX_MNEMONIC)
    _add_curve_info(log, index, "date time")
    for curve in curves:
        _add_curve_info(log, curve, "double")

    log_data = etree.SubElement(log, _tag("logData"))
    _add(log_data, "mnemonicList", ",".join([INDEX_MNEMONIC, *(c.mnemonic for c in curves)]))
    _add(log_data, "unitList", ",".join([INDEX_UNIT, *(c.unit for c in curves)]))
    for row in rows:
        cells = [format_time(row.ts_us)]
        cells.extend(_cell_text(value, header.null_value) for value in row.values)
        _add(log_data, "data", ",".join(cells))

    etree.indent(root, space="  ")
    body: bytes = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    return _XML_DECLARATION + body + b"\n"


def _check_rows(rows: Sequence[Row], width: int) -> None:
    previous: int | None = None
    for row in rows:
        if len(row.values) != width:
            message = (
                f"row at {format_time(row.ts_us)} has {len(row.values)} values "
                f"but the log has {width} curves"
            )
            raise ValueError(message)
        if previous is not None and row.ts_us <= previous:
            message = (
                f"row at {format_time(row.ts_us)} does not come after the row at "
                f"{format_time(previous)}: rows must be in strictly increasing time"
            )
            raise ValueError(message)
        previous = row.ts_us


def _cell_text(value: float | str | None, null_value: str) -> str:
    if value is None:
        return null_value
    if isinstance(value, str):
        if not is_number_text(value):
            message = f"value {value!r} is not a number: write digits with '.' as the decimal point"
            raise ValueError(message)
        return value.strip()
    return format_number(value)


def _tag(name: str) -> str:
    return f"{{{WITSML_NS}}}{name}"


def _add(parent: Any, name: str, text: str) -> Any:
    element = etree.SubElement(parent, _tag(name))
    element.text = text
    return element


def _add_curve_info(log: Any, curve: Curve, type_log_data: str) -> None:
    info = etree.SubElement(log, _tag("logCurveInfo"))
    info.set("uid", curve.uid)
    _add(info, "mnemonic", curve.mnemonic)
    if curve.unit:
        _add(info, "unit", curve.unit)
    if curve.description:
        _add(info, "curveDescription", curve.description)
    _add(info, "typeLogData", type_log_data)


# Parsing


def _parse_xml(data: bytes) -> Any:
    """Parse a document without loading DTDs, network resources or entities."""
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False
    )
    return etree.fromstring(data, parser)


def _doctype_problem(root: Any) -> Problem | None:
    """Return a problem for a document type declaration, which WITSML documents never carry.

    Entities stay unexpanded here, so a row holding `&name;` would be read as
    a null field while a server that expands entities reads a value: the two
    would disagree, and libxml2's schema check fails on unexpanded entities.
    """
    docinfo = root.getroottree().docinfo
    if not docinfo.doctype and docinfo.internalDTD is None and docinfo.externalDTD is None:
        return None
    return Problem(
        1,
        "the document has a DOCTYPE declaration: WITSML documents must not declare a DTD "
        "or entities, so remove the <!DOCTYPE ...> part and write the values in place",
    )


def _syntax_problem(error: Any) -> Problem:
    line = error.lineno if isinstance(error.lineno, int) and error.lineno > 0 else None
    return Problem(line, f"the file is not well-formed XML: {error.msg}")


def _local_name(element: Any) -> str | None:
    """Return the tag without its namespace, or None for a comment or processing instruction."""
    if not isinstance(element.tag, str):
        return None
    return str(etree.QName(element).localname)


def _namespace(element: Any) -> str | None:
    namespace = etree.QName(element).namespace
    return None if namespace is None else str(namespace)


def _children(parent: Any, name: str) -> list[Any]:
    """Return the child elements called `name` in the parent's namespace."""
    namespace = _namespace(parent)
    return [
        child for child in parent if _local_name(child) == name and _namespace(child) == namespace
    ]


def _child(parent: Any, name: str) -> Any | None:
    children = _children(parent, name)
    return children[0] if children else None


def _text(element: Any) -> str:
    """Return the text of an element, comments left out."""
    if len(element) == 0:
        return str(element.text or "")
    return str(element.xpath("string()"))


def _line(element: Any) -> int | None:
    line = element.sourceline
    return line if isinstance(line, int) else None


# Checking documents


def check_log_document(data: bytes) -> list[Problem]:
    """Check a `<logs>` document against the rules WITSML 1.4.1.1 servers enforce.

    Returns the problems sorted by line, each with the line of the element at
    fault, and an empty list for a document that passes. A UTF-8 byte order mark
    is fine, and a file that is not XML gives one problem. The XML schema is
    checked separately, by `schema_problems`.
    """
    try:
        root = _parse_xml(data)
    except etree.XMLSyntaxError as exc:
        return [_syntax_problem(exc)]
    doctype = _doctype_problem(root)
    if doctype is not None:
        return [doctype]
    problems: list[Problem] = []
    _check_root(root, problems)
    logs = _children(root, "log")
    if not logs:
        problems.append(
            Problem(_line(root), "<logs> contains no <log> element: a document holds one or more")
        )
    for log in logs:
        _LogCheck(log, problems).run()
    problems.sort(key=lambda p: -1 if p.line is None else p.line)
    return problems


def _check_root(root: Any, problems: list[Problem]) -> None:
    line = _line(root)
    name = _local_name(root)
    namespace = _namespace(root)
    if name != "logs":
        problems.append(
            Problem(line, f"the root element is <{name}>: a log document starts with <logs>")
        )
    if namespace != WITSML_NS:
        found = "no namespace" if namespace is None else f"namespace {namespace}"
        problems.append(
            Problem(
                line,
                f"<{name}> is in {found}: WITSML 1.4.1.1 elements are in the default "
                f'namespace, add xmlns="{WITSML_NS}"',
            )
        )
    version = root.get("version")
    if version is None:
        problems.append(
            Problem(line, f'<{name}> has no version attribute: add version="{WITSML_VERSION}"')
        )
    elif VERSION_PATTERN.fullmatch(version) is None:
        problems.append(
            Problem(
                line,
                f"<{name}> has version {version!r}: a WITSML 1.4.1 document needs "
                f'a version such as "{WITSML_VERSION}"',
            )
        )


@dataclass
class _CurveInfo:
    """Fields of one `logCurveInfo` element that the checks use."""

    element: Any
    mnemonic: str | None
    mnemonic_line: int | None
    unit: str
    type_log_data: str | None
    null_value: str | None


@dataclass
class _LogCheck:
    """The checks of one `<log>` element, appending to a shared problem list."""

    log: Any
    problems: list[Problem]
    infos: list[_CurveInfo] = field(default_factory=list)
    index_curve: str | None = None
    index_type: str | None = None
    null_value: str = ""
    delimiter: str = ","
    row_problems: int = 0

    def run(self) -> None:
        self._check_identity()
        self._check_header()
        self._check_curve_infos()
        self._check_index_curve()
        for log_data in _children(self.log, "logData"):
            self._check_log_data(log_data)
        if self.row_problems > MAX_ROW_PROBLEMS:
            more = self.row_problems - MAX_ROW_PROBLEMS
            self.problems.append(
                Problem(None, f"log {self._uid_text()}: {more} more data row problems not listed")
            )

    def _report(self, element: Any, message: str) -> None:
        self.problems.append(Problem(_line(element), message))

    def _uid_text(self) -> str:
        uid = self.log.get("uid")
        return repr(uid) if uid else f"on line {_line(self.log)}"

    def _check_identity(self) -> None:
        for attribute in ("uidWell", "uidWellbore", "uid"):
            value = self.log.get(attribute)
            if not value:
                self._report(
                    self.log,
                    f"<log> has no {attribute} attribute: a server stores a log only with "
                    "uidWell, uidWellbore and uid",
                )
            else:
                self._check_uid(self.log, f"<log> {attribute}", value)

    def _check_uid(self, element: Any, what: str, value: str) -> None:
        if len(value) > MAX_UID_CHARS:
            self._report(
                element, f"{what} {value!r} has {len(value)} characters: at most 64 are allowed"
            )
        if _WHITESPACE.search(value):
            self._report(element, f"{what} {value!r} contains whitespace: uids may not")

    def _check_header(self) -> None:
        for name in ("nameWell", "nameWellbore", "name"):
            element = _child(self.log, name)
            if element is None or not _text(element).strip():
                where = self.log if element is None else element
                self._report(
                    where, f"<log> has no {name}: every log needs nameWell, nameWellbore and name"
                )
                continue
            text = _text(element)
            if len(text) > MAX_NAME_CHARS:
                self._report(element, f"{name} has {len(text)} characters: at most 64 are allowed")

        index_type = _child(self.log, "indexType")
        if index_type is None or not _text(index_type).strip():
            self._report(self.log, '<log> has no indexType: add one such as "date time"')
        else:
            self.index_type = _text(index_type).strip()

        null_value = _child(self.log, "nullValue")
        if null_value is not None:
            self.null_value = _text(null_value).strip()
            if not self.null_value:
                self._report(
                    null_value,
                    "nullValue is empty: give a value such as -999.25, or leave the element "
                    "out so empty fields are null",
                )

        delimiter = _child(self.log, "dataDelimiter")
        if delimiter is not None and _text(delimiter):
            self.delimiter = _text(delimiter)

        if self.index_type == "date time":
            for name in ("startDateTimeIndex", "endDateTimeIndex"):
                element = _child(self.log, name)
                if element is None:
                    continue
                try:
                    parse_time(_text(element))
                except ValueError as exc:
                    self._report(element, f"{name}: {exc}")

    def _check_curve_infos(self) -> None:
        first_line_of: dict[str, int | None] = {}
        first_uid_line: dict[str, int | None] = {}
        for element in _children(self.log, "logCurveInfo"):
            info = self._read_curve_info(element)
            self.infos.append(info)

            uid = element.get("uid")
            if not uid:
                self._report(element, "logCurveInfo has no uid attribute: every curve needs a uid")
            else:
                self._check_uid(element, "logCurveInfo uid", uid)
                if uid in first_uid_line:
                    self._report(
                        element,
                        f"logCurveInfo uid {uid!r} is used twice in this log (first on line "
                        f"{first_uid_line[uid]}): curve uids must be unique",
                    )
                else:
                    first_uid_line[uid] = _line(element)

            mnemonic = info.mnemonic
            if mnemonic is None:
                self._report(element, "logCurveInfo has no mnemonic: every curve needs one")
                continue
            where = info.mnemonic_line
            if mnemonic in first_line_of:
                self.problems.append(
                    Problem(
                        where,
                        f"mnemonic {mnemonic!r} is used twice in this log (first on line "
                        f"{first_line_of[mnemonic]}): mnemonics must be unique",
                    )
                )
            else:
                first_line_of[mnemonic] = where
            self._check_mnemonic_text(where, mnemonic)
            if info.type_log_data is None:
                self._report(element, f"logCurveInfo {mnemonic!r} has no typeLogData")

    def _read_curve_info(self, element: Any) -> _CurveInfo:
        mnemonic_element = _child(element, "mnemonic")
        unit_element = _child(element, "unit")
        type_element = _child(element, "typeLogData")
        null_element = _child(element, "nullValue")
        mnemonic = None if mnemonic_element is None else _text(mnemonic_element).strip()
        return _CurveInfo(
            element=element,
            mnemonic=mnemonic or None,
            mnemonic_line=_line(element if mnemonic_element is None else mnemonic_element),
            unit="" if unit_element is None else _text(unit_element).strip(),
            type_log_data=None if type_element is None else _text(type_element).strip(),
            null_value=None if null_element is None else _text(null_element).strip(),
        )

    def _check_mnemonic_text(self, line: int | None, mnemonic: str) -> None:
        if len(mnemonic) > MAX_MNEMONIC_CHARS:
            self.problems.append(
                Problem(
                    line,
                    f"mnemonic {mnemonic!r} has {len(mnemonic)} characters: at most 32 are allowed",
                )
            )
        bad = sorted({char for char in mnemonic if char in FORBIDDEN_MNEMONIC_CHARS})
        if bad:
            self.problems.append(
                Problem(
                    line,
                    f"mnemonic {mnemonic!r} contains {' '.join(bad)}: mnemonics may not "
                    f"contain any of {' '.join(FORBIDDEN_MNEMONIC_CHARS)}",
                )
            )

    def _infos_named(self, mnemonic: str) -> list[_CurveInfo]:
        return [info for info in self.infos if info.mnemonic == mnemonic]

    def _check_index_curve(self) -> None:
        element = _child(self.log, "indexCurve")
        if element is None or not _text(element).strip():
            self._report(self.log, "<log> has no indexCurve: name the mnemonic of the index column")
            return
        self.index_curve = _text(element).strip()
        infos = self._infos_named(self.index_curve)
        if not infos:
            self._report(
                element,
                f"indexCurve {self.index_curve!r} has no logCurveInfo: describe the index "
                "curve like every other curve",
            )
            return
        if self.index_type != "date time":
            return
        info = infos[0]
        type_element = _child(info.element, "typeLogData")
        if info.type_log_data is not None and info.type_log_data != "date time":
            self._report(
                type_element,
                f"index curve {self.index_curve!r} has typeLogData {info.type_log_data!r}: "
                'the index of a date time log needs typeLogData "date time"',
            )
        if info.unit and info.unit not in TIME_UNITS:
            self._report(
                _child(info.element, "unit"),
                f"index curve {self.index_curve!r} has unit {info.unit!r}, which is not a unit "
                "of time: use s or leave the unit out",
            )

    def _check_log_data(self, log_data: Any) -> None:
        mnemonic_list = _child(log_data, "mnemonicList")
        if mnemonic_list is None:
            self._report(log_data, "logData has no mnemonicList: name the column of each value")
            return
        mnemonics = [item.strip() for item in _text(mnemonic_list).split(",")]
        columns = self._check_mnemonic_list(mnemonic_list, mnemonics)
        self._check_unit_list(log_data, mnemonics, columns)
        self._check_data_rows(log_data, mnemonics, columns)

    def _check_mnemonic_list(self, element: Any, mnemonics: list[str]) -> list[_CurveInfo | None]:
        """Check the list and return the curve of each column (None when it has none)."""
        if self.index_curve is not None and mnemonics[0] != self.index_curve:
            self._report(
                element,
                f"mnemonicList starts with {mnemonics[0]!r}: the index curve "
                f"{self.index_curve!r} must be the first column",
            )
        seen: Counter[str] = Counter()
        columns: list[_CurveInfo | None] = []
        for mnemonic in mnemonics:
            if seen[mnemonic] == 1:
                self._report(
                    element,
                    f"mnemonicList names {mnemonic!r} more than once: each curve may have "
                    "one column",
                )
            infos = self._infos_named(mnemonic)
            if not infos:
                self._report(
                    element,
                    f"mnemonicList names {mnemonic!r}, which has no logCurveInfo: describe "
                    "each curve in a logCurveInfo",
                )
                columns.append(None)
            else:
                # The k-th column of a repeated mnemonic belongs to its k-th logCurveInfo.
                columns.append(infos[min(seen[mnemonic], len(infos) - 1)])
            seen[mnemonic] += 1
        return columns

    def _check_unit_list(
        self, log_data: Any, mnemonics: list[str], columns: list[_CurveInfo | None]
    ) -> None:
        unit_list = _child(log_data, "unitList")
        if unit_list is None:
            self._report(log_data, "logData has no unitList: give the unit of each column")
            return
        units = [item.strip() for item in _text(unit_list).split(",")]
        if len(units) != len(mnemonics):
            self._report(
                unit_list,
                f"unitList has {len(units)} entries but mnemonicList has {len(mnemonics)}: "
                "give one unit per column, empty for a unitless curve",
            )
            return
        for number, (mnemonic, unit, info) in enumerate(
            zip(mnemonics, units, columns, strict=True), start=1
        ):
            if info is not None and unit != info.unit:
                self._report(
                    unit_list,
                    f"unitList entry {number} ({mnemonic!r}) is {unit!r} but its logCurveInfo "
                    f"on line {_line(info.element)} has unit {info.unit!r}: the units must match",
                )

    def _check_data_rows(
        self, log_data: Any, mnemonics: list[str], columns: list[_CurveInfo | None]
    ) -> None:
        direction_element = _child(self.log, "direction")
        direction = "increasing" if direction_element is None else _text(direction_element).strip()
        time_index = self.index_type == "date time"
        previous: float | None = None
        for data in _children(log_data, "data"):
            fields = _text(data).split(self.delimiter)
            if len(fields) != len(mnemonics):
                self._row_problem(
                    data,
                    f"data row has {len(fields)} values but mnemonicList names "
                    f"{len(mnemonics)} columns",
                )
                continue
            index = self._row_index(data, fields[0], time_index=time_index)
            if index is not None and previous is not None:
                if direction == "increasing" and index <= previous:
                    self._row_problem(
                        data,
                        f"index {fields[0].strip()!r} does not come after the previous row: "
                        "rows of an increasing log must be in strictly increasing order",
                    )
                elif direction == "decreasing" and index >= previous:
                    self._row_problem(
                        data,
                        f"index {fields[0].strip()!r} does not come before the previous row: "
                        "rows of a decreasing log must be in strictly decreasing order",
                    )
            if index is not None:
                previous = index
            start = 1 if time_index else 0
            for number in range(start, len(fields)):
                self._check_value(data, number, mnemonics[number], fields[number], columns[number])

    def _row_index(self, data: Any, text: str, *, time_index: bool) -> float | None:
        """Return the row's index as a number for the order check, or None when unusable."""
        if time_index:
            try:
                return float(parse_time(text))
            except ValueError as exc:
                self._row_problem(data, f"index of the data row: {exc}")
                return None
        if is_number_text(text):
            return float(text)
        return None

    def _check_value(
        self, data: Any, number: int, mnemonic: str, text: str, info: _CurveInfo | None
    ) -> None:
        if info is None or info.type_log_data not in NUMERIC_TYPES:
            return
        value = text.strip()
        if not value or value == self.null_value or value == info.null_value:
            return
        if not is_number_text(value):
            null = self.null_value or "an empty field"
            self._row_problem(
                data,
                f"value {value!r} in column {number + 1} ({mnemonic!r}) is not a number: "
                f"write digits with '.' as the decimal point, or the null value ({null})",
            )

    def _row_problem(self, data: Any, message: str) -> None:
        self.row_problems += 1
        if self.row_problems <= MAX_ROW_PROBLEMS:
            self._report(data, message)


# Schema


_schemas: dict[Path, Any] = {}
_schema_lock = threading.Lock()


def schema_problems(data: bytes, xsd_dir: Path) -> list[Problem]:
    """Validate a document against `xsd_dir/obj_log.xsd` and return each error with its line.

    The parsed schema is kept per folder for later calls. Raises
    FileNotFoundError when the folder has no obj_log.xsd, and ValueError when
    the schema cannot be loaded.
    """
    try:
        root = _parse_xml(data)
    except etree.XMLSyntaxError as exc:
        return [_syntax_problem(exc)]
    doctype = _doctype_problem(root)
    if doctype is not None:
        return [doctype]
    with _schema_lock:
        schema = _load_schema(xsd_dir)
        # An XMLSchema keeps its error log on the object, so validate under the lock.
        schema.validate(root)
        errors = list(schema.error_log)
    return [Problem(_error_line(error), _error_message(error)) for error in errors]


def _load_schema(xsd_dir: Path) -> Any:
    path = xsd_dir / "obj_log.xsd"
    if not path.is_file():
        message = (
            f"the schema folder {xsd_dir} has no obj_log.xsd: give the folder of the "
            "WITSML 1.4.1.1 data schemas"
        )
        raise FileNotFoundError(message)
    key = path.resolve()
    schema = _schemas.get(key)
    if schema is None:
        try:
            schema = etree.XMLSchema(etree.parse(str(path)))
        except (etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
            message = f"cannot load the schema {path}: {exc}"
            raise ValueError(message) from None
        _schemas[key] = schema
    return schema


def _error_line(error: Any) -> int | None:
    line = error.line
    return line if isinstance(line, int) and line > 0 else None


def _error_message(error: Any) -> str:
    return str(error.message).replace(f"{{{WITSML_NS}}}", "")


# Reading accepted documents


def parse_log_documents(data: bytes) -> list[ParsedLog]:
    """Read the time logs of a document, for storing them.

    Raises ValueError naming the first problem when `check_log_document` finds
    any, when a log is not indexed by date time, or when a data curve is not
    numeric.
    """
    problems = check_log_document(data)
    if problems:
        first = problems[0]
        where = "" if first.line is None else f" on line {first.line}"
        more = f" ({len(problems) - 1} more)" if len(problems) > 1 else ""
        message = f"invalid WITSML log document{where}: {first.message}{more}"
        raise ValueError(message)
    root = _parse_xml(data)
    return [_parse_log(log) for log in _children(root, "log")]


def _parse_log(log: Any) -> ParsedLog:
    uid = str(log.get("uid"))
    index_type = _text(_require(_child(log, "indexType"))).strip()
    if index_type != "date time":
        message = (
            f"log {uid!r} on line {_line(log)} has indexType {index_type!r}: "
            'only logs indexed by "date time" are accepted'
        )
        raise ValueError(message)
    null_element = _child(log, "nullValue")
    header = LogHeader(
        well_uid=str(log.get("uidWell")),
        well_name=_text(_require(_child(log, "nameWell"))),
        wellbore_uid=str(log.get("uidWellbore")),
        wellbore_name=_text(_require(_child(log, "nameWellbore"))),
        log_uid=uid,
        log_name=_text(_require(_child(log, "name"))),
        null_value="" if null_element is None else _text(null_element).strip(),
    )
    index_curve = _text(_require(_child(log, "indexCurve"))).strip()
    delimiter_element = _child(log, "dataDelimiter")
    delimiter = "," if delimiter_element is None else (_text(delimiter_element) or ",")

    infos: dict[str, Any] = {}
    for element in _children(log, "logCurveInfo"):
        infos[_text(_require(_child(element, "mnemonic"))).strip()] = element
    order = _curve_order(log, index_curve, infos)
    curves = tuple(_parsed_curve(uid, infos[mnemonic]) for mnemonic in order)
    position = {mnemonic: number for number, mnemonic in enumerate(order)}
    curve_nulls = [_curve_null(infos[mnemonic]) for mnemonic in order]

    rows: list[tuple[int, tuple[str | None, ...]]] = []
    for log_data in _children(log, "logData"):
        mnemonics = _mnemonic_list(log_data)
        for data in _children(log_data, "data"):
            fields = _text(data).split(delimiter)
            values: list[str | None] = [None] * len(order)
            for mnemonic, text in zip(mnemonics[1:], fields[1:], strict=True):
                number = position[mnemonic]
                value = text.strip()
                if value and value != header.null_value and value != curve_nulls[number]:
                    values[number] = value
            rows.append((parse_time(fields[0]), tuple(values)))
    return ParsedLog(header, curves, tuple(rows))


def _require(element: Any | None) -> Any:
    # check_log_document has already reported a missing element, so this is a bug.
    if element is None:
        message = "a required element is missing from a log that passed the checks"
        raise ValueError(message)
    return element


def _mnemonic_list(log_data: Any) -> list[str]:
    return [item.strip() for item in _text(_require(_child(log_data, "mnemonicList"))).split(",")]


def _curve_order(log: Any, index_curve: str, infos: dict[str, Any]) -> list[str]:
    """Return the data curves in column order, then those without a column."""
    order: list[str] = []
    for log_data in _children(log, "logData"):
        order.extend(m for m in _mnemonic_list(log_data) if m != index_curve and m not in order)
    order.extend(m for m in infos if m != index_curve and m not in order)
    return order


def _parsed_curve(log_uid: str, element: Any) -> Curve:
    mnemonic = _text(_require(_child(element, "mnemonic"))).strip()
    type_element = _child(element, "typeLogData")
    type_log_data = "" if type_element is None else _text(type_element).strip()
    if type_log_data not in NUMERIC_TYPES:
        message = (
            f"curve {mnemonic!r} of log {log_uid!r} on line {_line(element)} has typeLogData "
            f"{type_log_data!r}: only numeric curves ({', '.join(sorted(NUMERIC_TYPES))}) "
            "are accepted"
        )
        raise ValueError(message)
    unit = _child(element, "unit")
    description = _child(element, "curveDescription")
    return Curve(
        mnemonic=mnemonic,
        unit="" if unit is None else _text(unit).strip(),
        uid=str(element.get("uid")),
        description="" if description is None else _text(description).strip(),
    )


def _curve_null(element: Any) -> str | None:
    null = _child(element, "nullValue")
    return None if null is None else _text(null).strip() or None
