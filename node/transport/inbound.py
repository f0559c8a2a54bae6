"""Requests that arrive over a WebRTC link, served through the node's own HTTP stack.

A request from a linked peer is not handed to the handlers directly: it is replayed
into this node's aiohttp application through an internal Unix-socket site, so it passes
exactly the middlewares an HTTP request passes (Host check, signature verification,
exposure policy, audit row, metrics, the per-model queue, the hop marker) with no
second code path to keep in sync. A Unix-socket caller has no IP address, so the guard
treats it as a remote, non-loopback caller: it never gets loopback trust (no unsigned
admin endpoints), whatever the link's peer sends.

The replayer names the linked peer in ``X-DVAI-Link-Peer`` (replacing any such header the
peer sent); on that site the guard (``node.security.guard.arrived_over_link``) then
requires every request, whatever its path, to be signed by exactly that device, and the
refusals are audited like any other. The socket lives in a private (0700) temporary
directory and is removed on close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from ..constants import LINK_PEER_HEADER
from .frames import MAX_CHUNK_BYTES
from .mux import InboundBody, InboundRequest, LinkClosedError, ResponseWriter

__all__ = ["LinkRequestReplayer", "REPLAY_SOCKET_NAME"]

log = logging.getLogger(__name__)

REPLAY_SOCKET_NAME = "link.sock"

_DROPPED_REQUEST_HEADERS = frozenset({
    LINK_PEER_HEADER.lower(), "host", "connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
    "upgrade", "content-length", "expect",
})
_DROPPED_RESPONSE_HEADERS = frozenset({
    "connection", "keep-alive", "transfer-encoding", "content-length", "date", "server",
})


async def _body_for_replay(body: InboundBody) -> bytes | AsyncIterator[bytes]:
    """A body of one chunk (a sender fills every chunk but the last) goes as bytes, with its
    length, like almost every chat request; a longer one streams into the app chunk by chunk
    as it arrives, so it is never held whole twice on this side."""
    first = await body.read_chunk()
    if len(first) < MAX_CHUNK_BYTES:
        rest = await body.read()  # b"" once the end frame is here
        return first + rest if rest else first

    async def chunks() -> AsyncIterator[bytes]:
        yield first
        async for chunk in body:
            yield chunk

    return chunks()


class LinkRequestReplayer:
    """Owns the internal socket path and the client that replays link requests into the app."""

    def __init__(self, *, read_timeout: float) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="dvai-link-"))  # mkdtemp: mode 0700
        self.socket_path = str(self._dir / REPLAY_SOCKET_NAME)
        self._read_timeout = read_timeout
        self._session: aiohttp.ClientSession | None = None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await asyncio.to_thread(shutil.rmtree, self._dir, True)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.UnixConnector(path=self.socket_path, limit=0),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=self._read_timeout),
            )
        return self._session

    async def serve(self, peer_id: str, request: InboundRequest, writer: ResponseWriter) -> None:
        """Answer ``request`` from ``peer_id`` (cancelled when the peer cancels the stream)."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_REQUEST_HEADERS}
        headers[LINK_PEER_HEADER] = peer_id  # the guard requires the request be signed by this device
        body = await _body_for_replay(request.body)
        try:
            async with self._client().request(request.method, "http://localhost" + request.path,
                                              headers=headers, data=body,
                                              allow_redirects=False) as response:
                writer.head(response.status, {k: v for k, v in response.headers.items()
                                              if k.lower() not in _DROPPED_RESPONSE_HEADERS})
                async for chunk in response.content.iter_any():
                    await writer.write(chunk)
                await writer.end()
        except LinkClosedError:
            raise  # the peer cancelled or the link went: nobody is waiting for an answer
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.warning("replaying a link request from %s failed: %s", peer_id[:16], exc)
            with contextlib.suppress(Exception):
                await writer.fail("replay_failed", f"the node could not serve the request: {type(exc).__name__}")

