"""Find the line of each key and array-of-tables element in a TOML text.

tomllib parses the file but keeps no positions; this locator scans the same text
so that config errors can name their line. It does not validate TOML.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from typing import NamedTuple

__all__ = ["TomlLines", "TomlPath"]

TomlPath = tuple[str | int, ...]
"""Keys and array indices from the document root, in the form of pydantic's error `loc`."""


_TOKEN = re.compile(
    r"(?P<space>[ \t]+)"
    r"|(?P<comment>\#[^\n]*)"
    r"|(?P<newline>\r?\n)"
    r'|(?P<string>"""(?:\\.|[^\\])*?"{3,5}'
    r"|'''.*?'{3,5}"
    r'|"(?:\\.|[^"\\\n])*"'
    r"|'[^'\n]*')"
    r"|(?P<bare>[A-Za-z0-9_+:-]+)"
    r"|(?P<punct>.)",
    re.DOTALL,
)


class _Token(NamedTuple):
    kind: str
    text: str
    line: int
    start: int
    end: int


def _tokenize(text: str) -> list[_Token]:
    """Split TOML text into strings, bare words, punctuation and newlines, dropping comments."""
    tokens = []
    line = 1
    for match in _TOKEN.finditer(text):
        kind = match.lastgroup or "punct"
        if kind not in ("space", "comment"):
            tokens.append(_Token(kind, match.group(), line, match.start(), match.end()))
        line += match.group().count("\n")
    return tokens


class TomlLines:
    """Line numbers of the tables, keys and array elements of a TOML document.

    tomllib reports no positions, so this scan follows only the document's
    structure (table headers, keys, brackets and braces) and never computes a
    value. It expects text that tomllib accepted. On other text it still ends,
    but the lines it finds may be wrong.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[TomlPath, int] = {}
        """Line of each path: the key's line, or the `[[...]]` header of an array element."""
        self.duplicates: list[tuple[TomlPath, int]] = []
        """Keys assigned a second time, with the line of the second assignment."""
        self._tokens = _tokenize(text)
        self._pos = 0
        self._table: TomlPath = ()
        self._array_lengths: dict[TomlPath, int] = {}
        self._scan()

    def line_of(self, path: Sequence[str | int]) -> int | None:
        """Return the line of `path`, or of its nearest ancestor that the text contains."""
        key = tuple(path)
        for end in range(len(key), 0, -1):
            line = self.lines.get(key[:end])
            if line is not None:
                return line
        return None

    def _peek(self) -> _Token | None:
        return self._tokens[self._pos] if self._pos < len(self._tokens) else None

    def _next(self) -> _Token:
        token = self._tokens[self._pos]
        self._pos += 1
        return token

    def _scan(self) -> None:
        while (token := self._peek()) is not None:
            if token.text == "[":
                self._header()
            elif token.kind in ("bare", "string"):
                self._key_value(self._table)
            # The rest of the line belongs to a value already scanned, or is not valid TOML.
            while (token := self._peek()) is not None and token.kind != "newline":
                self._next()
            if token is not None:
                self._next()

    def _header(self) -> None:
        opener = self._next()
        following = self._peek()
        is_array = following is not None and following.text == "[" and following.start == opener.end
        if is_array:
            self._next()
        keys = self._key()
        if not keys:
            return
        path = (*self._resolve(keys[:-1]), keys[-1])
        self._mark_parents(path, opener.line)
        if is_array:
            index = self._array_lengths.get(path, 0)
            self._array_lengths[path] = index + 1
            self.lines.setdefault(path, opener.line)
            path = (*path, index)
        self.lines[path] = opener.line
        self._table = path

    def _resolve(self, keys: Sequence[str]) -> TomlPath:
        """Map header keys to a path, entering the last element of each array of tables."""
        path: TomlPath = ()
        for key in keys:
            path = (*path, key)
            length = self._array_lengths.get(path)
            if length:
                path = (*path, length - 1)
        return path

    def _mark_parents(self, path: TomlPath, line: int) -> None:
        for end in range(1, len(path)):
            self.lines.setdefault(path[:end], line)

    def _key(self) -> list[str]:
        """Consume a possibly dotted key and return its parts."""
        parts = []
        while (token := self._peek()) is not None and token.kind in ("bare", "string"):
            self._next()
            parts.append(_key_text(token))
            dot = self._peek()
            if dot is None or dot.text != ".":
                break
            self._next()
        return parts

    def _key_value(self, table: TomlPath) -> None:
        line = self._tokens[self._pos].line
        path = (*table, *self._key())
        self._mark_parents(path, line)
        if path in self.lines:
            self.duplicates.append((path, line))
        else:
            self.lines[path] = line
        equals = self._peek()
        if equals is not None and equals.text == "=":
            self._next()
            self._value(path)

    def _value(self, path: TomlPath) -> None:
        token = self._peek()
        if token is None:
            return
        if token.text == "[":
            self._array(path)
        elif token.text == "{":
            self._inline_table(path)
        else:
            # A scalar may span several tokens (1.5, or a date and time separated by a space).
            while (token := self._peek()) is not None and token.text not in (",", "]", "}"):
                if token.kind == "newline":
                    break
                self._next()

    def _array(self, path: TomlPath) -> None:
        self._next()
        index = 0
        while (token := self._peek()) is not None:
            if token.text == "]":
                self._next()
                return
            if token.kind == "newline" or token.text == ",":
                index += token.text == ","
                self._next()
                continue
            self.lines.setdefault((*path, index), token.line)
            before = self._pos
            self._value((*path, index))
            if self._pos == before:
                self._next()

    def _inline_table(self, path: TomlPath) -> None:
        self._next()
        while (token := self._peek()) is not None:
            if token.text == "}":
                self._next()
                return
            if token.kind in ("bare", "string"):
                self._key_value(path)
            else:
                self._next()


def _key_text(token: _Token) -> str:
    """Return the key that a bare or quoted key token names."""
    if token.kind == "bare" or len(token.text) < 2:
        return token.text
    if token.text.startswith("'"):
        return token.text[1:-1]
    # Let tomllib undo the escapes of a basic string, so keys compare as tomllib stores them.
    try:
        decoded = tomllib.loads(f"key = {token.text}")["key"]
    except tomllib.TOMLDecodeError:
        return token.text[1:-1]
    return str(decoded)
