"""``QrPairingService``: the node component behind ``pair-qr`` / ``pair-scan`` and ``dvai-node pair --qr/--scan``.

It owns the background tasks of pairings in flight (the initiator waits for a
scanner after ``pair-qr`` has answered), stores each result through the
``store_result`` callback the app gives it, and cancels everything on
``close()``. Handlers only call ``offer()``, ``scan()``, ``status()``,
``cancel()`` and turn the returned views into JSON.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from ..common.errors import ConflictError, InvalidRequestError, NotFoundError, ServiceUnavailableError
from ..constants import QR_MAX_PENDING_OFFERS, QR_MAX_REMEMBERED_OUTCOMES
from ..identity import DeviceIdentity
from ..transport.rendezvous_client import (
    Approver,
    PairingCancelledError,
    QrOffer,
    QrPairingInitiator,
    QrPairingScanner,
)
from .qr import PairingFailedError, PairingResult

log = logging.getLogger(__name__)


StoreResult = Callable[[PairingResult], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class OfferStatus:
    session_id: str
    state: Literal["waiting", "paired", "failed", "cancelled"]
    short_code: str | None = None
    peer_device_id: str | None = None
    peer_device_name: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "sessionId": self.session_id,
            "state": self.state,
            "shortCode": self.short_code,
            "peerDeviceId": self.peer_device_id,
            "peerDeviceName": self.peer_device_name,
            "error": self.error,
        }


def offer_to_json(offer: QrOffer, *, rendezvous_url: str) -> dict[str, Any]:
    """The ``pair-qr`` response body: the payload and the QR as terminal text, SVG and PNG."""
    return {
        "sessionId": offer.session_id,
        "payload": offer.uri,
        "expiresAt": offer.expires_at,
        "rendezvousUrl": rendezvous_url,
        "qr": {
            "text": offer.qr_text(),
            "svg": offer.qr_svg(),
            "pngBase64": base64.b64encode(offer.qr_png()).decode(),
        },
    }


def result_to_json(result: PairingResult) -> dict[str, Any]:
    """The ``pair-scan`` response body, shaped like the handshake's (the key stays in the store)."""
    return {
        "paired": True,
        "pairedAt": result.paired_at,
        "via": result.via,
        "peerDeviceId": result.peer_device_id,
        "peerDeviceName": result.peer_device_name,
        "shortCode": result.short_code,
    }


class QrPairingService:
    def __init__(
        self,
        *,
        identity: DeviceIdentity,
        device_name: str,
        rendezvous_url: str | None,
        store_result: StoreResult,
        approve: Approver | None = None,
        http: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._identity = identity
        self._device_name = device_name
        self._rendezvous_url = rendezvous_url
        self._store_result = store_result
        self._approve = approve
        self._http = http
        self._clock = clock
        self._pending: dict[str, tuple[QrPairingInitiator, asyncio.Task[None]]] = {}
        self._outcomes: OrderedDict[str, OfferStatus] = OrderedDict()
        self._closed = False

    async def offer(self) -> tuple[QrOffer, QrPairingInitiator]:
        """Create a session and wait for a scanner in the background; the result is stored when it comes."""
        if self._closed:
            raise ServiceUnavailableError("the node is shutting down")
        if not self._rendezvous_url:
            raise ConflictError("no rendezvous configured: set offload.rendezvous_url", code="no_rendezvous")
        if len(self._pending) >= QR_MAX_PENDING_OFFERS:
            raise ConflictError(f"{QR_MAX_PENDING_OFFERS} QR pairings are already waiting; cancel one first")
        initiator = QrPairingInitiator(
            identity=self._identity, device_name=self._device_name, rendezvous_url=self._rendezvous_url,
            approve=self._approve, http=self._http, clock=self._clock,
        )
        try:
            offer = await initiator.start()
        except PairingFailedError as exc:
            await initiator.close()
            raise ServiceUnavailableError(f"cannot create a pairing session: {exc}", retry_after=5) from exc
        task = asyncio.create_task(self._finish_offer(offer.session_id, initiator), name="qr-pairing-offer")
        self._pending[offer.session_id] = (initiator, task)
        return offer, initiator

    async def wait(self, session_id: str) -> OfferStatus:
        """Wait until the offer ``session_id`` ends (for the CLI); its status then."""
        pending = self._pending.get(session_id)
        if pending is not None:
            with suppress(asyncio.CancelledError):
                await asyncio.shield(pending[1])
        return self.status(session_id)

    async def scan(self, payload: str) -> PairingResult:
        """Join the session in a scanned payload, complete it, store and return the result."""
        if self._closed:
            raise ServiceUnavailableError("the node is shutting down")
        if not isinstance(payload, str) or not payload.startswith("dvai://pair?"):
            raise InvalidRequestError("'payload' must be a dvai://pair?... URI", param="payload")
        scanner = QrPairingScanner(
            identity=self._identity, device_name=self._device_name, approve=self._approve,
            http=self._http, clock=self._clock,
        )
        result = await scanner.pair(payload)
        await self._store_result(result)
        return result

    def status(self, session_id: str) -> OfferStatus:
        pending = self._pending.get(session_id)
        if pending is not None:
            return OfferStatus(session_id, "waiting", short_code=pending[0].short_code)
        outcome = self._outcomes.get(session_id)
        if outcome is None:
            raise NotFoundError(f"no QR pairing with session id '{session_id}'")
        return outcome

    async def cancel(self, session_id: str) -> OfferStatus:
        pending = self._pending.get(session_id)
        if pending is not None:
            await pending[0].cancel()
            with suppress(asyncio.CancelledError):
                await pending[1]
        return self.status(session_id)

    async def close(self) -> None:
        """Abort every waiting offer and await its task."""
        self._closed = True
        for session_id in list(self._pending):
            initiator, task = self._pending[session_id]
            with suppress(Exception):
                await asyncio.wait_for(initiator.cancel("the node is shutting down"), 2)
            done, _ = await asyncio.wait({task}, timeout=2)
            if not done:
                task.cancel()
                with suppress(asyncio.CancelledError):
                    await task

    async def _finish_offer(self, session_id: str, initiator: QrPairingInitiator) -> None:
        try:
            result = await initiator.wait()
            await self._store_result(result)
        except PairingFailedError as exc:
            state: Literal["failed", "cancelled"] = "cancelled" if isinstance(exc, PairingCancelledError) else "failed"
            self._remember(OfferStatus(session_id, state, short_code=initiator.short_code, error=str(exc)))
            log.info("QR pairing %s %s: %s", session_id, state, exc)
        except asyncio.CancelledError:
            self._remember(OfferStatus(session_id, "cancelled", short_code=initiator.short_code, error="stopped"))
            raise
        except Exception as exc:  # noqa: BLE001 - the store failed; report it, never kill the loop
            self._remember(OfferStatus(session_id, "failed", error=f"storing the pairing failed: {exc}"))
            log.exception("storing QR pairing %s failed", session_id)
        else:
            self._remember(OfferStatus(
                session_id, "paired", short_code=result.short_code,
                peer_device_id=result.peer_device_id, peer_device_name=result.peer_device_name,
            ))
        finally:
            self._pending.pop(session_id, None)

    def _remember(self, status: OfferStatus) -> None:
        self._outcomes[status.session_id] = status
        while len(self._outcomes) > QR_MAX_REMEMBERED_OUTCOMES:
            self._outcomes.popitem(last=False)
