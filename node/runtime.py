"""The embeddable node: ``async with Node(config) as node: …``.

With ``transport="http"`` it serves the OpenAI surface on a local port (base
port, retrying +1 up to ``http_max_port_attempts``); with ``transport="none"``
it serves the same calls in-process without opening a port.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .api.schemas import parse_chat_request, parse_completion_request, parse_embedding_request
from .api.server import NodeRunner
from .app import build_app
from .audit import AUDIT_FILE, AuditLog
from .capability import CapabilityScore, CapabilityService, CapabilityStore
from .common.errors import ConfigError
from .common.fsutil import atomic_write_json, read_json, remove_stale_temp_files
from .config import IceServer, NodeConfig, load_config, override_config
from .context import NodeContext
from .discovery import AdvertisedInfo, DiscoveryService, Peer, PeerTable
from .engine.registry import ModelRegistry
from .engine.service import InferenceLimits, InferenceService
from .hub.external import ExternalEngines
from .hub.interceptor import ChatCompletionInterceptor
from .hub.keys import ApiKeyStore
from .hub.quotas import QuotaBook
from .hub.substitution import SubstitutionPolicy
from .hub.usage import UsageStore
from .identity import IdentityHandle, open_node_identity
from .metrics import NodeMetrics
from .offload.forward import ForwardSettings
from .offload.router import OffloadCallback, OffloadRouter
from .pairing import Pairing, PairingApprover, PairingHook, PairingResult, PairingStore
from .pairing.qr_service import QrPairingService
from .security import NonceCache, exposure_warnings, is_loopback
from .transport.http_link import HttpPeerLink
from .transport.link import PeerLink
from .transport.rendezvous_client import Approver as QrApprover

if TYPE_CHECKING:
    from .discovery.rendezvous import RemotePeerBook
    from .transport.inbound import LinkRequestReplayer

log = logging.getLogger(__name__)


class Node:
    """A dvai-mesh node embedded in an application."""

    def __init__(
        self,
        config: NodeConfig | None = None,
        *,
        on_pairing_request: PairingHook | None = None,
        on_qr_pairing: QrApprover | None = None,
        on_offload: OffloadCallback | None = None,
        chat_completion_interceptor: ChatCompletionInterceptor | None = None,
        **overrides: Any,
    ) -> None:
        """Hooks: ``on_pairing_request(request)`` decides LAN pairing requests;
        ``on_qr_pairing(prompt)`` sees the peer and short code of a QR pairing and approves it
        (unset: QR pairings complete once both sides' key confirmations verify). See docs/security.md.
        ``on_offload(peer)`` is called when a peer starts serving a request this node forwarded
        (the reference's ``onOffload``; see docs/offload.md).
        ``chat_completion_interceptor(body, context, headers)`` sees every chat completion first
        and may answer it (the reference's ``chatCompletionInterceptor``; see docs/hub.md).
        """
        self.on_pairing_request = on_pairing_request
        self.on_qr_pairing = on_qr_pairing
        self.on_offload = on_offload
        self.chat_completion_interceptor = chat_completion_interceptor
        if config is None:
            config = load_config(overrides=overrides) if overrides else NodeConfig()
        elif overrides:
            config = override_config(config, overrides)  # validated like any other source
        self.config = config
        self.context: NodeContext | None = None
        self._identity_handle: IdentityHandle | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._runner: NodeRunner | None = None
        self._port: int | None = None
        self._replayer: LinkRequestReplayer | None = None
        self._remote_peers: RemotePeerBook | None = None

    # -- lifecycle -----------------------------------------------------------
    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, *, wait_ready: bool = True) -> None:
        """Bind the port, load preloaded models; with ``wait_ready`` return once they are loaded."""
        if self.context is not None:
            return
        try:
            self.context = context = await asyncio.to_thread(self._build_context)
        except BaseException:
            await self.close()  # releases the state-dir lock taken before the failure
            raise
        try:
            context.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, connect=5))
            context.qr = self._qr_service(context)
            context.external = ExternalEngines(self.config.hub.external_engines, context.http,
                                               ForwardSettings.from_config(self.config), context.identity.device_id)
            await context.external.start()
            if context.audit is not None:
                await context.audit.start()
            await context.registry.start(wait=False)
            if context.capability is not None:
                await context.capability.start()  # probes (if any) run in the background
            if self.config.transport == "http":
                await self._serve_http(context)
                if self.config.offload.enabled:
                    await self._start_discovery(context)
                    context.router = self._build_router(context)
                    await context.router.start()
                    if self.config.offload.rendezvous_url:
                        await self._start_internet_path(context, self.config.offload.rendezvous_url)
            if wait_ready:
                await context.registry.wait_preloaded()
        except BaseException:
            await self.close()
            raise

    async def _start_discovery(self, context: NodeContext) -> None:
        """Find peers and announce this node (offload enabled, HTTP transport only)."""
        config = self.config
        assert context.node_identity is not None and context.http is not None and self._port is not None
        offload = config.offload
        if is_loopback(config.http_bind_host) and not offload.discover_interfaces:
            # A loopback-only node must not announce 127.0.0.1 to the whole LAN.
            offload = dataclasses.replace(offload, discover_interfaces=("127.0.0.1",))
        context.peers = PeerTable.from_config(offload, self_device_id=context.identity.device_id)
        port, registry, capability = self._port, context.registry, context.capability
        wildcard = config.http_bind_host in ("0.0.0.0", "::", "")

        def advertised() -> AdvertisedInfo:
            return AdvertisedInfo(
                port=port,
                loaded_models=tuple(s.info.id for s in registry.slots() if s.state == "ready"),
                capability=capability.snapshot() if capability is not None and capability.enabled else {},
                capability_curve=capability.curves() if capability is not None and capability.enabled else {},
                queue_depth={s.info.id: s.queue_depth for s in registry.slots()},
                addresses=() if wildcard else (config.http_bind_host,),
            )

        context.discovery = DiscoveryService(offload, context.node_identity, context.peers, context.http,
                                             advertised)
        await context.discovery.start()
        discovery = context.discovery

        def readvertise(*_args: object) -> None:
            task = asyncio.get_running_loop().create_task(discovery.update_advertisement())
            self._background.add(task)
            task.add_done_callback(self._background.discard)

        if capability is not None:
            capability.subscribe(readvertise)
        preload = asyncio.create_task(self._readvertise_after_preload(context), name="readvertise")
        self._background.add(preload)
        preload.add_done_callback(self._background.discard)

    async def _start_internet_path(self, context: NodeContext, rendezvous_url: str) -> None:
        """Presence on the rendezvous and WebRTC links to QR-paired peers (docs/internet-path.md).

        Requests arriving over a link are replayed into this node's own application through
        an internal Unix-socket site, so they pass every check an HTTP request passes."""
        from .discovery.model import HealthReport
        from .discovery.rendezvous import RemotePeerBook, fetch_health_over
        from .security.signing import sign_with_pairing
        from .transport.inbound import LinkRequestReplayer
        from .transport.links import LinkManager
        from .transport.presence import PresenceConnection

        assert self._runner is not None and context.pairings is not None and context.http is not None
        offload = self.config.offload
        self._replayer = replayer = LinkRequestReplayer(
            read_timeout=self.config.generation_timeout + offload.forward_read_timeout)
        await web.UnixSite(self._runner, replayer.socket_path).start()
        pairings = context.pairings

        def link_key(device_id: str) -> bytes | None:
            # a mutual pairing sits in both directions; the outbound slot is one per device,
            # while the device may hold several inbound pairings (one per app)
            pairing = pairings.get(device_id, direction="outbound")
            return pairing.key if pairing is not None and pairing.via == "rendezvous" \
                and pairing.role == "mutual" else None

        def watched() -> list[str]:
            return sorted(p.peer_device_id for p in pairings.list() if link_key(p.peer_device_id) is not None)

        presence: PresenceConnection | None = None

        def ice_servers() -> tuple[IceServer, ...]:
            minted = presence.turn_servers() if presence is not None else ()
            return (*offload.ice_servers, *minted)

        context.links = LinkManager(
            device_id=context.identity.device_id, pairing_key_for=link_key, ice_servers=ice_servers,
            relay_only=offload.ice_relay_only, connect_timeout=offload.link_connect_timeout,
            idle_timeout=offload.link_idle_timeout, on_request=replayer.serve,
            max_request_body=self.config.max_body_bytes)
        await context.links.start()
        links = context.links
        own_id = context.identity.device_id

        async def fetch_health(device_id: str) -> HealthReport | str:
            pairing = pairings.get(device_id, direction="outbound")
            if link_key(device_id) is None or pairing is None:
                return "not paired"

            def sign(method: str, path: str, body: bytes) -> dict[str, str]:
                return sign_with_pairing(pairing, own_id, method, path, body)

            return await fetch_health_over(links.link_for(device_id), sign,
                                           connect_timeout=offload.link_connect_timeout)

        def paired_name(device_id: str) -> str | None:
            pairing = pairings.get(device_id, direction="outbound")
            return pairing.peer_device_name if link_key(device_id) is not None and pairing else None

        def link_up(device_id: str) -> bool:
            info = links.info(device_id)
            return info is not None and info.state.up

        assert context.peers is not None
        self._remote_peers = book = RemotePeerBook(table=context.peers, fetch_health=fetch_health,
                                                   paired_name=paired_name, link_up=link_up)
        context.presence = presence = PresenceConnection(
            base_url=rendezvous_url, identity=context.identity, session=context.http, links=links,
            watched=watched, on_presence=book.on_presence, interval=offload.presence_interval,
            want_turn=offload.rendezvous_turn)
        await presence.start()

    async def _readvertise_after_preload(self, context: NodeContext) -> None:
        await context.registry.wait_preloaded()
        if context.discovery is not None:
            await context.discovery.update_advertisement()

    def _qr_service(self, context: NodeContext) -> QrPairingService:
        pairings = context.pairings
        assert pairings is not None

        my_device_id = context.identity.device_id

        async def store(result: PairingResult) -> None:
            # Each side signs as its own device id (the reference's appId fallback).
            await pairings.add(Pairing(
                peer_device_id=result.peer_device_id, peer_device_name=result.peer_device_name,
                key=result.pairing_key, via="rendezvous", paired_at=result.paired_at, role="mutual",
                our_app_id=my_device_id, peer_app_id=result.peer_device_id,
            ))

        return QrPairingService(identity=context.identity, device_name=context.device_name,
                                rendezvous_url=self.config.offload.rendezvous_url, store_result=store,
                                approve=self.on_qr_pairing, http=context.http)

    def _build_context(self) -> NodeContext:
        config = self.config
        state_dir = config.resolved_state_dir()
        self._identity_handle = handle = open_node_identity(state_dir, config.device_name, exclusive=True)
        if handle.locked:  # no other node writes here: leftovers of a write a crash interrupted
            for path in remove_stale_temp_files(state_dir):
                log.info("removed %s, left by an interrupted write", path.name)
        identity = handle.identity.device
        registry = ModelRegistry.from_config(config)
        limits = InferenceLimits(config.generation_timeout, config.max_blank_chunks)
        for warning in exposure_warnings(config):
            log.warning("%s", warning)
        usage = UsageStore.open(state_dir, retention_days=config.hub.usage_retention_days)
        audit = None
        if config.audit.enabled:
            audit = AuditLog(state_dir / AUDIT_FILE, retention_days=config.audit.retention_days,
                             max_rows=config.audit.max_rows, enabled=True)
        context = NodeContext(
            config=config,
            identity=identity,
            device_name=handle.identity.device_name,
            node_identity=handle.identity,
            registry=registry,
            inference=InferenceService(registry, limits),
            capability=CapabilityService(config, registry, CapabilityStore(state_dir)),
            pairings=PairingStore.load_sync(state_dir, self_device_id=identity.device_id),
            nonces=NonceCache.for_process_start(),
            approver=PairingApprover.from_config(config.security, hook=self.on_pairing_request),
            audit=audit,
            api_keys=ApiKeyStore.load(state_dir),
            interceptor=self.chat_completion_interceptor,
            substitution=SubstitutionPolicy.from_config(config.hub),
            usage=usage,
            quotas=QuotaBook(config.hub.quotas, usage=usage.tokens_today),
        )
        context.metrics = _build_metrics(context)
        return context

    def _build_router(self, context: NodeContext) -> OffloadRouter:
        """The offload router, with the links that reach peers (LAN HTTP)."""
        if context.peers is None or context.pairings is None or context.http is None:
            raise RuntimeError("the offload router needs the peer table, the pairing store and the HTTP client")
        session = context.http

        def link_for(peer: Peer) -> PeerLink:
            # A rendezvous peer is reached over its WebRTC data channel (docs/internet-path.md);
            # the peer table lists a device found on both paths as its LAN entry while that answers.
            if peer.via == "rendezvous" and context.links is not None:
                return context.links.link_for(peer.device_id)
            return HttpPeerLink(session, peer.base_url)

        return OffloadRouter(config=context.config, device_id=context.identity.device_id,
                             registry=context.registry, capability=context.capability, peers=context.peers,
                             pairings=context.pairings, links=link_for, on_offload=self.on_offload,
                             metrics=context.metrics)

    async def _serve_http(self, context: NodeContext) -> None:
        config = self.config
        app = build_app(context)
        self._runner = NodeRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._port = await _bind_with_retry(self._runner, config)
        host = config.http_bind_host
        shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)
        if ":" in shown and not shown.startswith("["):
            shown = f"[{shown}]"
        context.base_url = f"http://{shown}:{self._port}/v1"
        local_url = context.base_url
        if _needs_loopback_site(host):
            # Bound to one LAN/VPN address: keep the node reachable by its owner on this machine
            # too (CLI, local apps), unsigned, as when it is bound to loopback.
            local = "::1" if ":" in host else "127.0.0.1"
            try:
                await web.TCPSite(self._runner, local, self._port, reuse_address=True).start()
            except OSError as exc:
                log.warning("could not also listen on %s:%d (%s); local programs must use %s (a caller "
                            "on this machine is still recognised as local)", local, self._port, exc,
                            context.base_url)
            else:
                local_url = f"http://{'[::1]' if local == '::1' else local}:{self._port}/v1"
        context.local_base_url = local_url
        await asyncio.to_thread(_write_endpoint, config.resolved_state_dir(), local_url)

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        if self.context is not None and self.context.router is not None:
            await self.context.router.stop()
        if self.context is not None and self.context.presence is not None:
            await self.context.presence.stop()
            self.context.presence = None
        book, self._remote_peers = self._remote_peers, None
        if book is not None:
            await book.close()
        if self.context is not None and self.context.links is not None:
            await self.context.links.stop()
            self.context.links = None
        if self.context is not None and self.context.discovery is not None:
            # Say goodbye while the node still answers its health checks.
            await self.context.discovery.stop()
            self.context.discovery = None
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        replayer, self._replayer = self._replayer, None
        if replayer is not None:
            await replayer.close()
        context, self.context = self.context, None
        if context is not None:
            if context.approver is not None:
                context.approver.close()
            if context.qr is not None:
                await context.qr.close()
            if context.capability is not None:
                await context.capability.stop()
            await context.registry.stop()
            if context.external is not None:
                await context.external.stop()
            if context.audit is not None:
                await context.audit.close()
            if context.usage is not None:
                await asyncio.to_thread(context.usage.close)
            if context.http is not None:
                await context.http.close()
            if self._port is not None:
                await asyncio.to_thread(_remove_endpoint, self.config.resolved_state_dir(), os.getpid())
        handle, self._identity_handle = self._identity_handle, None
        if handle is not None:
            handle.close()

    # -- addresses -----------------------------------------------------------
    @property
    def base_url(self) -> str | None:
        """The URL to hand to any OpenAI client (``None`` with ``transport="none"``)."""
        return self.context.base_url if self.context else None

    @property
    def port(self) -> int | None:
        return self._port

    @property
    def device_id(self) -> str:
        return self._require().identity.device_id

    # -- inference -----------------------------------------------------------
    async def chat_completion(self, messages: list[dict[str, Any]], *, model: str | None = None,
                              **options: Any) -> dict[str, Any]:
        body = {"model": model or self.config.default_model_id, "messages": messages, **options,
                "stream": False}
        return await self._require().inference.complete(parse_chat_request(body))

    async def stream_chat(self, messages: list[dict[str, Any]], *, model: str | None = None,
                          **options: Any) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks, as an OpenAI client would receive them."""
        body = {"model": model or self.config.default_model_id, "messages": messages, **options,
                "stream": True}
        stream = self._require().inference.stream(parse_chat_request(body))
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def completion(self, prompt: str | list[str], *, model: str | None = None,
                         **options: Any) -> dict[str, Any]:
        body = {"model": model or self.config.default_model_id, "prompt": prompt, **options, "stream": False}
        return await self._require().inference.complete(parse_completion_request(body))

    async def embedding(self, inputs: str | list[str], *, model: str | None = None) -> list[list[float]]:
        """One normalised vector per input, in order (the reference's ``number[][]``)."""
        body = {"model": model or self._embedding_model(), "input": inputs}
        result = await self._require().inference.embeddings(parse_embedding_request(body))
        return [item["embedding"] for item in result["data"]]

    # -- peers -----------------------------------------------------------------
    def get_peers(self) -> tuple[Peer, ...]:
        """A snapshot of the peer table (empty when offload, and so discovery, is off)."""
        peers = self._require().peers
        return peers.snapshot() if peers is not None else ()

    # -- capability ------------------------------------------------------------
    async def probe_capability(self, model: str | None = None) -> CapabilityScore | None:
        """Run a fresh probe of ``model`` (default: the default model) and persist the score.

        As in the reference, a no-op returning ``None`` when offload is disabled.
        """
        service = self._require().capability
        return None if service is None else await service.probe_capability(model)

    async def get_capability(self, model_id: str | None = None) -> CapabilityScore | None:
        """The cached probe or observed score, else a heuristic estimate (``source`` says which);
        ``None`` when offload is disabled."""
        service = self._require().capability
        return None if service is None else service.get_capability(model_id)

    # -- pairing -------------------------------------------------------------
    async def pair_qr(self) -> dict[str, Any]:
        """Start a QR pairing: the ``pair-qr`` body (payload, QR as text/SVG/PNG, session id)."""
        from .pairing.qr_service import offer_to_json

        qr = self._qr()
        offer, _ = await qr.offer()
        return await asyncio.to_thread(offer_to_json, offer, rendezvous_url=self.config.offload.rendezvous_url or "")

    async def wait_qr_pairing(self, session_id: str) -> dict[str, Any]:
        """Wait until a QR offer is scanned and completed (or fails); its final status."""
        return (await self._qr().wait(session_id)).to_json()

    async def cancel_qr_pairing(self, session_id: str) -> dict[str, Any]:
        return (await self._qr().cancel(session_id)).to_json()

    async def pair_scan(self, payload: str) -> dict[str, Any]:
        """Complete a QR pairing from a scanned ``dvai://pair?…`` payload."""
        from .api.trust import pairing_error
        from .pairing.qr import PairingFailedError
        from .pairing.qr_service import result_to_json

        try:
            return result_to_json(await self._qr().scan(payload))
        except PairingFailedError as exc:
            raise pairing_error(exc) from exc

    def _qr(self) -> QrPairingService:
        qr = self._require().qr
        if qr is None:
            raise RuntimeError("QR pairing is not available")
        return qr

    def _embedding_model(self) -> str:
        for model in self.config.models:
            if model.embedding:
                return model.id
        return self.config.default_model_id

    def _require(self) -> NodeContext:
        if self.context is None:
            raise RuntimeError("the node is not started; use `async with Node(...)` or `await node.start()`")
        return self.context


ENDPOINT_FILE = "endpoint.json"
"""Where a serving node records its base URL, so local CLI commands can find it."""


def _write_endpoint(state_dir: Path, base_url: str) -> None:
    atomic_write_json(state_dir / ENDPOINT_FILE, {"baseUrl": base_url, "pid": os.getpid()}, mode=0o600)


def _remove_endpoint(state_dir: Path, pid: int) -> None:
    path = state_dir / ENDPOINT_FILE
    current = read_json(path, default=None, tolerate_corrupt=True)
    if isinstance(current, dict) and current.get("pid") == pid:
        path.unlink(missing_ok=True)


def _needs_loopback_site(bind_host: str) -> bool:
    """A specific non-loopback address (not a wildcard, which covers loopback already)."""
    return bind_host not in ("0.0.0.0", "::", "") and not is_loopback(bind_host) and bind_host != "localhost"


async def _bind_with_retry(runner: web.AppRunner, config: NodeConfig) -> int:
    """Bind the first free port from ``http_base_port`` (``+1`` up to the attempt limit).

    ``SO_REUSEADDR`` (never ``SO_REUSEPORT``): a restarted node gets its port back even while
    the previous process's connections sit in TIME_WAIT, and a port another process really
    listens on still fails to bind (then the next port is tried, with a warning).
    """
    attempts = 1 if config.http_base_port == 0 else config.http_max_port_attempts
    last_error: OSError | None = None
    for offset in range(attempts):
        port = config.http_base_port + offset if config.http_base_port else 0
        site = web.TCPSite(runner, config.http_bind_host, port, reuse_address=True, reuse_port=False)
        try:
            await site.start()
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last_error = exc
            continue
        server = site._server  # noqa: SLF001 - the only way to learn an ephemeral port
        sockets = getattr(server, "sockets", None) or []
        bound = int(sockets[0].getsockname()[1]) if sockets else port
        if offset:
            log.warning("port %d busy, using %d (%s)", config.http_base_port, bound, last_error)
        return bound
    raise ConfigError(
        f"no free port in {config.http_base_port}..{config.http_base_port + attempts - 1} "
        f"on {config.http_bind_host} ({last_error})"
    )


def _build_metrics(context: NodeContext) -> NodeMetrics:
    """Metrics reading the registry, the peer table (once discovery sets it) and the pairings."""

    def peers() -> Iterable[Peer] | None:
        return context.peers.snapshot() if context.peers is not None else None

    def paired() -> int | None:
        return len(context.pairings) if context.pairings is not None else None

    audit = context.audit
    return NodeMetrics(device_id=context.identity.device_id, device_name=context.device_name,
                       models=context.registry, peers=peers, paired_devices=paired,
                       started_at=context.started_at, audit_health=audit.health if audit is not None else None)
