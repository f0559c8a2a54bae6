"""Pairing sessions: a pure state machine over plain values.

The rendezvous only stores and relays public values: the initiator's and the
scanner's ephemeral X25519 public keys, the scanner's device id, and opaque
key-confirmation messages. It never sees the one-time secret or the key.

States (``docs/pairing-protocol.md`` draws the sequence)::

    open --join--> joined --confirm(scanner)--> scanner_confirmed
         --confirm(initiator)--> initiator_confirmed --finish(scanner)--> completed
    any live state --abort / a second join--> aborted;  --ttl--> expired

Every function takes ``now`` and returns a new session (or raises), so the
rules are tested with plain data; ``SessionManager`` (``rendezvous.manager``)
does the storage and the waking of long-polls.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from node.common.b64 import b64url_decode, b64url_encode
from node.common.clock import ms_from_seconds
from node.common.device_ids import is_valid_device_id
from node.common.errors import (
    AuthenticationError,
    ConflictError,
    DVAIError,
    InvalidRequestError,
    NotFoundError,
)

from .constants import MAX_ABORT_REASON

SESSION_ID_BYTES = 16
"""128 random bits per session id (the issue asks for at least 64)."""

TOKEN_BYTES = 16
"""128 random bits per role token; only its SHA-256 is stored."""


_SESSION_ID_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")


class SessionState(StrEnum):
    OPEN = "open"
    JOINED = "joined"
    SCANNER_CONFIRMED = "scanner_confirmed"
    INITIATOR_CONFIRMED = "initiator_confirmed"
    COMPLETED = "completed"
    ABORTED = "aborted"
    EXPIRED = "expired"

    @property
    def ended(self) -> bool:
        return self in (SessionState.COMPLETED, SessionState.ABORTED, SessionState.EXPIRED)


class Role(StrEnum):
    INITIATOR = "initiator"
    SCANNER = "scanner"


class SessionExpiredError(DVAIError):
    status = 410
    error_type = "invalid_request_error"
    code = "session_expired"


class SessionAbortedError(ConflictError):
    code = "session_aborted"


class SessionStateError(ConflictError):
    code = "wrong_session_state"


class ThirdPartyJoinError(ConflictError):
    """A join on a session that already has a scanner: the session is now aborted for both sides."""

    code = "session_already_joined"


@dataclass(frozen=True, slots=True)
class SessionEvent:
    seq: int
    kind: str
    at: float
    data: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "kind": self.kind, "at": ms_from_seconds(self.at), "data": dict(self.data)}


@dataclass(frozen=True, slots=True)
class PairingSession:
    id: str
    state: SessionState
    created_at: float
    expires_at: float
    initiator_public_key: str
    initiator_token_hash: str
    scanner_public_key: str | None = None
    scanner_device_id: str | None = None
    scanner_token_hash: str | None = None
    events: tuple[SessionEvent, ...] = ()
    end_reason: str | None = None

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def events_after(self, seq: int) -> tuple[SessionEvent, ...]:
        return tuple(e for e in self.events if e.seq > seq)

    def to_record(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["state"] = self.state.value
        record["events"] = [dataclasses.asdict(e) | {"data": dict(e.data)} for e in self.events]
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> PairingSession:
        data = dict(record)
        data["state"] = SessionState(data["state"])
        data["events"] = tuple(SessionEvent(**e) for e in data.get("events", ()))
        return cls(**data)


# --------------------------------------------------------------------------
# Values checked at the edge


def is_valid_session_id(value: object) -> bool:
    return isinstance(value, str) and bool(_SESSION_ID_RE.match(value))


def new_session_id(random_bytes: bytes) -> str:
    if len(random_bytes) < 8:
        raise ValueError("a session id needs at least 64 random bits")
    return b64url_encode(random_bytes)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_public_key(value: object, param: str) -> str:
    """A base64url (no padding) X25519 public key of 32 bytes; returned in canonical form."""
    if not isinstance(value, str) or len(value) != 43:
        raise InvalidRequestError(f"'{param}' must be a base64url X25519 public key (43 characters)", param=param)
    try:
        raw = b64url_decode(value)
    except ValueError as exc:
        raise InvalidRequestError(f"'{param}' is not valid base64url", param=param) from exc
    if len(raw) != 32:
        raise InvalidRequestError(f"'{param}' must encode exactly 32 bytes", param=param)
    return value


def parse_device_id(value: object, param: str) -> str:
    if not is_valid_device_id(value):
        raise InvalidRequestError(f"'{param}' is not a device id", param=param)
    assert isinstance(value, str)
    return value


# --------------------------------------------------------------------------
# Transitions


def create_session(
    *, session_id: str, initiator_public_key: str, initiator_token: str, now: float, ttl: float
) -> PairingSession:
    return PairingSession(
        id=session_id,
        state=SessionState.OPEN,
        created_at=now,
        expires_at=now + ttl,
        initiator_public_key=initiator_public_key,
        initiator_token_hash=hash_token(initiator_token),
        events=(SessionEvent(1, "created", now),),
    )


def refresh(session: PairingSession, now: float) -> PairingSession:
    """The session as it is at ``now``: a live session past its expiry becomes ``expired``."""
    if session.state.ended or now < session.expires_at:
        return session
    return _advance(session, SessionState.EXPIRED, "expired", now, {}, end_reason="expired")


def role_for_token(session: PairingSession, token: str | None) -> Role:
    """Which side holds ``token``; constant-time comparison against the stored hashes."""
    if token:
        digest = hash_token(token)
        if hmac.compare_digest(digest, session.initiator_token_hash):
            return Role.INITIATOR
        if session.scanner_token_hash and hmac.compare_digest(digest, session.scanner_token_hash):
            return Role.SCANNER
    raise AuthenticationError("missing or wrong session token", code="invalid_session_token")


def join(
    session: PairingSession,
    *,
    scanner_public_key: str,
    scanner_device_id: str,
    scanner_token: str,
    now: float,
) -> tuple[PairingSession, DVAIError | None]:
    """Join as the scanner. A join on an already joined session aborts it: returns (aborted, error)."""
    session = refresh(session, now)
    _require_live(session)
    if session.state is not SessionState.OPEN:
        aborted = _advance(
            session, SessionState.ABORTED, "aborted", now,
            {"reason": "a third party tried to join", "by": "rendezvous"}, end_reason="third_party_join",
        )
        return aborted, ThirdPartyJoinError(
            "this pairing session was already joined; it has been aborted for both sides"
        )
    joined = _advance(
        session, SessionState.JOINED, "joined", now,
        {"scanner_public_key": scanner_public_key, "scanner_device_id": scanner_device_id},
        scanner_public_key=scanner_public_key,
        scanner_device_id=scanner_device_id,
        scanner_token_hash=hash_token(scanner_token),
    )
    return joined, None


def confirm(session: PairingSession, *, role: Role, message: str, now: float) -> PairingSession:
    """Relay one key-confirmation message: the scanner's first, then the initiator's."""
    session = refresh(session, now)
    _require_live(session)
    expected = SessionState.JOINED if role is Role.SCANNER else SessionState.SCANNER_CONFIRMED
    if session.state is not expected:
        raise SessionStateError(
            f"the {role.value} cannot confirm while the session is {session.state.value}"
        )
    target = SessionState.SCANNER_CONFIRMED if role is Role.SCANNER else SessionState.INITIATOR_CONFIRMED
    return _advance(session, target, "confirm", now, {"role": role.value, "message": message})


def finish(session: PairingSession, *, role: Role, message: str, now: float) -> PairingSession:
    """The scanner's final message after it verified the initiator: the session is complete."""
    session = refresh(session, now)
    _require_live(session)
    if role is not Role.SCANNER:
        raise SessionStateError("only the scanner sends the finish message")
    if session.state is not SessionState.INITIATOR_CONFIRMED:
        raise SessionStateError(f"the scanner cannot finish while the session is {session.state.value}")
    return _advance(
        session, SessionState.COMPLETED, "finish", now, {"role": role.value, "message": message},
        end_reason="completed",
    )


def abort(session: PairingSession, *, role: Role, reason: str, now: float) -> PairingSession:
    """Either side ends the session; ending an ended session changes nothing."""
    session = refresh(session, now)
    if session.state.ended:
        return session
    reason = reason[:MAX_ABORT_REASON]
    return _advance(
        session, SessionState.ABORTED, "aborted", now, {"reason": reason, "by": role.value},
        end_reason="aborted",
    )


def _require_live(session: PairingSession) -> None:
    if session.state is SessionState.EXPIRED:
        raise SessionExpiredError("this pairing session has expired; start a new one")
    if session.state is SessionState.ABORTED:
        reason = session.events[-1].data.get("reason", "aborted") if session.events else "aborted"
        raise SessionAbortedError(f"this pairing session was aborted: {reason}")
    if session.state is SessionState.COMPLETED:
        raise SessionStateError("this pairing session is already complete; sessions are single-use")


def _advance(
    session: PairingSession,
    state: SessionState,
    kind: str,
    now: float,
    data: Mapping[str, str],
    **changes: Any,
) -> PairingSession:
    event = SessionEvent(session.last_seq + 1, kind, now, dict(data))
    return dataclasses.replace(session, state=state, events=(*session.events, event), **changes)


def unknown_session() -> NotFoundError:
    return NotFoundError("unknown pairing session", code="unknown_session")
