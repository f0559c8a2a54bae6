"""The peer link: the one interface the offload router forwards through.

A link sends one signed request to a peer and hands back the answer's status, headers
and body bytes as they arrive; cancelling it makes the peer stop generating. The LAN
implementation is plain HTTP (:class:`node.transport.http_link.HttpPeerLink`); the
internet path's WebRTC data channel is the second. The router and the forwarder see
only this module's types, never a transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["LinkRequest", "LinkResponse", "PeerLink", "PeerLinkError"]


@dataclass(frozen=True, slots=True)
class LinkRequest:
    method: str
    path: str
    """path with query, relative to the peer's root (``/v1/chat/completions``)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    """already signed (the four ``X-DVAI-*`` headers) plus the hop and offload headers."""
    body: bytes = b""


class LinkResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read_chunk(self) -> bytes:
        """The next bytes of the body as they arrive; ``b""`` at its end.
        Raises :class:`PeerLinkError` when the link breaks."""
        ...

    def release(self) -> None:
        """The body was read to its end: the link may carry the next request."""
        ...

    def cancel(self) -> None:
        """Abandon the answer: the peer must stop generating."""
        ...


class PeerLink(Protocol):
    async def open(self, request: LinkRequest, *, connect_timeout: float) -> LinkResponse:
        """Send ``request``; return once the peer's status and headers are here.
        Raises :class:`PeerLinkError` when the peer cannot be reached."""
        ...


class PeerLinkError(OSError):
    """The link could not carry the request or its answer."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        """nothing was served (e.g. a pooled connection the peer had closed): the same
        request may be sent again, re-signed with a fresh nonce."""
