"""Per-peer health as seen by this node: a circuit breaker and counters.

Pure bookkeeping with an injected ``now`` (no clock reads, no I/O, no tasks).
The forwarder brackets every request to a peer with a :class:`PeerAttempt`
(``book.begin(peer_id, now)`` … ``attempt.succeeded/failed/cancelled``); the
health poller feeds :meth:`PeerHealth.record_report`; the router turns a
:class:`PeerHealthSnapshot` into the ``PeerCandidate`` fields with
:func:`apply_health`.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum

from node.common.ewma import ewma
from node.constants import (
    CIRCUIT_BREAK_MAX_S,
    CIRCUIT_BREAK_MULTIPLIER,
    CIRCUIT_TRIAL_TIMEOUT_S,
    MAX_TRACKED_PEERS,
    OBSERVED_MIN_TOKENS,
    OBSERVED_RATE_ALPHA,
)
from node.offload.policy import PeerCandidate

__all__ = [
    "BreakerSettings",
    "CircuitBreaker",
    "CircuitState",
    "PeerAttempt",
    "PeerHealth",
    "PeerHealthBook",
    "PeerHealthSnapshot",
    "apply_health",
]


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    break_s: float = 30.0
    """seconds a peer is skipped after its first failure (``OffloadConfig.circuit_break_s``)."""
    max_break_s: float = CIRCUIT_BREAK_MAX_S
    multiplier: float = CIRCUIT_BREAK_MULTIPLIER
    trial_timeout_s: float = CIRCUIT_TRIAL_TIMEOUT_S
    alpha: float = OBSERVED_RATE_ALPHA
    min_tokens: int = OBSERVED_MIN_TOKENS

    def __post_init__(self) -> None:
        if not (self.break_s > 0 and self.max_break_s >= self.break_s and self.multiplier >= 1):
            raise ValueError("BreakerSettings: need 0 < break_s <= max_break_s and multiplier >= 1")
        if not 0 < self.alpha <= 1:
            raise ValueError("BreakerSettings: alpha must be in (0, 1]")


class CircuitBreaker:
    """closed → (failure) → open for a back-off → half-open: one trial → closed or open again.

    The open period after ``n`` consecutive failures is
    ``min(max_break_s, break_s * multiplier ** (n - 1))``; a success resets ``n``.
    """

    __slots__ = ("_settings", "_failures", "_open_until", "_trial_started")

    def __init__(self, settings: BreakerSettings | None = None) -> None:
        self._settings = settings or BreakerSettings()
        self._failures = 0
        self._open_until: float | None = None
        self._trial_started: float | None = None

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def state(self, now: float) -> CircuitState:
        if self._open_until is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if now < self._open_until else CircuitState.HALF_OPEN

    def blocked_until(self, now: float) -> float | None:
        """When a request may next be sent (for ``PeerCandidate.circuit_open_until``); None = now."""
        state = self.state(now)
        if state is CircuitState.OPEN:
            return self._open_until
        if state is CircuitState.HALF_OPEN and self._trial_running(now):
            assert self._trial_started is not None
            return self._trial_started + self._settings.trial_timeout_s
        return None

    def try_acquire(self, now: float) -> bool:
        """May one request go out now?  In half-open, only the single trial may."""
        state = self.state(now)
        if state is CircuitState.CLOSED:
            return True
        if state is CircuitState.OPEN or self._trial_running(now):
            return False
        self._trial_started = now
        return True

    def record_success(self, now: float) -> None:
        self._failures = 0
        self._open_until = None
        self._trial_started = None

    def record_failure(self, now: float) -> None:
        self._failures += 1
        s = self._settings
        # exponent capped so a peer failing for days cannot overflow the float
        period = s.break_s * s.multiplier ** min(self._failures - 1, 64)
        self._open_until = now + min(s.max_break_s, period)
        self._trial_started = None

    def release_trial(self, now: float) -> None:
        """A request ended without telling us anything (the client went away): let another try."""
        self._trial_started = None

    def _trial_running(self, now: float) -> bool:
        started = self._trial_started
        return started is not None and now - started < self._settings.trial_timeout_s


@dataclass(frozen=True, slots=True)
class PeerHealthSnapshot:
    device_id: str
    requests: int = 0
    failures: int = 0
    cancelled: int = 0
    tokens: int = 0
    in_flight: int = 0
    observed_tok_per_s: float | None = None
    observed_at: float | None = None
    queue_depth_others: int = 0
    """requests at the peer that are not ours, from its last health report."""
    circuit_state: CircuitState = CircuitState.CLOSED
    circuit_open_until: float | None = None
    consecutive_failures: int = 0


class PeerHealth:
    """One peer's breaker and counters."""

    def __init__(self, device_id: str, settings: BreakerSettings | None = None) -> None:
        self.device_id = device_id
        self._settings = settings or BreakerSettings()
        self.breaker = CircuitBreaker(self._settings)
        self.requests = 0
        self.failures = 0
        self.cancelled = 0
        self.tokens = 0
        self.in_flight = 0
        self.observed_tok_per_s: float | None = None
        self.observed_at: float | None = None
        self.queue_depth_others = 0

    def begin(self, now: float) -> PeerAttempt | None:
        """Start a request to this peer, or None if its circuit does not allow one now."""
        if not self.breaker.try_acquire(now):
            return None
        self.requests += 1
        self.in_flight += 1
        return PeerAttempt(self)

    def record_report(self, now: float, queue_depth: int) -> None:
        """The peer reported ``queue_depth`` requests queued or running (everyone's, ours included).

        Our own requests are subtracted as counted at this moment, so the router can
        add its live ``in_flight`` without counting ours twice.
        """
        reported = queue_depth if isinstance(queue_depth, int) and queue_depth > 0 else 0
        self.queue_depth_others = max(0, reported - self.in_flight)

    def observe(self, now: float, tokens: int, decode_seconds: float) -> None:
        """Fold one response's decode rate into the moving average.

        EWMA with ``alpha`` (default 0.3): the newest sample weighs 0.3 and older
        ones decay by 0.7 per sample, so a real change of speed shows within
        3–5 requests (0.7**3 ≈ 0.34 of the old value left) while one odd reply
        moves the average by only 30 %.  The first sample sets it outright.
        """
        if tokens < self._settings.min_tokens or not (math.isfinite(decode_seconds) and decode_seconds > 0):
            return
        self.observed_tok_per_s = ewma(self.observed_tok_per_s, tokens / decode_seconds, self._settings.alpha)
        self.observed_at = now

    def snapshot(self, now: float) -> PeerHealthSnapshot:
        return PeerHealthSnapshot(
            device_id=self.device_id,
            requests=self.requests,
            failures=self.failures,
            cancelled=self.cancelled,
            tokens=self.tokens,
            in_flight=self.in_flight,
            observed_tok_per_s=self.observed_tok_per_s,
            observed_at=self.observed_at,
            queue_depth_others=self.queue_depth_others,
            circuit_state=self.breaker.state(now),
            circuit_open_until=self.breaker.blocked_until(now),
            consecutive_failures=self.breaker.consecutive_failures,
        )

    def _finish(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)


class PeerAttempt:
    """One request to a peer; exactly one of succeeded/failed/cancelled counts (later calls are no-ops)."""

    __slots__ = ("_health", "_done")

    def __init__(self, health: PeerHealth) -> None:
        self._health = health
        self._done = False

    @property
    def device_id(self) -> str:
        return self._health.device_id

    @property
    def done(self) -> bool:
        return self._done

    def succeeded(self, now: float, *, tokens: int = 0, decode_seconds: float = 0.0) -> None:
        """The peer answered in full; ``decode_seconds`` is first token → last token."""
        if self._close():
            h = self._health
            h.tokens += max(0, tokens)
            h.observe(now, tokens, decode_seconds)
            h.breaker.record_success(now)

    def failed(self, now: float, *, tokens: int = 0) -> None:
        """Connection refused, timeout, 5xx, or a broken stream: opens the circuit."""
        if self._close():
            h = self._health
            h.failures += 1
            h.tokens += max(0, tokens)
            h.breaker.record_failure(now)

    def cancelled(self, now: float, *, tokens: int = 0) -> None:
        """Our client went away: says nothing about the peer's health."""
        if self._close():
            h = self._health
            h.cancelled += 1
            h.tokens += max(0, tokens)
            h.breaker.release_trial(now)

    def _close(self) -> bool:
        if self._done:
            return False
        self._done = True
        self._health._finish()
        return True


class PeerHealthBook:
    """``PeerHealth`` per device id, at most ``max_peers`` of them (idle ones evicted oldest first)."""

    def __init__(self, settings: BreakerSettings | None = None, *, max_peers: int = MAX_TRACKED_PEERS) -> None:
        self._settings = settings or BreakerSettings()
        self._max_peers = max(1, max_peers)
        self._peers: OrderedDict[str, PeerHealth] = OrderedDict()

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._peers

    def get(self, device_id: str) -> PeerHealth:
        health = self._peers.get(device_id)
        if health is None:
            self._evict_for_one()
            health = self._peers[device_id] = PeerHealth(device_id, self._settings)
        self._peers.move_to_end(device_id)
        return health

    def begin(self, device_id: str, now: float) -> PeerAttempt | None:
        return self.get(device_id).begin(now)

    def record_report(self, device_id: str, now: float, queue_depth: int) -> None:
        self.get(device_id).record_report(now, queue_depth)

    def snapshot(self, device_id: str, now: float) -> PeerHealthSnapshot:
        """The peer's snapshot, or an all-zero one for a peer never seen (nothing is created)."""
        health = self._peers.get(device_id)
        return health.snapshot(now) if health is not None else PeerHealthSnapshot(device_id)

    def snapshots(self, now: float) -> list[PeerHealthSnapshot]:
        return [h.snapshot(now) for h in self._peers.values()]

    def forget(self, device_id: str) -> None:
        self._peers.pop(device_id, None)

    def _evict_for_one(self) -> None:
        while len(self._peers) >= self._max_peers:
            victim = next((k for k, h in self._peers.items() if h.in_flight == 0), None)
            if victim is None:
                return  # all busy: in-flight requests are bounded elsewhere, so this stays bounded
            del self._peers[victim]


def apply_health(candidate: PeerCandidate, snapshot: PeerHealthSnapshot) -> PeerCandidate:
    """The candidate with our own measurements filled in: observed rate, load, circuit."""
    return dataclasses.replace(
        candidate,
        observed_tok_per_s=snapshot.observed_tok_per_s,
        observed_at=snapshot.observed_at,
        queue_depth=snapshot.queue_depth_others,
        in_flight=snapshot.in_flight,
        circuit_open_until=snapshot.circuit_open_until,
    )
