"""The offload decision table, ranking, the no_capable_device body and header parsing."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.common.errors import InvalidRequestError, ServiceUnavailableError
from node.constants import NO_CAPABLE_DEVICE_RETRY_AFTER
from node.offload.policy import (
    LocalState,
    NoCapableDeviceError,
    OffloadAction,
    OffloadMode,
    PeerCandidate,
    PolicySettings,
    Reason,
    decide,
    no_capable_device_body,
    parse_offload_header,
    ranking_score,
)

NOW = 100_000.0
MODEL = "gemma3-270m"
ALIAS = "gemma"
SETTINGS = PolicySettings(min_local_capability=10.0, verify_max_age=600.0, observed_max_age=120.0,
                          max_forward_attempts=3)


def local(capability: float | None = 4.2, **kw: object) -> LocalState:
    return LocalState(device_id="dev-local", model_id=MODEL, capability=capability,
                      capability_source="probe", **kw)  # type: ignore[arg-type]


def peer(
    device_id: str = "peer-a",
    *,
    verified: float | None = 30.0,
    verified_at: float | None = NOW - 10,
    claimed: float | None = None,
    paired: bool = True,
    reachable: bool = True,
    models: tuple[str, ...] = (MODEL, ALIAS),
    observed: float | None = None,
    observed_at: float | None = None,
    queue: int = 0,
    in_flight: int = 0,
    circuit: float | None = None,
) -> PeerCandidate:
    return PeerCandidate(
        device_id=device_id, device_name=device_id.upper(), paired=paired, reachable=reachable,
        models=frozenset(models), claimed_tok_per_s=claimed, verified_tok_per_s=verified,
        verified_at=verified_at, observed_tok_per_s=observed, queue_depth=queue, in_flight=in_flight,
        circuit_open_until=circuit, via="mdns", observed_at=observed_at,
    )


def run(mode: str, loc: LocalState, peers: list[PeerCandidate], *, model: str = MODEL, hop: bool = False,
        s: PolicySettings = SETTINGS):
    return decide(OffloadMode(mode), loc, peers, model, s, NOW, hop=hop)


def reasons(decision) -> list[tuple[str, str]]:
    return [(c.device_id, c.reason.value) for c in decision.checked]


def targets(decision) -> list[str]:
    return [p.device_id for p in decision.peers]


# --- header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "mode"),
    [(None, "prefer"), ("", "prefer"), ("   ", "prefer"), ("prefer", "prefer"), ("never", "never"),
     ("require", "require"), ("NEVER", "never"), (" Require ", "require"), ("\tPrefer\n", "prefer")],
)
def test_header_values(value: str | None, mode: str) -> None:
    assert parse_offload_header(value) is OffloadMode(mode)


@pytest.mark.parametrize("value", ["maybe", "prefer,never", "yes", "pre fer", "0", "x" * 5000])
def test_header_bad_value_is_400_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_offload_header(value)
    err = info.value
    assert err.status == 400
    assert err.param == "X-DVAI-Offload"
    assert "prefer, never, require" in err.message
    assert len(err.message) < 200  # a hostile header is not echoed whole
    assert err.to_body()["error"]["param"] == "X-DVAI-Offload"


# --- the decision table ---------------------------------------------------------------------------


@pytest.mark.parametrize("local_cap", [4.2, 25.0, None])
def test_never_is_always_local(local_cap: float | None) -> None:
    d = run("never", local(local_cap), [peer(verified=100.0)])
    assert d.action is OffloadAction.LOCAL
    assert d.peers == ()
    assert d.needs_verification == ()
    assert reasons(d) == [("self", "selected"), ("peer-a", "qualified")]


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_local_meeting_the_threshold_runs_locally_even_with_a_faster_peer(mode: str) -> None:
    d = run(mode, local(12.0), [peer(verified=100.0), peer("peer-b", verified=None, claimed=200.0)])
    assert d.action is OffloadAction.LOCAL
    assert reasons(d) == [("self", "selected"), ("peer-a", "qualified"), ("peer-b", "unverified")]
    assert d.needs_verification == ()  # no probe traffic when the answer cannot change


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_local_exactly_at_threshold_is_enough(mode: str) -> None:
    assert run(mode, local(10.0), [peer(verified=100.0)]).action is OffloadAction.LOCAL


@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_slow_local_forwards_to_a_qualified_peer(mode: str) -> None:
    d = run(mode, local(4.2), [peer(verified=30.0)])
    assert d.action is OffloadAction.FORWARD
    assert targets(d) == ["peer-a"]
    assert reasons(d) == [("self", "below threshold"), ("peer-a", "selected")]
    assert d.checked[0].capability_score == 4.2
    assert d.checked[1].capability_score == 30.0


def test_peer_exactly_at_threshold_qualifies() -> None:
    assert targets(run("require", local(4.2), [peer(verified=10.0)])) == ["peer-a"]


def test_prefer_without_peers_runs_locally_anyway() -> None:
    d = run("prefer", local(4.2), [])
    assert d.action is OffloadAction.LOCAL
    assert reasons(d) == [("self", "selected")]


def test_require_without_peers_refuses() -> None:
    d = run("require", local(4.2), [])
    assert d.action is OffloadAction.REFUSE
    assert reasons(d) == [("self", "below threshold")]


def test_unmeasured_local_counts_as_below_threshold() -> None:
    refused = run("require", local(None), [])
    assert refused.action is OffloadAction.REFUSE
    assert refused.checked[0].to_json() == {"deviceId": "self", "capabilityScore": None,
                                            "reason": "no capability score"}
    assert targets(run("prefer", local(None), [peer(verified=10.0)])) == ["peer-a"]


PEER_STATES = {
    "not paired": dict(paired=False),
    "unreachable": dict(reachable=False),
    "unverified": dict(verified=None, verified_at=None, claimed=100.0),
    "verification stale": dict(verified_at=NOW - 601.0, claimed=100.0),
    "below threshold": dict(claimed=100.0, verified=5.0),
    "circuit open": dict(circuit=NOW + 5.0),
    "model not served": dict(models=("llama-3-8b",)),
}


@pytest.mark.parametrize("state", sorted(PEER_STATES))
@pytest.mark.parametrize("mode", ["prefer", "require"])
def test_unqualified_peer_is_never_used(state: str, mode: str) -> None:
    d = run(mode, local(4.2), [peer(**PEER_STATES[state])])  # type: ignore[arg-type]
    assert d.peers == ()
    assert d.action is (OffloadAction.LOCAL if mode == "prefer" else OffloadAction.REFUSE)
    self_reason = "selected" if mode == "prefer" else "below threshold"
    assert reasons(d) == [("self", self_reason), ("peer-a", state)]


@pytest.mark.parametrize("state", ["unverified", "verification stale"])
def test_unverified_peer_is_listed_for_verification_then_used(state: str) -> None:
    candidate = peer(**PEER_STATES[state])  # type: ignore[arg-type]
    first = run("require", local(4.2), [candidate])
    assert first.action is OffloadAction.REFUSE
    assert first.needs_verification == ("peer-a",)
    probed = dataclasses.replace(candidate, verified_tok_per_s=25.0, verified_at=NOW)
    second = run("require", local(4.2), [probed])
    assert targets(second) == ["peer-a"]
    assert second.needs_verification == ()


def test_claims_alone_never_qualify_and_low_claims_are_not_probed() -> None:
    d = run("prefer", local(4.2), [
        peer("claims-high", verified=None, verified_at=None, claimed=1000.0),
        peer("claims-low", verified=None, verified_at=None, claimed=3.0),
        peer("claims-nothing", verified=None, verified_at=None),
        peer("not-faster-claim", verified=None, verified_at=None, claimed=4.0),
    ])
    assert d.action is OffloadAction.LOCAL
    assert d.needs_verification == ("claims-high", "claims-nothing")
    assert all(c.capability_score is None for c in d.checked[1:])  # claims are never shown as scores


def test_stale_verification_with_a_low_last_figure_and_no_claim_is_not_reprobed() -> None:
    d = run("require", local(4.2), [peer(verified=3.0, verified_at=NOW - 700)])
    assert reasons(d)[1] == ("peer-a", "verification stale")
    assert d.needs_verification == ()


def test_claims_high_but_verified_low_is_not_preferred() -> None:
    d = run("prefer", local(4.2), [peer("liar", claimed=500.0, verified=8.0),
                                   peer("honest", claimed=15.0, verified=15.0)])
    assert targets(d) == ["honest"]
    assert reasons(d) == [("self", "below threshold"), ("liar", "below threshold"), ("honest", "selected")]


def test_expired_circuit_qualifies_again() -> None:
    assert targets(run("require", local(4.2), [peer(circuit=NOW - 0.001)])) == ["peer-a"]
    assert targets(run("require", local(4.2), [peer(circuit=NOW)])) == ["peer-a"]


def test_alias_and_id_both_match() -> None:
    for requested in (MODEL, ALIAS):
        assert targets(run("require", local(4.2), [peer()], model=requested)) == ["peer-a"]
    only_alias = peer(models=(ALIAS,))
    assert targets(run("require", local(4.2), [only_alias], model=ALIAS)) == ["peer-a"]
    assert reasons(run("require", local(4.2), [only_alias], model=MODEL))[1] == ("peer-a", "model not served")


def test_slower_peer_is_reported_not_faster_than_local() -> None:
    s = dataclasses.replace(SETTINGS, min_local_capability=5.0)
    d = run("prefer", local(20.0), [peer(verified=12.0)], s=s)
    assert reasons(d) == [("self", "selected"), ("peer-a", "not faster than local")]


@pytest.mark.parametrize("mode", ["prefer", "never", "require"])
def test_hop_marker_is_always_local(mode: str) -> None:
    d = run(mode, local(1.0), [peer(verified=100.0)], hop=True)
    assert d.action is OffloadAction.LOCAL
    assert d.peers == ()
    assert d.needs_verification == ()
    assert "hop" in d.why


def test_fresh_observed_rate_overrides_verified() -> None:
    slow_in_practice = peer(verified=30.0, observed=6.0, observed_at=NOW - 5)
    d = run("require", local(4.2), [slow_in_practice])
    assert d.action is OffloadAction.REFUSE
    assert reasons(d)[1] == ("peer-a", "below threshold")
    assert d.checked[1].capability_score == 6.0
    stale_observation = dataclasses.replace(slow_in_practice, observed_at=NOW - 121)
    assert targets(run("require", local(4.2), [stale_observation])) == ["peer-a"]


def test_observation_without_fresh_verification_does_not_qualify() -> None:
    d = run("require", local(4.2), [peer(verified=None, verified_at=None, observed=50.0, observed_at=NOW)])
    assert d.action is OffloadAction.REFUSE
    assert reasons(d)[1] == ("peer-a", "unverified")


def test_forward_carries_fallbacks_capped_and_reports_the_rest_qualified() -> None:
    peers = [peer(f"p{i}", verified=float(10 + 10 * i)) for i in range(5)]
    d = run("prefer", local(4.2), peers)
    assert targets(d) == ["p4", "p3", "p2"]
    assert reasons(d) == [("self", "below threshold"), ("p0", "qualified"), ("p1", "qualified"),
                          ("p2", "qualified"), ("p3", "qualified"), ("p4", "selected")]


def test_forward_still_lists_peers_worth_probing() -> None:
    d = run("prefer", local(4.2), [peer("known"), peer("new", verified=None, verified_at=None, claimed=80.0)])
    assert targets(d) == ["known"]
    assert d.needs_verification == ("new",)


def test_checked_is_self_then_input_order_without_duplicates_or_self_peers() -> None:
    d = run("prefer", local(4.2), [
        peer("z", paired=False), peer("a"), peer("z", verified=99.0), peer("dev-local", verified=99.0),
        peer("self", verified=99.0), peer("m", reachable=False),
    ])
    assert reasons(d) == [("self", "below threshold"), ("z", "not paired"), ("a", "selected"),
                          ("dev-local", "this device"), ("self", "this device"), ("m", "unreachable")]
    assert targets(d) == ["a"]


def test_hostile_numbers_do_not_crash_or_qualify() -> None:
    d = run("require", local(float("nan")), [
        peer("nan", verified=float("nan")), peer("inf-claim", verified=None, claimed=float("inf")),
        peer("neg", verified=-5.0), peer("neg-queue", verified=20.0, queue=-100, in_flight=-3),
        peer("inf", verified=float("inf")),
    ])
    assert targets(d) == ["neg-queue"]
    assert d.checked[0].to_json()["reason"] == "no capability score"
    json.dumps(d.checked_json)  # always serialisable
    assert ranking_score(20.0, -100, -3) == 20.0


def test_mode_accepts_plain_strings() -> None:
    assert decide("never", local(4.2), [peer()], MODEL, SETTINGS, NOW).action is OffloadAction.LOCAL  # type: ignore[arg-type]


# --- ranking --------------------------------------------------------------------------------------


def test_busy_fast_peer_loses_to_idle_medium_peer() -> None:
    d = run("prefer", local(4.2), [peer("fast", verified=40.0, queue=3), peer("medium", verified=20.0)])
    assert targets(d) == ["medium", "fast"]


def test_our_in_flight_requests_count_as_load() -> None:
    d = run("prefer", local(4.2), [peer("fast", verified=40.0, in_flight=1), peer("mid", verified=30.0)])
    assert targets(d) == ["mid", "fast"]  # 40/2 = 20 < 30
    d = run("prefer", local(4.2), [peer("fast", verified=40.0, in_flight=1, queue=1),
                                   peer("slow", verified=12.0)])
    assert targets(d) == ["fast", "slow"]  # 40/3 ≈ 13.3 > 12


def test_idle_fast_peer_wins() -> None:
    d = run("prefer", local(4.2), [peer("s", verified=10.0), peer("m", verified=20.0), peer("f", verified=40.0)])
    assert targets(d) == ["f", "m", "s"]


def test_equal_scores_prefer_fewer_in_flight_then_device_id() -> None:
    # 40 / (1 + 3) == 10 / (1 + 0): the idle one has fewer of our requests
    d = run("prefer", local(4.2), [peer("busy", verified=40.0, in_flight=3), peer("idle", verified=10.0)])
    assert targets(d) == ["idle", "busy"]
    d = run("prefer", local(4.2), [peer("b", verified=20.0), peer("c", verified=20.0), peer("a", verified=20.0)])
    assert targets(d) == ["a", "b", "c"]


def test_observed_rate_ranks_when_fresh() -> None:
    d = run("prefer", local(4.2), [peer("a", verified=40.0, observed=15.0, observed_at=NOW),
                                   peer("b", verified=20.0)])
    assert targets(d) == ["b", "a"]


def test_ranking_score_formula() -> None:
    assert ranking_score(40.0, 3, 0) == 10.0
    assert ranking_score(40.0, 1, 2) == 10.0
    assert ranking_score(20.0, 0, 0) == 20.0


# --- no_capable_device ----------------------------------------------------------------------------


def test_no_capable_device_body_is_exactly_the_reference_shape() -> None:
    d = run("require", local(4.2), [peer("laptop", paired=False), peer("phone", verified=6.5)])
    body = no_capable_device_body(
        d, model=MODEL, local_capability=4.2, required_at_least=10.0, rendezvous_configured=True,
        paired_remote_peers=1, request_id="req-123",
    )
    assert body == {
        "error": {
            "type": "no_capable_device",
            "code": 503,
            "message": "No device with capability ≥ 10 tok/s for model gemma3-270m was reachable.",
            "checked": [
                {"deviceId": "self", "capabilityScore": 4.2, "reason": "below threshold"},
                {"deviceId": "laptop", "capabilityScore": 30, "reason": "not paired"},
                {"deviceId": "phone", "capabilityScore": 6.5, "reason": "below threshold"},
            ],
            "localCapability": 4.2,
            "requiredAtLeast": 10,
            "rendezvousConfigured": True,
            "pairedRemotePeers": 1,
            "requestId": "req-123",
        }
    }
    assert list(body["error"]) == ["type", "code", "message", "checked", "localCapability",
                                   "requiredAtLeast", "rendezvousConfigured", "pairedRemotePeers", "requestId"]
    assert json.dumps(body["error"]["requiredAtLeast"]) == "10"


def test_no_capable_device_body_with_the_reference_single_entry() -> None:
    d = run("require", local(4.2), [])
    body = no_capable_device_body(d, model="…", local_capability=4.2, required_at_least=10,
                                  rendezvous_configured=True, paired_remote_peers=0, request_id="...")
    assert body == {"error": {
        "type": "no_capable_device", "code": 503,
        "message": "No device with capability ≥ 10 tok/s for model … was reachable.",
        "checked": [{"deviceId": "self", "capabilityScore": 4.2, "reason": "below threshold"}],
        "localCapability": 4.2, "requiredAtLeast": 10, "rendezvousConfigured": True,
        "pairedRemotePeers": 0, "requestId": "...",
    }}


def test_no_capable_device_body_formats_fractions_and_null_local() -> None:
    d = run("require", local(None), [], s=dataclasses.replace(SETTINGS, min_local_capability=7.5))
    body = no_capable_device_body(d, model="m", local_capability=None, required_at_least=7.5,
                                  rendezvous_configured=False, paired_remote_peers=0, request_id="r")
    assert body["error"]["message"] == "No device with capability ≥ 7.5 tok/s for model m was reachable."
    assert body["error"]["localCapability"] is None
    assert body["error"]["checked"] == [{"deviceId": "self", "capabilityScore": None,
                                         "reason": "no capability score"}]


def test_no_capable_device_error_is_a_503_with_retry_after_and_the_same_body() -> None:
    d = run("require", local(4.2), [])
    kwargs = dict(model=MODEL, local_capability=4.2, required_at_least=10.0, rendezvous_configured=False,
                  paired_remote_peers=0, request_id="abc")
    err = NoCapableDeviceError.from_decision(d, **kwargs)  # type: ignore[arg-type]
    assert isinstance(err, ServiceUnavailableError)
    assert err.status == 503
    assert err.headers == {"Retry-After": str(NO_CAPABLE_DEVICE_RETRY_AFTER)} == {"Retry-After": "30"}
    expected = no_capable_device_body(d, **kwargs)  # type: ignore[arg-type]
    body = err.to_body()
    assert body == expected
    assert "param" not in body["error"]
    body["error"]["checked"][0]["reason"] = "tampered"
    assert err.to_body() == expected  # callers get copies


# --- properties -----------------------------------------------------------------------------------

ids = st.text(alphabet="abcdefgh0123", min_size=1, max_size=4)
rates = st.one_of(st.none(), st.floats(min_value=0, max_value=80, allow_nan=False))
times = st.one_of(st.none(), st.floats(min_value=NOW - 1000, max_value=NOW + 10))

candidate_strategy = st.builds(
    PeerCandidate,
    device_id=ids, device_name=st.just("n"), paired=st.booleans(), reachable=st.booleans(),
    models=st.frozensets(st.sampled_from([MODEL, ALIAS, "other"]), max_size=3),
    claimed_tok_per_s=rates, verified_tok_per_s=rates, verified_at=times, observed_tok_per_s=rates,
    queue_depth=st.integers(0, 20), in_flight=st.integers(0, 20), circuit_open_until=times,
    via=st.just("mdns"), observed_at=times,
)
candidates_strategy = st.lists(candidate_strategy, max_size=8, unique_by=lambda p: p.device_id)


def qualifies(p: PeerCandidate, local_cap: float | None, model: str) -> bool:
    """An independent restatement of the rules, to check decide() against."""
    if not (p.paired and p.reachable and model in p.models):
        return False
    if p.circuit_open_until is not None and NOW < p.circuit_open_until:
        return False
    if p.verified_tok_per_s is None or p.verified_at is None or NOW - p.verified_at > SETTINGS.verify_max_age:
        return False
    fresh_obs = p.observed_tok_per_s is not None and p.observed_at is not None \
        and NOW - p.observed_at <= SETTINGS.observed_max_age
    rate = p.observed_tok_per_s if fresh_obs else p.verified_tok_per_s
    assert rate is not None
    # faster than local: what a new request would get there (one-point curve: the rate shared
    # with the requests already there) beats what it would get here (idle: the local rate)
    share = rate / (1 + p.queue_depth + p.in_flight)
    return rate >= SETTINGS.min_local_capability and share > (local_cap or 0.0)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.sampled_from(list(OffloadMode)), local_cap=rates, candidates=candidates_strategy,
    hop=st.booleans(), model=st.sampled_from([MODEL, ALIAS]),
)
def test_decide_properties(mode: OffloadMode, local_cap: float | None, candidates: list[PeerCandidate],
                           hop: bool, model: str) -> None:
    d = decide(mode, local(local_cap), candidates, model, SETTINGS, NOW, hop=hop)
    local_ok = local_cap is not None and local_cap >= SETTINGS.min_local_capability
    if hop or mode is OffloadMode.NEVER:
        assert d.action is OffloadAction.LOCAL and d.peers == () and d.needs_verification == ()
    if local_ok:
        assert d.action is OffloadAction.LOCAL
    if d.action is OffloadAction.REFUSE:
        assert mode is OffloadMode.REQUIRE and not hop and not local_ok
    for p in d.peers:
        assert p.device_id != "dev-local"
        assert qualifies(p, local_cap, model), p
    any_qualified = any(qualifies(p, local_cap, model) for p in candidates if p.device_id not in ("self",
                                                                                               "dev-local"))
    if not hop and mode is not OffloadMode.NEVER and not local_ok:
        assert (d.action is OffloadAction.FORWARD) == any_qualified
    # checked: self first, then every candidate exactly once, in input order
    assert d.checked[0].device_id == "self"
    assert [c.device_id for c in d.checked[1:]] == [p.device_id for p in candidates]
    assert sum(c.reason is Reason.SELECTED for c in d.checked) == (0 if d.action is OffloadAction.REFUSE else 1)
    # forwarded peers are in descending score order
    scores = [ranking_score(p.observed_tok_per_s if p.observed_at is not None and p.observed_tok_per_s is not None
                            and NOW - p.observed_at <= SETTINGS.observed_max_age else p.verified_tok_per_s or 0,
                            p.queue_depth, p.in_flight) for p in d.peers]
    assert scores == sorted(scores, reverse=True)
    assert not set(d.needs_verification) & {p.device_id for p in d.peers}
    for c in d.checked:
        assert c.capability_score is None or math.isfinite(c.capability_score)
    json.dumps(copy.deepcopy(d.checked_json))


# --- the threshold rule, as docs/offload.md states it ------------------------------------------------


def _documented_threshold_examples() -> list[tuple[float, float, float, str, str]]:
    """The rows of the examples table under "The threshold rule" in docs/offload.md."""
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "offload.md").read_text()
    section = text.split("### The threshold rule", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0].replace(".", "").isdigit():
            rows.append((float(cells[0]), float(cells[1]), float(cells[2]), cells[3], cells[4]))
    return rows


def test_the_docs_list_threshold_examples() -> None:
    assert len(_documented_threshold_examples()) >= 5


@pytest.mark.parametrize(("threshold", "local_rate", "peer_rate", "prefer", "require"),
                         _documented_threshold_examples())
def test_documented_threshold_examples(threshold: float, local_rate: float, peer_rate: float, prefer: str,
                                       require: str) -> None:
    settings_ = dataclasses.replace(SETTINGS, min_local_capability=threshold)
    for mode, expected in (("prefer", prefer), ("require", require)):
        decision = run(mode, local(local_rate), [peer(verified=peer_rate)], s=settings_)
        outcome = {OffloadAction.LOCAL: "local", OffloadAction.FORWARD: "peer",
                   OffloadAction.REFUSE: "503"}[decision.action]
        assert outcome == expected, (mode, threshold, local_rate, peer_rate, reasons(decision))
        if outcome == "peer":
            assert targets(decision) == ["peer-a"]
