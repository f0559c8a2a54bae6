"""HTTP clients for managed-mode OpenAI clients: send a request once more after *connection
refused* (nothing reached the serve), re-resolving the serve first; never retry anything
else, so a request the serve had begun is not replayed.

The transports wrap whichever HTTP library the installed ``openai`` SDK is built on
(``httpx2`` for openai 3, ``httpx`` before).
"""

from __future__ import annotations

import asyncio
import errno
import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .handle import ManagedNode


def http_module() -> ModuleType:
    """The HTTP library the ``openai`` SDK uses."""
    for name in ("httpx2", "httpx"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    raise ImportError("managed-mode OpenAI clients need the openai package (pip install openai)")


def connection_refused(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a refused TCP connection: nothing reached the serve."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ConnectionRefusedError):
            return True
        if isinstance(current, OSError) and current.errno == errno.ECONNREFUSED:
            return True
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        for linked in (current.__cause__, current.__context__):
            if linked is not None:
                stack.append(linked)
    return False


def _fresh_connections(http: ModuleType) -> Any:
    """One connection per request, none kept alive: a request to a dead serve then always meets
    *connection refused*, never a pooled socket the dead serve left half-open (whose reset could
    not be told apart from a serve dying mid-request, so it could not be retried). On loopback a
    connection costs well under a millisecond."""
    return http.Limits(max_keepalive_connections=0)


def sync_client(node: ManagedNode) -> Any:
    """A ``Client`` whose requests go to ``node``'s current serve, retried once when refused."""
    http = http_module()

    class RetryRefusedTransport(http.BaseTransport):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self._inner = http.HTTPTransport(limits=_fresh_connections(http))

        def handle_request(self, request: Any) -> Any:
            generation = node.retarget(request)
            try:
                return self._inner.handle_request(request)
            except http.ConnectError as exc:
                if not connection_refused(exc):
                    raise
            node.reresolve(generation)
            node.retarget(request)
            return self._inner.handle_request(request)

        def close(self) -> None:
            self._inner.close()

    return http.Client(transport=RetryRefusedTransport(), timeout=None)


def async_client(node: ManagedNode) -> Any:
    """The ``AsyncClient`` form of :func:`sync_client`."""
    http = http_module()

    class AsyncRetryRefusedTransport(http.AsyncBaseTransport):  # type: ignore[name-defined,misc]
        def __init__(self) -> None:
            self._inner = http.AsyncHTTPTransport(limits=_fresh_connections(http))

        async def handle_async_request(self, request: Any) -> Any:
            generation = node.retarget(request)
            try:
                return await self._inner.handle_async_request(request)
            except http.ConnectError as exc:
                if not connection_refused(exc):
                    raise
            await asyncio.to_thread(node.reresolve, generation)
            node.retarget(request)
            return await self._inner.handle_async_request(request)

        async def aclose(self) -> None:
            await self._inner.aclose()

    return http.AsyncClient(transport=AsyncRetryRefusedTransport(), timeout=None)
