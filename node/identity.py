"""Device identity: a long-term Ed25519 key pair per install, kept in the state dir.

The device id is derived from the public key, so it is stable across restarts,
unique per install, and checkable by anyone who sees the key.
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .fsutil import atomic_write_bytes, ensure_private_dir

DEVICE_ID_PREFIX = "dv"
KEY_FILE = "identity.key"


def device_id_from_public_key(public_key: bytes) -> str:
    """``dv`` + the first 20 bytes of sha256(raw Ed25519 public key), base32, lower case (34 chars)."""
    if len(public_key) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    digest = hashlib.sha256(public_key).digest()[:20]
    return DEVICE_ID_PREFIX + base64.b32encode(digest).decode().lower()


def is_valid_device_id(value: object) -> bool:
    if not isinstance(value, str) or len(value) != 34 or not value.startswith(DEVICE_ID_PREFIX):
        return False
    try:
        base64.b32decode(value[2:].upper())
    except ValueError:
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


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    private_key: Ed25519PrivateKey
    public_key: bytes
    device_id: str

    @classmethod
    def generate(cls) -> DeviceIdentity:
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> DeviceIdentity:
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(private_key=key, public_key=public, device_id=device_id_from_public_key(public))

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    def private_bytes(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )


def load_or_create_identity(state_dir: Path) -> DeviceIdentity:
    """Read the key from ``state_dir``, creating it (mode 0600, atomically) on first start."""
    ensure_private_dir(state_dir)
    path = Path(state_dir) / KEY_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        identity = DeviceIdentity.generate()
        atomic_write_bytes(path, identity.private_bytes())
        return identity
    if len(raw) != 32:
        raise ValueError(f"{path} is not a 32-byte Ed25519 private key")
    return DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(raw))
