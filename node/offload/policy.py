"""The offload decision: run a request here, forward it to a peer, or refuse.

Pure functions over plain data, no I/O: the router gathers the local state
and one ``PeerCandidate`` per known peer, calls :func:`decide` with an
injected ``now``, and acts on the :class:`OffloadDecision`.  See
``docs/offload.md`` for the rules in prose.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from node.capability.curve import Curve, clean_curve, marginal_rate, scale_curve, single_point
from node.common.errors import InvalidRequestError, ServiceUnavailableError
from node.constants import (
    NO_CAPABLE_DEVICE_RETRY_AFTER,
    OFFLOAD_HEADER,
    OFFLOAD_MAX_FORWARD_ATTEMPTS,
    OFFLOAD_OBSERVED_MAX_AGE_S,
)

if TYPE_CHECKING:
    from node.config import OffloadConfig

__all__ = [
    "CheckedDevice",
    "LocalState",
    "NoCapableDeviceError",
    "OffloadAction",
    "OffloadDecision",
    "OffloadMode",
    "PeerCandidate",
    "PolicySettings",
    "Reason",
    "SELF_DEVICE_ID",
    "decide",
    "decode_share",
    "local_marginal_rate",
    "no_capable_device_body",
    "parse_offload_header",
    "peer_marginal_rate",
    "ranking_score",
    "single_stream_rate",
]

SELF_DEVICE_ID = "self"
"""How the local device is named in ``checked`` (the reference's spelling)."""


class OffloadMode(StrEnum):
    """The ``X-DVAI-Offload`` header values."""

    PREFER = "prefer"
    NEVER = "never"
    REQUIRE = "require"


class OffloadAction(StrEnum):
    LOCAL = "local"
    FORWARD = "forward"
    REFUSE = "refuse"


class Reason(StrEnum):
    """Why a device in ``checked`` was used or not (first failing rule wins)."""

    SELECTED = "selected"
    QUALIFIED = "qualified"
    BELOW_THRESHOLD = "below threshold"
    NO_CAPABILITY = "no capability score"
    NOT_PAIRED = "not paired"
    UNREACHABLE = "unreachable"
    MODEL_NOT_SERVED = "model not served"
    CIRCUIT_OPEN = "circuit open"
    UNVERIFIED = "unverified"
    VERIFICATION_STALE = "verification stale"
    NOT_FASTER = "not faster than local"
    IS_SELF = "this device"
    DUPLICATE = "duplicate"


def parse_offload_header(value: str | None) -> OffloadMode:
    """``X-DVAI-Offload`` → mode; absent or blank means ``prefer``; anything else is a 400."""
    if value is None:
        return OffloadMode.PREFER
    text = value.strip().lower()
    if not text:
        return OffloadMode.PREFER
    try:
        return OffloadMode(text)
    except ValueError:
        accepted = ", ".join(m.value for m in OffloadMode)
        shown = value if len(value) <= 40 else value[:40] + "…"
        raise InvalidRequestError(
            f"Invalid {OFFLOAD_HEADER} header {shown!r}: expected one of {accepted}",
            param=OFFLOAD_HEADER,
            code="invalid_offload_header",
        ) from None


@dataclass(frozen=True, slots=True)
class LocalState:
    """This device, for the requested model."""

    device_id: str
    model_id: str
    capability: float | None
    """decode tok/s for ``model_id``; None when never measured (or the model is not served here)."""
    capability_source: str = "probe"
    """where ``capability`` came from: "probe", "heuristic" or "none"."""
    queue_depth: int = 0
    """requests waiting or running on the model here (this one not included)."""
    in_flight: int = 0
    curve: Curve = ()
    """aggregate tok/s by concurrency for ``model_id`` (its shape is anchored at ``capability``);
    empty means one point: ``capability`` for one stream, no gain from running more."""


@dataclass(frozen=True, slots=True)
class PeerCandidate:
    """One peer as the router sees it at decision time."""

    device_id: str
    device_name: str
    paired: bool
    reachable: bool
    models: frozenset[str]
    """model ids and aliases the peer serves."""
    claimed_tok_per_s: float | None
    """the peer's own figure: advisory, never enough to qualify it."""
    verified_tok_per_s: float | None
    """measured by us with a signed probe through the network."""
    verified_at: float | None
    observed_tok_per_s: float | None
    """decode rate of our requests forwarded to it (moving average)."""
    queue_depth: int
    """requests queued or running at the peer that are not ours, from its last health
    report (see ``PeerHealth.record_report``: the reported total minus our requests in
    flight at that moment), so adding ``in_flight`` does not count ours twice."""
    in_flight: int
    """our requests in flight to it right now."""
    circuit_open_until: float | None
    via: str
    observed_at: float | None = None
    """when ``observed_tok_per_s`` was last updated; None means "treat as stale"."""
    curve: Curve = ()
    """the peer's claimed capability curve (aggregate tok/s by concurrency, from discovery or
    its health report). Only its *shape* is used, bounded by ``clean_curve`` and anchored at
    our own measured rate; empty means one point."""


@dataclass(frozen=True, slots=True)
class PolicySettings:
    min_local_capability: float = 10.0
    """tok/s a device must reach to serve a request (the reference's ``minLocalCapability``)."""
    verify_max_age: float = 600.0
    """seconds a verified capability stays valid."""
    observed_max_age: float = OFFLOAD_OBSERVED_MAX_AGE_S
    """seconds an observed rate is preferred over the verified one."""
    max_forward_attempts: int = OFFLOAD_MAX_FORWARD_ATTEMPTS
    """peers in a forward decision: the best plus fallbacks tried before the first byte."""

    @classmethod
    def from_config(cls, config: OffloadConfig) -> PolicySettings:
        return cls(
            min_local_capability=config.min_local_capability,
            verify_max_age=config.verify_max_age,
        )


@dataclass(frozen=True, slots=True)
class CheckedDevice:
    device_id: str
    capability_score: float | None
    reason: Reason

    def to_json(self) -> dict[str, Any]:
        return {
            "deviceId": self.device_id,
            "capabilityScore": _json_number(self.capability_score),
            "reason": self.reason.value,
        }


@dataclass(frozen=True, slots=True)
class OffloadDecision:
    action: OffloadAction
    mode: OffloadMode
    peers: tuple[PeerCandidate, ...]
    """for FORWARD: best first, then fallbacks; empty otherwise."""
    checked: tuple[CheckedDevice, ...]
    """self first, then every distinct candidate in input order."""
    needs_verification: tuple[str, ...]
    """peers that might qualify once probed; empty when the decision cannot use peers."""
    why: str
    """one line for logs."""

    @property
    def checked_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.checked]


def effective_tok_per_s(peer: PeerCandidate, settings: PolicySettings, now: float) -> float | None:
    """Our own measurement of the peer: observed if fresh, else verified (any age); never the claim."""
    observed = _clean_rate(peer.observed_tok_per_s)
    if observed is not None and _fresh(peer.observed_at, settings.observed_max_age, now):
        return observed
    return _clean_rate(peer.verified_tok_per_s)


def ranking_score(rate: float, queue_depth: int, in_flight: int, curve: Curve = ()) -> float:
    """Expected tok/s a new request gets from a device, given the work ahead of it.

    ``marginal_rate`` of the device's curve (``curve``'s shape anchored at ``rate``, one
    point when empty) with ``n = queue_depth + in_flight`` requests already there: the
    aggregate rate with ``n + 1`` sequences, shared among them. A batching engine decodes
    the ``n + 1`` together and its aggregate grows with concurrency up to its last measured
    point; past that (or with a one-point curve) the aggregate stays flat, and each
    request sees ``rate / (n + 1)``: the same whether it waits for the ``n`` ahead of it
    or shares the steps with them. Picking the maximum minimises expected completion time.
    """
    load = max(0, queue_depth) + max(0, in_flight)
    return marginal_rate(_anchored(curve, rate), load)


def decode_share(curve: Curve, concurrency: int) -> float:
    """Each sequence's decode rate with ``concurrency`` requests at a device, relative to its
    rate alone, from the (untrusted) curve's shape: how a rate observed there under load maps
    back to the single-stream rate the curve is anchored at.

    Only the sequences a batching engine decodes together share the steps; requests past its
    seats wait and then decode at their own full share, so the count is capped at the curve's
    last level (the seats are at least that many; capping errs toward a lower estimate).
    A one-point curve (an engine serving one request at a time, or an older peer) gives 1:
    its decode rate does not depend on the queue.
    """
    cleaned = clean_curve(curve) if curve else ()
    if len(cleaned) < 2:
        return 1.0
    sequences = min(max(1, concurrency), cleaned[-1][0])
    return marginal_rate(cleaned, sequences - 1) / cleaned[0][1]


def single_stream_rate(measured: float, share: float, best_measured: float | None) -> float:
    """The single-stream rate a peer's curve is anchored at, from a rate ``measured`` there while
    this request's decode ``share`` was below 1 (``decode_share``), never above the best rate
    actually measured there (``best_measured``, this one included).

    ``share`` comes from the peer's own claims (its curve and its reported load), so it may
    only explain a low measurement, never lift a peer above what it has delivered to us: a
    peer claiming to be busy with a flat curve gains nothing."""
    if not (share > 0 and math.isfinite(measured)):
        return measured
    return min(measured / share, max(measured, best_measured or 0.0))


def local_marginal_rate(local: LocalState) -> float | None:
    """What a new request would get here: this device's curve with its own running count."""
    rate = _clean_rate(local.capability)
    if rate is None:
        return None
    return ranking_score(rate, local.queue_depth, local.in_flight, local.curve)


def peer_marginal_rate(peer: PeerCandidate, rate: float) -> float:
    """What a new request would get at ``peer`` measured at ``rate`` (its claimed curve's shape)."""
    return ranking_score(rate, peer.queue_depth, peer.in_flight, peer.curve)


def decide(
    mode: OffloadMode,
    local: LocalState,
    candidates: Sequence[PeerCandidate],
    model: str,
    settings: PolicySettings,
    now: float,
    hop: bool = False,
) -> OffloadDecision:
    """Where to run one request; see the module docs and ``docs/offload.md``."""
    mode = OffloadMode(mode)
    threshold = settings.min_local_capability
    local_rate = _clean_rate(local.capability)
    local_marginal = local_marginal_rate(local)
    local_ok = local_marginal is not None and local_marginal >= threshold
    evaluated = _evaluate_peers(local, candidates, model, settings, now, local_marginal or 0.0)
    qualified = [e for e in evaluated if e.reason is Reason.QUALIFIED]
    ranked = sorted(qualified, key=_rank_key)

    if hop:
        return _local(mode, local_rate, evaluated, "hop marker: never forwarded again")
    if mode is OffloadMode.NEVER:
        return _local(mode, local_rate, evaluated, "X-DVAI-Offload: never")
    if local_ok:
        return _local(mode, local_rate, evaluated, "local capability meets the threshold")

    pending = tuple(e.peer.device_id for e in evaluated if e.needs_verification)
    if ranked:
        chosen = ranked[: max(1, settings.max_forward_attempts)]
        selected_id = chosen[0].peer.device_id
        # self is shown with the rate it was judged by: its marginal rate at its current load
        checked = [_self_checked(local_marginal, Reason.NO_CAPABILITY if local_rate is None
                                 else Reason.BELOW_THRESHOLD)]
        for e in evaluated:
            reason = Reason.SELECTED if e.peer.device_id == selected_id and e.reason is Reason.QUALIFIED \
                else e.reason
            checked.append(CheckedDevice(e.peer.device_id, e.score, reason))
        return OffloadDecision(
            OffloadAction.FORWARD, mode, tuple(e.peer for e in chosen), tuple(checked), pending,
            f"forward to {selected_id} ({len(chosen) - 1} fallback(s))",
        )
    if mode is OffloadMode.PREFER:
        return _local(mode, local_rate, evaluated, "no qualified peer: running locally anyway", pending)
    if local_rate is not None and local_rate >= threshold:
        # Capable but busy: its queue, not its speed, put the marginal rate below the threshold.
        return _local(mode, local_rate, evaluated, "local capability meets the threshold (busy; no faster peer)",
                      pending)
    reason = Reason.NO_CAPABILITY if local_rate is None else Reason.BELOW_THRESHOLD
    checked = [_self_checked(local_marginal, reason)]
    checked += [CheckedDevice(e.peer.device_id, e.score, e.reason) for e in evaluated]
    return OffloadDecision(
        OffloadAction.REFUSE, mode, (), tuple(checked), pending, "require: no device meets the threshold",
    )


def no_capable_device_body(
    decision: OffloadDecision,
    *,
    model: str,
    local_capability: float | None,
    required_at_least: float,
    rendezvous_configured: bool,
    paired_remote_peers: int,
    request_id: str,
) -> dict[str, Any]:
    """The reference's ``no_capable_device`` body, field for field and in its order."""
    return {
        "error": {
            "type": "no_capable_device",
            "code": 503,
            "message": f"No device with capability ≥ {_format_number(required_at_least)} tok/s "
                       f"for model {model} was reachable.",
            "checked": decision.checked_json,
            "localCapability": _json_number(_clean_rate(local_capability)),
            "requiredAtLeast": _json_number(required_at_least),
            "rendezvousConfigured": bool(rendezvous_configured),
            "pairedRemotePeers": int(paired_remote_peers),
            "requestId": request_id,
        }
    }


class NoCapableDeviceError(ServiceUnavailableError):
    """503 + ``Retry-After: 30`` with the reference's ``no_capable_device`` body (no ``param``)."""

    error_type = "no_capable_device"

    def __init__(self, body: Mapping[str, Any]) -> None:
        error = body["error"]
        super().__init__(str(error["message"]), retry_after=NO_CAPABLE_DEVICE_RETRY_AFTER, code=503)
        self._body = {"error": dict(error)}

    @classmethod
    def from_decision(
        cls,
        decision: OffloadDecision,
        *,
        model: str,
        local_capability: float | None,
        required_at_least: float,
        rendezvous_configured: bool,
        paired_remote_peers: int,
        request_id: str,
    ) -> NoCapableDeviceError:
        return cls(no_capable_device_body(
            decision,
            model=model,
            local_capability=local_capability,
            required_at_least=required_at_least,
            rendezvous_configured=rendezvous_configured,
            paired_remote_peers=paired_remote_peers,
            request_id=request_id,
        ))

    def to_body(self) -> dict[str, Any]:
        error = dict(self._body["error"])
        error["checked"] = [dict(c) for c in error["checked"]]
        return {"error": error}


# --- private helpers ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Evaluated:
    peer: PeerCandidate
    reason: Reason
    score: float | None
    """our measured tok/s (shown as ``capabilityScore``), never the claim."""
    needs_verification: bool = False
    marginal: float = 0.0
    """what a new request would get there (``peer_marginal_rate``): the ranking key."""


def _evaluate_peers(
    local: LocalState,
    candidates: Iterable[PeerCandidate],
    model: str,
    settings: PolicySettings,
    now: float,
    local_rate: float,
) -> list[_Evaluated]:
    seen: set[str] = set()
    out: list[_Evaluated] = []
    for peer in candidates:
        if peer.device_id in seen:
            continue  # listed once: the first entry for a device id wins
        seen.add(peer.device_id)
        out.append(_evaluate_peer(peer, local, model, settings, now, local_rate))
    return out


def _evaluate_peer(
    peer: PeerCandidate,
    local: LocalState,
    model: str,
    settings: PolicySettings,
    now: float,
    local_rate: float,
) -> _Evaluated:
    """``local_rate``: this device's marginal rate (its curve at its own load)."""
    threshold = settings.min_local_capability
    score = effective_tok_per_s(peer, settings, now)
    if peer.device_id in (local.device_id, SELF_DEVICE_ID):
        return _Evaluated(peer, Reason.IS_SELF, score)
    if not peer.paired:
        return _Evaluated(peer, Reason.NOT_PAIRED, score)
    if not peer.reachable:
        return _Evaluated(peer, Reason.UNREACHABLE, score)
    if model not in peer.models:
        return _Evaluated(peer, Reason.MODEL_NOT_SERVED, score)
    if peer.circuit_open_until is not None and now < peer.circuit_open_until:
        return _Evaluated(peer, Reason.CIRCUIT_OPEN, score)
    verified = _clean_rate(peer.verified_tok_per_s)
    if verified is None or peer.verified_at is None:
        return _Evaluated(peer, Reason.UNVERIFIED, None, _worth_probing(peer, None, threshold, local_rate))
    if not _fresh(peer.verified_at, settings.verify_max_age, now):
        worth = _worth_probing(peer, verified, threshold, local_rate)
        return _Evaluated(peer, Reason.VERIFICATION_STALE, score, worth)
    assert score is not None  # verified is set, so the effective rate is too
    if score < threshold:
        return _Evaluated(peer, Reason.BELOW_THRESHOLD, score)
    marginal = peer_marginal_rate(peer, score)
    if marginal <= local_rate:
        return _Evaluated(peer, Reason.NOT_FASTER, score, marginal=marginal)
    return _Evaluated(peer, Reason.QUALIFIED, score, marginal=marginal)


def _worth_probing(peer: PeerCandidate, last_verified: float | None, threshold: float, local_rate: float) -> bool:
    """Probe a peer whose claim (or, lacking one, last measurement) could qualify it, or that says nothing."""
    prospect = _clean_rate(peer.claimed_tok_per_s)
    if prospect is None:
        prospect = last_verified
    return prospect is None or (prospect >= threshold and prospect > local_rate)


def _rank_key(e: _Evaluated) -> tuple[float, int, str]:
    return (-e.marginal, max(0, e.peer.in_flight), e.peer.device_id)


def _anchored(curve: Curve, rate: float) -> Curve:
    """``curve`` (untrusted: cleaned first) with its shape anchored at ``rate`` for one stream."""
    cleaned = clean_curve(curve) if curve else ()
    return scale_curve(cleaned, rate) if cleaned else single_point(rate)


def _local(
    mode: OffloadMode,
    local_rate: float | None,
    evaluated: list[_Evaluated],
    why: str,
    pending: tuple[str, ...] = (),
) -> OffloadDecision:
    checked = [_self_checked(local_rate, Reason.SELECTED)]
    checked += [CheckedDevice(e.peer.device_id, e.score, e.reason) for e in evaluated]
    return OffloadDecision(OffloadAction.LOCAL, mode, (), tuple(checked), pending, why)


def _self_checked(local_rate: float | None, reason: Reason) -> CheckedDevice:
    return CheckedDevice(SELF_DEVICE_ID, local_rate, reason)


def _clean_rate(value: float | None) -> float | None:
    """A usable tok/s figure, or None for missing, negative, NaN or infinite values."""
    if value is None or isinstance(value, bool):
        return None
    try:
        rate = float(value)
    except (TypeError, ValueError):
        return None
    return rate if math.isfinite(rate) and rate >= 0 else None


def _fresh(at: float | None, max_age: float, now: float) -> bool:
    return at is not None and math.isfinite(at) and now - at <= max_age


def _json_number(value: float | None) -> float | int | None:
    """Whole numbers as ints (``10`` not ``10.0``, as the reference prints), others to 2 decimals."""
    if value is None:
        return None
    if float(value).is_integer():
        return int(value)
    return round(float(value), 2)


def _format_number(value: float) -> str:
    number = _json_number(value)
    return str(number)
