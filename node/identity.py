"""Device identity: a long-term Ed25519 key pair per install, kept in the state dir.

The device id is derived from the public key, so it is stable across restarts,
unique per install, and checkable by anyone who sees the key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .common.b64 import b64url_decode, b64url_encode
from .common.clock import unix_ms
from .common.device_ids import device_id_from_public_key, verify_device_signature
from .common.fsutil import atomic_write_bytes, atomic_write_json, ensure_private_dir, read_json
from .common.messages import health_proof_message
from .constants import (
    B64_FIELD_MAX_CHARS,
    B64_KEY_MAX_CHARS,
    HEALTH_CHALLENGE_MAX_CHARS,
    MAX_DEVICE_NAME_CHARS,
)

KEY_FILE = "identity.key"


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
    ensure_private_dir(state_dir, tighten=True)
    path = Path(state_dir) / KEY_FILE
    try:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # a key copied in with looser permissions is made private again
        raw = path.read_bytes()
    except FileNotFoundError:
        identity = DeviceIdentity.generate()
        atomic_write_bytes(path, identity.private_bytes())
        return identity
    if len(raw) != 32:
        raise ValueError(f"{path} is not a 32-byte Ed25519 private key")
    return DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(raw))


# --------------------------------------------------------------------------
# The running node's identity: device key + name + per-start instance id, and
# detection of two nodes started from copies of one state dir.

INSTANCE_FILE = "instance.json"
LOCK_FILE = "node.lock"

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """Who this node is: its long-term key, a human name, and this process's instance id.

    ``instance_id`` is random per process start. Two processes with the same device id
    but different instance ids are two copies of one state dir (or one dir used twice).
    """

    device: DeviceIdentity
    device_name: str
    instance_id: str

    @property
    def device_id(self) -> str:
        return self.device.device_id


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """What ``instance.json`` remembers about the last process that used a state dir."""

    device_id: str
    state_dir: str
    host: str
    machine_id: str
    pid: int
    started_at: int
    """unix ms"""
    instance_id: str

    def to_json(self) -> dict[str, object]:
        return {
            "deviceId": self.device_id,
            "stateDir": self.state_dir,
            "host": self.host,
            "machineId": self.machine_id,
            "pid": self.pid,
            "startedAt": self.started_at,
            "instanceId": self.instance_id,
        }

    @classmethod
    def from_json(cls, value: object) -> InstanceRecord | None:
        """The record, or None when the file content is not a record (never raises)."""
        if not isinstance(value, dict):
            return None
        try:
            record = cls(
                device_id=str(value["deviceId"]),
                state_dir=str(value["stateDir"]),
                host=str(value["host"]),
                machine_id=str(value["machineId"]),
                pid=int(value["pid"]),
                started_at=int(value["startedAt"]),
                instance_id=str(value["instanceId"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        return record


def default_device_name(hostname: str | None = None) -> str:
    """The host name without its domain, cut to 63 characters; ``dvai-node`` if empty."""
    name = (hostname if hostname is not None else socket.gethostname()).split(".")[0]
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    return name[:MAX_DEVICE_NAME_CHARS] or "dvai-node"


def new_instance_id() -> str:
    return secrets.token_hex(8)


def copied_state_dir_warnings(previous: InstanceRecord | None, current: InstanceRecord) -> tuple[str, ...]:
    """Warnings when ``instance.json`` shows the state dir was last used elsewhere (pure).

    A copy carries ``instance.json`` along, so a copied dir remembers another path or
    another machine. A moved dir looks the same; the message says so.
    """
    if previous is None or previous.device_id != current.device_id:
        return ()
    where = []
    if previous.machine_id != current.machine_id:
        where.append(f"on another machine ({previous.host})")
    if previous.state_dir != current.state_dir:
        where.append(f"at another path ({previous.state_dir})")
    if not where:
        return ()
    return (
        f"state dir {current.state_dir} was last used {' and '.join(where)}. If that copy is still "
        f"running, two nodes share device id {current.device_id} and peers will see one device flip "
        f"between two addresses. Fix: stop one of them, delete identity.key in its state dir, and "
        f"start it again (it gets a new device id; re-pair it). Ignore this if the dir was moved.",
    )


class IdentityHandle:
    """The opened identity of a running node; holds the state dir lock until ``close()``."""

    def __init__(self, identity: NodeIdentity, warnings: tuple[str, ...], lock_fd: int | None) -> None:
        self.identity = identity
        self.warnings = warnings
        self._lock_fd = lock_fd

    @property
    def locked(self) -> bool:
        """True while this process holds the state dir's lock (no other node writes in it)."""
        return self._lock_fd is not None

    def close(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)  # releases the flock


def open_node_identity(
    state_dir: Path,
    device_name: str | None = None,
    *,
    host: str | None = None,
    machine_id: str | None = None,
    now_ms: int | None = None,
    exclusive: bool = False,
) -> IdentityHandle:
    """Load or create the key, lock the state dir, record ``instance.json``, warn about copies.

    Blocking (file I/O): call it from a thread (``asyncio.to_thread``) when a loop runs.
    Each warning is logged once at WARNING level and kept in ``handle.warnings``.
    With ``exclusive`` (a serving node), a state dir another process holds raises
    :class:`StateDirInUseError` instead of a warning.
    """
    state_dir = ensure_private_dir(Path(state_dir))
    device = load_or_create_identity(state_dir)
    host = host if host is not None else socket.gethostname()
    identity = NodeIdentity(device, device_name or default_device_name(host), new_instance_id())
    current = InstanceRecord(
        device_id=device.device_id,
        state_dir=str(state_dir.resolve()),
        host=host,
        machine_id=machine_id if machine_id is not None else _machine_id(host),
        pid=os.getpid(),
        started_at=now_ms if now_ms is not None else unix_ms(),
        instance_id=identity.instance_id,
    )
    warnings: list[str] = []
    lock_fd, holder = _lock_state_dir(state_dir)
    if lock_fd is None and holder is not None and exclusive:
        raise StateDirInUseError(
            f"another dvai-node ({holder}) is already running from state dir {state_dir}; stop it, or "
            f"give this node its own state dir (--state-dir DIR, or DVAI_STATE_DIR)"
        )
    if lock_fd is None and holder is not None:
        warnings.append(
            f"another dvai-node process ({holder}) is running from state dir {state_dir} right now: "
            f"both use device id {device.device_id}. Give each node its own state_dir."
        )
    previous = InstanceRecord.from_json(_read_json_quietly(state_dir / INSTANCE_FILE))
    warnings.extend(copied_state_dir_warnings(previous, current))
    if lock_fd is not None or holder is None:  # never clobber the record of the process holding the lock
        atomic_write_json(state_dir / INSTANCE_FILE, current.to_json())
    for message in warnings:
        _log.warning("%s", message)
    return IdentityHandle(identity, tuple(warnings), lock_fd)


class StateDirInUseError(RuntimeError):
    """A serving node found its state dir locked by another running node."""


def make_health_proof(identity: NodeIdentity, challenge: str) -> dict[str, str] | None:
    """The ``identityProof`` object for a health answer, or None for a bad challenge.

    A health handler calls this with the ``challenge`` query parameter (1-64 hex chars).
    """
    if not is_valid_health_challenge(challenge):
        return None
    message = health_proof_message(challenge, identity.device_id, identity.instance_id)
    return {
        "publicKey": b64url_encode(identity.device.public_key),
        "signature": b64url_encode(identity.device.sign(message)),
    }


def check_health_proof(proof: object, challenge: str, device_id: str, instance_id: str) -> bool:
    """True when ``proof`` (from a health answer) was made by ``device_id``'s key for ``challenge``."""
    if not isinstance(proof, dict):
        return False
    public_key, signature = proof.get("publicKey"), proof.get("signature")
    if not isinstance(public_key, str) or not isinstance(signature, str):
        return False
    if len(public_key) > B64_KEY_MAX_CHARS or len(signature) > B64_FIELD_MAX_CHARS:
        return False
    try:
        public_raw, signature_raw = b64url_decode(public_key), b64url_decode(signature)
    except ValueError:
        return False
    message = health_proof_message(challenge, device_id, instance_id)
    return verify_device_signature(device_id, public_raw, signature_raw, message)


def is_valid_health_challenge(challenge: object) -> bool:
    return (
        isinstance(challenge, str)
        and 0 < len(challenge) <= HEALTH_CHALLENGE_MAX_CHARS
        and all(ch in "0123456789abcdef" for ch in challenge)
    )


def _machine_id(host: str) -> str:
    """A short stable id of this machine (hashed /etc/machine-id), the host name if absent."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            raw = Path(path).read_text().strip()
        except OSError:
            continue
        if raw:
            return hashlib.sha256(raw.encode()).hexdigest()[:16]
    return "host:" + host


def _lock_state_dir(state_dir: Path) -> tuple[int | None, str | None]:
    """(fd holding an exclusive flock, None) or (None, "pid N on HOST") when someone holds it."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        return None, None
    path = state_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown pid"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    return fd, None


def _read_json_quietly(path: Path) -> object:
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None
