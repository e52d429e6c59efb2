"""JSON Schema of the config file, for editors that check TOML as the user types."""

from __future__ import annotations

import json
from typing import Any

from config.model import Config
from config.units import DURATION_PATTERN, SIZE_PATTERN, format_duration, format_size

__all__ = ["SCHEMA_ID", "config_json_schema", "config_json_schema_text"]

SCHEMA_ID = "https://rig-agent.invalid/schemas/agent.schema.json"
"""`$id` of the schema. The host is reserved, so no editor tries to download it."""


def config_json_schema() -> dict[str, Any]:
    """Return the JSON Schema (draft 2020-12) of the config file as written in TOML.

    The pydantic models describe the values after conversion. This schema
    describes what the file may contain instead: durations and sizes are
    strings with a unit, and Modbus addresses may be Modicon strings.
    """
    generated = Config.model_json_schema(mode="validation")
    generated.pop("title", None)
    generated.pop("description", None)
    schema: dict[str, Any] = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "rig-agent config",
        "description": (
            "Config of the rig-agent edge gateway (TOML). "
            "Check a file with `rig-agent check-config FILE`."
        ),
        **generated,
    }
    for prop in schema.get("properties", {}).values():
        _drop_null(prop)
    for model in schema.get("$defs", {}).values():
        for name, prop in model.get("properties", {}).items():
            _drop_null(prop)
            _written_default(prop)
            prop.pop("format", None)
            if model.get("title") == "ModbusPoint":
                _modbus_point_property(name, prop)
    return schema


def config_json_schema_text() -> str:
    """Return the schema as indented JSON text with a final newline."""
    return json.dumps(config_json_schema(), indent=2, sort_keys=False) + "\n"


def _drop_null(prop: dict[str, Any]) -> None:
    """Remove the null choice of an optional key: TOML has no null, a key is left out instead.

    With a single remaining choice, validators report the error of that
    choice rather than "not valid under any of the given schemas".
    """
    choices = prop.get("anyOf")
    if not choices or {"type": "null"} not in choices:
        return
    rest = [choice for choice in choices if choice != {"type": "null"}]
    if prop.get("default", 0) is None:
        del prop["default"]
    if len(rest) == 1:
        del prop["anyOf"]
        prop.update(rest[0])
    else:
        prop["anyOf"] = rest


def _written_default(prop: dict[str, Any]) -> None:
    """Write the default of a duration or size the way the file writes it ("100ms", "2GiB")."""
    if "default" not in prop or prop.get("type") != "string":
        return
    pattern = prop.get("pattern")
    default = prop["default"]
    if isinstance(default, bool) or not isinstance(default, int | float):
        return
    if pattern == DURATION_PATTERN:
        prop["default"] = format_duration(float(default))
    elif pattern == SIZE_PATTERN:
        prop["default"] = format_size(int(default))


def _modbus_point_property(name: str, prop: dict[str, Any]) -> None:
    """Admit the spellings that the point's validators accept before the field checks."""
    if name == "address":
        prop.pop("type", None)
        prop.pop("minimum", None)
        prop.pop("maximum", None)
        prop["anyOf"] = [
            {"type": "integer", "minimum": 0, "maximum": 465536},
            {"type": "string", "minLength": 1},
        ]
        prop["description"] = (
            "Register or bit address: 0-based (or 1-based with address_base = 1), or a "
            'Modicon address such as 40001, 400001 or "4x0001" when table is omitted.'
        )
    elif name == "order":
        for option in [prop, *prop.get("anyOf", [])]:
            if "enum" in option:
                option["enum"] = [*option["enum"], *(value.lower() for value in option["enum"])]
