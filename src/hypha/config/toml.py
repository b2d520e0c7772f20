"""The one TOML writer: Python values to TOML text and files.

Owns formatting values (booleans, numbers, strings, paths, lists, inline tables) and
documents (top-level keys, then ``[tables]`` and ``[[arrays of tables]]``). Reading TOML is
``tomllib``'s job (``load.py``); this module knows nothing of the config schema. Used by
``hypha init`` (``render_default``), ``hypha up`` (``hypha.local``) and the test harness.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# TOML basic strings must escape the quote, the backslash and control characters but tab.
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r"}


def _string(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif (ord(char) < 0x20 and char != "\t") or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def format_value(value: Any) -> str:
    """One TOML value: ``true``, ``1.5``, ``"text"``, ``[1, 2]`` or ``{ a = 1 }``.

    Raises:
        TypeError: ``value`` has no TOML form (None, bytes, other objects).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return _string(str(value))
    if isinstance(value, list | tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {format_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps(values: Mapping[str, Any]) -> str:
    """A TOML document: plain keys first, then one ``[table]`` per mapping value and one
    ``[[table]]`` per item of a list of mappings (nested deeper as inline tables)."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            tables.append(f"\n[{key}]")
            tables += [f"{k} = {format_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
            for item in value:
                tables.append(f"\n[[{key}]]")
                tables += [f"{k} = {format_value(v)}" for k, v in item.items()]
        else:
            lines.append(f"{key} = {format_value(value)}")
    return "\n".join(lines + tables) + "\n"


def write_toml(path: Path, values: Mapping[str, Any]) -> Path:
    """Write ``dumps(values)`` to ``path`` (blocking: async callers use a thread); returns it."""
    path.write_text(dumps(values))
    return path
