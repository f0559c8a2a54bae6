"""Node configuration: frozen dataclasses and their loaders.

Sources, lowest to highest precedence: defaults, a TOML file, environment
variables (``DVAI_`` + the key path in upper case, nested tables joined by
``__``), and command-line flags. Unknown keys and bad values fail at start
with a message that names the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .common.errors import ConfigError
from .common.settings import EnvString, build_dataclass, deep_merge, env_to_mapping, parse_json, read_toml
from .constants import (
    DEFAULT_CTX_SIZE,
    DEFAULT_GENERATION_TIMEOUT,
    DEFAULT_HTTP_PORT,
    DEFAULT_MAX_BLANK_CHUNKS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_PARALLEL,
    DEFAULT_PROMPT_CACHE_MIB,
    DEFAULT_QUEUE_DEPTH,
)
from .engine.default_model import DEFAULT_CHAT_MODEL_ID, GEMMA3_ID

ENV_PREFIX = "DVAI_"
DEFAULT_MODEL_ID = DEFAULT_CHAT_MODEL_ID
"""the model a node serves (and answers chats with) when no model is configured."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """One model a node serves, under an alias (``id``)."""

    id: str = DEFAULT_MODEL_ID
    path: str | None = None
    """GGUF file; unset: the built-in model of the same id (``smollm2-135m``, ``gemma3-270m``),
    else the built-in chat model."""
    catalog: str | None = None
    """a model catalogue name (``SMOLLM2_135M``, see ``dvai-node models --catalog``) to serve."""
    engine: Literal["llama", "simulated"] = "llama"
    """``simulated`` produces filler tokens at ``simulated_tok_per_s``: for routing tests only."""
    simulated_tok_per_s: float = 20.0
    ctx_size: int = DEFAULT_CTX_SIZE
    threads: int | None = None
    gpu_layers: int = 99
    chat_format: str | None = None
    embedding: bool = False
    reasoning_budget: int | None = None
    """0 hides ``<think>…</think>`` output; unset leaves it alone."""
    preload: bool = True
    keep_alive: float | None = None
    """seconds an idle model stays loaded; unset keeps it loaded."""
    queue_depth: int = DEFAULT_QUEUE_DEPTH
    parallel: int = DEFAULT_PARALLEL
    """sequences decoded together in one context (each gets ``ctx_size`` tokens of KV cache)."""
    prompt_cache_mib: int = DEFAULT_PROMPT_CACHE_MIB
    """MiB of host memory for finished sequences' KV state (the prompt cache); 0: idle seats keep
    their KV in the context instead."""
    aliases: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class KnownPeer:
    """A peer named in config: reached directly, without discovery."""

    base_url: str
    device_id: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class IceServer:
    """A STUN or TURN server for the internet path (``[[offload.ice_servers]]``)."""

    urls: tuple[str, ...]
    """``stun:host:port``, ``turn:host:port?transport=udp|tcp`` or ``turns:host:port``."""
    username: str | None = None
    credential: str | None = None
    """TURN password."""


@dataclass(frozen=True, slots=True)
class OffloadConfig:
    """The reference's ``OffloadConfig``; off by default."""

    enabled: bool = False
    discover_lan: bool = True
    discover_interfaces: tuple[str, ...] = ()
    """interface addresses for mDNS; empty means all."""
    min_local_capability: float = 10.0
    rendezvous_url: str | None = None
    known_peers: tuple[KnownPeer, ...] = ()
    custom_discovery: str | None = None
    """``module:function`` returning peers, called every ``custom_discovery_interval`` s."""
    custom_discovery_interval: float = 30.0
    probe_tokens: int = 50
    probe_on_start: bool = True
    health_interval: float = 1.0
    """seconds between active health checks of each peer."""
    unreachable_after: float = 3.0
    """seconds without an answer before a peer is marked unreachable."""
    remove_after: float = 60.0
    """seconds a peer stays listed as unreachable before it is removed."""
    verify_max_age: float = 600.0
    """seconds a verified peer capability stays valid before it is re-checked."""
    circuit_break_s: float = 30.0
    """seconds a failing peer is skipped (doubling on repeated failures, up to 600 s)."""
    verify_timeout: float = 10.0
    """seconds a verification probe of a peer may run; a request waits at most this long
    for the probes that could change where it runs."""
    forward_connect_timeout: float = 3.0
    """seconds to connect to a peer before it counts as failed (the next peer is tried)."""
    forward_read_timeout: float = 30.0
    """seconds without a byte from a peer in the middle of an answer before it counts as failed."""
    ice_servers: tuple[IceServer, ...] = ()
    """STUN/TURN servers for WebRTC links to rendezvous peers; empty: host candidates only
    (no third-party server is ever contacted)."""
    rendezvous_turn: bool = False
    """ask the rendezvous for time-limited TURN credentials (its ``turn_secret``/``turn_urls``) and
    add its TURN server to ``ice_servers``."""
    ice_relay_only: bool = False
    """use only TURN-relayed paths (hides both devices' addresses from each other)."""
    link_connect_timeout: float = 15.0
    """seconds to set up a WebRTC link (signaling, ICE, DTLS, channel) before it counts as failed."""
    link_idle_timeout: float = 120.0
    """seconds a WebRTC link with no request is kept open before it is closed."""
    presence_interval: float = 10.0
    """seconds between presence queries for rendezvous-paired peers."""


@dataclass(frozen=True, slots=True)
class AppPairingRule:
    """One ``[[security.app_pairing]]`` rule: how LAN handshakes for one app id are decided."""

    app_id: str
    """the handshake's ``appId`` (its device id when it sent none); ``*``: every app without a rule."""
    policy: Literal["allow", "prompt", "deny"]
    require_proof: bool = True
    """``allow`` approves only devices that prove their device id (the handshake's ``proof``)."""


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    pairing_policy: Literal["deny", "allowlist", "prompt"] = "deny"
    pairing_allowlist: tuple[str, ...] = ()
    app_pairing: tuple[AppPairingRule, ...] = ()
    """per-app pairing rules, decided before ``pairing_policy`` (docs/security.md#per-app-pairing)."""
    require_pairing: bool | None = None
    """unset: required whenever the API is bound beyond loopback."""
    allow_anonymous_lan: bool = False
    allowed_hosts: tuple[str, ...] = ()
    """extra Host header values accepted besides loopback names and the bind address."""
    handshake_rate_per_minute: int = 10
    trust_loopback: bool = True
    """loopback callers may call unsigned and reach admin endpoints; set false when a reverse
    proxy on this host forwards remote traffic (every caller would look like loopback)."""
    public_metrics: bool = False
    """serve ``GET /metrics`` to unsigned callers from the network (a Prometheus server on
    another host); off: loopback callers and paired devices only, as any non-public path."""


@dataclass(frozen=True, slots=True)
class AuditConfig:
    enabled: bool = True
    retention_days: float = 30.0
    max_rows: int = 100_000


@dataclass(frozen=True, slots=True)
class QuotaConfig:
    """One ``[[hub.quotas]]`` rule (docs/hub.md#quotas)."""

    app_id: str = "*"
    device_id: str | None = None
    """limit each device separately (``*``: every device); unset: the app's devices together."""
    model: str | None = None
    """limit each model separately, or only this model (``*``: each model)."""
    requests_per_minute: int | None = None
    tokens_per_day: int | None = None
    """prompt + completion tokens per UTC day."""
    concurrent: int | None = None
    """requests being answered at once."""


@dataclass(frozen=True, slots=True)
class ExternalEngineConfig:
    """One ``[[hub.external_engines]]`` entry: another OpenAI-compatible server (docs/hub.md)."""

    name: str
    base_url: str
    """its OpenAI base URL, e.g. ``http://127.0.0.1:11434/v1``."""
    models: tuple[str, ...]
    api_key: str = ""
    max_concurrent: int = 4
    max_waiting: int = 32
    health_interval: float = 15.0


@dataclass(frozen=True, slots=True)
class HubConfig:
    enabled: bool = False
    """hub mode (``dvai-node serve --hub``): the ``HUB_PRESET`` defaults apply under the keys set."""
    substitution: Literal["off", "same-family", "map"] = "off"
    """serve a request for a model nobody here has with another (docs/hub.md)."""
    substitution_map: tuple[str, ...] = ()
    """``map`` policy entries, each ``"requested=served"``."""
    quotas: tuple[QuotaConfig, ...] = ()
    external_engines: tuple[ExternalEngineConfig, ...] = ()
    usage_retention_days: int = 90
    """days of per-app usage kept (``GET /v1/dvai/usage``)."""


@dataclass(frozen=True, slots=True)
class NodeConfig:
    state_dir: Path | None = None
    cache_dir: Path | None = None
    """where the built-in model is assembled; unset: the platform's user cache dir."""
    device_name: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    transport: Literal["http", "none"] = "http"
    http_bind_host: str = "127.0.0.1"
    http_base_port: int = DEFAULT_HTTP_PORT
    http_max_port_attempts: int = 16
    cors_origin: tuple[str, ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    generation_timeout: float = DEFAULT_GENERATION_TIMEOUT
    max_blank_chunks: int = DEFAULT_MAX_BLANK_CHUNKS
    default_model: str | None = None
    models: tuple[ModelConfig, ...] = (ModelConfig(), ModelConfig(id=GEMMA3_ID, preload=False))
    """without a model table: the built-in chat model, and Gemma 3 270M loaded on first use."""
    on_model_load_failure: Literal["exit", "continue"] = "exit"
    """``exit``: ``dvai-node serve`` exits (status 1, naming the model and the reason) when a
    preloaded model cannot load; ``continue``: keep serving the others (503 for a failed one)."""
    offload: OffloadConfig = field(default_factory=OffloadConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    hub: HubConfig = field(default_factory=HubConfig)

    @property
    def default_model_id(self) -> str:
        return self.default_model or self.models[0].id

    def resolved_state_dir(self) -> Path:
        if self.state_dir is not None:
            return Path(self.state_dir).expanduser()
        from platformdirs import user_state_dir

        return Path(user_state_dir("dvai-mesh"))

    def replace(self, **changes: Any) -> NodeConfig:
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------
# Loading


def load_config(
    file: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Build a ``NodeConfig`` from a TOML file, the environment and flag overrides."""
    merged: dict[str, Any] = {}
    if file is not None:
        merged = deep_merge(merged, read_toml(file))
    from_env = env_to_mapping(os.environ if env is None else env, ENV_PREFIX)
    if isinstance(from_env.get("models"), dict):
        file_models = merged.get("models")
        known: dict[str, Any] = file_models if isinstance(file_models, dict) else _default_models_table()
        merged["models"] = known
        from_env["models"] = _match_env_models(from_env["models"], known)
    merged = deep_merge(merged, from_env)
    if overrides:
        overrides = dict(overrides)
        if "models" in overrides:  # a flag (--model) replaces the model table outright
            merged["models"] = overrides.pop("models")
        merged = deep_merge(merged, overrides)
    return config_from_mapping(merged)


def override_config(config: NodeConfig, overrides: Mapping[str, Any]) -> NodeConfig:
    """``config`` with ``overrides`` applied and checked like any other source.

    A table value (``offload={"enabled": True}``) updates that table's keys; ``models``
    replaces the model table, as the ``--model`` flag does.
    """
    mapping: dict[str, Any] = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    for key, value in overrides.items():
        current = mapping.get(key)
        if key != "models" and isinstance(value, Mapping) and dataclasses.is_dataclass(current):
            value = {**{f.name: getattr(current, f.name) for f in dataclasses.fields(current)}, **value}
        mapping[key] = value
    return config_from_mapping(mapping)


def model_id_for_path(path: str | Path) -> str:
    """The id a GGUF given by path is served under: its file name without extension, lower case."""
    return Path(path).stem.lower()


def env_model_name(model_id: str) -> str:
    """The environment spelling of a model id: ``gemma3-270m`` → ``GEMMA3_270M``."""
    return model_id.upper().replace("-", "_").replace(".", "_")


def _default_models_table() -> dict[str, Any]:
    """``NodeConfig().models`` as the TOML table that describes it (environment overrides apply to it)."""
    return {model.id: ({} if model.preload else {"preload": False}) for model in NodeConfig().models}


def _match_env_models(env_models: dict[str, Any], known: Mapping[str, Any]) -> dict[str, Any]:
    """Environment names cannot hold ``-``: ``DVAI_MODELS__GEMMA3_270M__…`` means ``gemma3-270m``."""
    by_env_name = {env_model_name(str(model_id)).lower(): str(model_id) for model_id in known}
    return {by_env_name.get(name, name): value for name, value in env_models.items()}


HUB_PRESET: Mapping[str, Any] = {
    "security": {"pairing_policy": "prompt"},
    "audit": {"enabled": True},
    "hub": {"quotas": [
        {"app_id": "*", "device_id": "*", "requests_per_minute": 120, "concurrent": 4},
        {"app_id": "*", "tokens_per_day": 2_000_000},
    ]},
}
"""What hub mode (``[hub] enabled = true``, ``serve --hub``) changes, for every key the
configuration leaves unset (docs/hub.md#hub-mode): each (device, app) pairing waits for the
operator; the audit log is on; every app gets its own quota (each of its devices 120 requests a
minute and 4 at once, the app 2 000 000 tokens a UTC day) unless ``[[hub.quotas]]`` (or
``quotas = []``) is configured. The bind address stays the operator's; an exposed hub refuses
unsigned network callers (``_check``)."""


def config_from_mapping(data: Mapping[str, Any]) -> NodeConfig:
    data = dict(data)
    if "models" in data:
        data["models"] = _models_from_mapping(data["models"])
    config: NodeConfig = build_dataclass(NodeConfig, data, "")
    if config.hub.enabled:
        config = build_dataclass(NodeConfig, deep_merge(HUB_PRESET, data), "")
    _check(config)
    return config


def _models_from_mapping(value: Any) -> tuple[ModelConfig, ...]:
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, ModelConfig) for v in value):
        return tuple(value)
    if isinstance(value, EnvString):
        value = parse_json(value, "models")
    if not isinstance(value, Mapping) or not value:
        raise ConfigError("models: expected a table of model aliases, e.g. [models.gemma3-270m]")
    models = []
    for alias, spec in value.items():
        if isinstance(spec, ModelConfig):
            models.append(spec)
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"models.{alias}: expected a table")
        models.append(build_dataclass(ModelConfig, {"id": str(alias), **spec}, f"models.{alias}."))
    return tuple(models)


def _check(config: NodeConfig) -> None:
    """Cross-field checks that a type alone cannot express."""
    ids: set[str] = set()
    for model in config.models:
        for name in (model.id, *model.aliases):
            if name in ids:
                raise ConfigError(f"models.{model.id}: duplicate model id or alias '{name}'")
            ids.add(name)
        if model.catalog is not None:
            from .catalog import lookup

            if lookup(model.catalog) is None:
                raise ConfigError(f"models.{model.id}.catalog: '{model.catalog}' is not in the model "
                                  "catalogue (dvai-node models --catalog lists it)")
        for key in ("ctx_size", "queue_depth", "parallel"):
            if getattr(model, key) < 1:
                raise ConfigError(f"models.{model.id}.{key}: expected a positive integer")
        if model.prompt_cache_mib < 0:
            raise ConfigError(f"models.{model.id}.prompt_cache_mib: expected 0 or more")
    rules: set[str] = set()
    for rule in config.security.app_pairing:
        if not rule.app_id or rule.app_id in rules:
            raise ConfigError(f"security.app_pairing: app_id '{rule.app_id}' is empty or has two rules")
        rules.add(rule.app_id)
    if config.hub.enabled and (config.security.allow_anonymous_lan or config.security.require_pairing is False):
        raise ConfigError("hub.enabled: a hub attributes every request to an app, so it cannot let unsigned "
                          "callers in (remove security.allow_anonymous_lan / security.require_pairing = false)")
    if config.default_model is not None and config.default_model not in ids:
        raise ConfigError(f"default_model: '{config.default_model}' is not a configured model")
    if not 0 < config.http_base_port < 65536 and config.http_base_port != 0:
        raise ConfigError("http_base_port: expected a port number (1-65535, or 0 for any)")
    if config.http_max_port_attempts < 1:
        raise ConfigError("http_max_port_attempts: expected a positive integer")
    if config.max_body_bytes < 1024:
        raise ConfigError("max_body_bytes: expected at least 1024")
    if config.generation_timeout <= 0:
        raise ConfigError("generation_timeout: expected a positive number of seconds")
    if config.max_blank_chunks < 1:
        raise ConfigError("max_blank_chunks: expected a positive integer")
    if config.offload.probe_tokens < 2:
        raise ConfigError("offload.probe_tokens: expected an integer of at least 2")
    for server in config.offload.ice_servers:
        if not server.urls or not all(u.startswith(("stun:", "turn:", "turns:")) for u in server.urls):
            raise ConfigError("offload.ice_servers.urls: expected stun:, turn: or turns: URLs")
    for key in ("verify_timeout", "forward_connect_timeout", "forward_read_timeout", "circuit_break_s",
                "link_connect_timeout", "link_idle_timeout", "presence_interval"):
        if not getattr(config.offload, key) > 0:
            raise ConfigError(f"offload.{key}: expected a positive number of seconds")
