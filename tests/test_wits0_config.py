"""The `[[sources.wits0]]` config: defaults, code mapping, links, checks and the summary."""

from __future__ import annotations

from datetime import UTC
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from pydantic import ValidationError

from config.loader import ConfigError, load_config, summarize
from config.model import Config, Wits0ItemMap, Wits0Source
from drivers.wits0_link import Wits0Link, parse_wits0_url
from drivers.wits0_parser import Wits0Parser

EXAMPLE = Path(__file__).parents[1] / "config" / "examples" / "agent.toml"
AGENT = '[agent]\nrig_id = "rig-07"\n'
WITS0 = '[[sources.wits0]]\nname = "edr"\nurl = "tcp://127.0.0.1:5000"\n'


def source(**keys: Any) -> Wits0Source:
    return Wits0Source.model_validate({"name": "edr", "url": "tcp://127.0.0.1:5000", **keys})


def rejection(**keys: Any) -> str:
    with pytest.raises(ValidationError) as caught:
        source(**keys)
    return str(caught.value)


def load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return load_config(path)


def load_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


# --- Defaults ------------------------------------------------------------------


def test_defaults() -> None:
    """A source with only name and url takes the documented defaults."""
    wits0 = source()
    assert wits0.items == "standard-01"
    assert wits0.units == "metric"
    assert wits0.unmapped == "keep"
    assert wits0.null_values == [-9999.0, -8888.0, -999.25]
    assert wits0.use_device_time is False
    assert wits0.timezone == "UTC"
    assert wits0.silence_timeout == 60.0
    assert wits0.transmit is False
    assert wits0.transmit_interval == 30.0


def test_default_transmit_packet() -> None:
    """The default packet to transmit is the 0111-9999 keep-alive with CR LF line ends."""
    assert source().transmit_bytes == b"&&\r\n0111-9999\r\n!!\r\n"


def test_sources_default_empty(tmp_path: Path) -> None:
    """A file without [[sources.wits0]] has no WITS0 sources."""
    assert load(tmp_path, AGENT).sources.wits0 == []


def test_loads_from_toml(tmp_path: Path) -> None:
    """A [[sources.wits0]] table with an items table loads into Wits0Source."""
    text = AGENT + WITS0 + '[sources.wits0.items]\n"0108" = { channel = "bit_depth", unit = "m" }\n'
    wits0 = load(tmp_path, text).sources.wits0[0]
    assert wits0.items == {"0108": Wits0ItemMap(channel="bit_depth", unit="m")}


# --- Code mapping --------------------------------------------------------------


def test_standard_metric_mapping() -> None:
    """With the standard table, a record 01 code maps to its mnemonic and metric unit."""
    assert source().map_code("0108") == Wits0ItemMap(channel="DBTM", unit="m")


def test_standard_fps_mapping() -> None:
    """units = "fps" picks the FPS column of the standard table."""
    assert source(units="fps").map_code("0121") == Wits0ItemMap(channel="SPPA", unit="psi")


def test_standard_header_mapping() -> None:
    """Header items such as 0105 map to their mnemonic with no unit."""
    assert source().map_code("0105") == Wits0ItemMap(channel="DATE", unit="")


def test_unmapped_kept() -> None:
    """A code outside the table becomes channel wits_<code> with no unit."""
    assert source().map_code("0169") == Wits0ItemMap(channel="wits_0169", unit="")


def test_unmapped_dropped() -> None:
    """With unmapped = "drop", a code outside the table maps to nothing."""
    assert source(unmapped="drop").map_code("0169") is None


def test_table_mapping() -> None:
    """A configured table maps its own codes and replaces the standard table."""
    wits0 = source(items={"0108": {"channel": "bit_depth", "unit": "ft"}}, unmapped="drop")
    assert wits0.map_code("0108") == Wits0ItemMap(channel="bit_depth", unit="ft")
    assert wits0.map_code("0110") is None


def test_table_unmapped_kept() -> None:
    """With a configured table, other codes still become wits_<code> by default."""
    wits0 = source(items={"0108": {"channel": "bit_depth"}})
    assert wits0.map_code("0110") == Wits0ItemMap(channel="wits_0110")


def test_own_code_channel_name_allowed() -> None:
    """A code may be mapped to the wits_<code> name that it would get unmapped."""
    wits0 = source(items={"0108": {"channel": "wits_0108"}})
    assert wits0.map_code("0108") == Wits0ItemMap(channel="wits_0108")


def test_unmapped_name_free_when_dropped() -> None:
    """A wits_<code> channel name is allowed when unmapped codes are dropped."""
    wits0 = source(items={"0108": {"channel": "wits_0110"}}, unmapped="drop")
    assert wits0.map_code("0110") is None


# --- Item checks ---------------------------------------------------------------


@pytest.mark.parametrize("code", ["108", "01080", "01a8", "\u0661\u0662\u0663\u0664", ""])
def test_code_not_four_digits(code: str) -> None:
    """Item codes other than 4 ASCII digits are rejected."""
    assert "invalid WITS code" in rejection(items={code: {"channel": "x"}})


def test_unknown_table_name() -> None:
    """A table name other than "standard-01" is rejected with a suggestion."""
    assert "did you mean 'standard-01'?" in rejection(items="standard-02")


def test_items_of_wrong_type() -> None:
    """items as a number gives one plain error, not one per member of the union."""
    message = rejection(items=5)
    assert "1 validation error" in message
    assert 'expected "standard-01" or a [sources.wits0.items] table' in message


def test_duplicate_channel() -> None:
    """Two codes that feed one channel are rejected."""
    items = {"0108": {"channel": "depth"}, "0110": {"channel": "depth"}}
    assert "channel 'depth' is used twice" in rejection(items=items)


def test_unmapped_name_collision() -> None:
    """A channel named like an unmapped code's channel is rejected while unmapped = "keep"."""
    assert "map 0110 as well" in rejection(items={"0108": {"channel": "wits_0110"}})


def test_null_values_accept_integers() -> None:
    """Integer null values from TOML are accepted as numbers."""
    assert source(null_values=[-9999, 0]).null_values == [-9999.0, 0.0]


def test_null_values_empty() -> None:
    """An empty list turns null sentinels off."""
    assert source(null_values=[]).null_values == []


@pytest.mark.parametrize("value", [True, "-9999", float("nan")], ids=repr)
def test_null_values_reject(value: object) -> None:
    """A boolean, a string or nan is not a null value."""
    rejection(null_values=[value])


def test_device_time_strict() -> None:
    """use_device_time takes true or false, not a string."""
    rejection(use_device_time="yes")


# --- Time zone -----------------------------------------------------------------


def test_timezone_utc() -> None:
    """The default UTC needs no time zone database."""
    assert source().tzinfo is UTC


def test_timezone_named() -> None:
    """An IANA name becomes its ZoneInfo."""
    assert source(timezone="America/Chicago").tzinfo == ZoneInfo("America/Chicago")


@pytest.mark.parametrize("name", ["Europe/Londn", "", "../etc/passwd", "CST6"])
def test_timezone_unknown(name: str) -> None:
    """A name that is not an IANA time zone is rejected and named."""
    assert f"unknown time zone {name!r}" in rejection(timezone=name)


def test_timezone_suggestion() -> None:
    """A misspelt time zone gets the closest valid name."""
    assert "did you mean 'Europe/London'?" in rejection(timezone="europe/londn")


# --- Transmit ------------------------------------------------------------------


def test_transmit_lines() -> None:
    """Each line of transmit_packet becomes one data line of the packet."""
    wits0 = source(transmit_packet="0111-9999\n\n  0121 5  \n0110\n")
    assert wits0.transmit_bytes == b"&&\r\n0111-9999\r\n01215\r\n0110\r\n!!\r\n"


def test_transmit_packet_parses() -> None:
    """The transmitted packet decodes as one valid packet with no malformed line."""
    parser = Wits0Parser()
    packets = parser.feed(source(transmit_packet="0111-9999\n0108 12.5").transmit_bytes)
    assert [(item.code, item.value) for item in packets[0].items] == [
        ("0111", -9999.0),
        ("0108", 12.5),
    ]
    assert parser.counters.malformed_lines == 0


@pytest.mark.parametrize(
    ("packet", "message"),
    [
        ("0111-9999\n01x1 5", "line 2 of transmit_packet"),
        ("0121 1250,5", "is not a WITS data line"),
        ("1984RIG-AGENT", "is not a WITS data line"),
        ("0101WELL\u00e9", "is not a WITS data line"),
        ("&&\n0111-9999\n!!", "write only the data lines"),
        ("\n  \n", "has no data line"),
    ],
)
def test_transmit_packet_invalid(packet: str, message: str) -> None:
    """A transmit_packet that the device would not accept is rejected with the line at fault."""
    assert message in rejection(transmit_packet=packet)


def test_transmit_interval_below_silence() -> None:
    """With transmit on, an interval as long as the silence timeout is rejected."""
    message = rejection(transmit=True, transmit_interval="60s", silence_timeout="60s")
    assert "is not shorter than silence_timeout" in message


def test_transmit_off_ignores_interval() -> None:
    """With transmit off, the interval is not checked against the silence timeout."""
    assert source(transmit_interval="2m").transmit_interval == 120.0


# --- Links ---------------------------------------------------------------------


def test_serial_link_defaults() -> None:
    """A serial URL without settings is 9600 baud, 8 data bits, no parity, 1 stop bit."""
    assert parse_wits0_url("serial:///dev/ttyS0") == Wits0Link(kind="serial", path="/dev/ttyS0")


def test_serial_link_settings() -> None:
    """A serial URL's query sets baud rate, parity, stop bits and data bits."""
    link = parse_wits0_url("serial:///dev/ttyUSB0?baudrate=19200&parity=even&stopbits=2&bytesize=7")
    assert link == Wits0Link(
        kind="serial", path="/dev/ttyUSB0", baudrate=19200, parity="E", stopbits=2, bytesize=7
    )


def test_tcp_link() -> None:
    """A tcp URL gives the host and port to connect to."""
    assert parse_wits0_url("tcp://10.0.0.5:5000") == Wits0Link(
        kind="tcp", host="10.0.0.5", port=5000
    )


def test_listen_link() -> None:
    """A tcp-listen URL gives the address and port to listen on."""
    link = parse_wits0_url("tcp-listen://0.0.0.0:5001")
    assert link == Wits0Link(kind="tcp-listen", host="0.0.0.0", port=5001)  # noqa: S104


def test_link_describe() -> None:
    """describe() shows serial settings in the usual 8N1 form and brackets IPv6 hosts."""
    assert parse_wits0_url("serial:///dev/ttyS1").describe() == "serial:///dev/ttyS1 (9600 8N1)"
    assert parse_wits0_url("tcp://[::1]:5000").describe() == "tcp://[::1]:5000"


def test_source_link_property() -> None:
    """Wits0Source.link is the parsed URL."""
    assert source().link == Wits0Link(kind="tcp", host="127.0.0.1", port=5000)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("udp://0.0.0.0:5000", "invalid WITS0 URL"),
        ("rtu:///dev/ttyS0", "invalid WITS0 URL"),
        ("tcp://10.0.0.5", "invalid port"),
        ("tcp://10.0.0.5:0", "invalid port"),
        ("tcp://10.0.0.5:70000", "invalid port"),
        ("tcp-listen://:5000", "the host is missing"),
        ("tcp://10.0.0.5:5000?baudrate=9600", "takes only host and port"),
        ("serial://dev/ttyS0", "three slashes"),
        ("serial:///dev/ttyS0?baud=9600", "unknown setting 'baud'"),
        ("serial:///dev/ttyS0?baudrate=9601", "invalid baudrate '9601'"),
        ("serial:///dev/ttyS0?parity=X", "invalid parity 'X'"),
    ],
)
def test_link_invalid(url: str, message: str) -> None:
    """Malformed WITS0 URLs are rejected with the reason."""
    with pytest.raises(ValueError, match=message):
        parse_wits0_url(url)


# --- Across sources ------------------------------------------------------------

MODBUS = '[[sources.modbus]]\nname = "{name}"\nurl = "{url}"\n[[sources.modbus.points]]\n'
MODBUS += 'channel = "spp"\naddress = 100\n'


def wits0_table(name: str, url: str) -> str:
    return f'[[sources.wits0]]\nname = "{name}"\nurl = "{url}"\n'


def test_name_unique_across_protocols(tmp_path: Path) -> None:
    """A WITS0 source may not reuse the name of a Modbus source."""
    text = AGENT + MODBUS.format(name="edr", url="tcp://127.0.0.1:5020")
    text += wits0_table("edr", "tcp://127.0.0.1:5000")
    assert "source name 'edr' is used twice" in load_error(tmp_path, text)


def test_name_unique_within_wits0(tmp_path: Path) -> None:
    """Two WITS0 sources may not share a name, and the error points at the second."""
    text = AGENT + wits0_table("edr", "tcp://127.0.0.1:5000") + "\n"
    text += wits0_table("edr", "tcp://127.0.0.1:5001")
    assert 'agent.toml:8: sources.wits0[1].name = "edr"' in load_error(tmp_path, text)


def test_listen_port_shared(tmp_path: Path) -> None:
    """Two sources may not listen on one TCP port, whatever their addresses."""
    text = AGENT + wits0_table("a", "tcp-listen://0.0.0.0:5000")
    text += wits0_table("b", "tcp-listen://127.0.0.1:5000")
    assert "both open TCP port 5000" in load_error(tmp_path, text)


def test_serial_port_shared_with_wits0(tmp_path: Path) -> None:
    """Two WITS0 sources may not open one serial port."""
    text = AGENT + wits0_table("a", "serial:///dev/ttyS0")
    text += wits0_table("b", "serial:///dev/ttyS0?baudrate=19200")
    assert "both open serial port /dev/ttyS0" in load_error(tmp_path, text)


def test_tcp_clients_may_share_server(tmp_path: Path) -> None:
    """Two sources may connect to the same TCP server."""
    text = AGENT + wits0_table("a", "tcp://10.0.0.5:5000") + wits0_table("b", "tcp://10.0.0.5:5000")
    assert len(load(tmp_path, text).sources.wits0) == 2


# --- Summary and example -------------------------------------------------------


def test_summary_line(tmp_path: Path) -> None:
    """The summary names the link, the mapping, the null values and the time source."""
    summary = summarize(load(tmp_path, AGENT + WITS0))
    expected = (
        "source edr: wits0 tcp://127.0.0.1:5000, items standard-01 in metric units, "
        "other codes as wits_<code>, null values -9999, -8888, -999.25, receive time, "
        "silence timeout 60s"
    )
    assert expected in summary


def test_summary_transmit(tmp_path: Path) -> None:
    """With transmit on, the summary shows the packet's lines and the interval."""
    text = AGENT + WITS0 + 'transmit = true\ntransmit_packet = "0111-9999"\n'
    assert "transmit edr: 0111-9999 every 30s" in summarize(load(tmp_path, text))


def test_summary_device_time(tmp_path: Path) -> None:
    """With device time on, the summary names the time zone."""
    text = AGENT + WITS0 + 'use_device_time = true\ntimezone = "Asia/Dubai"\n'
    assert "device time in Asia/Dubai" in summarize(load(tmp_path, text))


def test_summary_counts_wits0_as_source(tmp_path: Path) -> None:
    """A file with only a WITS0 source does not report that it has no sources."""
    assert "sources:" not in summarize(load(tmp_path, AGENT + WITS0))


def test_example_wits0_block_loads(tmp_path: Path) -> None:
    """The commented-out WITS0 feed of the example is valid once uncommented."""
    text = EXAMPLE.read_text()
    start = text.index("# [[sources.wits0]]")
    end = text.index("# A second device")
    block = [line.removeprefix("#").removeprefix(" ") for line in text[start:end].splitlines()]
    config = load(tmp_path, text[:start] + "\n".join(block) + "\n" + text[end:])
    wits0 = config.sources.wits0[0]
    assert wits0.link.kind == "serial"
    assert wits0.transmit is True
    assert wits0.map_code("0121") == Wits0ItemMap(channel="standpipe_pressure", unit="psi")
