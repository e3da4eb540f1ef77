"""The one TOML loader and validator: every config file of the agent is read through it.

An operator edits these files by hand on a fleet of hosts, so every error is one line that names
the file and the key by its full path (`stage[2].weight_pct`, `metrics."turns.latency_ns".critical`)
in one wording:

    <source>: <key path>: unknown key (known: a, b, c)
    <source>: <key path>: expected <what>, got <value>
    <source>: <key path>: missing required key

An unknown key is an error, not a silent no-op: a typo like `windows_s` must not quietly fall back
to the default. A binary or non-UTF-8 file is bad input like any other, never an internal error.
tomllib does not report positions for semantic errors; a document may carry a `locate` function
(the tuning profiles do) that turns a key path into a line number for the message.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from core.errors import BadInput

KeyPath = tuple[str | int, ...]
MISSING = object()


def render_key_path(parts: Iterable[str | int]) -> str:
    """("stage", 2, "weight_pct") -> stage[2].weight_pct; keys holding dots are quoted."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
            continue
        shown = f'"{part}"' if ("." in part or not part or " " in part) else part
        text += f".{shown}" if text else shown
    return text


def decode_toml_bytes(data: bytes, source: str) -> str:
    if b"\0" in data:
        raise BadInput(f"{source}: a binary file, not TOML text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise BadInput(f"{source}: not UTF-8 text (byte {error.start})") from None


def parse_toml_text(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{source}: not valid TOML ({error})") from None


def read_toml_text(path: Path, source: str | None = None) -> str:
    """A TOML file's text; BadInput (naming `source`, default the path) when it cannot be used."""
    path = Path(path)
    source = source or str(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{source}: no such file") from None
    except IsADirectoryError:
        raise BadInput(f"{source}: is a directory, not a TOML file") from None
    except OSError as error:
        raise BadInput(f"{source}: cannot read ({error.strerror})") from None
    return decode_toml_bytes(data, source)


def load_toml(path: Path, source: str | None = None) -> dict[str, Any]:
    source = source or str(path)
    return parse_toml_text(read_toml_text(path, source), source)


@dataclass(frozen=True)
class TomlDocument:
    """Where the values came from, for error messages."""

    source: str
    locate: Callable[[KeyPath], int] | None = None
    # ": " after a file name; "." when `source` is itself a key path ("exp.toml: fault[0]"), for
    # a table handed on as a dict (a chaos fault's spec) whose keys continue that path.
    key_separator: str = ": "

    def error(self, parts: KeyPath, message: str) -> BadInput:
        where = self.source
        if self.locate is not None:
            where = f"{where}:{self.locate(parts)}"
        key = render_key_path(parts)
        return BadInput(f"{where}{self.key_separator}{key}: {message}" if key else f"{where}: {message}")


def describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list) and len(value) > 8:
        return f"a list of {len(value)} items"
    return repr(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class TomlTable:
    """One table of a TOML document at a key path; every accessor validates and names the key."""

    def __init__(self, data: Any, document: TomlDocument, parts: KeyPath = (),
                 known: Iterable[str] | None = None):
        self.document, self.parts = document, tuple(parts)
        if not isinstance(data, dict):
            raise document.error(self.parts, f"expected a table, got {describe(data)}")
        self.data: dict[str, Any] = data
        if known is not None:
            self.check_keys(known)

    @classmethod
    def root(cls, data: dict, source: str, known: Iterable[str] | None = None,
             locate: Callable[[KeyPath], int] | None = None) -> "TomlTable":
        return cls(data, TomlDocument(source, locate), (), known)

    # -- structure ---------------------------------------------------------------------------
    def path_of(self, key: str | int | None = None) -> KeyPath:
        return self.parts if key is None else self.parts + (key,)

    def fail(self, key: str | int | None, message: str) -> None:
        raise self.document.error(self.path_of(key), message)

    def check_keys(self, known: Iterable[str]) -> None:
        known = tuple(known)
        for key in self.data:
            if key not in known:
                self.fail(key, f"unknown key (known: {', '.join(sorted(known)) or 'none'})")

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def keys(self) -> list[str]:
        return list(self.data)

    def raw(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

    def _value(self, key: str, default: Any) -> Any:
        value = self.data.get(key, default)
        if value is MISSING:
            self.fail(key, "missing required key")
        return value

    def table(self, key: str, known: Iterable[str] | None = None, required: bool = False) -> "TomlTable":
        value = self._value(key, MISSING if required else {})
        return TomlTable(value, self.document, self.path_of(key), known)

    def named_tables(self, key: str | None = None,
                     known: Iterable[str] | None = None) -> Iterator[tuple[str, "TomlTable"]]:
        """The tables of a table of named tables ([metrics."a"], [sysctl."vm.x"])."""
        container = self if key is None else self.table(key)
        for name, value in container.data.items():
            yield name, TomlTable(value, self.document, container.path_of(name), known)

    def table_list(self, key: str, known: Iterable[str] | None = None, required: bool = False) -> list["TomlTable"]:
        """An array of tables ([[stage]]): stage[0], stage[1]..."""
        value = self._value(key, MISSING if required else [])
        if not isinstance(value, list):
            self.fail(key, f"expected an array of tables ([[{key}]]), got {describe(value)}")
        if required and not value:
            self.fail(key, "expected at least one table")
        return [TomlTable(item, self.document, self.path_of(key) + (index,), known)
                for index, item in enumerate(value)]

    # -- scalars -----------------------------------------------------------------------------
    def number(self, key: str, default: Any = MISSING, *, low: float | None = None, high: float | None = None,
               positive: bool = False, integer: bool = False, what: str | None = None) -> Any:
        value = self._value(key, default)
        if value is None and default is None:
            return None
        noun = "integer" if integer else "number"
        kind = what or (f"a positive {noun}" if positive else f"an {noun}" if integer else f"a {noun}")
        if not _is_number(value) or (isinstance(value, float) and not math.isfinite(value)):
            self.fail(key, f"expected {kind}, got {describe(value)}")
        if integer and int(value) != value:
            self.fail(key, f"expected {kind}, got {describe(value)}")
        if positive and value <= 0:
            self.fail(key, f"expected {kind}, got {describe(value)}")
        if (low is not None and value < low) or (high is not None and value > high):
            self.fail(key, f"expected {kind} in {_bound(low)}..{_bound(high)}, got {describe(value)}")
        return int(value) if integer else float(value)

    def boolean(self, key: str, default: Any = MISSING) -> bool:
        value = self._value(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {describe(value)}")
        return value

    def string(self, key: str, default: Any = MISSING, *, allow_empty: bool = False) -> Any:
        value = self._value(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str) or (not allow_empty and not value.strip()):
            self.fail(key, f"expected a{'' if allow_empty else ' non-empty'} string, got {describe(value)}")
        return value

    def choice(self, key: str, choices: Iterable[str], default: Any = MISSING) -> str:
        choices = tuple(choices)
        value = self._value(key, default)
        if value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {describe(value)}")
        return value

    def string_list(self, key: str, default: Any = MISSING) -> tuple[str, ...]:
        value = self._value(key, list(default) if isinstance(default, tuple) else default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, f"expected a list of non-empty strings, got {describe(value)}")
        return tuple(v.strip() for v in value)

    def integer_list(self, key: str, default: Any = MISSING, *, positive: bool = False) -> tuple[int, ...]:
        value = self._value(key, list(default) if isinstance(default, tuple) else default)
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                             and (v > 0 or not positive) for v in value)
        if not ok:
            self.fail(key, f"expected a list of {'positive ' if positive else ''}integers, got {describe(value)}")
        return tuple(value)

    def typed(self, key: str, kind: type | tuple[type, ...], default: Any = MISSING) -> Any:
        """A value of one of the TOML types (str, int, float, bool, list, dict), by isinstance;
        bool is never taken for int (TOML's true is not 1)."""
        value = self._value(key, default)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            self.fail(key, f"expected {type_phrase(kinds)}, got {describe(value)}")
        return value


def _bound(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


TYPE_PHRASES = {str: "a string", bool: "true or false", int: "an integer", float: "a number",
                list: "a list", dict: "a table"}


def type_phrase(kinds: tuple[type, ...]) -> str:
    if set(kinds) == {int, float}:
        return "a number"
    return " or ".join(TYPE_PHRASES.get(kind, kind.__name__) for kind in kinds)
