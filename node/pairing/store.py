"""Pairings: who may call us, whom we may call, and with which key.

A pairing key is a 256-bit HMAC secret shared with one peer. Its ``role`` says which way it
may be used, because the two ends of a LAN handshake did not consent to the same thing:

- ``inbound``  — we issued the key (a peer ran the handshake against us and it was approved):
  the peer may sign requests *to us*; we never use it to call them.
- ``outbound`` — we received the key (we ran the handshake against the peer): we may sign
  requests *to the peer*; requests signed with it *to us* are refused.
- ``mutual``   — both ends hold the key by mutual consent (QR pairing through a rendezvous,
  or the operator configured it, ``via="static"``): either side may call the other.

Two nodes that each pair with the other hold one inbound and one outbound record for the same
peer, with different keys. Inbound pairings are kept per application: each app on a peer device
that ran the handshake (``appId``) holds its own key, so a peer device may hold several inbound
pairings, one per app id, and one outbound. Two app ids are bound to a key, one per direction, so a
record never has to say which way its app id points:

- ``our_app_id``  — the ``X-DVAI-App-Id`` *we* send when we sign with the key (set exactly when
  the record lets us call the peer: ``outbound`` and ``mutual``);
- ``peer_app_id`` — the ``X-DVAI-App-Id`` the *peer* must send when it signs with the key (set
  exactly when the peer may call us: ``inbound`` and ``mutual``).

A LAN handshake binds the requester's ``appId`` (falling back to its device id, as in the
reference); a QR pairing binds each side's device id. A signature is checked against the key of
the (device id, app id) pair that signed it (``PairingStore.credential_for``), so one app's key
never acts for another app on the same device.

Store versions: 1 had a single ``appId`` whose meaning depended on the role (``_migrate_v1``);
2 held at most one inbound pairing per device; 3 (this one) holds one per (device, app). Older
files are migrated and rewritten at start; a version 3 file is refused by older nodes.
"""

from __future__ import annotations

import asyncio
import builtins
import dataclasses
import json
import logging
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..common.b64 import b64url_decode, b64url_encode
from ..common.errors import ConflictError, NotFoundError
from ..common.fsutil import SECRET_MODE, atomic_write_json, ensure_private_dir
from ..constants import (
    B64_KEY_MAX_CHARS,
    PAIRING_KEY_BYTES,
    PAIRINGS_MAX,
)

logger = logging.getLogger(__name__)

PAIRINGS_FILE = "pairings.json"
STORE_FORMAT_VERSION = 3
"""2: ``ourAppId`` / ``peerAppId`` replace version 1's ambiguous ``appId``; 3: several inbound
pairings per device, one per app id (same record shape)."""
READABLE_VERSIONS = (1, 2, STORE_FORMAT_VERSION)

Via = Literal["lan-handshake", "rendezvous", "static"]
Role = Literal["inbound", "outbound", "mutual"]
Direction = Literal["inbound", "outbound"]

_ROLE_DIRECTIONS: dict[str, tuple[Direction, ...]] = {
    "inbound": ("inbound",),
    "outbound": ("outbound",),
    "mutual": ("inbound", "outbound"),
}


class PairingStoreError(ValueError):
    """pairings.json cannot be read: the node refuses to start rather than forget pairings."""


def encode_key(key: bytes) -> str:
    """base64url without padding (the reference's ``pairingKey``)."""
    return b64url_encode(key)


def decode_key(text: str) -> bytes:
    """Decode a base64url pairing key (padding optional); it must be exactly 256 bits."""
    if not isinstance(text, str) or len(text) > B64_KEY_MAX_CHARS:
        raise ValueError("pairing key must be a base64url string")
    try:
        key = b64url_decode(text)
    except ValueError as exc:
        raise ValueError("pairing key is not valid base64url") from exc
    if len(key) != PAIRING_KEY_BYTES:
        raise ValueError(f"pairing key must be {PAIRING_KEY_BYTES * 8} bits, got {len(key) * 8}")
    return key


@dataclass(frozen=True, slots=True)
class Pairing:
    """One pairing with one peer device (and, inbound, one of its apps). ``paired_at`` is unix ms."""

    peer_device_id: str
    peer_device_name: str
    key: bytes = field(repr=False)
    via: Via
    paired_at: int
    role: Role
    our_app_id: str | None = None
    """the app id we sign as with this key (set exactly when ``may_call_peer``)."""
    peer_app_id: str | None = None
    """the app id the peer must sign as with this key (set exactly when ``may_call_us``)."""
    base_url: str | None = None
    """where the peer was reached (outbound pairings made by ``pair_with``)."""
    admin: bool = False
    """the peer may call loopback-only admin endpoints (never set by a handshake)."""

    def __post_init__(self) -> None:
        if len(self.key) != PAIRING_KEY_BYTES:
            raise ValueError(f"pairing key must be {PAIRING_KEY_BYTES} bytes")
        if self.role not in _ROLE_DIRECTIONS:
            raise ValueError(f"role must be one of {', '.join(_ROLE_DIRECTIONS)}")
        if self.via not in get_args(Via):
            raise ValueError(f"via must be one of {', '.join(get_args(Via))}")
        if not self.peer_device_id:
            raise ValueError("peer_device_id must be non-empty")
        for name, needed in (("our_app_id", self.may_call_peer), ("peer_app_id", self.may_call_us)):
            value = getattr(self, name)
            if needed and not (isinstance(value, str) and value):
                raise ValueError(f"a {self.role} pairing needs a non-empty {name}")
            if not needed and value is not None:
                raise ValueError(f"a {self.role} pairing has no {name} (that direction is not paired)")

    @property
    def may_call_us(self) -> bool:
        return "inbound" in _ROLE_DIRECTIONS[self.role]

    @property
    def may_call_peer(self) -> bool:
        return "outbound" in _ROLE_DIRECTIONS[self.role]

    def to_public_json(self) -> dict[str, Any]:
        """For listings: everything but the key."""
        return {
            "peerDeviceId": self.peer_device_id,
            "peerDeviceName": self.peer_device_name,
            "ourAppId": self.our_app_id,
            "peerAppId": self.peer_app_id,
            "via": self.via,
            "pairedAt": self.paired_at,
            "role": self.role,
            "baseUrl": self.base_url,
            "admin": self.admin,
        }

    def to_json(self) -> dict[str, Any]:
        """For pairings.json: includes the key."""
        return {**self.to_public_json(), "pairingKey": encode_key(self.key)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Pairing:
        """Parse one stored record; raises ValueError naming what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("a pairing must be an object")
        try:
            pairing = cls(
                peer_device_id=_str(data, "peerDeviceId"),
                peer_device_name=_str(data, "peerDeviceName"),
                our_app_id=_optional_str(data, "ourAppId"),
                peer_app_id=_optional_str(data, "peerAppId"),
                key=decode_key(_str(data, "pairingKey")),
                via=_str(data, "via"),  # type: ignore[arg-type]
                paired_at=_int(data, "pairedAt"),
                role=_str(data, "role"),  # type: ignore[arg-type]
                base_url=data.get("baseUrl") if isinstance(data.get("baseUrl"), str) else None,
                admin=data.get("admin") is True,
            )
        except TypeError as exc:
            raise ValueError(str(exc)) from exc
        return pairing


InboundSlot = tuple[str, str]
"""(peer device id, peer app id): the key an inbound pairing is kept under."""


class PairingStore:
    """Pairings in memory for the hot path, persisted to ``pairings.json`` (atomic, 0600).

    Inbound pairings (the peer may call us) are kept per (peer device, peer app id); outbound
    ones (we may call the peer) per peer device. A mutual pairing sits in both: under its
    ``peer_app_id`` inbound and under the device outbound.

    Reads (``get``, ``credential_for``, ``list``) are synchronous and never touch the disk.
    Changes apply in memory at once (a revoked key stops verifying before ``revoke`` even
    awaits), then the whole store is written off the event loop; writes are serialised so the
    file always holds the latest state.
    """

    def __init__(self, path: Path, pairings: Iterable[Pairing] = ()) -> None:
        self.path = Path(path)
        self._inbound: dict[InboundSlot, Pairing] = {}
        self._outbound: dict[str, Pairing] = {}
        self._write_lock = asyncio.Lock()
        for pairing in pairings:
            self._put(pairing)

    @classmethod
    async def load(cls, state_dir: Path, *, self_device_id: str) -> PairingStore:
        """Read ``<state_dir>/pairings.json`` (missing → empty); corrupt → ``PairingStoreError``.

        ``self_device_id`` (this node's device id) is what a version 1 QR pairing signed as; an
        older file is migrated and rewritten at once.
        """
        return await asyncio.to_thread(cls.load_sync, state_dir, self_device_id=self_device_id)

    @classmethod
    def load_sync(cls, state_dir: Path, *, self_device_id: str) -> PairingStore:
        """``load`` for start-up code that runs before the event loop (a small file, read once)."""
        path = Path(state_dir) / PAIRINGS_FILE
        pairings, from_version = _read_pairings_file(path, self_device_id)
        store = cls(path, pairings)
        if from_version != STORE_FORMAT_VERSION:
            _write_pairings_file(path, store._document())
            logger.info("%s: migrated %d pairing(s) from format version %d to %d", path, len(pairings),
                        from_version, STORE_FORMAT_VERSION)
        return store

    def get(self, peer_device_id: str, *, direction: Direction = "inbound",
            app_id: str | None = None) -> Pairing | None:
        """The pairing the peer may call us with (``inbound``), or that we call it with (``outbound``).

        Inbound pairings are per app: ``app_id`` names the app (the peer's ``X-DVAI-App-Id``).
        Without it: the pairing of the app named like the device (the reference's fallback, and
        what a QR pairing binds), else the device's only inbound pairing, else None.
        """
        if direction == "outbound":
            return self._outbound.get(peer_device_id)
        if app_id is not None:
            return self._inbound.get((peer_device_id, app_id))
        exact = self._inbound.get((peer_device_id, peer_device_id))
        if exact is not None:
            return exact
        apps = self.apps_of(peer_device_id)
        return apps[0] if len(apps) == 1 else None

    def credential_for(self, peer_device_id: str, app_id: str) -> Pairing | None:
        """The key ``app_id`` on ``peer_device_id`` signs with to call us (signature checks)."""
        return self._inbound.get((peer_device_id, app_id))

    def apps_of(self, peer_device_id: str) -> builtins.list[Pairing]:
        """The device's inbound pairings, one per app, ordered by app id."""
        found = [p for (device, _), p in self._inbound.items() if device == peer_device_id]
        return sorted(found, key=lambda p: p.peer_app_id or "")

    def knows_device(self, peer_device_id: str) -> bool:
        """Whether any app of the device may call us."""
        return any(device == peer_device_id for device, _ in self._inbound)

    def list(self) -> builtins.list[Pairing]:
        """Every pairing, mutual ones once, ordered by peer, role, then app id."""
        unique = {id(p): p for p in (*self._inbound.values(), *self._outbound.values())}
        return sorted(unique.values(), key=lambda p: (p.peer_device_id, p.role, p.peer_app_id or ""))

    def __len__(self) -> int:
        return len(self.list())

    async def add(self, pairing: Pairing) -> Pairing:
        """Store ``pairing``, replacing what the peer (app) held in the same direction(s)."""
        if not any(current is not None for current in self._current(pairing)) and len(self) >= PAIRINGS_MAX:
            raise ConflictError(f"the pairing store is full ({PAIRINGS_MAX} pairings); revoke some first")
        self._put(pairing)
        # No rollback if the write fails: a concurrent revoke must not be undone, and the
        # caller has not handed the key to anyone yet; the next successful write persists it.
        await self._persist()
        return pairing

    async def revoke(self, peer_device_id: str, app_id: str | None = None) -> builtins.list[Pairing]:
        """Forget, at once, every pairing with the peer device (``app_id`` None: all its apps and
        the outbound pairing) or only the inbound pairing of one of its apps. NotFoundError when
        there is none. A mutual pairing whose app is revoked keeps its outbound direction."""
        if app_id is None:
            removed = [p for p in self.list() if p.peer_device_id == peer_device_id]
            if not removed:
                raise NotFoundError(f"no pairing with device '{peer_device_id}'")
            for slot in [slot for slot in self._inbound if slot[0] == peer_device_id]:
                del self._inbound[slot]
            self._outbound.pop(peer_device_id, None)
        else:
            current = self._inbound.pop((peer_device_id, app_id), None)
            if current is None:
                raise NotFoundError(f"no pairing lets app '{app_id}' on device '{peer_device_id}' call this node")
            removed = [current]
            if self._outbound.get(peer_device_id) is current:
                self._outbound[peer_device_id] = dataclasses.replace(current, role="outbound", peer_app_id=None)
        await self._persist()  # on failure the revocation still holds in memory until restart
        return removed

    async def set_admin(self, peer_device_id: str, admin: bool, *, app_id: str | None = None) -> Pairing:
        """Allow (or stop allowing) an inbound pairing of the peer to call admin endpoints
        (``app_id`` as in ``get``)."""
        current = self.get(peer_device_id, app_id=app_id)
        if current is None:
            raise NotFoundError(f"no pairing lets device '{peer_device_id}' call this node")
        return await self.add(dataclasses.replace(current, admin=admin))

    def _current(self, pairing: Pairing) -> builtins.list[Pairing | None]:
        """What ``pairing`` would replace, slot by slot."""
        found: builtins.list[Pairing | None] = []
        if pairing.may_call_us:
            assert pairing.peer_app_id is not None
            found.append(self._inbound.get((pairing.peer_device_id, pairing.peer_app_id)))
        if pairing.may_call_peer:
            found.append(self._outbound.get(pairing.peer_device_id))
        return found

    def _put(self, pairing: Pairing) -> None:
        device = pairing.peer_device_id
        inbound_slot = (device, pairing.peer_app_id) if pairing.peer_app_id is not None else None
        if inbound_slot is not None:
            old = self._inbound.pop(inbound_slot, None)
            if old is not None and old.role == "mutual" and not pairing.may_call_peer \
                    and self._outbound.get(device) is old:
                # a mutual key half-replaced keeps working in the direction not replaced
                self._outbound[device] = dataclasses.replace(old, role="outbound", peer_app_id=None)
        if pairing.may_call_peer:
            old = self._outbound.pop(device, None)
            if old is not None and old.role == "mutual" and old.peer_app_id is not None:
                old_slot = (device, old.peer_app_id)
                if old_slot != inbound_slot and self._inbound.get(old_slot) is old:
                    self._inbound[old_slot] = dataclasses.replace(old, role="inbound", our_app_id=None)
            self._outbound[device] = pairing
        if inbound_slot is not None:
            self._inbound[inbound_slot] = pairing

    def _document(self) -> dict[str, Any]:
        return {"version": STORE_FORMAT_VERSION, "pairings": [p.to_json() for p in self.list()]}

    async def _persist(self) -> None:
        async with self._write_lock:
            await asyncio.to_thread(_write_pairings_file, self.path, self._document())


def _migrate_v1(item: Any, self_device_id: str) -> Any:
    """A version 1 record's single ``appId`` pointed one way or the other depending on the role:

    - ``inbound`` (we issued the key): the app id the peer signs as;
    - ``outbound`` (we received the key): the app id we sign as;
    - ``mutual`` via ``rendezvous`` (QR): the peer's device id, what the peer signs as; we sign
      as our own device id (what the other side stored for us);
    - ``mutual`` via ``static``: one app id configured for both directions.
    """
    if not isinstance(item, dict):
        return item
    record = {k: v for k, v in item.items() if k != "appId"}
    app_id, role = item.get("appId"), item.get("role")
    if role == "inbound":
        record["peerAppId"] = app_id
    elif role == "outbound":
        record["ourAppId"] = app_id
    elif role == "mutual":
        record["peerAppId"] = app_id
        record["ourAppId"] = self_device_id if item.get("via") == "rendezvous" else app_id
    return record


def _read_pairings_file(path: Path, self_device_id: str) -> tuple[list[Pairing], int]:
    """The stored pairings, and the format version they were read from (a missing file: current).

    Versions 2 and 3 share the record shape: a version 2 file holds at most one inbound pairing
    per device, which version 3 keeps under its ``peerAppId``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return [], STORE_FORMAT_VERSION
    except OSError as exc:
        raise PairingStoreError(f"cannot read {path}: {exc}") from exc
    _tighten_mode(path)
    hint = "move it aside to start with no pairings, or restore it from a backup"
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PairingStoreError(f"{path} is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(document, dict) or not isinstance(document.get("pairings"), list):
        raise PairingStoreError(f"{path} has no 'pairings' list; {hint}")
    version = document.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise PairingStoreError(f"{path} has unsupported version {version!r}; {hint}")
    pairings = []
    for index, item in enumerate(document["pairings"]):
        try:
            pairings.append(Pairing.from_json(_migrate_v1(item, self_device_id) if version == 1 else item))
        except ValueError as exc:
            raise PairingStoreError(f"{path}: pairing #{index} is invalid ({exc}); {hint}") from exc
    return pairings, int(version)


def _write_pairings_file(path: Path, document: dict[str, Any]) -> None:
    ensure_private_dir(path.parent)
    atomic_write_json(path, document, mode=SECRET_MODE)


def _tighten_mode(path: Path) -> None:
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            logger.warning("%s was readable by others (mode %o); setting 0600", path, mode)
            os.chmod(path, SECRET_MODE)
    except OSError:
        pass


def _str(data: Mapping[str, Any], name: str) -> str:
    if name not in data:
        raise ValueError(f"'{name}' is missing")
    value = data[name]
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{name}' must be a non-empty string")
    return value


def _optional_str(data: Mapping[str, Any], name: str) -> str | None:
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"'{name}' must be a non-empty string or null")
    return value


def _int(data: Mapping[str, Any], name: str) -> int:
    if name not in data:
        raise ValueError(f"'{name}' is missing")
    value = data[name]
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"'{name}' must be an integer")
    return value
