"""The generic settings loader the node and the rendezvous build their configs with.

Sources are merged lowest to highest precedence by the caller (defaults, a TOML file,
environment variables, flags); ``build_dataclass`` then checks every value against the
frozen dataclass's field types. Errors are ``ConfigError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from .errors import ConfigError

__all__ = ["EnvString", "build_dataclass", "deep_merge", "env_to_mapping", "parse_json", "read_toml"]

T = TypeVar("T")


def read_toml(file: str | Path) -> dict[str, Any]:
    """A TOML file as a mapping; a missing or malformed file is a ``ConfigError`` naming it."""
    try:
        with open(file, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {file}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {file} is not valid TOML: {exc}") from exc


def env_to_mapping(env: Mapping[str, str], prefix: str) -> dict[str, Any]:
    """``DVAI_OFFLOAD__ENABLED=true`` (prefix ``DVAI_``) → ``{"offload": {"enabled": "true"}}``.

    Nested tables are joined by ``__``; values stay strings (``EnvString``) until the target
    type parses them.
    """
    out: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(prefix) or name == prefix:
            continue
        parts = [p.lower() for p in name[len(prefix):].split("__")]
        if any(not p for p in parts):
            raise ConfigError(f"environment variable {name}: empty key segment")
        target = out
        for part in parts[:-1]:
            nxt = target.setdefault(part, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"environment variable {name} conflicts with another setting")
            target = nxt
        target[parts[-1]] = EnvString(value)
    return out


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``extra``; tables present in both are merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


class EnvString(str):
    """A value that came from the environment: parsed by the target type."""


def build_dataclass(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """``cls(**data)`` with every value checked and coerced to the field's type.

    Unknown keys and bad values raise ``ConfigError`` naming the key (``prefix`` + field);
    nested dataclasses, tuples, unions, ``Literal``, ``Path`` and environment strings are handled.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}' (known keys: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:  # noqa: C901 - one branch per type
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, EnvString) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for arg in non_none:
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {value!r}")
        return str(value)
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, EnvString):
            value = parse_json(value, key)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a table")
        return build_dataclass(hint, value, key + ".")
    if origin is tuple:
        item_type = args[0]
        if isinstance(value, EnvString):
            text = value.strip()
            value = parse_json(text, key) if text.startswith("[") else [
                v.strip() for v in text.split(",") if v.strip()
            ]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_type)}")
        return tuple(_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value))
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, EnvString) and value.lower() in _BOOLS:
            return _BOOLS[value.lower()]
        raise ConfigError(f"{key}: expected a boolean (true/false), got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, EnvString):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, EnvString):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if hint is Path:
        if isinstance(value, (str, Path)):
            return Path(value).expanduser()
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {hint!r}")


_BOOLS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def parse_json(text: str, key: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key}: expected JSON, got {text!r}") from exc
