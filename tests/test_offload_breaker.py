"""Circuit breaker, per-peer counters and their hand-off to the offload decision."""

from __future__ import annotations

import pytest

from node.offload.breaker import (
    BreakerSettings,
    CircuitBreaker,
    CircuitState,
    PeerHealth,
    PeerHealthBook,
    PeerHealthSnapshot,
    apply_health,
)
from node.offload.policy import OffloadAction, OffloadMode, PeerCandidate, PolicySettings, decide
from tests.test_offload_policy import MODEL, local, peer

T0 = 1_000.0
S = BreakerSettings(break_s=30.0, max_break_s=600.0, multiplier=2.0, trial_timeout_s=90.0, alpha=0.3,
                    min_tokens=8)


def test_closed_breaker_lets_everything_through() -> None:
    b = CircuitBreaker(S)
    assert b.state(T0) is CircuitState.CLOSED
    assert all(b.try_acquire(T0 + i) for i in range(5))
    assert b.blocked_until(T0) is None


def test_failure_opens_for_break_s_then_allows_a_single_trial() -> None:
    b = CircuitBreaker(S)
    b.record_failure(T0)
    assert b.state(T0 + 29.9) is CircuitState.OPEN
    assert not b.try_acquire(T0 + 29.9)
    assert b.blocked_until(T0 + 10) == T0 + 30
    assert b.state(T0 + 30) is CircuitState.HALF_OPEN
    assert b.blocked_until(T0 + 30) is None  # a trial may go
    assert b.try_acquire(T0 + 30)
    assert not b.try_acquire(T0 + 31)  # only one trial at a time
    assert b.blocked_until(T0 + 31) == T0 + 30 + 90


def test_trial_success_closes_and_resets_back_off() -> None:
    b = CircuitBreaker(S)
    b.record_failure(T0)
    b.record_failure(T0)  # two in a row: 60 s
    assert b.consecutive_failures == 2
    assert b.try_acquire(T0 + 60)
    b.record_success(T0 + 61)
    assert b.state(T0 + 61) is CircuitState.CLOSED
    assert b.consecutive_failures == 0
    b.record_failure(T0 + 100)
    assert b.blocked_until(T0 + 100) == T0 + 130  # back to the base period


def test_back_off_doubles_and_is_capped() -> None:
    b = CircuitBreaker(S)
    periods = []
    t = T0
    for _ in range(9):
        assert b.try_acquire(t)
        b.record_failure(t)
        until = b.blocked_until(t)
        assert until is not None
        periods.append(until - t)
        t = until
    assert periods == [30, 60, 120, 240, 480, 600, 600, 600, 600]


def test_huge_failure_counts_do_not_overflow() -> None:
    b = CircuitBreaker(S)
    for _ in range(5000):
        b.record_failure(T0)
    assert b.blocked_until(T0) == T0 + 600


def test_unreported_trial_stops_blocking_after_the_trial_timeout() -> None:
    b = CircuitBreaker(S)
    b.record_failure(T0)
    assert b.try_acquire(T0 + 30)
    assert not b.try_acquire(T0 + 119.9)
    assert b.try_acquire(T0 + 120)


def test_breaker_settings_are_validated() -> None:
    with pytest.raises(ValueError):
        BreakerSettings(break_s=0)
    with pytest.raises(ValueError):
        BreakerSettings(break_s=60, max_break_s=30)
    with pytest.raises(ValueError):
        BreakerSettings(alpha=0)
    with pytest.raises(ValueError):
        BreakerSettings(multiplier=0.5)


# --- per-peer counters ----------------------------------------------------------------------------


def test_attempt_counts_requests_tokens_and_in_flight() -> None:
    h = PeerHealth("p", S)
    a = h.begin(T0)
    b = h.begin(T0)
    assert a is not None and b is not None
    assert (h.requests, h.in_flight) == (2, 2)
    a.succeeded(T0 + 5, tokens=100, decode_seconds=4.0)
    a.succeeded(T0 + 6, tokens=100, decode_seconds=4.0)  # second report ignored
    a.failed(T0 + 6)
    assert (h.in_flight, h.tokens, h.failures) == (1, 100, 0)
    assert h.observed_tok_per_s == 25.0 and h.observed_at == T0 + 5
    b.failed(T0 + 7, tokens=12)
    assert (h.in_flight, h.tokens, h.failures) == (0, 112, 1)
    assert a.done and b.done
    assert h.begin(T0 + 8) is None  # circuit open now
    assert h.requests == 2


def test_observed_rate_is_an_ewma_with_alpha() -> None:
    h = PeerHealth("p", S)
    for tokens, seconds in [(100, 5.0), (100, 2.5), (100, 10.0)]:
        attempt = h.begin(T0)
        assert attempt is not None
        attempt.succeeded(T0, tokens=tokens, decode_seconds=seconds)
    first = 20.0
    second = 0.3 * 40.0 + 0.7 * first
    third = 0.3 * 10.0 + 0.7 * second
    assert h.observed_tok_per_s == pytest.approx(third)


@pytest.mark.parametrize(("tokens", "seconds"), [(7, 1.0), (100, 0.0), (100, -1.0), (100, float("nan")),
                                                 (100, float("inf"))])
def test_useless_samples_do_not_move_the_average(tokens: int, seconds: float) -> None:
    h = PeerHealth("p", S)
    h.observe(T0, 100, 4.0)
    h.observe(T0 + 1, tokens, seconds)
    assert h.observed_tok_per_s == 25.0
    assert h.observed_at == T0


def test_cancelled_attempt_releases_the_trial_without_judging_the_peer() -> None:
    h = PeerHealth("p", S)
    first = h.begin(T0)
    assert first is not None
    first.failed(T0)
    trial = h.begin(T0 + 30)
    assert trial is not None
    assert h.begin(T0 + 31) is None
    trial.cancelled(T0 + 32, tokens=3)
    assert (h.cancelled, h.failures, h.tokens, h.in_flight) == (1, 1, 3, 0)
    assert h.breaker.state(T0 + 32) is CircuitState.HALF_OPEN
    assert h.begin(T0 + 33) is not None


def test_report_subtracts_our_own_in_flight() -> None:
    h = PeerHealth("p", S)
    assert h.begin(T0) is not None and h.begin(T0) is not None
    h.record_report(T0, 5)
    assert h.queue_depth_others == 3
    h.record_report(T0, 1)  # stale report: never negative
    assert h.queue_depth_others == 0
    h.record_report(T0, -7)
    assert h.queue_depth_others == 0


def test_snapshot_reflects_state() -> None:
    h = PeerHealth("p", S)
    a = h.begin(T0)
    assert a is not None
    a.failed(T0)
    snap = h.snapshot(T0 + 1)
    assert snap == PeerHealthSnapshot(device_id="p", requests=1, failures=1, circuit_state=CircuitState.OPEN,
                                      circuit_open_until=T0 + 30, consecutive_failures=1)


# --- the book -------------------------------------------------------------------------------------


def test_book_snapshot_of_unknown_peer_creates_nothing() -> None:
    book = PeerHealthBook(S)
    assert book.snapshot("ghost", T0) == PeerHealthSnapshot("ghost")
    assert "ghost" not in book and len(book) == 0


def test_book_is_bounded_and_evicts_idle_peers_oldest_first() -> None:
    book = PeerHealthBook(S, max_peers=2)
    busy = book.begin("busy", T0)
    assert busy is not None
    book.get("idle-old")
    book.get("new")  # evicts idle-old, keeps busy
    assert "busy" in book and "new" in book and "idle-old" not in book
    for i in range(100):
        book.get(f"flood-{i}")
    assert len(book) <= 2
    assert "busy" in book


def test_book_record_report_and_forget() -> None:
    book = PeerHealthBook(S)
    book.record_report("p", T0, 4)
    assert book.snapshot("p", T0).queue_depth_others == 4
    assert [s.device_id for s in book.snapshots(T0)] == ["p"]
    book.forget("p")
    assert "p" not in book


# --- hand-off to decide() -------------------------------------------------------------------------


def candidate_from(book: PeerHealthBook, base: PeerCandidate, now: float) -> PeerCandidate:
    return apply_health(base, book.snapshot(base.device_id, now))


def test_breaker_state_flows_into_the_decision() -> None:
    book = PeerHealthBook(S)
    base = peer("fast", verified=40.0, verified_at=T0)
    policy = PolicySettings(min_local_capability=10.0)

    def choose(now: float):
        return decide(OffloadMode.PREFER, local(4.2), [candidate_from(book, base, now)], MODEL, policy, now)

    assert choose(T0).action is OffloadAction.FORWARD
    attempt = book.begin("fast", T0)
    assert attempt is not None
    attempt.failed(T0 + 1)
    d = choose(T0 + 2)
    assert d.action is OffloadAction.LOCAL
    assert d.checked[1].reason.value == "circuit open"
    assert choose(T0 + 31).action is OffloadAction.FORWARD  # half-open: a trial may go
    trial = book.begin("fast", T0 + 31)
    assert trial is not None
    assert choose(T0 + 32).checked[1].reason.value == "circuit open"  # while the trial runs
    trial.succeeded(T0 + 40, tokens=100, decode_seconds=10.0)
    c = candidate_from(book, base, T0 + 41)
    assert (c.observed_tok_per_s, c.in_flight, c.circuit_open_until) == (10.0, 0, None)
    d = choose(T0 + 41)
    assert d.action is OffloadAction.FORWARD  # observed 10 tok/s is still ≥ threshold
    assert d.checked[1].capability_score == 10.0


def test_in_flight_from_the_book_steers_ranking() -> None:
    book = PeerHealthBook(S)
    fast = peer("fast", verified=40.0, verified_at=T0)
    mid = peer("mid", verified=20.0, verified_at=T0)
    policy = PolicySettings(min_local_capability=10.0)
    chosen = []
    for _ in range(6):
        cands = [candidate_from(book, p, T0) for p in (fast, mid)]
        d = decide(OffloadMode.PREFER, local(4.2), cands, MODEL, policy, T0)
        chosen.append(d.peers[0].device_id)
        assert book.begin(d.peers[0].device_id, T0) is not None
    # shares follow speed: fast takes 4 of 6, mid 2 (40/(1+n) vs 20/(1+m))
    assert chosen.count("fast") == 4 and chosen.count("mid") == 2
