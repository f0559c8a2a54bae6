"""Device ids: derived from a device's Ed25519 public key, so they are stable, unique and checkable.

Shared by the node (identity, discovery, pairing) and the rendezvous (presence, sessions),
which checks ids and signatures without holding any key of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = ["DEVICE_ID_PREFIX", "device_id_from_public_key", "is_valid_device_id", "verify_device_signature"]

DEVICE_ID_PREFIX = "dv"
DEVICE_ID_CHARS = 34
"""``dv`` + 32 base32 characters (160 bits of the key's hash)."""


def device_id_from_public_key(public_key: bytes) -> str:
    """``dv`` + the first 20 bytes of sha256(raw Ed25519 public key), base32, lower case (34 chars)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    digest = hashlib.sha256(public_key).digest()[:20]
    return DEVICE_ID_PREFIX + base64.b32encode(digest).decode().lower()


def is_valid_device_id(value: object) -> bool:
    """True for a well-formed device id (it says nothing about who holds the key)."""
    if not isinstance(value, str) or len(value) != DEVICE_ID_CHARS or not value.startswith(DEVICE_ID_PREFIX):
        return False
    try:
        base64.b32decode(value[2:].upper())
    except (binascii.Error, ValueError):
        return False
    return True


def verify_device_signature(device_id: str, public_key: bytes, signature: bytes, message: bytes) -> bool:
    """True when ``public_key`` belongs to ``device_id`` and signed ``message``."""
    try:
        if device_id_from_public_key(public_key) != device_id:
            return False
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except Exception:  # noqa: BLE001 - any failure means "not verified"
        return False
    return True
