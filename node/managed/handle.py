"""The consumer's handle on a managed serve: ``base_url``, ``port``, ``pid``, OpenAI clients
that survive a serve restart, and ``close()`` (detach, never kill a serve another consumer uses).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from .lifecycle import Attachment, Plan, attach, detach, plan
from .options import (
    DEFAULT_API_KEY,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_START_TIMEOUT_S,
    ManagedModel,
    ManagedOptions,
)
from .registry import connect_host

if TYPE_CHECKING:
    from openai import AsyncOpenAI, OpenAI


class ManagedNode:
    """A live hold on a shared (or dedicated) ``dvai-node serve``."""

    def __init__(self, plan: Plan, attachment: Attachment) -> None:
        self._plan = plan
        self._attachment = attachment
        self._lock = threading.Lock()
        self._generation = 0
        self._closed = False

    # -- starting ------------------------------------------------------------
    @classmethod
    def start(cls, options: ManagedOptions) -> ManagedNode:
        """Attach to a matching live serve or spawn one; return once it is healthy (blocking)."""
        resolved = plan(options)
        return cls(resolved, attach(resolved))

    @classmethod
    async def astart(cls, options: ManagedOptions) -> ManagedNode:
        return await asyncio.to_thread(cls.start, options)

    # -- what callers see ----------------------------------------------------
    @property
    def base_url(self) -> str:
        """The OpenAI base URL, ``http://127.0.0.1:<port>/v1``."""
        return self._attachment.record.base_url

    @property
    def port(self) -> int:
        return self._attachment.record.port

    @property
    def pid(self) -> int:
        """The serve's process id."""
        return self._attachment.record.serve.pid

    @property
    def serve_id(self) -> str:
        return self._attachment.record.id

    @property
    def models(self) -> list[str]:
        """Served model ids, the default first."""
        return list(self._attachment.record.models)

    @property
    def default_model(self) -> str:
        return self._attachment.record.models[0]

    @property
    def spawned(self) -> bool:
        """This handle's start spawned the serve (a cold start) rather than attaching to one."""
        return self._attachment.spawned

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def headers(self) -> dict[str, str]:
        return dict(self._plan.options.headers)

    def openai(self, **kwargs: Any) -> OpenAI:
        """An ``openai.OpenAI`` client for this serve. A request that meets *connection refused*
        (the serve is gone) re-resolves the serve and is sent once more; nothing else is retried
        (``max_retries=0``), so a request the serve had begun is never replayed."""
        import openai

        from .transport import sync_client

        kwargs.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base_url, api_key=self._plan.options.api_key,
                             default_headers=self.headers, http_client=sync_client(self), **kwargs)

    def async_openai(self, **kwargs: Any) -> AsyncOpenAI:
        """The ``openai.AsyncOpenAI`` form of :meth:`openai`."""
        import openai

        from .transport import async_client

        kwargs.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=self._plan.options.api_key,
                                  default_headers=self.headers, http_client=async_client(self), **kwargs)

    # -- re-resolving ----------------------------------------------------------
    @property
    def generation(self) -> int:
        """Bumped whenever the handle moves to another serve."""
        return self._generation

    def reresolve(self, seen_generation: int) -> None:
        """The serve refused a connection: attach to a live matching serve or spawn a fresh one.

        ``seen_generation`` is the generation the failed request used; if another thread already
        moved the handle on since, nothing is done (its request is simply sent again).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the managed node handle is closed")
            if self._generation != seen_generation:
                return
            old = self._attachment
            self._attachment = attach(self._plan, consumer=old.consumer)
            self._generation += 1
        detach(old, registry_dir=self._plan.options.registry_dir)  # if its record still exists

    # -- closing ---------------------------------------------------------------
    def close(self) -> None:
        """Detach from the serve. A serve other consumers use keeps running; an unused shared
        serve is reaped after the idle timeout, a dedicated one at once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        detach(self._attachment, registry_dir=self._plan.options.registry_dir)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> ManagedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> ManagedNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<ManagedNode {self.base_url} pid={self.pid} models={self.models}>"

    # -- for the transports ----------------------------------------------------
    def retarget(self, request: Any) -> int:
        """Point ``request`` at the current serve; return the generation it now uses."""
        with self._lock:
            generation = self._generation
            record = self._attachment.record
        host = connect_host(record.host).strip("[]")
        if request.url.host != host or request.url.port != record.port:
            request.url = request.url.copy_with(host=host, port=record.port)
            request.headers["Host"] = f"{connect_host(record.host)}:{record.port}"
        return generation


class ManagedNodeContext:
    """What :func:`managed_node` returns: use it with ``async with`` or ``with``."""

    def __init__(self, options: ManagedOptions) -> None:
        self.options = options
        self._node: ManagedNode | None = None

    async def __aenter__(self) -> ManagedNode:
        self._node = await ManagedNode.astart(self.options)
        return self._node

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._node is not None:
            await self._node.aclose()

    def __enter__(self) -> ManagedNode:
        self._node = ManagedNode.start(self.options)
        return self._node

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._node is not None:
            self._node.close()


def managed_node(
    models: Sequence[str | ManagedModel],
    *,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    start_timeout: float = DEFAULT_START_TIMEOUT_S,
    binary: str | None = None,
    reuse: bool | None = None,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    api_key: str = DEFAULT_API_KEY,
    headers: Mapping[str, str] | None = None,
    registry_dir: str | Path | None = None,
) -> ManagedNodeContext:
    """A shared, self-cleaning ``dvai-node serve`` for these models::

        async with managed_node(["GEMMA3_270M"]) as node:     # or: with managed_node(...) as node
            client = node.async_openai()

    See docs/managed.md for the options, sharing and reaping.
    """
    return ManagedNodeContext(ManagedOptions(
        models=tuple(models), host=host, port=port, start_timeout=start_timeout, binary=binary,
        reuse=reuse, idle_timeout=idle_timeout, api_key=api_key, headers=dict(headers or {}),
        registry_dir=Path(registry_dir) if registry_dir is not None else None,
    ))
