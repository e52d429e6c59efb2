"""Load the agent's TOML config file and report every mistake with its TOML path and line."""

from __future__ import annotations

import ast
import json
import math
import re
import tomllib
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from difflib import get_close_matches
from pathlib import Path
from typing import Any, Final, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails

from config.model import (
    NAME_PATTERN,
    CloudSection,
    Config,
    ModbusSource,
    Wits0Source,
    WitsmlSection,
)
from config.toml_lines import TomlLines, TomlPath
from config.units import format_duration, format_size
from drivers.modbus_plan import describe_plan, plan_for_source

__all__ = [
    "MISSING",
    "ConfigError",
    "ConfigIssue",
    "TomlLines",
    "TomlPath",
    "format_path",
    "format_value",
    "load_config",
    "summarize",
]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_MAX_VALUE_CHARS = 60


class _Missing:
    """Type of `MISSING`, the value of an issue about a key that is absent."""

    def __repr__(self) -> str:
        return "MISSING"


MISSING: Final = _Missing()


# --- Issues and the error that carries them ---------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One mistake in a config file, located by TOML path and line."""

    path: str
    """TOML path such as `sources.modbus[0].points[3].type`, or "" for the file as a whole."""
    line: int | None
    """1-based line in the file, or None when no line applies (a missing table)."""
    value: object
    """The rejected value, or `MISSING` when the key is absent."""
    message: str
    """Expectation and fix, in plain words."""
    column: int | None = None
    """1-based column, known only for TOML syntax errors."""
    file: Path | None = None

    def __str__(self) -> str:
        location = str(self.file) if self.file is not None else ""
        if self.line is not None:
            location = f"{location}:{self.line}" if location else f"line {self.line}"
            if self.column is not None:
                location += f":{self.column}"
        subject = self.path
        if subject and _shows_value(self.value):
            subject += f" = {format_value(self.value)}"
        return ": ".join(part for part in (location, subject, self.message) if part)


class ConfigError(Exception):
    """A config file that cannot be used, with every issue found in it."""

    def __init__(self, file: Path, issues: list[ConfigIssue]) -> None:
        self.file = file
        self.issues = issues
        super().__init__(file, issues)

    def __str__(self) -> str:
        return "\n".join(str(issue) for issue in self.issues)


# --- Loading ----------------------------------------------------------------


def load_config(path: Path) -> Config:
    """Read, parse and validate a config file.

    Raises ConfigError listing every issue found: an unreadable file, invalid TOML
    syntax, or each value that the config model rejects.
    """
    text = _read_text(path)
    data = _parse_toml(path, text)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = TomlLines(text)
        issues = [
            _issue_from_error(details, data, lines, path)
            for details in exc.errors(include_url=False)
        ]
        issues.sort(key=lambda issue: issue.line or 0)
        raise ConfigError(path, issues) from exc


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        issue = _file_issue(path, "file not found; check the path")
        raise ConfigError(path, [issue]) from exc
    except IsADirectoryError as exc:
        issue = _file_issue(path, "is a directory; expected the path of a .toml file")
        raise ConfigError(path, [issue]) from exc
    except OSError as exc:
        reason = exc.strerror or str(exc)
        issue = _file_issue(path, f"failed to read the file: {reason}; check its permissions")
        raise ConfigError(path, [issue]) from exc

    # Editors on Windows may start the file with a byte order mark, which tomllib rejects.
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        message = f"invalid UTF-8 byte 0x{raw[exc.start]:02x}; save the file as UTF-8 text"
        issue = ConfigIssue("", line, MISSING, message, file=path)
        raise ConfigError(path, [issue]) from exc


def _file_issue(path: Path, message: str) -> ConfigIssue:
    return ConfigIssue("", None, MISSING, message, file=path)


def _parse_toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [_syntax_issue(path, text, str(exc))]) from exc


# --- TOML syntax errors -----------------------------------------------------

_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_END_OF_DOCUMENT = re.compile(r"\s*\(at end of document\)$")
_DECLARED_TWICE = re.compile(r"Cannot declare (\(.*\)) twice")

# NOTE: these prefixes match the messages of tomllib in Python 3.11.7, the only
# version checked. A message that matches none of them is shown as tomllib wrote it.
_SYNTAX_EXPLANATIONS: Final = (
    (
        "Illegal character '\\n'",
        "a string is not closed: add the closing quote on the same line, "
        'or use """ for text over several lines',
    ),
    ("Unterminated string", "a string is not closed: add the closing quotes"),
    ('Expected "\'"', "a string is not closed: add the closing quote"),
    (
        "Invalid value",
        "invalid value: expected a string in double quotes, a number, true, false, "
        "a date, an array [...] or an inline table {...}",
    ),
    ("Expected '=' after a key", "expected '=' after the key: write key = value"),
    (
        "Cannot overwrite a value",
        "a key is set twice, or a table header repeats the name of a key: "
        "rename or delete one of them",
    ),
    (
        "Expected newline or end of document after a statement",
        "unexpected text after the value: write one key = value per line and start comments with #",
    ),
    ("Expected ']' at the end of a table", "a table header is not closed: add the closing ']'"),
    ("Expected ']]' at the end of an array", "a table header is not closed: add the closing ']]'"),
    ("Unclosed array", "an array is not closed: add the closing ']'"),
    ("Unclosed inline table", "an inline table is not closed: add the closing '}' on its line"),
    (
        "Unescaped '\\' in a string",
        'a backslash in a "..." string starts an escape: write \\\\ for one backslash, '
        "or use single quotes, such as 'C:\\data'",
    ),
    (
        "Invalid statement",
        "invalid line: expected key = value, a [table] header or a # comment",
    ),
)


def _syntax_issue(path: Path, text: str, error: str) -> ConfigIssue:
    """Turn a tomllib error message into an issue with its line, column and a plain explanation."""
    line: int | None = max(len(text.splitlines()), 1)
    column: int | None = None
    reason = _END_OF_DOCUMENT.sub("", error)
    position = _POSITION.search(reason)
    if position is not None:
        line, column = int(position.group(1)), int(position.group(2))
        reason = reason[: position.start()]

    # tomllib places a key set twice at the end of the document, so find the key here.
    if reason.startswith("Cannot overwrite a value"):
        located = TomlLines(text)
        if located.duplicates:
            key_path, key_line = located.duplicates[0]
            first_line = located.lines.get(key_path)
            where = f" (first on line {first_line})" if first_line else ""
            message = f"invalid TOML: key is set twice{where}; delete one of the two"
            return ConfigIssue(format_path(key_path), key_line, MISSING, message, file=path)
    return ConfigIssue("", line, MISSING, f"invalid TOML: {_explain_syntax(reason)}", column, path)


def _explain_syntax(reason: str) -> str:
    declared_twice = _DECLARED_TWICE.match(reason)
    if declared_twice is not None:
        try:
            keys = ast.literal_eval(declared_twice.group(1))
        except (ValueError, SyntaxError):
            keys = ()
        name = format_path(tuple(str(key) for key in keys))
        return (
            f"table [{name}] is declared twice: merge them into one [{name}] table, "
            f"or write [[{name}]] for each entry of a list of tables"
        )
    for prefix, explanation in _SYNTAX_EXPLANATIONS:
        if reason.startswith(prefix):
            return explanation
    return reason


# --- Validation errors ------------------------------------------------------

_ErrorMessage = Callable[[TomlPath, object, ErrorDetails], str]

_EXPECTED_TYPES: Final = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string in double quotes",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "path_type": "a path in double quotes",
    "list_type": "an array",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "dict_type": "a table",
}
_PYDANTIC_PREFIXES: Final = ("Value error, ", "Assertion failed, ")


def _issue_from_error(
    details: ErrorDetails, data: dict[str, Any], lines: TomlLines, file: Path
) -> ConfigIssue:
    """Convert one pydantic error into an issue at the line of its key."""
    path: TomlPath = tuple(details["loc"])
    at = details.get("ctx", {}).get("at")
    if isinstance(at, tuple):
        path = (*path, *at)
    kind = details["type"]
    value = MISSING if kind == "missing" else _lookup(data, path, details["input"])
    message = _message(kind, path, value, details)
    return ConfigIssue(format_path(path), lines.line_of(path), value, message, file=file)


def _message(kind: str, path: TomlPath, value: object, details: ErrorDetails) -> str:
    if kind in _EXPECTED_TYPES:
        return _type_message(kind, path, value)
    handler = _MESSAGES.get(kind)
    if handler is not None:
        return handler(path, value, details)
    text = details["msg"]
    for prefix in _PYDANTIC_PREFIXES:
        text = text.removeprefix(prefix)
    return text


def _missing_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    field = _field_at(path)
    annotation = field.annotation if field is not None else None
    table = _table_phrase(path[:-1])
    if get_origin(annotation) is list and _inner_model(annotation) is not None:
        return f"missing required key; add at least one [[{_header(path)}]] table below {table}"
    model = _inner_model(annotation)
    if model is not None:
        keys = [f"{name} = {_placeholder(info)}" for name, info in _required_scalars(model)]
        with_keys = f" with {', '.join(keys)}" if keys else ""
        return f"missing required table; add [{_header(path)}]{with_keys}"
    entry = _mapping_model(annotation)
    if entry is not None:
        keys = [f"{name} = {_placeholder(info)}" for name, info in _required_scalars(entry)]
        return (
            f"missing required table; add [{_header(path)}] with one line per entry, "
            f"such as KEY = {{ {', '.join(keys)} }}"
        )
    return f"missing required key; add {path[-1]} = {_placeholder(field)} to {table}"


def _unknown_key_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    key = str(path[-1])
    model = _model_at(path[:-1])
    known = list(model.model_fields) if model is not None else []
    entry = "table" if isinstance(value, dict) or _is_table_list(value) else "key"
    message = f"unknown {entry} {key!r}"

    close = get_close_matches(key.lower(), known, n=1)
    if close:
        return f"{message}: did you mean {close[0]!r}?"
    owner = _ancestor_with_field(path[:-1], key)
    if owner is not None:
        return (
            f"{message} in {_bracketed(path[:-1])}: it is a key of {_bracketed(owner)}, "
            f"so move it above the first {_bracketed(path[:-1])} header"
        )
    return f"{message}: expected one of {', '.join(known)}" if known else message


def _type_message(kind: str, path: TomlPath, value: object) -> str:
    message = f"expected {_EXPECTED_TYPES[kind]}, got {_toml_type(value)}"
    key = path[-1] if path else ""
    if kind == "list_type" and isinstance(value, dict):
        return f"{message}; write [[{_header(path)}]] instead of [{_header(path)}]"
    if kind.startswith("model") and _is_table_list(value):
        return f"{message}; write [{_header(path)}] instead of [[{_header(path)}]]"
    # An array element has no key of its own, so its fix shows the value alone.
    assignment = f"{key} = " if isinstance(key, str) else ""
    if kind in ("string_type", "path_type") and _is_scalar(value):
        return f'{message}; put the value in quotes: {assignment}"{_plain(value)}"'
    if isinstance(value, str) and _unquoted(value, kind) is not None:
        return f"{message}; write it without quotes: {assignment}{_unquoted(value, kind)}"
    return message


def _unquoted(text: str, kind: str) -> str | None:
    """Return `text` as an unquoted TOML number or boolean, or None if it is neither."""
    if kind.startswith("bool"):
        return text.strip().lower() if text.strip().lower() in ("true", "false") else None
    try:
        value = tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError:
        return None
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return text.strip() if number else None


def _literal_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    field = _field_at(path)
    choices = _literal_choices(field.annotation) if field is not None else ()
    if not choices:
        return f"expected {details.get('ctx', {}).get('expected', 'one of the listed values')}"
    message = f"expected one of {', '.join(format_value(choice) for choice in choices)}"
    names = [choice for choice in choices if isinstance(choice, str)]
    close = get_close_matches(str(value).lower(), names, n=1) if isinstance(value, str) else []
    return f"{message}; did you mean {format_value(close[0])}?" if close else message


def _literal_choices(annotation: Any) -> tuple[object, ...]:
    """Return the values of a Literal annotation, also inside `Literal[...] | None`."""
    if get_origin(annotation) is Literal:
        return get_args(annotation)
    if get_origin(annotation) in (Union, types.UnionType):
        return tuple(
            choice for argument in get_args(annotation) for choice in _literal_choices(argument)
        )
    return ()


def _range_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    field = _field_at(path)
    metadata = field.metadata if field is not None else []
    ctx = details.get("ctx", {})
    low = next((item.ge for item in metadata if hasattr(item, "ge")), ctx.get("ge"))
    high = next((item.le for item in metadata if hasattr(item, "le")), ctx.get("le"))
    if low is not None and high is not None:
        return f"out of range: expected a number from {low} to {high}"
    if low is not None:
        return f"out of range: expected a number of at least {low}"
    if high is not None:
        return f"out of range: expected a number of at most {high}"
    text: str = details["msg"]
    return text


def _pattern_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    pattern = details.get("ctx", {}).get("pattern")
    if pattern == NAME_PATTERN:
        return "invalid name: use only letters, digits, '_', '.' and '-', with no spaces"
    return f"invalid text: expected a match for the pattern {pattern}"


def _length_message(path: TomlPath, value: object, details: ErrorDetails) -> str:
    ctx = details.get("ctx", {})
    actual = len(value) if isinstance(value, str | list) else ctx.get("actual_length")
    if details["type"] == "string_too_short":
        if ctx.get("min_length") == 1:
            return "must not be empty"
        return f"too short: expected at least {ctx.get('min_length')} characters"
    if details["type"] == "string_too_long":
        return f"too long: expected at most {ctx.get('max_length')} characters, got {actual}"
    field = _field_at(path)
    is_tables = field is not None and _inner_model(field.annotation) is not None
    if details["type"] == "too_short" and is_tables:
        return f"expected at least one [[{_header(path)}]] table, got {actual}"
    if details["type"] == "too_short":
        return f"too few items: expected at least {ctx.get('min_length')}, got {actual}"
    return f"too many items: expected at most {ctx.get('max_length')}, got {actual}"


_MESSAGES: Final[dict[str, _ErrorMessage]] = {
    "missing": _missing_message,
    "extra_forbidden": _unknown_key_message,
    "literal_error": _literal_message,
    "greater_than_equal": _range_message,
    "less_than_equal": _range_message,
    "greater_than": _range_message,
    "less_than": _range_message,
    "string_pattern_mismatch": _pattern_message,
    "string_too_short": _length_message,
    "string_too_long": _length_message,
    "too_short": _length_message,
    "too_long": _length_message,
}


# --- Walking the config model along a TOML path -----------------------------


def _model_at(path: TomlPath) -> type[BaseModel] | None:
    """Return the model class that validates the table at `path`."""
    model: type[BaseModel] = Config
    at_mapping_key = False
    for part in path:
        if isinstance(part, int):
            continue
        if at_mapping_key:
            # `part` is a key chosen in the file, such as a WITS code in `items`.
            at_mapping_key = False
            continue
        field = model.model_fields.get(part)
        annotation = field.annotation if field is not None else None
        inner = _inner_model(annotation)
        if inner is None:
            inner = _mapping_model(annotation)
            at_mapping_key = inner is not None
        if inner is None:
            return None
        model = inner
    return None if at_mapping_key else model


def _field_at(path: TomlPath) -> FieldInfo | None:
    if not path or isinstance(path[-1], int):
        return None
    model = _model_at(path[:-1])
    return model.model_fields.get(path[-1]) if model is not None else None


def _inner_model(annotation: Any) -> type[BaseModel] | None:
    """Return the model inside an annotation such as `Model`, `Model | None` or `list[Model]`."""
    if get_origin(annotation) in (list, Union, types.UnionType):
        for argument in get_args(annotation):
            inner = _inner_model(argument)
            if inner is not None:
                return inner
        return None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _mapping_model(annotation: Any) -> type[BaseModel] | None:
    """Return the model of the values of `dict[str, Model]`, also inside a union."""
    if get_origin(annotation) in (Union, types.UnionType):
        for argument in get_args(annotation):
            inner = _mapping_model(argument)
            if inner is not None:
                return inner
        return None
    if get_origin(annotation) is dict:
        return _inner_model(get_args(annotation)[1])
    return None


def _required_scalars(model: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    return [
        (name, info)
        for name, info in model.model_fields.items()
        if info.is_required() and _inner_model(info.annotation) is None
    ]


def _ancestor_with_field(path: TomlPath, key: str) -> TomlPath | None:
    """Return the nearest enclosing table whose model has `key`, for keys written too late."""
    for end in range(len(path) - 1, -1, -1):
        model = _model_at(path[:end])
        if model is not None and key in model.model_fields and end:
            return path[:end]
    return None


def _placeholder(field: FieldInfo | None) -> str:
    annotation = field.annotation if field is not None else None
    if annotation is str:
        return '"..."'
    if get_origin(annotation) is Literal:
        return format_value(get_args(annotation)[0])
    return "..."


def _header(path: TomlPath) -> str:
    """Return the table header name for `path`: its keys without array indices."""
    return format_path(tuple(part for part in path if isinstance(part, str)))


def _bracketed(path: TomlPath) -> str:
    """Return the header that opens the table at `path`: `[name]`, or `[[name]]` in an array."""
    if path and isinstance(path[-1], int):
        return f"[[{_header(path)}]]"
    return f"[{_header(path)}]"


def _table_phrase(path: TomlPath) -> str:
    if not path:
        return "the top of the file"
    if isinstance(path[-1], int):
        return f"this [[{_header(path)}]] table"
    return f"[{_header(path)}]"


def _lookup(data: object, path: TomlPath, default: object) -> object:
    """Return the raw TOML value at `path`, or `default` when the path is not in the data."""
    for part in path:
        if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
            continue
        if isinstance(data, dict) and part in data:
            data = data[part]
            continue
        return default
    return data


# --- Formatting paths and values --------------------------------------------


def format_path(path: Sequence[str | int]) -> str:
    """Format a path as TOML writes it: `sources.modbus[0].points[3].type`."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        key = part if _BARE_KEY.fullmatch(part) else json.dumps(part, ensure_ascii=False)
        text = f"{text}.{key}" if text else key
    return text


_URL_USERINFO = re.compile(r"//[^/@\s]*@")


def format_value(value: object) -> str:
    """Format a value as TOML would write it, shortened to about 60 characters.

    The user-info part of a URL ("//user:password@") is masked, because error
    messages end up in the journal.
    """
    if isinstance(value, str):
        value = _URL_USERINFO.sub("//***@", value)
    text = _toml_literal(value)
    if len(text) > _MAX_VALUE_CHARS:
        text = text[: _MAX_VALUE_CHARS - 3] + "..."
    return text


def _toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(_toml_literal(item) for item in value) + "]"
    if isinstance(value, dict):
        pairs = ", ".join(f"{format_path([k])} = {_toml_literal(v)}" for k, v in value.items())
        return "{ " + pairs + " }" if pairs else "{}"
    return repr(value)


def _plain(value: object) -> str:
    return _toml_literal(value).strip('"')


def _toml_type(value: object) -> str:
    names: list[tuple[type | tuple[type, ...], str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a float"),
        (str, "a string"),
        ((datetime, date, time), "a date or time"),
        (dict, "a table"),
    ]
    if _is_table_list(value):
        return "an array of tables"
    for kind, name in names:
        if isinstance(value, kind):
            return name
    return "an array" if isinstance(value, list) else type(value).__name__


def _is_scalar(value: object) -> bool:
    return isinstance(value, bool | int | float | str)


def _is_table_list(value: object) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _shows_value(value: object) -> bool:
    """Return whether an issue shows its value. Tables are left out because they span lines."""
    return value is not MISSING and not isinstance(value, dict) and not _is_table_list(value)


# --- Summary ----------------------------------------------------------------


def summarize(config: Config) -> str:
    """Describe what the agent would run with this config, one aligned line per item."""
    buffer = config.buffer
    rows = [
        ("rig id", config.agent.rig_id),
        ("data dir", str(config.agent.data_dir)),
        (
            "buffer",
            f"max {format_size(buffer.max_bytes)}, "
            f"commit every {format_duration(buffer.commit_interval)}",
        ),
    ]
    for source in config.sources.modbus:
        rows.extend(_source_rows(source))
    for wits0 in config.sources.wits0:
        rows.extend(_wits0_rows(wits0))
    if not config.sources.modbus and not config.sources.wits0:
        advice = "none; add a [[sources.modbus]] or [[sources.wits0]] table to read a device"
        rows.append(("sources", advice))
    if config.mqtt is not None:
        rows.append(
            (
                "sink mqtt",
                f"{config.mqtt.url}, topic prefix {config.topic_prefix()}, qos {config.mqtt.qos}",
            )
        )
    if config.cloud is not None:
        rows.extend(_cloud_rows(config.cloud))
    if config.witsml is not None:
        rows.extend(_witsml_rows(config, config.witsml))
    if not config.enabled_sinks():
        rows.append(("sinks", "none; readings stay in the local buffer"))
    width = max(len(label) for label, _ in rows) + 1
    return "\n".join(f"{label + ':':<{width}} {text}" for label, text in rows)


def _source_rows(source: ModbusSource) -> list[tuple[str, str]]:
    """Describe one Modbus source: its connection, its read plan and each converted address."""
    count = len(source.points)
    settings = [
        f"modbus {source.endpoint.describe()}",
        f"unit {source.unit_id}",
        f"poll every {format_duration(source.poll_interval)}",
        f"timeout {format_duration(source.timeout)}",
    ]
    if source.frame_pause:
        settings.append(f"frame pause {format_duration(source.frame_pause)}")
    settings.append(f"{count} point{'s' if count != 1 else ''}")
    rows = [(f"source {source.name}", ", ".join(settings))]
    try:
        plan = describe_plan(source, plan_for_source(source))
    except ValueError as exc:
        plan = f"cannot be planned: {exc}"
    rows.append((f"plan {source.name}", plan))
    for point in source.points:
        if point.address_note:
            rows.append((f"point {source.name}/{point.channel}", point.address_note))
    return rows


def _wits0_rows(source: Wits0Source) -> list[tuple[str, str]]:
    """Describe one WITS0 source: its link, code mapping, null values, time stamps and transmit."""
    if isinstance(source.items, str):
        mapping = f"items {source.items} in {source.units} units"
    else:
        count = len(source.items)
        mapping = f"{count} mapped code{'s' if count != 1 else ''}"
    unmapped = "other codes as wits_<code>" if source.unmapped == "keep" else "other codes dropped"
    nulls = ", ".join(repr(value).removesuffix(".0") for value in source.null_values) or "none"
    clock = f"device time in {source.timezone}" if source.use_device_time else "receive time"
    settings = [
        f"wits0 {source.link.describe()}",
        mapping,
        unmapped,
        f"null values {nulls}",
        clock,
        f"silence timeout {format_duration(source.silence_timeout)}",
    ]
    rows = [(f"source {source.name}", ", ".join(settings))]
    if source.transmit:
        lines = " ".join(code + text for code, text in source.transmit_items)
        every = format_duration(source.transmit_interval)
        rows.append((f"transmit {source.name}", f"{lines} every {every}"))
    return rows


def _cloud_rows(cloud: CloudSection) -> list[tuple[str, str]]:
    """Describe the cloud sink, and whether its key file would let the agent start here."""
    settings = [
        cloud.url,
        f"device {cloud.device_id}",
        f"audience {cloud.audience}",
        f"up to {cloud.batch_max_readings} readings per batch",
        f"every {format_duration(cloud.interval)} when idle",
        f"token lifetime {format_duration(cloud.token_lifetime)}",
        f"timeout {format_duration(cloud.timeout)}",
    ]
    if not cloud.is_tls:
        settings.append("plain http" if cloud.is_loopback else "plain http (allow_insecure_http)")
    if cloud.ca_file:
        settings.append(f"extra CA file {cloud.ca_file}")
    return [("sink cloud", ", ".join(settings)), ("cloud key", _key_status(cloud.private_key_file))]


def _witsml_rows(config: Config, witsml: WitsmlSection) -> list[tuple[str, str]]:
    """Describe the WITSML sink: its log, row and upload timing, then one line per curve."""
    settings = [
        f"log {witsml.log_uid} ({witsml.log_name})",
        f"well {witsml.well_uid} ({witsml.well_name})",
        f"wellbore {witsml.wellbore_uid} ({witsml.wellbore_name})",
        f"rows of {format_duration(witsml.row_period)}",
        f"upload every {format_duration(witsml.interval)}",
        f"{format_duration(witsml.settle)} after a row ends",
        f"up to {witsml.max_rows} rows per document",
        f"null value {witsml.null_value}",
    ]
    rows = [("sink witsml", ", ".join(settings))]
    for column in config.witsml_columns():
        channel = f"{config.witsml_column_source(column)}/{column.channel}"
        unit = f"[{column.unit}]" if column.unit else "(no unit)"
        rows.append(("witsml curve", f"{channel} -> {column.mnemonic} {unit}"))
    return rows


def _key_status(setting: str) -> str:
    """Check the device key file as the agent would at start, and describe the outcome.

    A failure here is reported but is not a config error: the config may be
    checked on another machine than the rig, where the key does not exist.
    """
    # Imported here so that loading a config does not need the uplink's libraries.
    from uplink.auth import KeyFileError, jwk_thumbprint, load_private_key, resolve_secret_path

    try:
        path = resolve_secret_path(setting)
    except KeyFileError:
        return (
            f"credential {setting!r} in $CREDENTIALS_DIRECTORY, which systemd sets from "
            "LoadCredential=; not set here, so the key is not checked"
        )
    try:
        kid = jwk_thumbprint(load_private_key(path).public_key())
    except KeyFileError as exc:
        return f"WARNING: {exc}; the agent will not start on this machine until this is fixed"
    return f"{path}, kid {kid}"
