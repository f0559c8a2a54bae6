"""The signed protocol messages: the exact bytes a device signs with its Ed25519 key.

Each is a fixed context label and the fields, newline-joined, so a signature made for one
purpose can never be replayed as another. Both signers (the node) and verifiers (the node,
the rendezvous) build them here; the formats are in ``docs/security.md`` and
``docs/rendezvous.md``.
"""

from __future__ import annotations

__all__ = [
    "HANDSHAKE_PROOF_CONTEXT",
    "HEALTH_PROOF_CONTEXT",
    "PRESENCE_AUTH_LABEL",
    "handshake_proof_message",
    "health_proof_message",
    "presence_auth_message",
]

PRESENCE_AUTH_LABEL = b"dvai-rendezvous-auth-v1"
HANDSHAKE_PROOF_CONTEXT = b"dvai-handshake-v1"
HEALTH_PROOF_CONTEXT = b"dvai-health-v1"


def presence_auth_message(audience: str, nonce: str) -> bytes:
    """What a device signs to join the rendezvous presence relay: label, the server's public URL
    and its challenge nonce."""
    return b"\n".join((PRESENCE_AUTH_LABEL, audience.encode(), nonce.encode()))


def handshake_proof_message(peer_device_id: str, target_device_id: str, timestamp_ms: int) -> bytes:
    """What a pairing handshake's ``proof`` signs: who asks, whom, and when (unix ms)."""
    return b"\n".join((HANDSHAKE_PROOF_CONTEXT, peer_device_id.encode(), target_device_id.encode(),
                       str(timestamp_ms).encode()))


def health_proof_message(challenge: str, device_id: str, instance_id: str) -> bytes:
    """What a node signs to prove, in its health answer, that it holds ``device_id``'s key."""
    return b"\n".join((HEALTH_PROOF_CONTEXT, challenge.encode(), device_id.encode(), instance_id.encode()))
