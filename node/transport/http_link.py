"""The LAN peer link: requests to a peer's HTTP surface over the node's shared client."""

from __future__ import annotations

from collections.abc import Mapping

import aiohttp

from .link import LinkRequest, PeerLinkError

__all__ = ["HttpPeerLink"]


class HttpPeerLink:
    """A :class:`~node.offload.link.PeerLink` to the peer whose OpenAI base URL is ``base_url``."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self._session = session
        self._root = base_url.rstrip("/").removesuffix("/v1")

    async def open(self, request: LinkRequest, *, connect_timeout: float) -> _HttpResponse:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout)
        try:
            response = await self._session.request(request.method, self._root + request.path, data=request.body,
                                                   headers=dict(request.headers), timeout=timeout)
        except aiohttp.ServerDisconnectedError as exc:
            # A pooled keep-alive connection the peer had closed (it restarted, or its idle
            # timeout won the race): nothing was served on it.
            raise PeerLinkError(_describe(exc), retryable=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerLinkError(_describe(exc)) from None
        return _HttpResponse(response)


class _HttpResponse:
    __slots__ = ("_response", "status", "headers")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers: Mapping[str, str] = response.headers

    async def read_chunk(self) -> bytes:
        try:
            return await self._response.content.readany()
        except (aiohttp.ClientError, OSError) as exc:
            raise PeerLinkError(_describe(exc)) from None

    def release(self) -> None:
        self._response.release()

    def cancel(self) -> None:
        # Dropping the connection is how HTTP cancels: the peer's handler is cancelled with it.
        self._response.close()


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
