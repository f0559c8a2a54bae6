"""QR pairing over a rendezvous, the network part: ``QrPairingInitiator`` and ``QrPairingScanner``.

The crypto is in ``node.pairing.qr`` (pure functions); this module
only moves its messages through the rendezvous HTTP API (``docs/rendezvous.md``)
and runs the steps in order (``docs/pairing-protocol.md``)::

    initiator                         rendezvous                      scanner
    start(): POST /v1/sessions  ─────▶  open
    show QR (URI with secret)  ··········· (camera, never the server) ·······▶ pair(uri)
                                        joined  ◀──── POST …/join (B, scanner id)
    long-poll sees join, derives keys            derives keys, POST …/confirm (scanner MAC)
    verify scanner MAC, approve?  ◀─────  scanner_confirmed
    POST …/confirm (initiator MAC) ────▶  initiator_confirmed ───▶ verify, approve?
                                        completed ◀──── POST …/finish (finish MAC)
    verify finish MAC → result                                 → result

A failed check aborts the session (best effort) and raises; no result, no key.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from ..common.b64 import b64url_encode
from ..constants import RENDEZVOUS_MAX_RESPONSE_BYTES
from ..identity import DeviceIdentity
from ..pairing.qr import (
    PairingFailedError,
    PairingResult,
    PairingTranscript,
    QrPayload,
    Role,
    SessionKeys,
    build_confirmation,
    build_finish,
    decode_b64_field,
    derive_session_keys,
    generate_ephemeral_key,
    make_result,
    new_secret,
    parse_pairing_uri,
    public_bytes,
    render_qr_png,
    render_qr_svg,
    render_qr_text,
    verify_confirmation,
    verify_finish,
    x25519_shared_secret,
)

LONG_POLL_S = 25.0
"""seconds one events request waits on the rendezvous (its own cap is 30 by default)."""
REQUEST_TIMEOUT_S = 10.0
"""seconds any other rendezvous request may take."""
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 2.0
"""seconds between retries of a long-poll while the rendezvous is unreachable (doubling from the first)."""


class RendezvousError(PairingFailedError):
    """The rendezvous answered with an error (``status``/``code`` from its JSON body)."""

    def __init__(self, message: str, *, status: int = 0, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class PairingExpiredError(PairingFailedError):
    pass


class PairingAbortedError(PairingFailedError):
    """The session was aborted: by the other side, a third party's join, or the rendezvous."""


class PairingCancelledError(PairingFailedError):
    """This side cancelled (``cancel()``) or declined (the approver returned False)."""


@dataclass(frozen=True, slots=True)
class PairingPrompt:
    """What a host app shows before it approves: the other device and the code both screens show."""

    role: Role
    peer_device_id: str
    peer_device_name: str
    short_code: str


Approver = Callable[[PairingPrompt], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class QrOffer:
    """The initiator's QR payload; show it, then ``await initiator.wait()``."""

    uri: str = field(repr=False)
    session_id: str
    expires_at: int
    """unix milliseconds."""

    def qr_text(self) -> str:
        return render_qr_text(self.uri)

    def qr_png(self, scale: int = 6) -> bytes:
        return render_qr_png(self.uri, scale=scale)

    def qr_svg(self, scale: int = 6) -> str:
        return render_qr_svg(self.uri, scale=scale)


class RendezvousHttpClient:
    """Thin client of the rendezvous session endpoints; raises ``RendezvousError`` with its message."""

    def __init__(self, base_url: str, *, session: aiohttp.ClientSession | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._own_session = session is None

    async def create_session(self, initiator_public_key: bytes) -> dict[str, Any]:
        return await self._call("POST", "/v1/sessions", {"initiator_public_key": b64url_encode(initiator_public_key)})

    async def join(self, session_id: str, scanner_public_key: bytes, scanner_device_id: str) -> dict[str, Any]:
        body = {"scanner_public_key": b64url_encode(scanner_public_key), "scanner_device_id": scanner_device_id}
        return await self._call("POST", f"/v1/sessions/{session_id}/join", body)

    async def events(self, session_id: str, token: str, *, after: int, wait: float) -> dict[str, Any]:
        path = f"/v1/sessions/{session_id}/events?after={after}&wait={wait:g}"
        return await self._call("GET", path, None, token=token, time_limit=wait + REQUEST_TIMEOUT_S)

    async def confirm(self, session_id: str, token: str, message: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/sessions/{session_id}/confirm", {"message": message}, token=token)

    async def finish(self, session_id: str, token: str, message: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/sessions/{session_id}/finish", {"message": message}, token=token)

    async def abort(self, session_id: str, token: str, reason: str) -> dict[str, Any]:
        return await self._call("POST", f"/v1/sessions/{session_id}/abort", {"reason": reason}, token=token)

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    async def _call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        token: str | None = None,
        time_limit: float = REQUEST_TIMEOUT_S,
    ) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            async with self._session.request(
                method, self.base_url + path, json=body, headers=headers,
                timeout=aiohttp.ClientTimeout(total=time_limit),
            ) as response:
                raw = await response.content.read(RENDEZVOUS_MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RendezvousError(f"cannot reach the rendezvous at {self.base_url}: {exc or type(exc).__name__}") from exc
        return _decode_response(status, raw)


def _decode_response(status: int, raw: bytes) -> dict[str, Any]:
    if len(raw) > RENDEZVOUS_MAX_RESPONSE_BYTES:
        raise RendezvousError("the rendezvous sent an oversize response", status=status)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError as exc:
        raise RendezvousError(f"the rendezvous sent a response that is not JSON (HTTP {status})", status=status) from exc
    if not isinstance(data, dict):
        raise RendezvousError("the rendezvous sent a response that is not a JSON object", status=status)
    if status < 400:
        return data
    error = _as_dict(data.get("error"))
    message = str(error.get("message") or f"HTTP {status}")
    code = error.get("code") if isinstance(error.get("code"), str) else None
    kind: type[RendezvousError] = RendezvousError
    if status == 410:
        kind = _ExpiredRendezvousError
    elif code in ("session_aborted", "session_already_joined"):
        kind = _AbortedRendezvousError
    raise kind(f"rendezvous: {message}", status=status, code=code)


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class _ExpiredRendezvousError(RendezvousError, PairingExpiredError):
    pass


class _AbortedRendezvousError(RendezvousError, PairingAbortedError):
    pass


class _PairingSide:
    """What both sides share: the client, the session cursor, cancellation and failure handling."""

    role: Role

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        device_name: str,
        approve: Approver | None,
        http: aiohttp.ClientSession | None,
        clock: Callable[[], float],
    ) -> None:
        self._identity = identity
        self._device_name = device_name
        self._approve = approve
        self._http = http
        self._clock = clock
        self._client: RendezvousHttpClient | None = None
        self._session_id: str | None = None
        self._token: str | None = None
        self._after = 0
        self._cancelled = False
        self._keys: SessionKeys | None = None
        self._expires_at = float("inf")

    @property
    def short_code(self) -> str | None:
        """The 6-digit code to show once the keys are derived (None before)."""
        return None if self._keys is None else self._keys.short_code

    async def cancel(self, reason: str = "cancelled by the user") -> None:
        """Abort the session; a running ``wait()``/``pair()`` raises ``PairingCancelledError``."""
        self._cancelled = True
        await self._abort(reason)

    async def close(self) -> None:
        """Release the HTTP session this side opened (``wait()``/``pair()`` do it when they end)."""
        if self._client is not None:
            await self._client.close()

    async def _next_event(self, kind: str, from_role: Role) -> dict[str, Any]:
        """Long-poll until the other side's ``kind`` event; raise if the session ends first."""
        assert self._client is not None and self._session_id is not None and self._token is not None
        while True:
            self._raise_if_cancelled()
            page = await self._poll()
            for event in page.get("events", ()):
                if not isinstance(event, dict) or not isinstance(event.get("seq"), int):
                    raise PairingFailedError("the rendezvous sent a malformed event")
                self._after = max(self._after, event["seq"])
                data = _as_dict(event.get("data"))
                if event.get("kind") == "aborted":
                    self._raise_if_cancelled()
                    raise PairingAbortedError(f"pairing aborted: {data.get('reason', 'no reason given')}")
                if event.get("kind") == "expired":
                    raise PairingExpiredError("the pairing session expired before it was completed")
                if event.get("kind") == kind and (kind == "joined" or data.get("role") == from_role.value):
                    return data
            if page.get("state") in ("aborted", "expired", "completed"):
                self._raise_if_cancelled()
                raise PairingAbortedError(f"pairing session ended ({page.get('state')}) before the {kind} step")

    async def _poll(self) -> dict[str, Any]:
        """One long-poll; a rendezvous that is briefly unreachable (a restart) is retried until expiry."""
        assert self._client is not None and self._session_id is not None and self._token is not None
        delay = RETRY_FIRST_S
        while True:
            try:
                return await self._client.events(self._session_id, self._token, after=self._after, wait=LONG_POLL_S)
            except RendezvousError as exc:
                if exc.status not in (0, 502, 503, 504) or self._clock() + delay > self._expires_at:
                    raise
            self._raise_if_cancelled()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_S)

    async def _ask(self, peer_device_id: str, peer_device_name: str) -> None:
        assert self._keys is not None
        if self._approve is None:
            return
        prompt = PairingPrompt(self.role, peer_device_id, peer_device_name, self._keys.short_code)
        if not await self._approve(prompt):
            self._cancelled = True
            await self._abort("declined by the user")
            raise PairingCancelledError("pairing declined")

    async def _run_guarded(self, steps: Awaitable[PairingResult]) -> PairingResult:
        """Run the steps; on any failure abort the session (best effort) so the other side stops too."""
        try:
            return await steps
        except BaseException as exc:
            reason = "cancelled" if not isinstance(exc, Exception) else f"{self.role.value} failed: {exc}"[:200]
            with suppress(Exception):
                await self._abort(reason)
            if isinstance(exc, PairingFailedError) and not isinstance(exc, PairingCancelledError):
                self._raise_if_cancelled()
            raise
        finally:
            await self.close()

    async def _abort(self, reason: str) -> None:
        if self._client is None or self._session_id is None or self._token is None:
            return
        with suppress(PairingFailedError):
            await self._client.abort(self._session_id, self._token, reason)

    def _raise_if_cancelled(self) -> None:
        if self._cancelled:
            raise PairingCancelledError("pairing cancelled")


class QrPairingInitiator(_PairingSide):
    """The side that shows the QR code: ``offer = await start()``, show it, ``result = await wait()``."""

    role = Role.INITIATOR

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        device_name: str,
        rendezvous_url: str,
        approve: Approver | None = None,
        http: aiohttp.ClientSession | None = None,
        random_bytes: Callable[[int], bytes] = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(identity=identity, device_name=device_name, approve=approve, http=http, clock=clock)
        self._rendezvous_url = rendezvous_url.rstrip("/")
        self._random = random_bytes
        self._ephemeral = generate_ephemeral_key()
        self._secret = new_secret(random_bytes(32))
        self.offer: QrOffer | None = None

    async def start(self) -> QrOffer:
        """Create the session on the rendezvous and build the QR payload."""
        self._client = RendezvousHttpClient(self._rendezvous_url, session=self._http)
        created = await self._client.create_session(public_bytes(self._ephemeral))
        session_id, token = created.get("session_id"), created.get("initiator_token")
        if not isinstance(session_id, str) or not isinstance(token, str):
            raise RendezvousError("the rendezvous did not return a session id and token")
        self._session_id, self._token = session_id, token
        url = created.get("rendezvous_url") if isinstance(created.get("rendezvous_url"), str) else None
        payload = QrPayload(
            rendezvous_url=url or self._rendezvous_url,
            session_id=session_id,
            initiator_public_key=public_bytes(self._ephemeral),
            initiator_device_id=self._identity.device_id,
            secret=self._secret,
        )
        raw_expiry = created.get("expires_at")
        expires_at = raw_expiry if isinstance(raw_expiry, int) else 0
        self._expires_at = expires_at / 1000 if expires_at else self._clock() + 120
        self.offer = QrOffer(payload.to_uri(), session_id, expires_at)
        return self.offer

    async def wait(self) -> PairingResult:
        """Wait for a scanner, verify it, ask the approver, and finish. Raises ``PairingFailedError``."""
        if self.offer is None:
            raise RuntimeError("call start() first")
        return await self._run_guarded(self._steps())

    async def _steps(self) -> PairingResult:
        assert self._client is not None and self._session_id is not None and self._token is not None
        joined = await self._next_event("joined", Role.SCANNER)
        try:
            scanner_key = decode_b64_field(str(joined.get("scanner_public_key")), "scanner_public_key")
        except ValueError as exc:
            raise PairingFailedError(f"the rendezvous relayed a malformed scanner key: {exc}") from exc
        scanner_id = str(joined.get("scanner_device_id"))
        if scanner_id == self._identity.device_id:
            raise PairingFailedError("a device cannot pair with itself")
        transcript = PairingTranscript(
            self._session_id, public_bytes(self._ephemeral), scanner_key, self._identity.device_id, scanner_id
        )
        shared = x25519_shared_secret(self._ephemeral, scanner_key)
        self._keys = keys = derive_session_keys(shared, self._secret, transcript)
        confirm = await self._next_event("confirm", Role.SCANNER)
        peer = verify_confirmation(keys, transcript, Role.SCANNER, str(confirm.get("message")))
        await self._ask(peer.device_id, peer.device_name)
        message = build_confirmation(keys, transcript, Role.INITIATOR, self._identity, self._device_name)
        await self._client.confirm(self._session_id, self._token, message)
        finish = await self._next_event("finish", Role.SCANNER)
        verify_finish(keys, transcript, str(finish.get("message")))
        return make_result(peer, keys, self._clock())


class QrPairingScanner(_PairingSide):
    """The side that scanned the QR code: ``result = await pair(uri)``."""

    role = Role.SCANNER

    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        device_name: str,
        approve: Approver | None = None,
        http: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(identity=identity, device_name=device_name, approve=approve, http=http, clock=clock)
        self._ephemeral = generate_ephemeral_key()

    async def pair(self, payload: str | QrPayload) -> PairingResult:
        """Join the session in ``payload`` and complete the exchange. Raises ``PairingFailedError``."""
        if isinstance(payload, str):
            try:
                payload = parse_pairing_uri(payload)
            except ValueError as exc:
                raise PairingFailedError(str(exc)) from exc
        if payload.initiator_device_id == self._identity.device_id:
            raise PairingFailedError("a device cannot pair with itself")
        return await self._run_guarded(self._steps(payload))

    async def _steps(self, payload: QrPayload) -> PairingResult:
        self._client = client = RendezvousHttpClient(payload.rendezvous_url, session=self._http)
        own_key = public_bytes(self._ephemeral)
        joined = await client.join(payload.session_id, own_key, self._identity.device_id)
        token = joined.get("scanner_token")
        if not isinstance(token, str):
            raise RendezvousError("the rendezvous did not return a scanner token")
        self._session_id, self._token = payload.session_id, token
        expires_at = joined.get("expires_at")
        self._expires_at = expires_at / 1000 if isinstance(expires_at, int) else self._clock() + 120
        if joined.get("initiator_public_key") != b64url_encode(payload.initiator_public_key):
            # The QR is the trusted channel; a relay that reports another key is lying.
            raise PairingFailedError("the rendezvous reports an initiator key that differs from the QR code")
        transcript = PairingTranscript(
            payload.session_id, payload.initiator_public_key, own_key,
            payload.initiator_device_id, self._identity.device_id,
        )
        shared = x25519_shared_secret(self._ephemeral, payload.initiator_public_key)
        self._keys = keys = derive_session_keys(shared, payload.secret, transcript)
        message = build_confirmation(keys, transcript, Role.SCANNER, self._identity, self._device_name)
        await client.confirm(payload.session_id, token, message)
        confirm = await self._next_event("confirm", Role.INITIATOR)
        peer = verify_confirmation(keys, transcript, Role.INITIATOR, str(confirm.get("message")))
        await self._ask(peer.device_id, peer.device_name)
        await client.finish(payload.session_id, token, build_finish(keys, transcript))
        return make_result(peer, keys, self._clock())
