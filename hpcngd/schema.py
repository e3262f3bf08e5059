"""The machinery under the run-file sections: field rules, type checks and TOML values. Pure.

A section is a frozen dataclass deriving :class:`Section`; each field is declared with :func:`opt`,
whose metadata says what is allowed (``choices``, ``ge``/``gt``/``le``/``lt``) and documents the key
(``help``). Construction checks every field and then the section's own cross-field :meth:`Section.check`,
so a section that exists is valid. Errors are one line: ``section.key = value: what is allowed``.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import field
from typing import Any

from hpcngd.errors import ConfigError


def _key(help: str, **rules: Any) -> dict[str, Any]:
    return {"help": help, **rules}


def opt(default: Any, help: str, **rules: Any) -> Any:
    return field(default=default, metadata=_key(help, **rules))


class Section:
    """Base of every run-file section: type and range checks from field metadata."""

    SECTION: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = _coerce(self.SECTION, f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
            _check_rules(self.SECTION, f.name, value, f.metadata)
        self.check()

    def check(self) -> None:
        """Cross-field checks of one section; override to add them."""

    def fail(self, key: str, why: str) -> typing.NoReturn:
        """Raise the one-line error for ``SECTION.key``."""
        raise ConfigError(f"{self.SECTION}.{key} = {show(getattr(self, key))}: {why}")


def show(value: Any) -> str:
    if isinstance(value, tuple):
        value = list(value)
    return toml_value(value) if isinstance(value, (str, int, float, bool, list)) else repr(value)


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "booleans", str: "strings"}


def _coerce(section: str, key: str, value: Any, hint: Any) -> Any:
    """Check ``value`` against the annotation and return it in canonical form (tuples, floats)."""
    where = f"{section}.{key} = {show(value)}"
    if isinstance(hint, types.UnionType):  # e.g. str | bool: the first type that fits
        for option in typing.get_args(hint):
            try:
                return _coerce(section, key, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: must be {' or '.join(_TYPE_NAMES[t] for t in typing.get_args(hint))}")
    if typing.get_origin(hint) is tuple:
        (item_type, _) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list of {_PLURALS[item_type]}")
        return tuple(_coerce(section, key, v, item_type) for v in value)
    ok = (
        isinstance(value, bool)
        if hint is bool
        else (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if hint is float
            else isinstance(value, hint) and not (hint is int and isinstance(value, bool))
        )
    )
    if not ok:
        raise ConfigError(f"{where}: must be {_TYPE_NAMES[hint]}")
    if hint is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number")
    return value


def _check_rules(section: str, key: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    items = value if isinstance(value, tuple) else (value,)
    where = f"{section}.{key} = {show(value)}"
    if "choices" in meta and value not in meta["choices"]:
        allowed = ", ".join(show(c) for c in meta["choices"])
        raise ConfigError(f"{where}: must be one of {allowed}")
    for op, test, words in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        if op in meta and not all(test(v, meta[op]) for v in items):
            raise ConfigError(f"{where}: must be {words} {meta[op]}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)
