"""`rig-agent config schema`: the JSON Schema accepts valid config files and rejects broken ones."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from config.loader import load_config
from config.schema import config_json_schema

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "config" / "examples" / "agent.toml"

MINIMAL = """
[agent]
rig_id = "rig-07"
data_dir = "/var/lib/rig-agent"

[buffer]
max_bytes = "512MiB"
commit_interval = "250ms"

[[sources.modbus]]
name = "plc"
url = "tcp://127.0.0.1:502"
poll_interval = "1s"
  [[sources.modbus.points]]
  channel = "spp"
  address = 40001
  type = "uint16"
  [[sources.modbus.points]]
  channel = "hook_load"
  address = "4x0003"
  order = "cdab"
  type = "float32"
"""


def _validator() -> jsonschema.Draft202012Validator:
    schema = config_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(document: dict[str, Any]) -> list[str]:
    return [error.message for error in _validator().iter_errors(document)]


def test_schema_is_valid_draft_2020_12() -> None:
    schema = config_json_schema()

    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def test_schema_accepts_example_config() -> None:
    document = tomllib.loads(EXAMPLE.read_text())

    assert _errors(document) == []


def test_schema_accepts_written_forms(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MINIMAL)
    load_config(path)  # the loader accepts the file, so the schema must too

    assert _errors(tomllib.loads(MINIMAL)) == []


def test_schema_defaults_as_written() -> None:
    buffer = config_json_schema()["$defs"]["BufferSection"]["properties"]

    assert buffer["commit_interval"]["default"] == "100ms"
    assert buffer["max_bytes"]["default"] == "2GiB"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"commit_interval": 0.1}, "is not of type 'string'"),
        ({"commit_interval": "100"}, "does not match"),
        ({"max_bytes": "2 gigabytes"}, "does not match"),
        ({"max_byte": "2GiB"}, "Additional properties are not allowed"),
    ],
)
def test_schema_rejects_buffer_mistakes(change: dict[str, Any], expected: str) -> None:
    document = tomllib.loads(MINIMAL)
    document["buffer"] = change

    errors = _errors(document)

    assert len(errors) == 1
    assert expected in errors[0]


def test_schema_requires_agent_table() -> None:
    document = tomllib.loads(MINIMAL)
    del document["agent"]

    assert _errors(document) == ["'agent' is a required property"]


def test_cli_prints_schema() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "config", "schema"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == config_json_schema()


def test_schema_accepts_witsml_section(tmp_path: Path) -> None:
    text = (
        MINIMAL
        + """
[cloud]
url = "https://ingest.example.com"
device_id = "rig-07-edge"
private_key_file = "/etc/rig-agent/device-key.pem"

[witsml]
interval = "60s"
row_period = "1s"
null_value = -999.25
well_uid = "W-001"
well_name = "Example 1H"
wellbore_uid = "WB-001"
wellbore_name = "Example 1H OH"
log_uid = "rig-07-time"
log_name = "Rig 07 time log"
  [witsml.curves]
  spp = { mnemonic = "SPPA", unit = "psi" }
  "plc/hook_load" = { mnemonic = "HKLA" }
"""
    )
    path = tmp_path / "agent.toml"
    path.write_text(text)
    load_config(path)

    assert _errors(tomllib.loads(text)) == []


def test_schema_names_key_in_optional_table() -> None:
    """An error inside an optional table names the key, not "not valid under any schema"."""
    document = tomllib.loads(MINIMAL)
    document["mqtt"] = {"url": "mqtt://127.0.0.1:1883", "qos": 2}

    errors = _errors(document)

    assert errors == ["2 is not one of [0, 1]"]
