"""Managed-mode options (the reference's ``QvacManagedOptions`` in Python naming) and the
pure decisions made from them: which models, the reuse key, the synthesized node config."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..catalog import CatalogModel, lookup
from .errors import DuplicateManagedModelError, MultipleDefaultManagedModelsError, UnknownManagedModelError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_START_TIMEOUT_S = 180.0
"""a serve opens its port at once but is healthy only once every preloaded model is loaded."""
DEFAULT_IDLE_TIMEOUT_S = 300.0
"""how long a shared serve outlives its last consumer."""
DEFAULT_API_KEY = "dvai"
"""a loopback node does not check it; some OpenAI clients refuse to send no key at all."""
KEY_FORMAT = 1
"""bumped when the reuse key's inputs change, so old and new consumers never share by accident."""


@dataclass(frozen=True, slots=True)
class ManagedModel:
    """One model of a managed serve: a catalogue name plus its serve config."""

    name: str
    """catalogue constant name (``GEMMA3_270M``) or served id (``gemma3-270m``)."""
    config: Mapping[str, Any] = field(default_factory=dict)
    """``[models.<alias>]`` keys written verbatim into the serve's config (``ctx_size``,
    ``reasoning_budget``, ``embedding``, ``engine``, …)."""
    preload: bool = True
    default: bool = False
    alias: str | None = None
    """the id it is served under; unset: the catalogue id. Lets one catalogue model be served
    twice (say, once in embedding mode)."""


@dataclass(frozen=True, slots=True)
class ManagedOptions:
    models: tuple[str | ManagedModel, ...]
    host: str = DEFAULT_HOST
    port: int | None = None
    """pin the serve's port (no reuse then); unset: a free port."""
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    binary: str | None = None
    """the ``dvai-node`` executable; unset: the one installed beside this Python, else on PATH."""
    reuse: bool | None = None
    """share a matching serve with other consumers; unset: true unless ``port`` is pinned."""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S
    api_key: str = DEFAULT_API_KEY
    headers: Mapping[str, str] = field(default_factory=dict)
    registry_dir: Path | None = None
    """where the registry of live serves lives; unset: ``<user state dir>/managed-serves``."""

    @property
    def shared(self) -> bool:
        return self.reuse if self.reuse is not None else self.port is None


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    alias: str
    entry: CatalogModel
    config: Mapping[str, Any]
    preload: bool
    default: bool


def resolve_models(models: Sequence[str | ManagedModel]) -> tuple[ResolvedModel, ...]:
    """Catalogue entries for the requested models; the default one first."""
    if not models:
        raise UnknownManagedModelError("managed mode needs at least one model")
    resolved: list[ResolvedModel] = []
    seen: set[str] = set()
    for item in models:
        spec = ManagedModel(name=item) if isinstance(item, str) else item
        entry = lookup(spec.name)
        if entry is None:
            raise UnknownManagedModelError(f"'{spec.name}' is not in the model catalogue "
                                           f"(dvai-node models --catalog lists it)")
        alias = spec.alias or entry.id
        if alias in seen:
            raise DuplicateManagedModelError(f"model '{alias}' is requested twice; give one an alias")
        seen.add(alias)
        resolved.append(ResolvedModel(alias, entry, dict(spec.config), spec.preload, spec.default))
    defaults = [m for m in resolved if m.default]
    if len(defaults) > 1:
        names = ", ".join(m.alias for m in defaults)
        raise MultipleDefaultManagedModelsError(f"at most one model may be the default (got {names})")
    default = defaults[0] if defaults else resolved[0]
    return (default, *(m for m in resolved if m is not default))


def reuse_key(models: Sequence[ResolvedModel], *, host: str, binary: str) -> str:
    """Serves with equal keys are interchangeable: same models, per-model config, host, binary."""
    material = {
        "format": KEY_FORMAT,
        "host": host,
        "binary": binary,
        "models": [
            {"alias": m.alias, "name": m.entry.name, "config": dict(m.config), "preload": m.preload}
            for m in models
        ],
    }
    text = json.dumps(material, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def synthesize_config(models: Sequence[ResolvedModel]) -> str:
    """The serve's TOML config: one ``[models.<alias>]`` table per model, the default first.

    Each catalogue constant name becomes an alias of its model (when unused), so clients may
    send either ``gemma3-270m`` or ``GEMMA3_270M``.
    """
    lines = [
        "# written by dvai-mesh managed mode; do not edit (the serve is shared)",
        f"default_model = {_value(models[0].alias)}",
        "http_max_port_attempts = 1",
    ]
    taken = {m.alias for m in models}
    for model in models:
        table: dict[str, Any] = {"catalog": model.entry.name, "ctx_size": model.entry.ctx_size,
                                 "preload": model.preload}
        if model.entry.name not in taken:
            taken.add(model.entry.name)
            table["aliases"] = [model.entry.name]
        table.update(model.config)
        lines += ["", f"[models.{_value(model.alias)}]"]
        lines += [f"{_value(key)} = {_value(value)}" for key, value in table.items()]
    return "\n".join(lines) + "\n"


def _value(value: Any) -> str:
    """A TOML value (strings in JSON spelling, which TOML basic strings accept)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"managed model config: {value!r} is not a TOML number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_value(str(k))} = {_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"managed model config: cannot write {value!r} into the serve's config")
