"""The rendezvous as a discovery source: QR-paired peers that are online there.

The presence connection (``node.transport.presence``) reports which rendezvous-paired
devices are connected to the rendezvous. For each of them this book asks the peer's
``GET /v1/dvai/health`` (with a fresh challenge, so the answer proves the device key)
over the WebRTC link, and lists the peer in the ``PeerTable`` with ``via =
"rendezvous"``: reachable while it is present and its last health answer was good.

A health answer is renewed every ``REMOTE_HEALTH_REFRESH_S`` while a link to the peer is
up anyway, and at most every ``REMOTE_HEALTH_MAX_AGE_S`` otherwise (that opens a link,
which then closes when idle), so an idle pair of devices does not keep a link open. A
peer that leaves the rendezvous is removed from the table.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..constants import MAX_HEALTH_BODY_BYTES, REMOTE_HEALTH_MAX_AGE_S
from ..transport.link import LinkRequest, PeerLink
from .health import parse_health_report
from .model import HealthReport, Peer, PeerState
from .peers import PeerTable

__all__ = ["RemotePeerBook", "REMOTE_HEALTH_MAX_AGE_S", "REMOTE_HEALTH_REFRESH_S"]

log = logging.getLogger(__name__)

REMOTE_HEALTH_REFRESH_S = 30.0
"""seconds between health answers of a rendezvous peer while a link to it is up."""
REMOTE_RETRY_S = 30.0
"""seconds before a rendezvous peer whose health could not be fetched is tried again."""

FetchHealth = Callable[[str], Awaitable["HealthReport | str"]]
"""``fetch(device_id)``: the peer's validated health answer over the link, or why there is none."""


@dataclass(slots=True)
class _Known:
    name: str
    report: HealthReport | None = None
    at: float = 0.0
    error: str | None = None
    tried_at: float = 0.0
    fetching: bool = False


async def fetch_health_over(link: PeerLink, sign: Callable[[str, str, bytes], dict[str, str]], *,
                            connect_timeout: float, within: float = 10.0) -> HealthReport | str:
    """A peer's validated ``GET /v1/dvai/health`` answer over ``link`` (signed, challenged),
    or why there is none."""
    challenge = secrets.token_hex(16)
    path = f"/v1/dvai/health?challenge={challenge}"
    try:
        async with asyncio.timeout(connect_timeout + within):
            response = await link.open(LinkRequest("GET", path, sign("GET", path, b""), b""),
                                       connect_timeout=connect_timeout)
            body = bytearray()
            try:
                while chunk := await response.read_chunk():
                    body += chunk
                    if len(body) > MAX_HEALTH_BODY_BYTES:
                        return f"answer larger than {MAX_HEALTH_BODY_BYTES} bytes"
            finally:
                response.release()
        if response.status not in (200, 503):  # 503: alive, models loading or failed
            return f"HTTP {response.status}"
        return parse_health_report(json.loads(body), challenge)
    except (OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    except (ValueError, RecursionError) as exc:
        return f"bad answer: {exc}"


class RemotePeerBook:
    def __init__(
        self,
        *,
        table: PeerTable,
        fetch_health: FetchHealth,
        paired_name: Callable[[str], str | None],
        link_up: Callable[[str], bool],
        clock: Callable[[], float] = time.monotonic,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self._table = table
        self._fetch = fetch_health
        self._paired_name = paired_name
        self._link_up = link_up
        self._clock = clock
        self._now_ms = now_ms
        self._online: frozenset[str] = frozenset()
        self._known: dict[str, _Known] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def on_presence(self, online: frozenset[str]) -> None:
        """The rendezvous says these paired devices are connected now."""
        self._online = online
        for device_id in list(self._known):
            if device_id not in online:
                del self._known[device_id]
        now = self._clock()
        for device_id in online:
            name = self._paired_name(device_id)
            if name is None:
                continue
            known = self._known.setdefault(device_id, _Known(name))
            if not known.fetching and self._due(device_id, known, now):
                known.fetching = True
                known.tried_at = now
                task = asyncio.get_running_loop().create_task(self._refresh(device_id, known),
                                                              name="rendezvous-peer-health")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        self._publish()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._table.set_remote(())

    def _due(self, device_id: str, known: _Known, now: float) -> bool:
        if known.report is None or known.error is not None:
            return now - known.tried_at >= REMOTE_RETRY_S or known.tried_at == 0.0
        age = now - known.at
        return age >= REMOTE_HEALTH_MAX_AGE_S or (age >= REMOTE_HEALTH_REFRESH_S and self._link_up(device_id))

    async def _refresh(self, device_id: str, known: _Known) -> None:
        try:
            result = await self._fetch(device_id)
        except Exception as exc:  # noqa: BLE001 - a fetch failure marks the peer, never the book
            result = f"{type(exc).__name__}: {exc}"
        finally:
            known.fetching = False
        if isinstance(result, str):
            known.error = result
            log.info("rendezvous peer %s: no health answer over the link (%s)", device_id[:16], result)
        elif result.device_id != device_id:
            known.error = f"answered as another device ({result.device_id[:16]})"
        else:
            known.report, known.at, known.error = result, self._clock(), None
        if self._known.get(device_id) is known:
            self._publish()

    def _publish(self) -> None:
        now_ms = self._now_ms()
        peers = []
        for device_id, known in self._known.items():
            report = known.report
            if report is None:
                state = PeerState.UNREACHABLE if known.error else PeerState.PENDING
            else:
                state = PeerState.UNREACHABLE if known.error else PeerState.REACHABLE
            peers.append(Peer(
                device_id=device_id,
                device_name=(report.device_name if report and report.device_name else known.name),
                dvai_version=report.version if report else "",
                base_url="",
                app_id=None,
                loaded_models=report.loaded_models if report else (),
                capability={},
                via="rendezvous",
                secure=True,
                last_seen_at=now_ms,
                state=state,
                queue_depth=dict(report.queue_depth) if report else {},
                sources=("rendezvous",),
                identity_verified=bool(report and report.proven and not known.error),
                flag=None,
            ))
        self._table.set_remote(peers)
