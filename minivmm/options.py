"""QEMU's option value syntaxes: sizes, booleans and keyval lists; and
minivmm's timeouts from the environment.

``TYPE,key=value,key=value`` with ``,,`` for a literal comma; the first item
may omit its key (the "implied" key: the object type, the machine type...).
JSON objects are accepted where QEMU accepts them.
"""

from __future__ import annotations

import json
import os
import re

_SUFFIXES = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
MAX_SIZE_DIGITS = 24  # more than any size a 64-bit machine can have
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|0x[0-9a-fA-F]+)\s*([bBkKmMgGtTpPeE]?)\s*$")


class OptionError(ValueError):
    """A malformed value; the caller adds which option it came from."""


def parse_size(text: str, default_unit: str = "B") -> int:
    """QEMU's qemu_strtosz: ``512``, ``1G``, ``1.5G``, ``0x1000``; plain numbers in ``default_unit``."""
    m = _SIZE_RE.match(text)
    if not m:
        raise OptionError(f"invalid size '{text}' (use a number with an optional K, M, G or T suffix)")
    number, suffix = m.groups()
    if len(number) > MAX_SIZE_DIGITS:
        raise OptionError(f"invalid size '{text[:40]}...': more than {MAX_SIZE_DIGITS} digits")
    unit = _SUFFIXES[(suffix or default_unit).upper()]
    if number.startswith("0x"):
        if suffix:
            raise OptionError(f"invalid size '{text}': hexadecimal sizes take no suffix")
        value = int(number, 16)
    elif "." in number:
        value = int(float(number) * (1 << unit))
        if not suffix and default_unit == "B":
            raise OptionError(f"invalid size '{text}': fractions need a suffix")
    else:
        value = int(number) << unit
    if value <= 0:
        raise OptionError(f"invalid size '{text}': must be positive")
    return value


def parse_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("on", "yes", "true"):
        return True
    if lowered in ("off", "no", "false"):
        return False
    raise OptionError(f"Parameter '{key}' expects 'on' or 'off'")


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, str]:
    """``a,b=1,c=x,,y`` -> {implied_key: "a", "b": "1", "c": "x,y"}."""
    items = text.replace(",,", "\0").split(",")
    result: dict[str, str] = {}
    for i, item in enumerate(items):
        item = item.replace("\0", ",")
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
        elif i == 0 and implied_key is not None:
            key, value = implied_key, item
        else:
            raise OptionError(f"Expected '=' after parameter '{item}'")
        if not key:
            raise OptionError(f"Invalid parameter '{item}'")
        if key in result:
            raise OptionError(f"Parameter '{key}' given more than once")
        result[key] = value
    return result


def parse_object(text: str, implied_key: str) -> dict[str, str]:
    """keyval or, when it starts with ``{``, a JSON object (values become strings)."""
    if text.lstrip().startswith("{"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise OptionError(f"JSON parse error, {e.msg}") from None
        except RecursionError:
            raise OptionError("JSON parse error, nesting depth limit exceeded") from None
        except ValueError as e:  # e.g. an integer of more than 4300 digits
            raise OptionError(f"JSON parse error, {e}") from None
        if not isinstance(data, dict):
            raise OptionError("JSON value must be an object")
        return {k: _json_value(v) for k, v in data.items()}
    return parse_keyval(text, implied_key)


def _json_value(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, str)):
        return str(value)
    return json.dumps(value)


def seconds_from_env(name: str, default: float) -> float:
    """A timeout from environment variable ``name``: a positive number of seconds, else ``default``."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1e6:
        raise OptionError(f"{name}={text}: expected a number of seconds above 0")
    return value
