"""Security proper: signed requests and safe exposure.

- ``signing``: the HMAC request signature (compose, sign, verify) and the nonce replay cache;
- ``guard``: the exposure policy (who may reach which endpoint) and its aiohttp middleware.

Pairing (store, handshake, approval, QR) lives in ``node.pairing``, the audit log in
``node.audit``; the audit log reads the per-request record (``node/api/record.py``).
Integration (see docs/security.md): ``NonceCache.for_process_start()`` at start;
``make_security_middleware(config, store, nonces, loopback_only_paths=...)`` on the app.
"""

from __future__ import annotations

from .guard import (
    ATTRIBUTION_KEY,
    DEFAULT_PUBLIC_PATHS,
    LOOPBACK_KEY,
    AccessPolicy,
    attribution_of,
    audit_peer_of,
    decide_access,
    exposure_warnings,
    host_allowed,
    is_exposed,
    is_loopback,
    make_security_middleware,
    pairing_required,
)
from .signing import (
    ANONYMOUS,
    SIGNATURE_VERSION,
    SIGNED_HEADERS,
    Attribution,
    NonceCache,
    compose_signed_message,
    new_nonce,
    path_with_query_of,
    sign_hmac,
    sign_request_headers,
    sign_with_pairing,
    verify_hmac,
    verify_signed_request,
)

__all__ = [
    "ANONYMOUS",
    "ATTRIBUTION_KEY",
    "DEFAULT_PUBLIC_PATHS",
    "LOOPBACK_KEY",
    "SIGNATURE_VERSION",
    "SIGNED_HEADERS",
    "AccessPolicy",
    "Attribution",
    "NonceCache",
    "attribution_of",
    "audit_peer_of",
    "compose_signed_message",
    "decide_access",
    "exposure_warnings",
    "host_allowed",
    "is_exposed",
    "is_loopback",
    "make_security_middleware",
    "new_nonce",
    "pairing_required",
    "path_with_query_of",
    "sign_hmac",
    "sign_request_headers",
    "sign_with_pairing",
    "verify_hmac",
    "verify_signed_request",
]
