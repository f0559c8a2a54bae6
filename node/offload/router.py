"""The offload router: per request, run it here, forward it to a peer, or refuse.

It gathers what :func:`node.offload.policy.decide` needs (the local capability from the
``CapabilityService``, one ``PeerCandidate`` per peer in the ``PeerTable`` with pairing,
verification and health filled in), verifies peers when the decision says it could
matter, and forwards with the :class:`~node.offload.forward.Forwarder`, falling back to
the next peer (or this device under ``prefer``) when a peer fails before its first byte.

Integration (``node/runtime.py`` builds it; ``node/api/openai.py`` calls it)::

    router = OffloadRouter(config=..., peers=..., links=link_for, ...)   # offload enabled
    await router.start()            # after discovery started
    outcome = await router.route(RoutedRequest(...))   # plain values, no HTTP
    ServeHere → serve locally; Forwarded(answer) → write the peer's answer; Refused(error) → raise it
    await router.stop()             # before the HTTP client session closes

``route`` returns ``Refused`` with a ``NoCapableDeviceError`` (503) under ``require`` when no
device qualifies; the caller parses ``X-DVAI-Offload`` with ``parse_offload_header`` (400 when bad).

Hop marker: a request carrying ``X-DVAI-Hop`` was forwarded to us. Signed by a paired
device it is served here whatever its ``X-DVAI-Offload`` (decision rule 1). Unsigned, the
marker proves nothing: the request is handled as a normal request that may not be
forwarded (``require`` is then judged on the local score alone), so an anonymous client
can neither make a ring loop nor skip the threshold by adding the header.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from node.common.errors import DVAIError
from node.config import NodeConfig
from node.constants import MAX_VERIFICATIONS, VERIFY_REFRESH_FRACTION
from node.discovery.peers import Peer, PeerChange, PeerChangeKind, PeerTable
from node.engine.record import RequestRecord
from node.engine.registry import ModelRegistry
from node.pairing.store import PairingStore
from node.transport.link import PeerLink

from .breaker import BreakerSettings, PeerAttempt, PeerHealthBook, apply_health
from .forward import (
    ForwardCall,
    Forwarder,
    ForwardFailed,
    ForwardSettings,
    ForwardStatus,
    ForwardTarget,
    PeerAnswer,
)
from .policy import (
    LocalState,
    NoCapableDeviceError,
    OffloadAction,
    OffloadDecision,
    OffloadMode,
    PeerCandidate,
    PolicySettings,
    decide,
    decode_share,
    single_stream_rate,
)
from .verify import PeerVerifier, ProbeTarget, measure_decode_rate

if TYPE_CHECKING:
    from node.capability import CapabilityService

__all__ = ["Forwarded", "OffloadCallback", "OffloadMetrics", "OffloadRouter", "Refused", "RouteOutcome",
           "RoutedRequest", "ServeHere"]

log = logging.getLogger(__name__)

OffloadCallback = Callable[[Peer], object]
"""``on_offload(peer)``: called when a peer starts serving a forwarded request (the reference's
``onOffload``). Runs on the event loop; it must not block. A returned awaitable is run as a
task; exceptions are logged and ignored."""

LinkFactory = Callable[[Peer], PeerLink]
"""The link that reaches a peer (LAN HTTP, or the data channel for a rendezvous peer)."""


class OffloadMetrics(Protocol):
    """What the router reports to the node's metrics (``node.metrics.NodeMetrics``)."""

    def offload_started(self, peer_id: str) -> None: ...

    def offload_finished(self, peer_id: str, ok: bool, tokens: int) -> None: ...


@dataclass(frozen=True, slots=True)
class RoutedRequest:
    """One request to place, as plain values (the HTTP edge builds it)."""

    path: str
    """path with query (``/v1/chat/completions``): where a peer receives it."""
    model: str
    stream: bool
    body: bytes
    """the body as received, forwarded unchanged (unless the peer knows the model by another name)."""
    payload: Mapping[str, Any]
    """the same body, parsed."""
    mode: OffloadMode = OffloadMode.PREFER
    marked: bool = False
    """the request carries the hop marker (``X-DVAI-Hop``): it may not be forwarded again."""
    hop: bool = False
    """… and a paired device signed it: it is served here whatever the mode (rule 1)."""
    request_id: str = ""
    record: RequestRecord | None = None
    needs: frozenset[str] = frozenset()
    """features the request uses (``tools``, ``structured_outputs``, ``responses``): a peer whose
    health report does not list them for the model is not a candidate ("model not served")."""


@dataclass(frozen=True, slots=True)
class ServeHere:
    """Serve the request on this node."""


@dataclass(frozen=True, slots=True)
class Forwarded:
    """A peer is serving it: write ``answer`` out and close it."""

    answer: PeerAnswer


@dataclass(frozen=True, slots=True)
class Refused:
    """No device qualifies (``require``): answer with ``error``."""

    error: NoCapableDeviceError


RouteOutcome = ServeHere | Forwarded | Refused
SERVE_HERE = ServeHere()


class OffloadRouter:
    """Routes requests of a node with offload enabled; one per node."""

    def __init__(
        self,
        *,
        config: NodeConfig,
        device_id: str,
        registry: ModelRegistry,
        capability: CapabilityService | None,
        peers: PeerTable,
        pairings: PairingStore,
        links: LinkFactory,
        on_offload: OffloadCallback | None = None,
        metrics: OffloadMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._device_id = device_id
        self._registry = registry
        self._capability = capability
        self._peers = peers
        self._pairings = pairings
        self._links = links
        self._on_offload = on_offload
        self._metrics = metrics
        self._clock = clock
        offload = config.offload
        self.settings = PolicySettings.from_config(offload)
        self.health = PeerHealthBook(BreakerSettings(break_s=offload.circuit_break_s))
        self._forwarder = Forwarder(device_id=device_id, settings=ForwardSettings.from_config(config))

        async def measure(target: ProbeTarget) -> tuple[float | None, int]:
            # A batching peer decodes the probe alongside the requests it is running: the rate
            # measured is its share at that concurrency, mapped back to the single-stream rate.
            share = self._decode_share(target.device_id, target.model)
            threshold = offload.min_local_capability * share
            rate, tokens = await measure_decode_rate(target, self_device_id=device_id,
                                                     time_limit=offload.verify_timeout,
                                                     connect_timeout=offload.forward_connect_timeout,
                                                     give_up_below=threshold or None)
            return (None if rate is None else self._single_stream(target.device_id, target.model, rate, share)), tokens

        self.verifier = PeerVerifier(measure, on_unreachable=self._probe_unreachable, clock=clock)
        self._best_measured: OrderedDict[tuple[str, str], float] = OrderedDict()
        """per (peer, model): the highest decode rate measured there (verification or forwarding)."""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._unsubscribe: Callable[[], None] | None = None

    # -- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Follow the peers' queue depths from their health reports."""
        if self._unsubscribe is None:
            for peer in self._peers.snapshot():
                self._record_report(peer)
            self._unsubscribe = self._peers.subscribe(self._on_peer_change)

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.verifier.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    # -- the request path --------------------------------------------------------------
    async def route(self, request: RoutedRequest) -> RouteOutcome:
        """Where ``request`` is served (see the module docs)."""
        mode, model, forwardable = request.mode, request.model, not request.marked
        needs = request.needs
        decision = self.decide(mode, model, hop=request.hop, forwardable=forwardable, needs=needs)
        decision = await self._verify_if_useful(decision, mode, model, hop=request.hop, forwardable=forwardable,
                                                needs=needs)
        attempts = 0
        while decision.action is OffloadAction.FORWARD and attempts < self.settings.max_forward_attempts:
            attempts += 1
            answer = await self._forward(request, decision.peers[0])
            if answer is not None:
                return Forwarded(answer)
            decision = self.decide(mode, model, hop=request.hop, forwardable=forwardable,
                                   needs=needs)  # the failed peer is now skipped
        if decision.action is OffloadAction.REFUSE or (
                decision.action is OffloadAction.FORWARD and mode is OffloadMode.REQUIRE):
            return Refused(self._refusal(decision, model, request.request_id))
        return SERVE_HERE

    def decide(self, mode: OffloadMode, model: str, *, hop: bool = False, forwardable: bool = True,
               needs: frozenset[str] = frozenset()) -> OffloadDecision:
        """The policy's decision for ``model`` right now (pure apart from reading current state)."""
        now = self._clock()
        local = self._local_state(model)
        candidates = ([self._candidate(peer, model, now, needs) for peer in self._peers.snapshot()]
                      if forwardable else [])
        return decide(mode, local, candidates, model, self.settings, now, hop=hop)

    # -- state for the policy ----------------------------------------------------------
    def _local_state(self, model: str) -> LocalState:
        try:
            slot = self._registry.resolve(model)
        except DVAIError:
            return LocalState(self._device_id, model, None, "none")
        score = self._capability.get_capability(model) if self._capability is not None else None
        if score is None:
            return LocalState(self._device_id, slot.info.id, None, "none", queue_depth=slot.queue_depth)
        return LocalState(self._device_id, slot.info.id, score.tok_per_s, score.source,
                          queue_depth=slot.queue_depth, curve=score.points)

    def _candidate(self, peer: Peer, model: str, now: float, needs: frozenset[str] = frozenset()) -> PeerCandidate:
        wire = self._wire_model(model, peer)
        if wire is not None and not needs <= set(peer.features.get(wire, ())):
            wire = None  # an older peer, or an engine that cannot honour tools/grammars: "model not served"
        verification = self.verifier.get(peer.device_id, wire or model)
        claimed = peer.capability.get(wire or model)
        candidate = PeerCandidate(
            device_id=peer.device_id,
            device_name=peer.device_name,
            paired=self._pairings.get(peer.device_id, direction="outbound") is not None,
            # Only a peer whose last health answer proved its device key may receive prompts:
            # an impostor claiming a paired device's id at another address never qualifies.
            reachable=peer.reachable and peer.identity_verified,
            models=frozenset((model,)) if wire is not None else frozenset(),
            claimed_tok_per_s=claimed,
            verified_tok_per_s=verification.tok_per_s if verification is not None else None,
            verified_at=verification.at if verification is not None else None,
            observed_tok_per_s=None,
            queue_depth=0,
            in_flight=0,
            circuit_open_until=None,
            via=peer.via,
            curve=peer.capability_curve.get(wire or model, ()),
        )
        return apply_health(candidate, self.health.snapshot(peer.device_id, now))

    def _wire_model(self, model: str, peer: Peer) -> str | None:
        """The name the peer serves the requested model under: the name itself, or, for a
        local alias, our canonical id when the peer lists that; None when it serves neither."""
        if model in peer.loaded_models:
            return model
        try:
            canonical = self._registry.resolve(model).info.id
        except DVAIError:
            return None
        return canonical if canonical in peer.loaded_models else None

    # -- verification ------------------------------------------------------------------
    async def _verify_if_useful(self, decision: OffloadDecision, mode: OffloadMode, model: str, *,
                                hop: bool, forwardable: bool, needs: frozenset[str] = frozenset(),
                                ) -> OffloadDecision:
        """Probe the peers the decision could use once verified: in the background when the
        request goes to a peer anyway, else waiting (at most ``verify_timeout``) and deciding again."""
        if decision.action is OffloadAction.FORWARD:
            self._refresh_if_ageing(decision.peers[0].device_id, model)
        targets = self._probe_targets(decision.needs_verification, model)
        if not targets:
            return decision
        if decision.action is OffloadAction.FORWARD:
            for target in targets:
                self.verifier.start(target)
            return decision
        def forwardable_now() -> bool:
            return self.decide(mode, model, hop=hop, forwardable=forwardable,
                               needs=needs).action is OffloadAction.FORWARD

        await self.verifier.verify(targets, wait=self._config.offload.verify_timeout, enough=forwardable_now)
        return self.decide(mode, model, hop=hop, forwardable=forwardable, needs=needs)

    def _probe_targets(self, device_ids: tuple[str, ...], model: str) -> list[ProbeTarget]:
        now = self._clock()
        targets = []
        for device_id in device_ids:
            peer = self._peers.get(device_id)
            pairing = self._pairings.get(device_id, direction="outbound")
            wire = self._wire_model(model, peer) if peer is not None else None
            if peer is None or pairing is None or wire is None or not self.verifier.may_probe(device_id, wire, now):
                continue
            targets.append(ProbeTarget(device_id, self._links(peer), pairing, wire))
        return targets

    def _refresh_if_ageing(self, device_id: str, model: str) -> None:
        peer = self._peers.get(device_id)
        if peer is None:
            return
        wire = self._wire_model(model, peer) or model
        verification = self.verifier.get(device_id, wire)
        age_limit = self.settings.verify_max_age * VERIFY_REFRESH_FRACTION
        if verification is not None and self._clock() - verification.at > age_limit:
            targets = self._probe_targets((device_id,), model)
            for target in targets:
                self.verifier.start(target)

    def _decode_share(self, device_id: str, model: str) -> float:
        """A new request's decode share at the peer now (its claimed curve, its known load)."""
        peer = self._peers.get(device_id)
        curve = peer.capability_curve.get(model, ()) if peer is not None else ()
        snapshot = self.health.snapshot(device_id, self._clock())
        return decode_share(curve, snapshot.queue_depth_others + snapshot.in_flight + 1)

    def _single_stream(self, device_id: str, model: str, rate: float, share: float) -> float:
        """``rate`` measured at the peer with decode ``share``, as its single-stream rate (bounded by
        the best rate measured there: see ``single_stream_rate``); remembers the best."""
        key = (device_id, model)
        best = self._best_measured.get(key)
        estimate = single_stream_rate(rate, share, best)
        if math.isfinite(rate) and rate > 0:
            self._best_measured[key] = max(rate, best or 0.0)
            self._best_measured.move_to_end(key)
            while len(self._best_measured) > MAX_VERIFICATIONS:
                self._best_measured.popitem(last=False)
        return estimate

    def _probe_unreachable(self, device_id: str) -> None:
        """A probe could not reach the peer: skip it like a failed request would."""
        self.health.get(device_id).breaker.record_failure(self._clock())

    # -- forwarding --------------------------------------------------------------------
    async def _forward(self, request: RoutedRequest, candidate: PeerCandidate) -> PeerAnswer | None:
        """Try one peer: its answer, or None when it failed before the first byte."""
        peer = self._peers.get(candidate.device_id)
        pairing = self._pairings.get(candidate.device_id, direction="outbound")
        wire = self._wire_model(request.model, peer) if peer is not None else None
        if peer is None or pairing is None or wire is None:
            return None
        attempt = self.health.begin(peer.device_id, self._clock())
        if attempt is None:
            return None
        body = request.body if wire == request.model else _with_model(request.payload, wire)
        if self._metrics is not None:
            _safely(self._metrics.offload_started, peer.device_id)
        target = ForwardTarget(peer.device_id, self._links(peer), pairing)
        call = ForwardCall(request.path, body, request.stream, request.request_id or None)
        # This request's decode share there (it joins the requests queued or running): the
        # observed rate is folded in as the single-stream rate its curve is anchored at.
        share = decode_share(candidate.curve, candidate.queue_depth + candidate.in_flight + 1)
        try:
            answer = await self._forwarder.open(
                target, call, on_finished=lambda done: self._finished(done, attempt, peer, wire, request, share))
        except ForwardFailed as exc:
            self._finish_attempt(attempt, ForwardStatus.FAILED, 0, None)
            log.warning("offload of %s to %s failed before the first byte (%s); trying elsewhere",
                        request.path, _short(peer.device_id), exc)
            return None
        except asyncio.CancelledError:
            self._finish_attempt(attempt, ForwardStatus.CANCELLED, 0, None)
            log.info("offload of %s to %s cancelled: the client went away", request.path, _short(peer.device_id))
            raise
        self._notify(peer)
        return answer

    def _finished(self, answer: PeerAnswer, attempt: PeerAttempt, peer: Peer, wire: str,
                  request: RoutedRequest, share: float = 1.0) -> None:
        """A forwarded answer was closed: account for it, fill the record, log one line."""
        result = answer.result
        rate = result.outcome.decode_tok_per_s
        single = self._single_stream(peer.device_id, wire, rate, share) if rate else rate
        self._finish_attempt(attempt, result.status, result.tokens, single)
        if request.record is not None:
            request.record.served(peer.device_id, model=wire, prompt_tokens=result.outcome.prompt_tokens,
                                  completion_tokens=result.tokens, first_token_s=result.first_byte_s,
                                  decode_tok_per_s=rate, via=peer.via)
            if result.status is ForwardStatus.BROKEN:
                request.record.failed(result.peer_error_code or "peer_failed")
        log.info("offloaded %s (%s) to %s %s via %s: %s, %d tokens%s, first byte %.0f ms%s",
                 request.path, request.model, _short(peer.device_id), peer.device_name or "", peer.via,
                 result.status.value, result.tokens, f" at {rate:.1f} tok/s" if rate else "",
                 (result.first_byte_s or 0) * 1000, f" ({result.error})" if result.error else "")

    def _finish_attempt(self, attempt: PeerAttempt, status: ForwardStatus, tokens: int, rate: float | None) -> None:
        now = self._clock()
        if status is ForwardStatus.SERVED:
            attempt.succeeded(now, tokens=tokens, decode_seconds=tokens / rate if rate else 0.0)
        elif status is ForwardStatus.CANCELLED:
            attempt.cancelled(now, tokens=tokens)
        else:
            attempt.failed(now, tokens=tokens)
        if self._metrics is not None:
            ok = status is ForwardStatus.SERVED or status is ForwardStatus.CANCELLED
            _safely(self._metrics.offload_finished, attempt.device_id, ok, tokens)

    def _notify(self, peer: Peer) -> None:
        if self._on_offload is None:
            return
        try:
            outcome = self._on_offload(peer)
            if inspect.isawaitable(outcome):
                task = asyncio.ensure_future(outcome)
                self._tasks.add(task)
                task.add_done_callback(self._callback_done)
        except Exception:  # noqa: BLE001 - a diagnostic hook never breaks a request
            log.exception("on_offload callback failed")

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("on_offload callback failed: %r", task.exception())

    def _refusal(self, decision: OffloadDecision, model: str, request_id: str) -> NoCapableDeviceError:
        paired = {p.peer_device_id for p in self._pairings.list() if p.may_call_peer}
        local = self._local_state(model)
        return NoCapableDeviceError.from_decision(
            decision, model=model, local_capability=local.capability,
            required_at_least=self.settings.min_local_capability,
            rendezvous_configured=bool(self._config.offload.rendezvous_url),
            paired_remote_peers=len(paired), request_id=request_id,
        )

    # -- peer reports ------------------------------------------------------------------
    def _on_peer_change(self, change: PeerChange) -> None:
        if change.kind is PeerChangeKind.REMOVED:
            return
        self._record_report(change.peer)

    def _record_report(self, peer: Peer) -> None:
        depth = sum(v for v in peer.queue_depth.values() if isinstance(v, int) and v > 0)
        if depth or peer.device_id in self.health:  # idle peers we never used need no entry
            self.health.record_report(peer.device_id, self._clock(), depth)

    # -- introspection -------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """``GET /v1/dvai/offload``: per-peer counters, circuits and verified rates."""
        now = self._clock()
        verified: dict[str, list[dict[str, Any]]] = {}
        for result in self.verifier.results():
            verified.setdefault(result.device_id, []).append(result.to_json())
        peers = []
        for snapshot in self.health.snapshots(now):
            peers.append({
                "deviceId": snapshot.device_id,
                "requests": snapshot.requests,
                "failures": snapshot.failures,
                "cancelled": snapshot.cancelled,
                "tokens": snapshot.tokens,
                "inFlight": snapshot.in_flight,
                "observedTokPerS": None if snapshot.observed_tok_per_s is None
                else round(snapshot.observed_tok_per_s, 2),
                "queueDepthOthers": snapshot.queue_depth_others,
                "circuit": snapshot.circuit_state.value,
                "circuitOpenUntil": snapshot.circuit_open_until,
                "verified": verified.pop(snapshot.device_id, []),
            })
        peers += [{"deviceId": device_id, "requests": 0, "failures": 0, "cancelled": 0, "tokens": 0,
                   "inFlight": 0, "observedTokPerS": None, "queueDepthOthers": 0, "circuit": "closed",
                   "circuitOpenUntil": None, "verified": results} for device_id, results in verified.items()]
        return {
            "deviceId": self._device_id,
            "minLocalCapability": self.settings.min_local_capability,
            "verifyMaxAge": self.settings.verify_max_age,
            "peers": peers,
        }


def _with_model(payload: Mapping[str, Any], model: str) -> bytes:
    """The request body with ``model`` replaced (a local alias → the id the peer knows)."""
    return json.dumps({**payload, "model": model}).encode()


def _safely(hook: Callable[..., None], *args: object) -> None:
    try:
        hook(*args)
    except Exception:  # noqa: BLE001 - metrics never break a request
        log.debug("metrics hook %s failed", getattr(hook, "__name__", hook), exc_info=True)


def _short(device_id: str) -> str:
    return device_id[:16]
