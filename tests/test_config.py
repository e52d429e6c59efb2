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
from config.model import ModbusPoint
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


MODBUS_MISTAKES = [
    pytest.param(
        AGENT + SOURCE + POINT + 'order = "CDAB"\nword_order = "big"\n',
        'agent.toml:10: sources.modbus[0].points[0].order = "CDAB": order "CDAB" means '
        'word_order = "little", but word_order = "big" is also given',
        id="order-contradicts-word-order",
    ),
    pytest.param(
        AGENT + SOURCE + POINT + "order = 1\n",
        "agent.toml:10: sources.modbus[0].points[0].order = 1: expected one of "
        '"ABCD", "CDAB", "BADC", "DCBA"',
        id="order-not-a-string",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\naddress = 1\n'
        'type = "bool"\nbit = 0\nbyte_order = "little"\n',
        'agent.toml:11: sources.modbus[0].points[0].byte_order = "little": byte_order does '
        "not apply to a bool",
        id="byte-order-on-bool",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\naddress = 1\n'
        'type = "bool"\nbit = 0\norder = "DCBA"\n',
        'agent.toml:11: sources.modbus[0].points[0].order = "DCBA": order does not apply',
        id="order-on-bool",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\ntable = "coil"\n'
        'address = 1\ntype = "float32"\n',
        "agent.toml:10: sources.modbus[0].points[0].type = \"float32\": type 'float32' cannot "
        'be read from a coil table, which holds single bits: use type = "bool"',
        id="float-on-coil",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\ntable = "discrete"\n'
        "address = 1\nbit = 2\n",
        "agent.toml:10: sources.modbus[0].points[0].bit = 2: bit does not apply to a discrete",
        id="bit-on-discrete",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\naddress = 1\n'
        'type = "bool"\nbit = 16\n',
        "agent.toml:10: sources.modbus[0].points[0].bit = 16: out of range: expected a number "
        "from 0 to 15",
        id="bit-16",
    ),
    pytest.param(
        AGENT + SOURCE + POINT.replace("float32", "uint16") + "null_value = 70000\n",
        "agent.toml:10: sources.modbus[0].points[0].null_value = 70000: uint16 never reads 70000",
        id="null-value-out-of-type-range",
    ),
    pytest.param(
        AGENT + SOURCE + POINT.replace("float32", "int16") + "null_value = -1.5\n",
        "agent.toml:10: sources.modbus[0].points[0].null_value = -1.5: int16 never reads -1.5, "
        "so this null_value would never match: expected a whole number from -32768 to 32767",
        id="null-value-fraction-for-integer",
    ),
    pytest.param(
        AGENT + SOURCE + POINT.replace("float32", "float32") + "null_value = 1e39\n",
        "agent.toml:10: sources.modbus[0].points[0].null_value = 1e+39: float32 never reads",
        id="null-value-beyond-float32",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "run"\ntable = "coil"\n'
        "address = 1\nnull_value = 0\n",
        "agent.toml:10: sources.modbus[0].points[0].null_value = 0: null_value does not apply "
        "to a bool",
        id="null-value-on-bool",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "spp"\naddress = "100"\n',
        "agent.toml:8: sources.modbus[0].points[0].address = \"100\": invalid address '100': "
        "a quoted address must be in Modicon notation",
        id="quoted-plain-address",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "spp"\naddress = "40000"\n',
        "invalid address '40000': the number after the table digit is 1-based, from 1 to 65536",
        id="modicon-number-zero",
    ),
    pytest.param(
        AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "spp"\naddress = "4x65537"\n',
        "invalid address '4x65537': the number after the table digit is 1-based",
        id="modicon-number-too-big",
    ),
    pytest.param(
        AGENT + SOURCE + "address_base = 1\n" + POINT.replace("100", "65537"),
        "agent.toml:9: sources.modbus[0].points[0].address = 65537: address 65537 is out of "
        "range for address_base = 1: expected 1 to 65536",
        id="address-base-one-too-big",
    ),
    pytest.param(
        AGENT + SOURCE + "address_base = true\n" + POINT,
        "agent.toml:6: sources.modbus[0].address_base = true: expected the number 0 or 1, got true",
        id="address-base-boolean",
    ),
    pytest.param(
        AGENT + SOURCE + "address_base = 2\n" + POINT,
        "agent.toml:6: sources.modbus[0].address_base = 2: expected one of 0, 1",
        id="address-base-two",
    ),
    pytest.param(
        AGENT + SOURCE + "max_request_registers = 3\n" + POINT.replace("float32", "float64"),
        "agent.toml:6: sources.modbus[0].max_request_registers = 3: max_request_registers = 3 "
        "is smaller than points[0] ('spp', a float64 of 4 registers)",
        id="request-cap-below-point",
    ),
    pytest.param(
        AGENT + SOURCE + "max_request_bits = 2001\n" + POINT,
        "agent.toml:6: sources.modbus[0].max_request_bits = 2001: out of range: expected a "
        "number from 1 to 2000",
        id="bit-cap-over-2000",
    ),
    pytest.param(
        AGENT + SOURCE + "max_gap = 125\n" + POINT,
        "agent.toml:6: sources.modbus[0].max_gap = 125: out of range: expected a number from "
        "0 to 124",
        id="max-gap-over-124",
    ),
    pytest.param(
        AGENT + SOURCE + 'frame_pause = "-5ms"\n' + POINT,
        "agent.toml:6: sources.modbus[0].frame_pause = \"-5ms\": invalid duration '-5ms'",
        id="frame-pause-negative",
    ),
    pytest.param(
        AGENT + SOURCE.replace("tcp://127.0.0.1:5020", "rtu://dev/ttyUSB0") + POINT,
        'agent.toml:5: sources.modbus[0].url = "rtu://dev/ttyUSB0": invalid serial Modbus URL',
        id="rtu-url-two-slashes",
    ),
    pytest.param(
        AGENT + SOURCE.replace("tcp://127.0.0.1:5020", "modbus://10.0.0.5") + POINT,
        'agent.toml:5: sources.modbus[0].url = "modbus://10.0.0.5": invalid Modbus URL',
        id="url-unknown-scheme",
    ),
    pytest.param(
        AGENT
        + SOURCE.replace("tcp://127.0.0.1:5020", "rtu:///dev/ttyUSB0")
        + "unit_id = 0\n"
        + POINT,
        "agent.toml:6: sources.modbus[0].unit_id = 0: unit_id 0 is the broadcast address on a "
        "serial bus",
        id="serial-broadcast-unit",
    ),
    pytest.param(
        AGENT
        + SOURCE
        + POINT
        + SOURCE.replace('"pumps"', '"shakers"')
        + 'frame_pause = "5ms"\n'
        + POINT,
        "agent.toml:13: sources.modbus[1].frame_pause = \"5ms\": sources 'pumps' and 'shakers' "
        "share tcp://127.0.0.1:5020 but set frame_pause 0ms and 5ms",
        id="frame-pause-differs-on-bus",
    ),
    pytest.param(
        AGENT + SOURCE + POINT + SOURCE.replace('"pumps"', '"shakers"') + POINT,
        "agent.toml:10: sources.modbus[1].unit_id: sources 'pumps' and 'shakers' both "
        "read unit 1 on tcp://127.0.0.1:5020",
        id="tcp-unit-twice",
    ),
]
MISTAKES += MODBUS_MISTAKES


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
    assert "12 points" in summary


def test_example_serial_block_loads(tmp_path: Path) -> None:
    """The commented-out serial device of the example is valid once uncommented."""
    text = EXAMPLE.read_text()
    start = text.index("# [[sources.modbus]]")
    end = text.index("# The MQTT broker")
    block = [line.removeprefix("#").removeprefix(" ") for line in text[start:end].splitlines()]
    config = load_config(write(tmp_path, text[:start] + "\n".join(block) + "\n" + text[end:]))
    assert config.sources.modbus[1].endpoint.kind == "rtu"


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


# --- Modbus points, addresses and buses ------------------------------------------


def load_points(tmp_path: Path, points: str, source_keys: str = "") -> list[ModbusPoint]:
    text = AGENT + SOURCE + source_keys + points
    return load_config(write(tmp_path, text)).sources.modbus[0].points


@pytest.mark.parametrize(
    ("address", "table", "offset"),
    [
        ('"40101"', "holding", 100),
        ('"400101"', "holding", 100),
        ('"4x0101"', "holding", 100),
        ('"4X101"', "holding", 100),
        ('"465536"', "holding", 65535),
        ('"30001"', "input", 0),
        ('"3x1"', "input", 0),
        ('"00001"', "coil", 0),
        ('"10020"', "discrete", 19),
        ("40101", "holding", 100),
        ("30001", "input", 0),
        ("39999", "input", 9998),
        ("400101", "holding", 100),
        ("365536", "input", 65535),
        ("40000", "holding", 40000),
        ("29999", "holding", 29999),
        ("100", "holding", 100),
    ],
)
def test_modicon_address(tmp_path: Path, address: str, table: str, offset: int) -> None:
    """Modicon notation, quoted or as a 3xxxx/4xxxx integer, becomes table and 0-based address."""
    point_text = f'[[sources.modbus.points]]\nchannel = "p"\naddress = {address}\n'
    (point,) = load_points(tmp_path, point_text)
    assert (point.table, point.address) == (table, offset)


def test_written_table_keeps_integer(tmp_path: Path) -> None:
    """With table written, an integer such as 40101 is a plain 0-based address."""
    text = '[[sources.modbus.points]]\nchannel = "p"\ntable = "holding"\naddress = 40101\n'
    (point,) = load_points(tmp_path, text)
    assert point.address == 40101
    assert point.address_note == ""


def test_modicon_matching_table(tmp_path: Path) -> None:
    """A Modicon address may repeat the table it names."""
    text = '[[sources.modbus.points]]\nchannel = "p"\ntable = "input"\naddress = "30005"\n'
    (point,) = load_points(tmp_path, text)
    assert (point.table, point.address) == ("input", 4)


def test_address_base_one(tmp_path: Path) -> None:
    """With address_base = 1, plain addresses are 1-based and Modicon ones unchanged."""
    text = (
        '[[sources.modbus.points]]\nchannel = "a"\naddress = 101\n'
        '[[sources.modbus.points]]\nchannel = "b"\naddress = 65536\n'
        '[[sources.modbus.points]]\nchannel = "c"\naddress = "40101"\n'
        '[[sources.modbus.points]]\nchannel = "d"\ntable = "coil"\naddress = 1\n'
    )
    points = load_points(tmp_path, text, "address_base = 1\n")
    assert [point.address for point in points] == [100, 65535, 100, 0]


def test_address_note(tmp_path: Path) -> None:
    """A converted address keeps what was written and how it was read."""
    text = (
        '[[sources.modbus.points]]\nchannel = "a"\naddress = "40101"\n'
        '[[sources.modbus.points]]\nchannel = "b"\naddress = 7\n'
        '[[sources.modbus.points]]\nchannel = "c"\ntable = "discrete"\naddress = 3\n'
    )
    a, b, c = load_points(tmp_path, text, "address_base = 1\n")
    assert a.address_note == (
        "address 40101 \u2192 holding register 100 (Modicon 4xxxx notation, 1-based)"
    )
    assert b.address_note == "address 7 \u2192 holding register 6 (address_base = 1)"
    assert c.address_note == "address 3 \u2192 discrete bit 2 (address_base = 1)"


def test_address_base_per_source(tmp_path: Path) -> None:
    """address_base applies only to the points of its own source."""
    other = SOURCE.replace('"pumps"', '"shakers"').replace("5020", "5021")
    text = AGENT + SOURCE + "address_base = 1\n" + POINT + other + POINT
    sources = load_config(write(tmp_path, text)).sources.modbus
    assert [source.points[0].address for source in sources] == [99, 100]


@pytest.mark.parametrize(
    ("keys", "orders"),
    [
        ('order = "ABCD"', ("big", "big", "ABCD")),
        ('order = "cdab"', ("little", "big", "CDAB")),
        ('order = "BADC"\nbyte_order = "little"', ("big", "little", "BADC")),
        (
            'order = "dcba"\nword_order = "little"\nbyte_order = "little"',
            ("little", "little", "DCBA"),
        ),
        ('word_order = "little"', ("little", "big", "CDAB")),
        ("", ("big", "big", "ABCD")),
    ],
)
def test_order_folded(tmp_path: Path, keys: str, orders: tuple[str, str, str]) -> None:
    """order folds into word_order and byte_order, which define the layout name."""
    (point,) = load_points(tmp_path, POINT + keys + "\n")
    assert (point.word_order, point.byte_order, point.layout) == orders


def test_bit_tables_default_to_bool(tmp_path: Path) -> None:
    """Coils and discrete inputs are bools unless a type is written."""
    text = (
        '[[sources.modbus.points]]\nchannel = "a"\ntable = "coil"\naddress = 0\n'
        '[[sources.modbus.points]]\nchannel = "b"\naddress = "10001"\n'
    )
    points = load_points(tmp_path, text)
    assert [(point.table, point.type) for point in points] == [
        ("coil", "bool"),
        ("discrete", "bool"),
    ]


def test_bool_in_register(tmp_path: Path) -> None:
    """A bool on a holding register keeps its bit and spans one register."""
    text = '[[sources.modbus.points]]\nchannel = "run"\naddress = 3\ntype = "bool"\nbit = 15\n'
    (point,) = load_points(tmp_path, text)
    assert (point.bit, point.registers) == (15, 1)


@pytest.mark.parametrize(
    ("type_name", "value"),
    [
        ("uint16", "65535"),
        ("int64", "-9223372036854775808"),
        ("float32", "-9999.0"),
        ("float64", "nan"),
    ],
)
def test_null_value_accepted(tmp_path: Path, type_name: str, value: str) -> None:
    """A null_value that the type can hold is kept exactly as written."""
    (point,) = load_points(
        tmp_path, POINT.replace("float32", type_name) + f"null_value = {value}\n"
    )
    expected = tomllib.loads(f"v = {value}")["v"]
    assert repr(point.null_value) == repr(expected)


def test_source_defaults(tmp_path: Path) -> None:
    """A source without the new keys reads 0-based addresses with the protocol's limits."""
    source = load_config(write(tmp_path, VALID)).sources.modbus[0]
    assert source.address_base == 0
    assert (source.max_request_registers, source.max_request_bits, source.max_gap) == (125, 2000, 0)
    assert source.frame_pause == 0.0


def test_frame_pause_zero(tmp_path: Path) -> None:
    """frame_pause accepts "0ms" and a duration with a unit."""
    text = AGENT + SOURCE + 'frame_pause = "20ms"\n' + POINT
    assert load_config(write(tmp_path, text)).sources.modbus[0].frame_pause == pytest.approx(0.02)


def test_tcp_endpoint(tmp_path: Path) -> None:
    """A TCP source exposes its endpoint, host and port."""
    source = load_config(write(tmp_path, VALID)).sources.modbus[0]
    assert source.endpoint.kind == "tcp"
    assert (source.host, source.port) == ("127.0.0.1", 5020)


def test_rtu_endpoint(tmp_path: Path) -> None:
    """An rtu URL on a by-id path gives a serial endpoint with its settings."""
    url = "rtu:///dev/serial/by-id/usb-FTDI-if00?baudrate=9600&parity=E&stopbits=2"
    text = AGENT + SOURCE.replace("tcp://127.0.0.1:5020", url) + POINT
    endpoint = load_config(write(tmp_path, text)).sources.modbus[0].endpoint
    assert endpoint.path == "/dev/serial/by-id/usb-FTDI-if00"
    assert (endpoint.baudrate, endpoint.parity, endpoint.stopbits) == (9600, "E", 2)


def test_serial_port_shared(tmp_path: Path) -> None:
    """Devices with their own unit ids share one serial port with the same settings."""
    url = "rtu:///dev/ttyUSB0?baudrate=19200&parity=E"
    text = AGENT
    for unit in (1, 2, 3):
        text += SOURCE.replace('"pumps"', f'"dev{unit}"').replace("tcp://127.0.0.1:5020", url)
        text += f'unit_id = {unit}\nframe_pause = "5ms"\n' + POINT
    sources = load_config(write(tmp_path, text)).sources.modbus
    assert len({source.endpoint.bus_key for source in sources}) == 1


def test_same_unit_on_other_bus(tmp_path: Path) -> None:
    """The same unit id on two different buses is allowed."""
    other = SOURCE.replace('"pumps"', '"shakers"').replace("tcp://", "rtu+tcp://")
    text = AGENT + SOURCE + POINT + other + POINT
    assert len(load_config(write(tmp_path, text)).sources.modbus) == 2


def test_summary_lists_conversions(tmp_path: Path) -> None:
    """The summary explains each converted address and the read plan of each source."""
    text = AGENT + SOURCE + '[[sources.modbus.points]]\nchannel = "spp"\naddress = "40101"\n'
    summary = summarize(load_config(write(tmp_path, text)))
    assert (
        "point pumps/spp: address 40101 \u2192 holding register 100 "
        "(Modicon 4xxxx notation, 1-based)"
    ) in summary
    assert "plan pumps:" in summary
    assert "1 point in 1 request (holding 100..100)" in summary


def test_summary_serial_settings(tmp_path: Path) -> None:
    """The summary shows a serial source's port and its settings, defaults included."""
    url = "rtu:///dev/ttyUSB0?parity=E"
    text = AGENT + SOURCE.replace("tcp://127.0.0.1:5020", url) + 'frame_pause = "10ms"\n' + POINT
    summary = summarize(load_config(write(tmp_path, text)))
    assert "modbus rtu:///dev/ttyUSB0 (19200 8E1), unit 1," in summary
    assert "frame pause 10ms" in summary


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
        ("2TB", 2 * 1000**4),
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
        (3 * 1000**4, "3TB"),
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
