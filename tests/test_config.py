"""The TOML config loader: line-accurate errors, the line locator, units and the summary."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from config.loader import (
    MISSING,
    ConfigError,
    ConfigIssue,
    TomlLines,
    TomlPath,
    format_path,
    load_config,
    summarize,
)
from config.units import format_duration, format_size, parse_duration, parse_size

CASES = Path(__file__).parent / "cases" / "config"
EXAMPLE = Path(__file__).parents[1] / "config" / "examples" / "agent.toml"
BROKEN = sorted(path for path in CASES.iterdir() if (path / "expected.txt").exists())

VALID = """\
[agent]
rig_id = "rig-07"

[[sources.modbus]]
name = "mud-pumps"
url = "tcp://127.0.0.1:5020"

  [[sources.modbus.points]]
  channel = "standpipe_pressure"
  address = 100
  type = "float32"
"""


def config_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "agent.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


# --- Case folders ---------------------------------------------------------------


@pytest.mark.parametrize("case", BROKEN, ids=[path.name for path in BROKEN])
def test_broken_case(case: Path) -> None:
    """Each broken file raises ConfigError whose text contains every expected fragment."""
    text = str(config_error(case / "agent.toml"))
    for fragment in (case / "expected.txt").read_text().splitlines():
        if fragment.strip():
            assert fragment in text


def test_three_errors_all_reported() -> None:
    """A file with three mistakes yields exactly three issues."""
    error = config_error(CASES / "three_errors" / "agent.toml")
    assert len(error.issues) == 3


def test_issues_sorted_by_line(tmp_path: Path) -> None:
    """Issues are listed in the order of their lines, not in the order of the model's fields."""
    text = "[mqtt]\nqos = 2\n\n[agent]\nlog_level = 1\n"
    error = config_error(write(tmp_path, text))
    assert [issue.line for issue in error.issues] == [2, 4, 5]


def test_error_one_issue_per_line() -> None:
    """str(ConfigError) contains one line per issue."""
    error = config_error(CASES / "three_errors" / "agent.toml")
    assert str(error).splitlines() == [str(issue) for issue in error.issues]


def test_error_carries_file() -> None:
    """ConfigError names the file it was raised for."""
    path = CASES / "key_typo" / "agent.toml"
    assert config_error(path).file == path


def test_issue_fields_for_bad_value() -> None:
    """An issue for a rejected value carries the raw TOML value and its 1-based line."""
    issue = config_error(CASES / "wrong_type_unit_id" / "agent.toml").issues[0]
    assert (issue.path, issue.line, issue.value) == ("sources.modbus[0].unit_id", 7, "one")


def test_issue_fields_for_missing_key() -> None:
    """An issue for a missing key carries the MISSING sentinel as its value."""
    issue = config_error(CASES / "missing_rig_id" / "agent.toml").issues[0]
    assert issue.value is MISSING


def test_cases_are_enough() -> None:
    """The case folder covers at least twelve kinds of broken config."""
    assert len(BROKEN) >= 12


# --- Single mistakes, by error kind ---------------------------------------------

AGENT = '[agent]\nrig_id = "rig-07"\n'
SOURCE = '[[sources.modbus]]\nname = "pumps"\nurl = "tcp://127.0.0.1:5020"\n'
POINT = '[[sources.modbus.points]]\nchannel = "spp"\naddress = 100\ntype = "float32"\n'

MISTAKES = [
    pytest.param(
        AGENT + 'log_format = "jsn"\n',
        'agent.toml:3: agent.log_format = "jsn": expected one of "auto", "json", "console"; '
        'did you mean "json"?',
        id="literal",
    ),
    pytest.param(
        AGENT + "metrics_listen = 9108\n",
        "agent.toml:3: agent.metrics_listen = 9108: expected a string in double quotes, got an "
        'integer; put the value in quotes: metrics_listen = "9108"',
        id="string-from-integer",
    ),
    pytest.param(
        AGENT + "[buffer]\nmax_bytes = 512\n",
        "agent.toml:4: buffer.max_bytes = 512: invalid size 512: a number needs a unit, written "
        'in quotes, such as "512MiB"',
        id="size-bare-number",
    ),
    pytest.param(
        AGENT + '[buffer]\nmax_bytes = "2 gigs"\n',
        "agent.toml:4: buffer.max_bytes = \"2 gigs\": invalid size '2 gigs'",
        id="size-unknown-unit",
    ),
    pytest.param(
        AGENT + "[mqtt]\nkeepalive = true\n",
        "agent.toml:4: mqtt.keepalive = true: expected a duration string with a unit",
        id="duration-boolean",
    ),
    pytest.param(
        AGENT + "[mqtt]\nmax_inflight = 2.5\n",
        "agent.toml:4: mqtt.max_inflight = 2.5: expected an integer, got a float",
        id="integer-from-fraction",
    ),
    pytest.param(
        AGENT + "[mqtt]\nmax_inflight = 0\n",
        "agent.toml:4: mqtt.max_inflight = 0: out of range: expected a number from 1 to 1000",
        id="range",
    ),
    pytest.param(
        AGENT + '[mqtt]\nurl = "http://broker:1883"\n',
        "agent.toml:4: mqtt.url = \"http://broker:1883\": invalid MQTT URL 'http://broker:1883'",
        id="mqtt-url",
    ),
    pytest.param(
        'agent = "rig-07"\n',
        'agent.toml:1: agent = "rig-07": expected a table, got a string',
        id="table-from-string",
    ),
    pytest.param(
        '[[agent]]\nrig_id = "rig-07"\n',
        "agent.toml:1: agent: expected a table, got an array of tables; write [agent] instead "
        "of [[agent]]",
        id="table-written-as-array",
    ),
    pytest.param(
        AGENT + SOURCE + "points = []\n",
        "agent.toml:6: sources.modbus[0].points = []: expected at least one "
        "[[sources.modbus.points]] table, got 0",
        id="empty-points",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = ""\naddress = 1\n',
        'agent.toml:7: sources.modbus[0].points[0].channel = "": must not be empty',
        id="empty-channel",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "spp"\n',
        "agent.toml:6: sources.modbus[0].points[0].address: missing required key; "
        "add address = ... to this [[sources.modbus.points]] table",
        id="missing-in-array-element",
    ),
    pytest.param(
        AGENT + SOURCE + POINT + SOURCE + POINT,
        "agent.toml:11: sources.modbus[1].name = \"pumps\": source name 'pumps' is used twice",
        id="duplicate-source",
    ),
    pytest.param(
        AGENT + "[agent.extra]\nx = 1\n",
        "agent.toml:3: agent.extra: unknown table 'extra': expected one of rig_id, data_dir",
        id="unknown-subtable",
    ),
    pytest.param(
        AGENT + 'bogus = "x"\n',
        "agent.toml:3: agent.bogus = \"x\": unknown key 'bogus': expected one of rig_id, "
        "data_dir, log_format, log_level, metrics_listen",
        id="unknown-key-no-close-match",
    ),
    pytest.param(
        AGENT + SOURCE + "unit_id = true\n" + POINT,
        "agent.toml:6: sources.modbus[0].unit_id = true: expected an integer, got a boolean",
        id="integer-from-boolean",
    ),
    pytest.param(
        AGENT + SOURCE + POINT + 'scale = "0.1"\n',
        'agent.toml:10: sources.modbus[0].points[0].scale = "0.1": expected a number, got a '
        "string; write it without quotes: scale = 0.1",
        id="quoted-number",
    ),
    pytest.param(
        AGENT + SOURCE + "unit_id = 1.0\n" + POINT,
        "agent.toml:6: sources.modbus[0].unit_id = 1.0: expected an integer, got a float",
        id="integer-from-whole-float",
    ),
]


@pytest.mark.parametrize(("text", "expected"), MISTAKES)
def test_mistake_message(tmp_path: Path, text: str, expected: str) -> None:
    """A single mistake is reported with its line, TOML path, value and expectation."""
    assert expected in str(config_error(write(tmp_path, text)))


def test_strips_pydantic_prefix(tmp_path: Path) -> None:
    """Messages from validators lose pydantic's "Value error, " prefix."""
    text = str(config_error(write(tmp_path, AGENT + '[buffer]\ncommit_interval = "x"\n')))
    assert "Value error" not in text


def test_no_pydantic_links(tmp_path: Path) -> None:
    """Messages contain no links to the pydantic documentation."""
    text = str(config_error(write(tmp_path, AGENT + "unknown = 1\n")))
    assert "errors.pydantic.dev" not in text


# --- Files that cannot be read or parsed ----------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    """A file that does not exist yields one issue that names the file."""
    path = tmp_path / "nowhere.toml"
    assert str(config_error(path)) == f"{path}: file not found; check the path"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    """A directory given as the config file is reported as such."""
    assert "is a directory" in str(config_error(tmp_path))


def test_invalid_utf8(tmp_path: Path) -> None:
    """A byte that is not UTF-8 is reported with its line."""
    path = write(tmp_path, b'[agent]\nrig_id = "r\xffg"\n')
    assert "agent.toml:2: invalid UTF-8 byte 0xff" in str(config_error(path))


def test_byte_order_mark_accepted(tmp_path: Path) -> None:
    """A UTF-8 byte order mark at the start of the file is ignored."""
    path = write(tmp_path, b"\xef\xbb\xbf" + VALID.encode())
    assert load_config(path).agent.rig_id == "rig-07"


def test_syntax_error_single_issue(tmp_path: Path) -> None:
    """Invalid TOML yields exactly one issue, with line and column."""
    issues = config_error(write(tmp_path, AGENT + "x = = 1\n")).issues
    assert [(issue.line, issue.column) for issue in issues] == [(3, 5)]


def test_unknown_syntax_message_kept(tmp_path: Path) -> None:
    """A tomllib message with no plain-words translation is shown as tomllib wrote it."""
    text = str(config_error(write(tmp_path, AGENT + 'x = "\\u12"\n')))
    assert "agent.toml:3:8: invalid TOML: Invalid hex value" in text


# --- Valid files and the summary ------------------------------------------------


def test_example_loads() -> None:
    """The shipped example config is valid."""
    assert load_config(EXAMPLE).agent.rig_id == "rig-07"


def test_example_summary_names_source() -> None:
    """The summary of the example names its source, URL and point count."""
    summary = summarize(load_config(EXAMPLE))
    assert "source drilling-plc: modbus tcp://127.0.0.1:5020, unit 1, poll every 1s" in summary
    assert "9 points" in summary


def test_example_summary_names_sink() -> None:
    """The summary shows the MQTT sink with its topic prefix filled in."""
    summary = summarize(load_config(EXAMPLE))
    assert "sink mqtt:" in summary
    assert "topic prefix rigs/rig-07, qos 1" in summary


def test_summary_buffer_line(tmp_path: Path) -> None:
    """The summary shows the buffer cap and commit interval as a config would write them."""
    text = AGENT + '[buffer]\nmax_bytes = "512MiB"\ncommit_interval = "250ms"\n'
    summary = summarize(load_config(write(tmp_path, text)))
    assert "max 512MiB, commit every 250ms" in summary


def test_float_accepts_integer(tmp_path: Path) -> None:
    """An integer is accepted where a float is expected (scale = 2)."""
    config = load_config(write(tmp_path, VALID + "  scale = 2\n"))
    assert config.sources.modbus[0].points[0].scale == 2.0


def test_summary_without_sink(tmp_path: Path) -> None:
    """Without [mqtt] the summary states that readings stay in the buffer."""
    summary = summarize(load_config(write(tmp_path, VALID)))
    assert "sinks:" in summary
    assert "stay in the local buffer" in summary


def test_summary_aligned(tmp_path: Path) -> None:
    """Every value in the summary starts in the same column."""
    lines = summarize(load_config(write(tmp_path, VALID))).splitlines()
    columns = {len(line) - len(line.split(":", 1)[1].lstrip()) for line in lines}
    assert len(columns) == 1


# --- Issue rendering ------------------------------------------------------------


def test_issue_str_value() -> None:
    """An issue renders as file:line: path = value: message."""
    issue = ConfigIssue("agent.log_format", 14, "xml", "expected one of ...", file=Path("a.toml"))
    assert str(issue) == 'a.toml:14: agent.log_format = "xml": expected one of ...'


def test_issue_str_missing() -> None:
    """An issue for a missing key renders without a value."""
    issue = ConfigIssue("agent.rig_id", 3, MISSING, "missing required key", file=Path("a.toml"))
    assert str(issue) == "a.toml:3: agent.rig_id: missing required key"


def test_issue_str_without_line() -> None:
    """An issue with no line renders the file name alone."""
    issue = ConfigIssue("agent", None, MISSING, "missing required table", file=Path("a.toml"))
    assert str(issue) == "a.toml: agent: missing required table"


def test_issue_str_long_value() -> None:
    """Long values are cut so the issue stays on one readable line."""
    issue = ConfigIssue("agent.rig_id", 2, "x" * 200, "too long", file=Path("a.toml"))
    assert len(str(issue)) < 100


@pytest.mark.parametrize(
    ("path", "text"),
    [
        (("sources", "modbus", 0, "points", 3, "type"), "sources.modbus[0].points[3].type"),
        (("sources", "wits0", 0, "items", "0108"), "sources.wits0[0].items.0108"),
        (("witsml", "curves", "bit depth"), 'witsml.curves."bit depth"'),
        (("a.b",), '"a.b"'),
        ((), ""),
    ],
)
def test_format_path(path: TomlPath, text: str) -> None:
    """Paths are written as TOML keys, with indices in brackets and odd keys quoted."""
    assert format_path(path) == text


# --- Line locator ---------------------------------------------------------------

LAYOUTS: list[tuple[str, str, TomlPath, int]] = [
    (
        "inline-table",
        '[sources]\nitems = { "0108" = { channel = "bit_depth", unit = "m" } }\n',
        ("sources", "items", "0108", "unit"),
        2,
    ),
    (
        "comment-with-brackets-and-equals",
        '[agent]\n# old = [value] and [[tables]]\n  # [mqtt]\nrig_id = "r"  # = [x]\n',
        ("agent", "rig_id"),
        4,
    ),
    (
        "comment-is-not-a-table",
        "[agent]\n# [mqtt]\nx = 1\n",
        ("agent", "x"),
        3,
    ),
    (
        "string-with-hash-and-brackets",
        "[agent]\nname = \"a # [b] = c\"\nnext = '[[d]]'\n",
        ("agent", "next"),
        3,
    ),
    (
        "quoted-keys",
        '[items]\n"0108" = 1\n\'lit.key\' = 2\n"with space" = 3\n',
        ("items", "with space"),
        4,
    ),
    (
        "quoted-key-with-dot",
        "[items]\n'lit.key' = 2\n",
        ("items", "lit.key"),
        2,
    ),
    (
        "escaped-quoted-key",
        '[items]\n"tab\\tkey" = 1\n',
        ("items", "tab\tkey"),
        2,
    ),
    (
        "dotted-keys",
        '[agent]\nx = 1\nlimits.high . "max" = 5\n',
        ("agent", "limits", "high", "max"),
        3,
    ),
    (
        "dotted-header-with-spaces",
        '[ sources . "modbus" ]\n\nkey = 1\n',
        ("sources", "modbus"),
        1,
    ),
    (
        "nested-arrays-of-tables",
        "[[s]]\nn = 1\n[[s.p]]\nc = 1\n[[s.p]]\nc = 2\n"
        "[[s]]\nn = 2\n[[s.p]]\nc = 3\n[[s.p]]\nc = 4\n",
        ("s", 1, "p", 1, "c"),
        12,
    ),
    (
        "array-element-header",
        "[[s]]\nn = 1\n[[s.p]]\nc = 1\n[[s]]\nn = 2\n[[ s.p ]]\nc = 3\n",
        ("s", 1, "p", 0),
        7,
    ),
    (
        "subtable-of-array-element",
        "[[s]]\nn = 1\n[[s]]\nn = 2\n[s.opts]\nx = 1\n",
        ("s", 1, "opts", "x"),
        6,
    ),
    (
        "multi-line-array",
        "vals = [\n  1,\n  [2, 3],\n  4,\n]\nnext = 1\n",
        ("vals", 2),
        4,
    ),
    (
        "nested-array-value-is-not-a-header",
        "m = [[1, 2], [3]]\nnext = 1\n",
        ("next",),
        2,
    ),
    (
        "multi-line-array-of-inline-tables",
        "p = [\n  { c = 1 },\n  # [x] = y\n\n  { c = 2, d = 3 },\n]\n",
        ("p", 1, "d"),
        5,
    ),
    (
        "multi-line-basic-string",
        'a = """\n[fake]\nx = 1\n"""\nb = 2\n',
        ("b",),
        5,
    ),
    (
        "multi-line-literal-string",
        "a = '''\n[[fake]]\n'''\nb = 2\n",
        ("b",),
        4,
    ),
    (
        "multi-line-string-ending-in-quotes",
        'a = """x""""\nb = 2\n',
        ("b",),
        2,
    ),
    (
        "crlf-line-endings",
        '[agent]\r\nrig_id = "r"\r\n\r\nlog_level = "info"\r\n',
        ("agent", "log_level"),
        4,
    ),
    (
        "implicit-parent-table",
        "\n[a.b.c]\nx = 1\n",
        ("a",),
        2,
    ),
    (
        "date-time-with-space",
        "t = 1979-05-27 07:32:00Z\nnext = 1.5e3\nlast = -inf\n",
        ("last",),
        3,
    ),
    (
        "missing-key-falls-back-to-table",
        "[agent]\nx = 1\n\n[[s]]\nn = 1\n",
        ("s", 0, "absent"),
        4,
    ),
]


@pytest.mark.parametrize(
    ("text", "path", "line"),
    [pytest.param(text, path, line, id=name) for name, text, path, line in LAYOUTS],
)
def test_locator_layout(text: str, path: TomlPath, line: int) -> None:
    """The locator finds the line of a path in a tricky but valid TOML layout."""
    tomllib.loads(text)
    assert TomlLines(text).line_of(path) == line


def test_locator_root_has_no_line() -> None:
    """The document root has no line."""
    assert TomlLines(VALID).line_of(()) is None


def test_table_over_key(tmp_path: Path) -> None:
    """A table header that reuses a key's name is reported at the header's line."""
    text = str(config_error(write(tmp_path, AGENT + "x = 1\n[agent.x.y]\n")))
    assert "agent.toml:4:" in text
    assert "table header repeats the name of a key" in text


def test_locator_finds_duplicates() -> None:
    """A key assigned twice is listed with the line of the second assignment."""
    lines = TomlLines('[agent]\nrig_id = "a"\nx = 1\nrig_id = "b"\n')
    assert lines.duplicates == [(("agent", "rig_id"), 4)]


def test_locator_ends_on_broken_text() -> None:
    """The locator returns on text that tomllib rejects."""
    text = '[agent\nx = [1, {a = \n"unclosed\n[[s]]\n]]]\n}'
    assert TomlLines(text).line_of(("agent", "x")) == 2


def leaf_paths(data: Any, path: TomlPath = ()) -> list[TomlPath]:
    """Return the path of every key with a scalar or array-of-scalars value."""
    if isinstance(data, dict):
        return [leaf for key, value in data.items() for leaf in leaf_paths(value, (*path, key))]
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        return [leaf for i, item in enumerate(data) for leaf in leaf_paths(item, (*path, i))]
    return [path]


def test_locator_every_example_key() -> None:
    """Every key of the example config is located on a line that assigns that key."""
    text = EXAMPLE.read_text()
    source_lines = text.splitlines()
    located = TomlLines(text)
    for path in leaf_paths(tomllib.loads(text)):
        line = located.lines[path]
        assert source_lines[line - 1].lstrip().startswith(f"{path[-1]} =")


# --- Units ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("1s", 1.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        (" 100 ms ", 0.1),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Duration strings convert to seconds."""
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("fast", "invalid duration 'fast'"),
        ("5", "invalid duration '5'"),
        ("1 sec", "invalid duration '1 sec'"),
        ("-1s", "invalid duration '-1s'"),
        ("0s", "must be greater than zero"),
        (5, 'invalid duration 5: a number needs a unit, written in quotes, such as "5s"'),
        (0.5, 'such as "0.5s" or "0.5ms"'),
        (True, "got true"),
        ([1], "got [1]"),
    ],
)
def test_parse_duration_rejects(value: object, fragment: str) -> None:
    """Invalid durations raise ValueError naming the value and the expected form."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1B", 1),
        ("2KB", 2000),
        ("2KiB", 2048),
        ("512MiB", 512 * 1024**2),
        ("2GiB", 2 * 1024**3),
        ("1.5GB", 1_500_000_000),
        ("1TiB", 1024**4),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    """Size strings convert to bytes."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("2 gigs", "invalid size '2 gigs'"),
        ("2gib", "invalid size '2gib'"),
        ("MiB", "invalid size 'MiB'"),
        (512, 'invalid size 512: a number needs a unit, written in quotes, such as "512MiB"'),
        (1.5, "got 1.5"),
        (False, "got false"),
    ],
)
def test_parse_size_rejects(value: object, fragment: str) -> None:
    """Invalid sizes raise ValueError naming the value and the expected form."""
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_size(value)


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (2 * 1024**3, "2GiB"),
        (512 * 1024**2, "512MiB"),
        (1_000_000, "1MB"),
        (1000, "1KB"),
        (7, "7B"),
    ],
)
def test_format_size(size: int, text: str) -> None:
    """Sizes format in the largest unit that divides them exactly."""
    assert format_size(size) == text


@pytest.mark.parametrize(("seconds", "text"), [(0.1, "100ms"), (1.0, "1s"), (90.0, "90s")])
def test_format_duration(seconds: float, text: str) -> None:
    """Durations format as a config file would write them."""
    assert format_duration(seconds) == text
