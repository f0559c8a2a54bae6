"""Run the rendezvous app on a socket: ``RendezvousServer`` for embedders and tests, ``serve`` for the CLI."""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from node.common.signals import wait_for_stop_signal

from .app import create_app
from .config import RendezvousConfig

log = logging.getLogger(__name__)


class RendezvousServer:
    """The service listening on ``config.host:config.port`` (port 0 picks a free one)."""

    def __init__(self, config: RendezvousConfig, **app_kwargs: Any) -> None:
        self._config = config
        self._app_kwargs = app_kwargs
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    async def start(self) -> None:
        config = self._config
        sock = None
        if config.port == 0:
            # Bind first so the app (QR URLs, challenge audience) knows the real port.
            sock = socket.create_server((config.host, 0), family=_family(config.host))
            config = config.replace(port=sock.getsockname()[1])
            self._config = config
        app = create_app(config, **self._app_kwargs)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock, ssl_context=tls_context(config))
        else:
            site = web.TCPSite(self._runner, config.host, config.port, ssl_context=tls_context(config))
        await site.start()
        self.port = config.port

    @property
    def config(self) -> RendezvousConfig:
        """The config in force (with the bound port when 0 was asked for)."""
        return self._config

    @property
    def url(self) -> str:
        """The local URL (not ``public_url``): scheme, bind host and the bound port."""
        scheme = "https" if self._config.tls_cert else "http"
        host = f"[{self._config.host}]" if ":" in self._config.host else self._config.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def app(self) -> web.Application:
        if self._runner is None:
            raise RuntimeError("the rendezvous server is not started")
        return self._runner.app

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> RendezvousServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tls_context(config: RendezvousConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(config.tls_cert), str(config.tls_key))
    return context


async def serve(
    config: RendezvousConfig,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    on_ready: Callable[[RendezvousServer], None] | None = None,
) -> None:
    """Serve until ``shutdown_trigger`` returns, or SIGINT/SIGTERM when none is given."""
    server = RendezvousServer(config)
    await server.start()
    if on_ready is not None:
        on_ready(server)
    try:
        if shutdown_trigger is not None:
            await shutdown_trigger()
        else:
            await wait_for_stop_signal()
    finally:
        await server.stop()
