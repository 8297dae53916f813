"""The config's error type and its one type checker, shared by every section and the HF model
config: a value from YAML, JSON or a dotted override is checked against the field's type hint."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """An invalid or unknown configuration value; the message names the key."""


def check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks `value` against a type hint, converting only where it is lossless (a list to a
    tuple, an int or a numeric string to a float, one string to a one-item tuple of strings,
    a mapping to a frozen dataclass of its keys, each checked the same way)."""
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return _dataclass(key, value, hint)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {hint_name(hint)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str) and args and args[0] is str:
            value = [value]  # a single glob where a list of files is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {value!r}")
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(coerce(f"{key}[{i}]", v, a) for i, (v, a) in pairs)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if value is None and hint is type(None):
        return None
    raise ConfigError(f"{key}: unsupported value {value!r} for {hint_name(hint)}")


def _dataclass(key: str, value: Any, cls: type) -> Any:
    """A mapping (e.g. one item of train.phases) -> `cls`, its keys checked like a section's;
    the dataclass's own __post_init__ then checks the values."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of keys, got {value!r}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r} (known: {', '.join(known)})")
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in value]
    if missing:
        raise ConfigError(f"{key}: {missing[0]} is missing")
    values = {k: coerce(f"{key}.{k}", v, hints[k]) for k, v in value.items()}
    try:
        return cls(**values)
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from None


def hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
