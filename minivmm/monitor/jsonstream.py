"""Splitting a QMP byte stream into JSON values, with QEMU's limits.

QMP is not line-based: values may span lines or share one. The splitter
tracks bracket depth and strings with two regular expressions (so a long
value is scanned once, in C), keeps only the value being read, and turns
garbage between values into errors instead of dropping the connection. A
value larger than MAX_VALUE_SIZE or nested deeper than MAX_DEPTH is
reported and skipped to its end without being stored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MAX_VALUE_SIZE = 16 << 20
MAX_DEPTH = 1024

_STRUCTURE = re.compile(rb'[{}\[\]"]')
_STRING_END = re.compile(rb'["\\]')
_TOKEN_END = re.compile(rb"[\s{}\[\]]")
_WHITESPACE = b" \t\r\n"


@dataclass(frozen=True)
class Parsed:
    """One input unit: a decoded value, or the error QEMU would report for it."""

    value: object = None
    error: str | None = None


def _no_constants(name: str) -> object:
    raise ValueError(f"invalid keyword '{name}'")


def _finite(text: str) -> float:
    """A number JSON can say back: 1e999 would be echoed as Infinity, which is not JSON."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number '{text}' is out of range")
    return value


class JsonStream:
    def __init__(self) -> None:
        self._buf = bytearray()  # the value being read (empty while skipping)
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False  # over a value already reported as too large or too deep
        self._token = bytearray()  # a run of garbage between values

    def feed(self, data: bytes) -> list[Parsed]:
        out: list[Parsed] = []
        i, n = 0, len(data)
        while i < n:
            if self._depth == 0 and not self._in_string:
                i = self._between_values(data, i, out)
                continue
            i = self._inside_value(data, i, out)
        return out

    # --- between values ------------------------------------------------------
    def _between_values(self, data: bytes, i: int, out: list[Parsed]) -> int:
        n = len(data)
        if self._token:
            m = _TOKEN_END.search(data, i)
            end = m.start() if m else n
            self._token += data[i:end][: 64 - len(self._token)]
            if not m:
                return n
            out.append(self._token_error())
            return end
        while i < n and data[i] in _WHITESPACE:
            i += 1
        if i == n:
            return n
        c = data[i]
        if c in b'{["':  # an object or array, or a string (which is no command, but one value)
            self._depth, self._skipping = (0 if c == 0x22 else 1), False
            self._in_string = c == 0x22
            self._buf = bytearray(data[i : i + 1])
            return i + 1
        m = _TOKEN_END.search(data, i + 1)
        end = m.start() if m else n
        self._token = bytearray(data[i:end][:64])
        if m:
            out.append(self._token_error())
        return end

    def _token_error(self) -> Parsed:
        token, self._token = bytes(self._token), bytearray()
        try:
            json.loads(token, parse_constant=_no_constants)
        except ValueError:
            text = token.decode("utf-8", "replace")
            if text[0].isalpha():
                return Parsed(error=f"JSON parse error, invalid keyword '{text}'")
            return Parsed(error=f"JSON parse error, stray '{text}'")
        return Parsed(error="QMP input must be a JSON object")

    # --- inside a value ----------------------------------------------------------
    def _inside_value(self, data: bytes, i: int, out: list[Parsed]) -> int:
        start, n = i, len(data)
        while i < n:
            if self._in_string:
                if self._escape:
                    self._escape = False
                    i += 1
                    continue
                m = _STRING_END.search(data, i)
                if not m:
                    i = n
                    break
                i = m.end()
                if data[m.start()] == 0x5C:  # backslash
                    self._escape = True
                else:
                    self._in_string = False
                    if self._depth == 0:  # a string on its own
                        return self._finish(data, start, i, out)
                continue
            m = _STRUCTURE.search(data, i)
            if not m:
                i = n
                break
            i = m.end()
            c = data[m.start()]
            if c == 0x22:  # quote
                self._in_string = True
            elif c in b"{[":
                self._depth += 1
                if self._depth > MAX_DEPTH and not self._skipping:
                    self._skip(out, "JSON parse error, nesting depth limit exceeded")
            else:
                self._depth -= 1
                if self._depth == 0:
                    return self._finish(data, start, i, out)
        self._store(data, start, i, out)
        return i

    def _store(self, data: bytes, start: int, end: int, out: list[Parsed]) -> None:
        if self._skipping:
            return
        self._buf += data[start:end]
        if len(self._buf) > MAX_VALUE_SIZE:
            self._skip(out, "JSON parse error, token size limit exceeded")

    def _skip(self, out: list[Parsed], error: str) -> None:
        out.append(Parsed(error=error))
        self._skipping = True
        self._buf = bytearray()

    def _finish(self, data: bytes, start: int, end: int, out: list[Parsed]) -> int:
        self._store(data, start, end, out)
        if self._skipping:
            self._skipping = False
            return end
        raw, self._buf = bytes(self._buf), bytearray()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append(Parsed(error="JSON parse error, invalid UTF-8 sequence in string"))
            return end
        try:
            value = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            out.append(Parsed(error=f"JSON parse error, {reason[0].lower()}{reason[1:]}"))
            return end
        except RecursionError:
            out.append(Parsed(error="JSON parse error, nesting depth limit exceeded"))
            return end
        out.append(Parsed(value=value))
        return end
