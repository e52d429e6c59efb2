"""The [witsml] config table: keys, curve resolution, cross-checks, summary and example."""

from __future__ import annotations

from pathlib import Path

import pytest

from config.loader import ConfigError, load_config, summarize
from config.model import Config, WitsmlColumn, WitsmlSection

EXAMPLE = Path(__file__).parents[1] / "config" / "examples" / "agent.toml"

AGENT = '[agent]\nrig_id = "rig-07"\n\n'

PLC = """\
[[sources.modbus]]
name = "drilling-plc"
url = "tcp://127.0.0.1:5020"

  [[sources.modbus.points]]
  channel = "standpipe_pressure"
  address = 100
  type = "float32"
  unit = "psi"

  [[sources.modbus.points]]
  channel = "hookload"
  address = 102
  type = "float32"
  unit = "klbf"

  [[sources.modbus.points]]
  channel = "pump1_running"
  address = 110
  type = "bool"
  bit = 0

"""

EDR = """\
[[sources.wits0]]
name = "edr"
url = "tcp://127.0.0.1:5021"

"""

MUDLOG = """\
[[sources.wits0]]
name = "mudlog"
url = "tcp://127.0.0.1:5022"
unmapped = "{unmapped}"

  [sources.wits0.items]
  "0108" = {{ channel = "bit_depth", unit = "ft" }}
  "0121" = {{ channel = "standpipe_pressure", unit = "psi" }}

"""

CLOUD = """\
[cloud]
url = "http://127.0.0.1:8000"
device_id = "rig-07-edge"
private_key_file = "/etc/rig-agent/device-key.pem"

"""

HEADER_KEYS = {
    "well_uid": "W-001",
    "well_name": "Example 1H",
    "wellbore_uid": "WB-001",
    "wellbore_name": "Example 1H OH",
    "log_uid": "rig-07-time",
    "log_name": "Rig 07 time log",
}


def witsml_table(*curves: str, **keys: str) -> str:
    """Return a [witsml] table with the header keys, each of `keys` as written, then `curves`.

    A value of `keys` is TOML text, such as '"2s"' or '100'. A header key
    given in `keys` replaces its default; the value "" leaves the key out.
    """
    lines = ["[witsml]"]
    for name, value in HEADER_KEYS.items():
        if name not in keys:
            lines.append(f'{name} = "{value}"')
    lines.extend(f"{name} = {value}" for name, value in keys.items() if value)
    lines.append("")
    lines.append("  [witsml.curves]")
    lines.extend(f"  {curve}" for curve in curves)
    return "\n".join(lines) + "\n"


SPPA = 'standpipe_pressure = { mnemonic = "SPPA" }'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def error_text(tmp_path: Path, text: str) -> str:
    """Return the error output of loading `text`, which must be rejected."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return str(caught.value)


def line_of(text: str, fragment: str) -> int:
    """Return the 1-based line of the first line of `text` that contains `fragment`."""
    for number, line in enumerate(text.splitlines(), start=1):
        if fragment in line:
            return number
    raise AssertionError(f"{fragment!r} not in the config text")


def rejected_at(tmp_path: Path, text: str, fragment: str) -> str:
    """Return the error of `text` and assert that it points at the line holding `fragment`."""
    errors = error_text(tmp_path, text)
    assert f"agent.toml:{line_of(text, fragment)}: " in errors, errors
    return errors


def columns_of(tmp_path: Path, text: str) -> dict[str, WitsmlColumn]:
    return {column.key: column for column in load(tmp_path, text).witsml_columns()}


# --- A valid section --------------------------------------------------------------


def test_section_defaults(tmp_path: Path) -> None:
    """A [witsml] table with only the required keys gets the documented defaults."""
    witsml = load(tmp_path, AGENT + PLC + CLOUD + witsml_table(SPPA)).witsml
    assert witsml is not None
    assert witsml.interval == 60.0
    assert witsml.row_period == 1.0
    assert witsml.row_period_us == 1_000_000
    assert witsml.settle == 5.0
    assert witsml.max_rows == 10_000
    assert witsml.null_value == "-999.25"
    assert witsml.curves["standpipe_pressure"].unit is None
    assert witsml.curves["standpipe_pressure"].description == ""


def test_section_all_keys(tmp_path: Path) -> None:
    """Every key of [witsml] is read as written."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(
        'standpipe_pressure = { mnemonic = "SPP A", unit = "kPa", description = "Standpipe" }',
        interval='"2m"',
        row_period='"250ms"',
        settle='"0ms"',
        max_rows="500",
        null_value='"-9999"',
    )
    witsml = load(tmp_path, text).witsml
    assert witsml is not None
    assert witsml.interval == 120.0
    assert witsml.row_period_us == 250_000
    assert witsml.settle == 0.0
    assert witsml.max_rows == 500
    assert witsml.null_value == "-9999"
    for name, value in HEADER_KEYS.items():
        assert getattr(witsml, name) == value
    curve = witsml.curves["standpipe_pressure"]
    assert (curve.mnemonic, curve.unit, curve.description) == ("SPP A", "kPa", "Standpipe")


def test_section_round_trip(tmp_path: Path) -> None:
    """A loaded [witsml] table, dumped and validated again, is the same section."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(
        SPPA,
        '"drilling-plc/hookload" = { mnemonic = "HKLA", unit = "klbf", description = "Hook" }',
        row_period='"1500ms"',
        null_value="-999.25",
    )
    witsml = load(tmp_path, text).witsml
    assert witsml is not None
    again = WitsmlSection.model_validate(witsml.model_dump())
    assert again == witsml
    assert again.row_period_us == 1_500_000
    assert again.null_value == "-999.25"


def test_section_from_inline_subtables(tmp_path: Path) -> None:
    """A curve may also be written as its own [witsml.curves."KEY"] table."""
    text = AGENT + PLC + CLOUD + witsml_table()
    text += '  [witsml.curves."drilling-plc/hookload"]\n  mnemonic = "HKLA"\n'
    columns = columns_of(tmp_path, text)
    assert columns["drilling-plc/hookload"].mnemonic == "HKLA"


def test_witsml_absent(tmp_path: Path) -> None:
    """Without [witsml] there is no section, no column and no witsml sink."""
    config = load(tmp_path, AGENT + PLC + CLOUD)
    assert config.witsml is None
    assert config.witsml_columns() == []
    assert config.enabled_sinks() == ["cloud"]


def test_enabled_sinks_order(tmp_path: Path) -> None:
    """The witsml sink is listed after mqtt and cloud."""
    text = AGENT + PLC + CLOUD + '[mqtt]\nurl = "mqtt://127.0.0.1:1883"\n\n' + witsml_table(SPPA)
    assert load(tmp_path, text).enabled_sinks() == ["mqtt", "cloud", "witsml"]


def test_columns_in_file_order(tmp_path: Path) -> None:
    """Columns follow the order of [witsml.curves], with the uid made from the mnemonic."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(
        'pump1_running = { mnemonic = "PMP1 RUN%" }',
        SPPA,
        '"drilling-plc/hookload" = { mnemonic = "HKLA", description = "Hookload" }',
    )
    columns = load(tmp_path, text).witsml_columns()
    assert columns == [
        WitsmlColumn(
            key="pump1_running",
            source=None,
            channel="pump1_running",
            mnemonic="PMP1 RUN%",
            unit="",
            uid="PMP1_RUN_",
            description="",
        ),
        WitsmlColumn(
            key="standpipe_pressure",
            source=None,
            channel="standpipe_pressure",
            mnemonic="SPPA",
            unit="psi",
            uid="SPPA",
            description="",
        ),
        WitsmlColumn(
            key="drilling-plc/hookload",
            source="drilling-plc",
            channel="hookload",
            mnemonic="HKLA",
            unit="klbf",
            uid="HKLA",
            description="Hookload",
        ),
    ]


def test_column_source_of_bare_key(tmp_path: Path) -> None:
    """witsml_column_source names the one source that has a bare key's channel."""
    config = load(
        tmp_path, AGENT + PLC + EDR + CLOUD + witsml_table(SPPA, 'DBTM = { mnemonic = "DBTM" }')
    )
    sources = [config.witsml_column_source(column) for column in config.witsml_columns()]
    assert sources == ["drilling-plc", "edr"]


# --- Units ------------------------------------------------------------------------


def test_unit_from_modbus_point(tmp_path: Path) -> None:
    """A curve without unit takes the unit of its Modbus point."""
    columns = columns_of(tmp_path, AGENT + PLC + CLOUD + witsml_table(SPPA))
    assert columns["standpipe_pressure"].unit == "psi"


def test_unit_of_curve_wins(tmp_path: Path) -> None:
    """A unit set in the curve replaces the channel's unit."""
    text = (
        AGENT
        + PLC
        + CLOUD
        + witsml_table('standpipe_pressure = { mnemonic = "SPPA", unit = "kPa" }')
    )
    assert columns_of(tmp_path, text)["standpipe_pressure"].unit == "kPa"


def test_empty_unit_makes_unitless(tmp_path: Path) -> None:
    """unit = "" makes the curve unitless although the channel has a unit."""
    text = (
        AGENT + PLC + CLOUD + witsml_table('standpipe_pressure = { mnemonic = "SPPA", unit = "" }')
    )
    assert columns_of(tmp_path, text)["standpipe_pressure"].unit == ""


def test_unit_from_wits0_standard_metric(tmp_path: Path) -> None:
    """A WITS0 source with the standard table gives its metric units."""
    curves = ('DBTM = { mnemonic = "DBTM" }', 'HKLA = { mnemonic = "HKLA" }')
    columns = columns_of(tmp_path, AGENT + EDR + CLOUD + witsml_table(*curves))
    assert columns["DBTM"].unit == "m"
    assert columns["HKLA"].unit == "kdaN"


def test_unit_from_wits0_standard_fps(tmp_path: Path) -> None:
    """With units = "fps" the standard table gives foot and pound units."""
    edr = EDR.replace('url = "tcp://127.0.0.1:5021"', 'url = "tcp://127.0.0.1:5021"\nunits = "fps"')
    curves = ('DBTM = { mnemonic = "DBTM" }', 'SPPA = { mnemonic = "SPPA" }')
    columns = columns_of(tmp_path, AGENT + edr + CLOUD + witsml_table(*curves))
    assert columns["DBTM"].unit == "ft"
    assert columns["SPPA"].unit == "psi"


def test_unit_from_wits0_items(tmp_path: Path) -> None:
    """A WITS0 items table gives the unit of the mapped channel."""
    text = AGENT + MUDLOG.format(unmapped="keep") + CLOUD
    text += witsml_table('bit_depth = { mnemonic = "DBTM" }')
    assert columns_of(tmp_path, text)["bit_depth"].unit == "ft"


def test_unitless_standard_item(tmp_path: Path) -> None:
    """A standard item without a unit, such as a stroke count, gives a unitless curve."""
    text = AGENT + EDR + CLOUD + witsml_table('STKC = { mnemonic = "STKC" }')
    assert columns_of(tmp_path, text)["STKC"].unit == ""


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("lb,ft", "it contains a comma"),
        ("x" * 25, "it has 25 characters, and WITSML allows at most 24"),
        ("kft  lbf", "two spaces in a row"),
    ],
)
def test_channel_unit_unusable(tmp_path: Path, unit: str, expected: str) -> None:
    """A channel unit that WITSML cannot carry is rejected at the curve, with the fix."""
    plc = PLC.replace('unit = "psi"', f'unit = "{unit}"')
    text = AGENT + plc + CLOUD + witsml_table(SPPA)
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert f"channel 'standpipe_pressure' of source 'drilling-plc' has unit {unit!r}" in errors
    assert expected in errors
    assert "set unit in this curve" in errors


def test_channel_unit_unusable_but_overridden(tmp_path: Path) -> None:
    """An unusable channel unit is fine when the curve sets its own unit."""
    plc = PLC.replace('unit = "psi"', 'unit = "lb,ft"')
    text = (
        AGENT
        + plc
        + CLOUD
        + witsml_table('standpipe_pressure = { mnemonic = "SPPA", unit = "psi" }')
    )
    assert columns_of(tmp_path, text)["standpipe_pressure"].unit == "psi"


@pytest.mark.parametrize(
    ("unit", "expected"),
    [
        ("a,b", "it contains a comma"),
        ("u" * 25, "too long: expected at most 24 characters, got 25"),
        (" psi", "it starts or ends with a space"),
    ],
)
def test_curve_unit_invalid(tmp_path: Path, unit: str, expected: str) -> None:
    """A unit written in a curve follows the WITSML unit rules."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(f'standpipe_pressure = {{ mnemonic = "SPPA", unit = "{unit}" }}')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert "witsml.curves.standpipe_pressure.unit" in errors
    assert expected in errors


# --- Mnemonics and uids -------------------------------------------------------------


def test_mnemonic_too_long(tmp_path: Path) -> None:
    """A mnemonic over 32 characters is rejected at its line."""
    text = AGENT + PLC + CLOUD + witsml_table(f'standpipe_pressure = {{ mnemonic = "{"M" * 33}" }}')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert "witsml.curves.standpipe_pressure.mnemonic" in errors
    assert "too long: expected at most 32 characters, got 33" in errors


def test_mnemonic_of_32_accepted(tmp_path: Path) -> None:
    """A mnemonic of exactly 32 characters is accepted."""
    text = AGENT + PLC + CLOUD + witsml_table(f'standpipe_pressure = {{ mnemonic = "{"M" * 32}" }}')
    assert columns_of(tmp_path, text)["standpipe_pressure"].mnemonic == "M" * 32


@pytest.mark.parametrize("char", ["'", '\\"', "<", ">", "/", "\\\\", "&", ","])
def test_mnemonic_forbidden_character(tmp_path: Path, char: str) -> None:
    """Each character that WITSML servers reject in a mnemonic is named in the error."""
    text = AGENT + PLC + CLOUD + witsml_table(f'standpipe_pressure = {{ mnemonic = "SP{char}PA" }}')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    written = char.replace("\\\\", "\\").replace('\\"', '"')
    assert f"WITSML servers reject {written} in a mnemonic" in errors


@pytest.mark.parametrize(
    ("mnemonic", "expected"),
    [
        (" SPPA", "starts or ends with a space"),
        ("SPPA ", "starts or ends with a space"),
        ("SP  PA", "two spaces in a row"),
        ("SP\\tPA", "a tab, a line break or another invisible character"),
        ("", "must not be empty"),
    ],
)
def test_mnemonic_white_space(tmp_path: Path, mnemonic: str, expected: str) -> None:
    """A mnemonic that the schema's white-space rules would change is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(f'standpipe_pressure = {{ mnemonic = "{mnemonic}" }}')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert expected in errors


@pytest.mark.parametrize("mnemonic", ["TIME", "time", "Time"])
def test_mnemonic_time_reserved(tmp_path: Path, mnemonic: str) -> None:
    """TIME, in any letter case, is the index curve and no channel may use it."""
    text = AGENT + PLC + CLOUD + witsml_table(f'standpipe_pressure = {{ mnemonic = "{mnemonic}" }}')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert f"mnemonic {mnemonic!r} is reserved for the time index curve" in errors


def test_mnemonic_duplicate_other_case(tmp_path: Path) -> None:
    """Two mnemonics that differ only in letter case are rejected at the second one."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, 'hookload = { mnemonic = "sppa" }')
    errors = rejected_at(tmp_path, text, "hookload = {")
    assert "witsml.curves.hookload.mnemonic" in errors
    assert (
        "mnemonic 'sppa' of curve 'hookload' is also the mnemonic of curve "
        "'standpipe_pressure' ('SPPA')"
    ) in errors
    assert "give this curve another mnemonic" in errors


def test_mnemonic_duplicate_same_case(tmp_path: Path) -> None:
    """Two equal mnemonics are rejected without repeating the mnemonic."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, 'hookload = { mnemonic = "SPPA" }')
    errors = rejected_at(tmp_path, text, "hookload = {")
    assert "is also the mnemonic of curve 'standpipe_pressure', and" in errors


@pytest.mark.parametrize(("first", "second"), [("FLOW%", "FLOW_"), ("A B", "A_B"), ("Ä1", "_1")])
def test_curve_uid_collision(tmp_path: Path, first: str, second: str) -> None:
    """Two mnemonics that give the same curve uid are rejected at the second one."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(
        f'standpipe_pressure = {{ mnemonic = "{first}" }}',
        f'hookload = {{ mnemonic = "{second}" }}',
    )
    errors = rejected_at(tmp_path, text, "hookload = {")
    assert f"mnemonics {first!r} (curve 'standpipe_pressure') and {second!r}" in errors
    assert f"both give the curve uid {second!r}" in errors


# --- Curve keys -----------------------------------------------------------------


def test_unknown_channel_suggestion(tmp_path: Path) -> None:
    """A misspelt channel is rejected at its key with the closest channel name."""
    text = AGENT + PLC + CLOUD + witsml_table('standpipe_presure = { mnemonic = "SPPA" }')
    errors = rejected_at(tmp_path, text, "standpipe_presure = {")
    assert "unknown channel 'standpipe_presure'" in errors
    assert "did you mean 'standpipe_pressure'?" in errors


def test_unknown_channel_suggestion_ignores_case(tmp_path: Path) -> None:
    """A standard WITS mnemonic written in lower case gets the upper-case channel suggested."""
    text = AGENT + EDR + CLOUD + witsml_table('dbtm = { mnemonic = "DBTM" }')
    errors = rejected_at(tmp_path, text, "dbtm = {")
    assert "did you mean 'DBTM'?" in errors


def test_unknown_channel_without_sources(tmp_path: Path) -> None:
    """A config with no sources gets an error requesting a source table."""
    errors = rejected_at(tmp_path, AGENT + CLOUD + witsml_table(SPPA), "standpipe_pressure = {")
    assert "this file has no sources" in errors


def test_ambiguous_bare_channel(tmp_path: Path) -> None:
    """A bare channel name of two sources is rejected with both "SOURCE/CHANNEL" keys."""
    text = AGENT + PLC + MUDLOG.format(unmapped="keep") + CLOUD + witsml_table(SPPA)
    errors = rejected_at(tmp_path, text, "standpipe_pressure = {")
    assert "channel 'standpipe_pressure' exists in sources 'drilling-plc' and 'mudlog'" in errors
    assert '"drilling-plc/standpipe_pressure" or "mudlog/standpipe_pressure"' in errors


def test_source_channel_key_picks_source(tmp_path: Path) -> None:
    """ "SOURCE/CHANNEL" picks one of two sources with the same channel name."""
    text = AGENT + PLC + MUDLOG.format(unmapped="keep") + CLOUD
    text += witsml_table(
        '"mudlog/standpipe_pressure" = { mnemonic = "SPPA" }',
        '"drilling-plc/standpipe_pressure" = { mnemonic = "SPP2" }',
    )
    columns = columns_of(tmp_path, text)
    assert columns["mudlog/standpipe_pressure"].source == "mudlog"
    assert columns["mudlog/standpipe_pressure"].channel == "standpipe_pressure"
    assert columns["drilling-plc/standpipe_pressure"].source == "drilling-plc"


def test_source_channel_unknown_source(tmp_path: Path) -> None:
    """An unknown source in "SOURCE/CHANNEL" lists the sources and suggests the closest."""
    text = (
        AGENT + PLC + EDR + CLOUD + witsml_table('"drilling-plcc/hookload" = { mnemonic = "HKLA" }')
    )
    errors = rejected_at(tmp_path, text, "drilling-plcc/hookload")
    assert "unknown source 'drilling-plcc'" in errors
    assert "the sources of this file are 'drilling-plc', 'edr'" in errors
    assert "did you mean 'drilling-plc'?" in errors


def test_source_channel_unknown_channel(tmp_path: Path) -> None:
    """A channel missing from the named source is rejected with a suggestion from that source."""
    text = AGENT + PLC + EDR + CLOUD + witsml_table('"edr/HKLX1" = { mnemonic = "HKLX" }')
    errors = rejected_at(tmp_path, text, "edr/HKLX1")
    assert "source 'edr' has no channel 'HKLX1'; did you mean 'HKLX'?" in errors


def test_source_channel_of_other_source(tmp_path: Path) -> None:
    """A channel of another source does not resolve under the named source."""
    text = AGENT + PLC + EDR + CLOUD + witsml_table('"edr/hookload" = { mnemonic = "HKLA" }')
    errors = rejected_at(tmp_path, text, "edr/hookload")
    assert "source 'edr' has no channel 'hookload'" in errors


@pytest.mark.parametrize("key", ["drilling-plc/hookload/x", "/hookload", "drilling-plc/"])
def test_source_channel_key_invalid(tmp_path: Path, key: str) -> None:
    """A key with an empty part or two '/' is rejected with the expected form."""
    text = AGENT + PLC + CLOUD + witsml_table(f'"{key}" = {{ mnemonic = "HKLA" }}')
    errors = rejected_at(tmp_path, text, f'"{key}"')
    assert f"invalid curve key {key!r}" in errors
    assert "\"SOURCE/CHANNEL\" with one '/'" in errors


def test_same_channel_twice(tmp_path: Path) -> None:
    """A bare key and a "SOURCE/CHANNEL" key of the same channel are rejected at the second."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(SPPA, '"drilling-plc/standpipe_pressure" = { mnemonic = "SPP2" }')
    errors = rejected_at(tmp_path, text, '"drilling-plc/standpipe_pressure"')
    assert (
        "curves 'standpipe_pressure' and 'drilling-plc/standpipe_pressure' both name "
        "channel 'standpipe_pressure' of source 'drilling-plc'"
    ) in errors


def test_channel_named_time_allowed(tmp_path: Path) -> None:
    """The standard TIME item (0106) is a channel like any other; only the mnemonic is reserved."""
    text = AGENT + EDR + CLOUD + witsml_table('TIME = { mnemonic = "HHMMSS" }')
    assert columns_of(tmp_path, text)["TIME"].channel == "TIME"


# --- Unmapped WITS0 codes ---------------------------------------------------------


def test_unmapped_code_kept(tmp_path: Path) -> None:
    """With unmapped = "keep" a code outside the items table is the unitless wits_NNNN channel."""
    text = AGENT + MUDLOG.format(unmapped="keep") + CLOUD
    text += witsml_table(
        'wits_0199 = { mnemonic = "X199" }', '"mudlog/wits_0824" = { mnemonic = "X824" }'
    )
    columns = columns_of(tmp_path, text)
    assert (columns["wits_0199"].channel, columns["wits_0199"].unit) == ("wits_0199", "")
    assert columns["mudlog/wits_0824"].source == "mudlog"


def test_unmapped_code_kept_standard_table(tmp_path: Path) -> None:
    """A code outside the standard record 01 table is a wits_NNNN channel too."""
    text = AGENT + EDR + CLOUD + witsml_table('wits_0824 = { mnemonic = "X824" }')
    assert columns_of(tmp_path, text)["wits_0824"].unit == ""


@pytest.mark.parametrize("key", ["wits_0199", "mudlog/wits_0199"])
def test_unmapped_code_dropped(tmp_path: Path, key: str) -> None:
    """With unmapped = "drop" a wits_NNNN key is rejected with both fixes."""
    text = AGENT + MUDLOG.format(unmapped="drop") + CLOUD
    text += witsml_table(f'"{key}" = {{ mnemonic = "X199" }}')
    errors = rejected_at(tmp_path, text, key)
    assert "channel 'wits_0199' would carry the unmapped WITS code 0199" in errors
    assert "source 'mudlog' drops unmapped codes" in errors
    assert 'set unmapped = "keep" in that source, or map code 0199' in errors


def test_unmapped_name_of_mapped_code(tmp_path: Path) -> None:
    """wits_NNNN of a mapped code is rejected with the channel that the code feeds."""
    text = AGENT + MUDLOG.format(unmapped="keep") + CLOUD
    text += witsml_table('wits_0108 = { mnemonic = "DBTM" }')
    errors = rejected_at(tmp_path, text, "wits_0108 = {")
    assert "WITS code 0108 of source 'mudlog' feeds channel 'bit_depth', not 'wits_0108'" in errors


def test_unmapped_name_of_standard_code(tmp_path: Path) -> None:
    """wits_0108 with the standard table points at the DBTM channel."""
    text = AGENT + EDR + CLOUD + witsml_table('wits_0108 = { mnemonic = "DBTM" }')
    errors = rejected_at(tmp_path, text, "wits_0108 = {")
    assert "feeds channel 'DBTM', not 'wits_0108': use 'DBTM' as the key" in errors


def test_unmapped_code_in_two_sources(tmp_path: Path) -> None:
    """Two WITS0 sources that keep unmapped codes both have every wits_NNNN channel."""
    text = AGENT + EDR + MUDLOG.format(unmapped="keep") + CLOUD
    text += witsml_table('wits_0199 = { mnemonic = "X199" }')
    errors = rejected_at(tmp_path, text, "wits_0199 = {")
    assert '"edr/wits_0199" or "mudlog/wits_0199"' in errors


# --- Header keys ------------------------------------------------------------------


@pytest.mark.parametrize("key", ["well_uid", "wellbore_uid", "log_uid"])
def test_uid_with_space(tmp_path: Path, key: str) -> None:
    """A uid with a space is rejected at its line."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, **{key: '"rig 07"'})
    errors = rejected_at(tmp_path, text, f"{key} = ")
    assert f'witsml.{key} = "rig 07": invalid uid' in errors
    assert "no spaces or other white space" in errors


@pytest.mark.parametrize("char", ["/", "&", ",", "<", "\\\\"])
def test_uid_forbidden_character(tmp_path: Path, char: str) -> None:
    """A uid with a character that needs escaping or splits a URL is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, log_uid=f'"rig{char}07"')
    errors = rejected_at(tmp_path, text, "log_uid = ")
    assert f"invalid uid: it contains {char.replace(chr(92) * 2, chr(92))}" in errors


@pytest.mark.parametrize(
    "key", ["well_uid", "well_name", "wellbore_uid", "wellbore_name", "log_uid", "log_name"]
)
def test_header_over_64(tmp_path: Path, key: str) -> None:
    """Uids and names over 64 characters are rejected; 64 are accepted."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, **{key: f'"{"n" * 65}"'})
    errors = rejected_at(tmp_path, text, f"{key} = ")
    assert "too long: expected at most 64 characters, got 65" in errors
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, **{key: f'"{"n" * 64}"'})
    witsml = load(tmp_path, text).witsml
    assert witsml is not None
    assert getattr(witsml, key) == "n" * 64


@pytest.mark.parametrize("key", ["well_uid", "log_name"])
def test_header_empty(tmp_path: Path, key: str) -> None:
    """An empty uid or name is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, **{key: '""'})
    errors = rejected_at(tmp_path, text, f"{key} = ")
    assert "must not be empty" in errors


@pytest.mark.parametrize("key", ["well_uid", "log_name"])
def test_header_missing(tmp_path: Path, key: str) -> None:
    """A missing uid or name is rejected at the [witsml] table with the key to add."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, **{key: ""})
    errors = rejected_at(tmp_path, text, "[witsml]")
    assert f'missing required key; add {key} = "..." to [witsml]' in errors


def test_name_with_double_space(tmp_path: Path) -> None:
    """A name that the schema would collapse is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, well_name='"Example  1H"')
    errors = rejected_at(tmp_path, text, "well_name = ")
    assert "invalid name: it contains two spaces in a row" in errors


# --- null_value ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("written", "stored"),
    [('"-999.25"', "-999.25"), ("-999.25", "-999.25"), ("-9999", "-9999"), ('"NULL"', "NULL")],
)
def test_null_value_accepted(tmp_path: Path, written: str, stored: str) -> None:
    """null_value is kept as text; a TOML number becomes its text."""
    witsml = load(tmp_path, AGENT + PLC + CLOUD + witsml_table(SPPA, null_value=written)).witsml
    assert witsml is not None
    assert witsml.null_value == stored


@pytest.mark.parametrize(
    ("written", "expected"),
    [
        ('""', "null_value must not be empty"),
        ('"-999,25"', "null_value contains a comma"),
        ('"-999 25"', "null_value contains white space"),
        (f'"{"9" * 33}"', "null_value has 33 characters, and WITSML allows at most 32"),
        ('"NaN"', "null_value 'NaN' is not a finite number"),
        ('"-inf"', "null_value '-inf' is not a finite number"),
        ('"Infinity"', "null_value 'Infinity' is not a finite number"),
        ("nan", "null_value nan is not a finite number"),
        ("inf", "null_value inf is not a finite number"),
        ("true", 'expected a number or a string such as "-999.25", got a boolean'),
    ],
)
def test_null_value_rejected(tmp_path: Path, written: str, expected: str) -> None:
    """An empty, over-long, comma, white-space, NaN or boolean null_value is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, null_value=written)
    errors = rejected_at(tmp_path, text, "null_value = ")
    assert expected in errors


# --- Timing and size ----------------------------------------------------------------


@pytest.mark.parametrize("period", ['"0.5ms"', '"2h"', '"61m"'])
def test_row_period_out_of_range(tmp_path: Path, period: str) -> None:
    """A row_period under 1ms or over 1h is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, row_period=period)
    errors = rejected_at(tmp_path, text, "row_period = ")
    assert "out of range: expected a duration from 1ms to 1h" in errors


@pytest.mark.parametrize(("period", "micros"), [('"1ms"', 1000), ('"1h"', 3_600_000_000)])
def test_row_period_limits_accepted(tmp_path: Path, period: str, micros: int) -> None:
    """1ms and 1h, the limits of row_period, are accepted."""
    witsml = load(tmp_path, AGENT + PLC + CLOUD + witsml_table(SPPA, row_period=period)).witsml
    assert witsml is not None
    assert witsml.row_period_us == micros


def test_row_period_fraction_of_microsecond(tmp_path: Path) -> None:
    """A row_period that is not a whole number of microseconds is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, row_period='"1.0000005s"')
    errors = rejected_at(tmp_path, text, "row_period = ")
    assert "not a whole number of microseconds" in errors


@pytest.mark.parametrize("rows", ["0", "100001", "-1"])
def test_max_rows_out_of_range(tmp_path: Path, rows: str) -> None:
    """max_rows outside 1 to 100000 is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, max_rows=rows)
    errors = rejected_at(tmp_path, text, "max_rows = ")
    assert "out of range: expected a number from 1 to 100000" in errors


def test_max_rows_quoted(tmp_path: Path) -> None:
    """max_rows written as a string is rejected with the unquoted form."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, max_rows='"500"')
    errors = rejected_at(tmp_path, text, "max_rows = ")
    assert "write it without quotes: max_rows = 500" in errors


def test_interval_under_1s(tmp_path: Path) -> None:
    """An upload interval under 1s is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, interval='"500ms"')
    errors = rejected_at(tmp_path, text, "interval = ")
    assert "interval 500ms is too short: expected at least 1s" in errors


def test_settle_bare_number(tmp_path: Path) -> None:
    """settle is a duration string like every other duration."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, settle="5")
    errors = rejected_at(tmp_path, text, "settle = ")
    assert 'a number needs a unit, written in quotes, such as "5s"' in errors


# --- The section as a whole ------------------------------------------------------


def test_witsml_without_cloud(tmp_path: Path) -> None:
    """[witsml] without [cloud] is rejected at the [witsml] header."""
    errors = rejected_at(tmp_path, AGENT + PLC + witsml_table(SPPA), "[witsml]")
    assert "this file has no [cloud] table: add [cloud] with url" in errors


def test_no_curves(tmp_path: Path) -> None:
    """An empty [witsml.curves] table is rejected with an example line."""
    errors = rejected_at(tmp_path, AGENT + PLC + CLOUD + witsml_table(), "[witsml.curves]")
    assert "no curves: add one line per channel to [witsml.curves]" in errors


def test_curves_missing(tmp_path: Path) -> None:
    """A [witsml] table without [witsml.curves] is rejected with the table to add."""
    text = AGENT + PLC + CLOUD + witsml_table().replace("  [witsml.curves]\n", "")
    errors = rejected_at(tmp_path, text, "[witsml]")
    assert "missing required table; add [witsml.curves]" in errors


def test_curve_written_as_string(tmp_path: Path) -> None:
    """A curve written as a string shows the table form."""
    text = AGENT + PLC + CLOUD + witsml_table('standpipe_pressure = "SPPA"')
    errors = rejected_at(tmp_path, text, "standpipe_pressure = ")
    assert "expected a table with the curve's mnemonic" in errors


def test_curve_key_typo(tmp_path: Path) -> None:
    """A misspelt key inside a curve gets the right name suggested."""
    text = (
        AGENT
        + PLC
        + CLOUD
        + witsml_table('standpipe_pressure = { mnemonic = "SPPA", unt = "psi" }')
    )
    errors = rejected_at(tmp_path, text, "standpipe_pressure = ")
    assert "unknown key 'unt': did you mean 'unit'?" in errors


def test_description_too_long(tmp_path: Path) -> None:
    """A curve description over 256 characters is rejected."""
    text = AGENT + PLC + CLOUD
    text += witsml_table(
        f'standpipe_pressure = {{ mnemonic = "SPPA", description = "{"d" * 257}" }}'
    )
    errors = rejected_at(tmp_path, text, "standpipe_pressure = ")
    assert "too long: expected at most 256 characters, got 257" in errors


# --- Summary and example ------------------------------------------------------------


def test_summary_witsml_lines(tmp_path: Path) -> None:
    """check-config's summary shows the log, its timing and each curve with its unit."""
    text = AGENT + PLC + EDR + CLOUD
    text += witsml_table(
        SPPA,
        '"edr/DBTM" = { mnemonic = "DBTM" }',
        'pump1_running = { mnemonic = "PMP1" }',
        row_period='"500ms"',
        interval='"2m"',
    )
    summary = summarize(load(tmp_path, text))
    sink = next(line for line in summary.splitlines() if line.startswith("sink witsml:"))
    assert "log rig-07-time (Rig 07 time log)" in sink
    assert "rows of 500ms" in sink
    assert "upload every 120s" in sink
    assert "null value -999.25" in sink
    curves = [
        line.split(":", 1)[1].strip()
        for line in summary.splitlines()
        if line.startswith("witsml curve:")
    ]
    assert curves == [
        "drilling-plc/standpipe_pressure -> SPPA [psi]",
        "edr/DBTM -> DBTM [m]",
        "drilling-plc/pump1_running -> PMP1 (no unit)",
    ]


def uncomment(text: str, start: str, end: str) -> str:
    """Remove the leading "# " of each line of `text` from `start` up to `end`."""
    first = text.index(start)
    last = text.index(end, first)
    block = [line.removeprefix("#").removeprefix(" ") for line in text[first:last].splitlines()]
    return text[:first] + "\n".join(block) + "\n" + text[last:]


def test_example_witsml_block_loads(tmp_path: Path) -> None:
    """The commented-out [witsml] table of the example is valid with [cloud] uncommented."""
    text = uncomment(EXAMPLE.read_text(), "# [witsml]", "# The cloud ingest service")
    text = uncomment(text, "# [cloud]", "# ca_file")
    config = load(tmp_path, text)
    assert config.enabled_sinks() == ["mqtt", "cloud", "witsml"]
    witsml = config.witsml
    assert witsml is not None
    assert (witsml.interval, witsml.row_period, witsml.settle) == (60.0, 1.0, 5.0)
    assert witsml.max_rows == 10_000
    assert witsml.null_value == "-999.25"
    units = {column.mnemonic: column.unit for column in config.witsml_columns()}
    assert units == {
        "SPPA": "psi",
        "HKLA": "klbf",
        "BPOS": "m",
        "TQA": "kft.lbf",
        "RPMA": "rpm",
        "MFOP": "%",
    }


def test_example_witsml_block_with_wits0(tmp_path: Path) -> None:
    """The example's curve keys stay unambiguous when its WITS0 feed is uncommented too."""
    text = uncomment(EXAMPLE.read_text(), "# [witsml]", "# The cloud ingest service")
    text = uncomment(text, "# [cloud]", "# ca_file")
    text = uncomment(text, "# [[sources.wits0]]", "# A second device")
    config = load(tmp_path, text)
    assert [config.witsml_column_source(column) for column in config.witsml_columns()] == [
        "drilling-plc"
    ] * 6


def test_header_errors_case_reports_each() -> None:
    """Mistakes in several [witsml] keys are all reported, one issue per key."""
    case = Path(__file__).parent / "cases" / "config" / "witsml_header_errors" / "agent.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(case)
    issues = caught.value.issues
    assert [issue.path for issue in issues] == [
        "witsml.row_period",
        "witsml.null_value",
        "witsml.max_rows",
        "witsml.log_uid",
    ]


def test_settle_over_1h_rejected(tmp_path: Path) -> None:
    """A settle over 1h would hold every row back that long, so it is rejected."""
    text = AGENT + PLC + CLOUD + witsml_table(SPPA, settle='"30d"')
    errors = rejected_at(tmp_path, text, "settle = ")
    assert 'witsml.settle = "30d": too long: expected at most 1h' in errors

    witsml = load(tmp_path, AGENT + PLC + CLOUD + witsml_table(SPPA, settle='"1h"')).witsml
    assert witsml is not None
    assert witsml.settle == 3600.0
