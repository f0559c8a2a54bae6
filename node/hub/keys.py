"""API keys: ``Authorization: Bearer <key>`` for OpenAI clients that cannot sign requests.

A key is minted per app by the admin API or CLI and shown once. The node keeps only its
id and the SHA-256 of the whole key (keys carry 256 random bits, so a fast hash is enough:
there is nothing to brute-force), with its scopes: which models, which endpoints, whether
the request may be offloaded, and when it expires. Revocation takes effect on the next
request. The file (``api_keys.json`` in the state dir) is written atomically, mode 0600.

Key format: ``dvai-<id>-<secret>`` — ``id`` is 12 base32 characters (shown in listings and
the audit log), ``secret`` 43 base64url characters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..common.b64 import b64url_encode
from ..common.clock import unix_ms
from ..common.errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from ..common.fsutil import atomic_write_json, read_json
from ..constants import MAX_API_KEYS, MAX_KEY_NAME_CHARS

__all__ = ["API_KEYS_FILE", "ApiKey", "ApiKeyStore", "KeyScopes", "bearer_token", "check_scopes", "parse_scopes"]

log = logging.getLogger(__name__)

API_KEYS_FILE = "api_keys.json"
KEY_PREFIX = "dvai"
_KEY_RE = re.compile(r"^dvai-([a-z2-7]{12})-([A-Za-z0-9_-]{43})$")
_APP_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ANY = "*"


@dataclass(frozen=True, slots=True)
class KeyScopes:
    models: tuple[str, ...] = (ANY,)
    """model ids (or aliases) the key may use; ``*`` for all."""
    endpoints: tuple[str, ...] = (ANY,)
    """path prefixes the key may call (``/v1/chat/completions``, ``/v1/``); ``*`` for all but admin."""
    offload: bool = True
    """may a request made with this key be served by a peer?"""

    def allows_model(self, model: str) -> bool:
        return ANY in self.models or model in self.models

    def allows_path(self, path: str) -> bool:
        return ANY in self.endpoints or any(path == e or (e.endswith("/") and path.startswith(e))
                                            for e in self.endpoints)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A stored key: never the key itself, only its hash."""

    id: str
    app_id: str
    name: str
    digest: str
    """hex SHA-256 of the whole key."""
    scopes: KeyScopes = field(default_factory=KeyScopes)
    created_ms: int = 0
    expires_ms: int | None = None
    revoked_ms: int | None = None

    def usable(self, now_ms: int) -> bool:
        return self.revoked_ms is None and (self.expires_ms is None or now_ms < self.expires_ms)

    def to_json(self, *, with_digest: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "appId": self.app_id, "name": self.name,
            "scopes": {"models": list(self.scopes.models), "endpoints": list(self.scopes.endpoints),
                       "offload": self.scopes.offload},
            "createdAt": self.created_ms, "expiresAt": self.expires_ms, "revokedAt": self.revoked_ms,
        }
        if with_digest:
            out["sha256"] = self.digest
        return out

    @classmethod
    def from_json(cls, raw: Any) -> ApiKey:
        if not isinstance(raw, dict):
            raise ValueError("not an object")
        scopes = raw.get("scopes") or {}
        return cls(
            id=_text(raw["id"]), app_id=_text(raw["appId"]), name=_text(raw.get("name", "")),
            digest=_text(raw["sha256"]),
            scopes=KeyScopes(models=tuple(map(_text, scopes.get("models", [ANY]))),
                             endpoints=tuple(map(_text, scopes.get("endpoints", [ANY]))),
                             offload=bool(scopes.get("offload", True))),
            created_ms=int(raw.get("createdAt", 0)), expires_ms=_optional_int(raw.get("expiresAt")),
            revoked_ms=_optional_int(raw.get("revokedAt")),
        )


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


class ApiKeyStore:
    """The node's API keys, loaded once and saved atomically on every change."""

    def __init__(self, path: Path, *, clock: Callable[[], int] = unix_ms) -> None:
        self.path = path
        self._clock = clock
        self._keys: dict[str, ApiKey] = {}
        self._lock = threading.Lock()

    @classmethod
    def load(cls, state_dir: Path, **kwargs: Any) -> ApiKeyStore:
        store = cls(state_dir / API_KEYS_FILE, **kwargs)
        raw = read_json(store.path, {"keys": []}, tolerate_corrupt=True)
        entries = raw.get("keys", []) if isinstance(raw, dict) else []
        for entry in entries if isinstance(entries, list) else []:
            try:
                key = ApiKey.from_json(entry)
            except (KeyError, TypeError, ValueError):
                log.warning("ignored a malformed entry in %s", store.path)
                continue
            store._keys[key.id] = key
        return store

    def __len__(self) -> int:
        return len(self._keys)

    def get(self, key_id: str) -> ApiKey | None:
        return self._keys.get(key_id)

    def list(self) -> list[ApiKey]:
        return sorted(self._keys.values(), key=lambda k: (k.created_ms, k.id))

    def create(self, app_id: str, *, name: str = "", scopes: KeyScopes | None = None,
               expires_in_s: float | None = None) -> tuple[ApiKey, str]:
        """Mint a key for ``app_id``: the stored record and the key itself (shown once)."""
        if not isinstance(app_id, str) or not _APP_ID_RE.match(app_id):
            raise InvalidRequestError("'appId' must be 1-128 characters of letters, digits and ._:-",
                                      param="appId")
        if len(name) > MAX_KEY_NAME_CHARS:
            raise InvalidRequestError(f"'name' is longer than {MAX_KEY_NAME_CHARS} characters", param="name")
        if expires_in_s is not None and not expires_in_s > 0:
            raise InvalidRequestError("'expiresIn' must be a positive number of seconds", param="expiresIn")
        with self._lock:
            if len(self._keys) >= MAX_API_KEYS:
                raise InvalidRequestError(f"this node already has {MAX_API_KEYS} API keys; revoke some",
                                          code="too_many_keys")
            key_id = base64.b32encode(secrets.token_bytes(10)).decode().lower()[:12]
            secret = b64url_encode(secrets.token_bytes(32))
            token = f"{KEY_PREFIX}-{key_id}-{secret}"
            now = self._clock()
            record = ApiKey(id=key_id, app_id=app_id, name=name, digest=_digest(token),
                            scopes=scopes or KeyScopes(), created_ms=now,
                            expires_ms=None if expires_in_s is None else now + int(expires_in_s * 1000))
            self._save({**self._keys, key_id: record})
        return record, token

    def revoke(self, key_id: str) -> ApiKey | None:
        """Revoke at once (kept, marked, so the audit trail can still name it)."""
        with self._lock:
            key = self._keys.get(key_id)
            if key is None:
                return None
            if key.revoked_ms is None:
                key = replace(key, revoked_ms=self._clock())
                self._save({**self._keys, key_id: key})
            return key

    def authenticate(self, token: str) -> ApiKey:
        """The key ``token`` is, or ``AuthenticationError`` (401) naming no detail an attacker could use."""
        match = _KEY_RE.match(token)
        key = self._keys.get(match.group(1)) if match else None
        if key is None or not hmac.compare_digest(key.digest, _digest(token)):
            raise AuthenticationError("invalid API key", code="invalid_api_key")
        if not key.usable(self._clock()):
            raise AuthenticationError("this API key has expired or was revoked", code="invalid_api_key")
        return key

    def _save(self, keys: dict[str, ApiKey]) -> None:
        atomic_write_json(self.path, {"version": 1, "keys": [k.to_json(with_digest=True) for k in keys.values()]})
        self._keys = keys


def check_scopes(key: ApiKey, *, path: str, model: str | None = None) -> None:
    """``PermissionDeniedError`` (403) when ``key`` may not call ``path`` (or use ``model``)."""
    if not key.scopes.allows_path(path):
        raise PermissionDeniedError(f"this API key may not call {path}", code="key_scope_denied")
    if model is not None and not key.scopes.allows_model(model):
        raise PermissionDeniedError(f"this API key may not use the model '{model[:100]}'",
                                    code="key_scope_denied", param="model")


def parse_scopes(raw: Any) -> KeyScopes:
    """Scopes from an admin request body (400 naming the field when malformed)."""
    if raw is None:
        return KeyScopes()
    if not isinstance(raw, dict):
        raise InvalidRequestError("'scopes' must be an object", param="scopes")
    models = _string_list(raw.get("models", [ANY]), "scopes.models")
    endpoints = _string_list(raw.get("endpoints", [ANY]), "scopes.endpoints")
    offload = raw.get("offload", True)
    if not isinstance(offload, bool):
        raise InvalidRequestError("'scopes.offload' must be a boolean", param="scopes.offload")
    return KeyScopes(models=tuple(models), endpoints=tuple(endpoints), offload=offload)


def _string_list(value: Any, param: str) -> Iterable[str]:
    if not isinstance(value, list) or not value or len(value) > 256 or not all(
            isinstance(v, str) and 0 < len(v) <= 256 for v in value):
        raise InvalidRequestError(f"'{param}' must be a non-empty list of strings", param=param)
    return value


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("not a string")
    return value


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)
