"""Trust: pairing, signed requests, the audit log and safe exposure.

Integration surface (see docs/security.md, "Integration"):

- ``PairingStore.load(state_dir)``, ``PairingApprover.from_config(security, hook=...)``,
  ``NonceCache()``, ``AuditLog.open(state_dir, config.audit)`` at start;
  ``approver.close()`` and ``await audit.close()`` at shutdown.
- ``make_security_middleware(config, store, nonces, loopback_only_paths=...)`` on the app.
- ``await handle_handshake(body, remote=..., approver=..., store=..., node_device_id=...)`` in the
  handshake handler; ``await pair_with(session, url, identity=..., ...)`` to pair with a peer.
- the audit log reads the per-request record (``node/api/record.py``): one row per inference
  request, served or refused.
"""

from __future__ import annotations

from .approval import PairingApprover, PairingDecision, PairingHook, PairingRequest, TokenBuckets
from .audit import AUDIT_FILE, AuditLog, AuditLogError, AuditRow
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
from .handshake import (
    HANDSHAKE_PATH,
    DeviceSigner,
    check_handshake_proof,
    handle_handshake,
    make_handshake_proof,
    pair_with,
    parse_handshake_body,
)
from .pairing import PAIRINGS_FILE, Pairing, PairingStore, PairingStoreError, decode_key, encode_key
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
    verify_hmac,
    verify_signed_request,
)

__all__ = [
    "ANONYMOUS",
    "ATTRIBUTION_KEY",
    "AUDIT_FILE",
    "DEFAULT_PUBLIC_PATHS",
    "HANDSHAKE_PATH",
    "LOOPBACK_KEY",
    "PAIRINGS_FILE",
    "SIGNATURE_VERSION",
    "SIGNED_HEADERS",
    "AccessPolicy",
    "Attribution",
    "AuditLog",
    "AuditLogError",
    "AuditRow",
    "NonceCache",
    "Pairing",
    "PairingApprover",
    "PairingDecision",
    "PairingHook",
    "PairingRequest",
    "PairingStore",
    "PairingStoreError",
    "TokenBuckets",
    "attribution_of",
    "audit_peer_of",
    "compose_signed_message",
    "decide_access",
    "decode_key",
    "encode_key",
    "exposure_warnings",
    "handle_handshake",
    "make_handshake_proof",
    "check_handshake_proof",
    "DeviceSigner",
    "host_allowed",
    "is_exposed",
    "is_loopback",
    "make_security_middleware",
    "new_nonce",
    "pair_with",
    "pairing_required",
    "parse_handshake_body",
    "path_with_query_of",
    "sign_hmac",
    "sign_request_headers",
    "verify_hmac",
    "verify_signed_request",
]
