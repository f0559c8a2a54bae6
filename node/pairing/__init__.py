"""Pairing: who may call whom, with which key, and how two devices come to share one.

- ``store``: the persisted pairings (``PairingStore``, ``pairings.json``) and key encoding;
- ``handshake``: the LAN pairing handshake, server side and client (``pair_with``);
- ``approval``: the pairing policy, the owner's approval of pending requests, rate limits;
- ``qr``: the QR pairing protocol's crypto and QR rendering (pure, no I/O);
- ``qr_service``: the node component running QR pairings through a rendezvous. Import it
  from its module: it uses ``node.transport.rendezvous_client``, which builds on ``qr``.

Integration: ``PairingStore.load(state_dir)`` and ``PairingApprover.from_config(security,
hook=...)`` at start, ``approver.close()`` at shutdown; ``await handle_handshake(body,
remote=..., approver=..., store=..., node_device_id=...)`` in the handshake handler;
``await pair_with(session, url, identity=..., ...)`` to pair with a peer.
"""

from __future__ import annotations

from .approval import PairingApprover, PairingDecision, PairingHook, PairingRequest, TokenBuckets
from .handshake import (
    HANDSHAKE_PATH,
    DeviceSigner,
    check_handshake_proof,
    handle_handshake,
    make_handshake_proof,
    pair_with,
    parse_handshake_body,
)
from .qr import PairingFailedError, PairingResult, QrPayload, parse_pairing_uri
from .store import PAIRINGS_FILE, Pairing, PairingStore, PairingStoreError, decode_key, encode_key

__all__ = [
    "HANDSHAKE_PATH",
    "PAIRINGS_FILE",
    "DeviceSigner",
    "Pairing",
    "PairingApprover",
    "PairingDecision",
    "PairingFailedError",
    "PairingHook",
    "PairingRequest",
    "PairingResult",
    "PairingStore",
    "PairingStoreError",
    "QrPayload",
    "TokenBuckets",
    "check_handshake_proof",
    "decode_key",
    "encode_key",
    "handle_handshake",
    "make_handshake_proof",
    "pair_with",
    "parse_handshake_body",
    "parse_pairing_uri",
]
