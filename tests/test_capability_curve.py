"""The capability curve with plain data: marginal rates, hostile curves, refinement, the wire
forms (score JSON, mDNS ``cc``, health ``capabilityCurve``) and how the policy ranks by it.

The real-engine probe of a curve is in ``tests/test_capability.py``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest

from node.capability.curve import (
    Curve,
    aggregate_at,
    clean_curve,
    curve_from_json,
    curve_levels,
    curve_to_json,
    decode_curve_text,
    encode_curve_text,
    marginal_rate,
    refine_curve,
    scale_curve,
)
from node.capability.probe import level_tokens
from node.constants import (
    CAPABILITY_CURVE_MAX_POINTS,
    CAPABILITY_MAX_TOK_PER_S,
    MAX_TXT_BYTES,
    MAX_TXT_ITEM_BYTES,
)
from node.discovery.advert import AdvertisedInfo, claim_from_txt, decode_txt, encode_txt
from node.discovery.health import parse_health_report
from node.discovery.merge import PeerEntry, to_peer
from node.identity import DeviceIdentity, NodeIdentity
from node.offload.policy import (
    LocalState,
    OffloadAction,
    OffloadMode,
    PeerCandidate,
    PolicySettings,
    Reason,
    decide,
    decode_share,
    local_marginal_rate,
    ranking_score,
    single_stream_rate,
)

CPU: Curve = ((1, 40.0), (2, 56.0), (4, 64.0))
"""a CPU device: 40 tok/s alone, 56 aggregate at 2, 64 at 4 (issue 11's llama-batched-bench shape)."""
GPU: Curve = ((1, 30.0), (2, 60.0), (4, 120.0))
"""scales linearly up to 4."""

# --------------------------------------------------------------------------------------
# marginal_rate: aggregate at running + 1, shared among them; flat past the last point


@pytest.mark.parametrize(("curve", "running", "expected"), [
    (((1, 40.0),), 0, 40.0),               # one point: the old rate / (1 + queue)
    (((1, 40.0),), 1, 20.0),
    (((1, 40.0),), 3, 10.0),
    (CPU, 0, 40.0),                        # alone: the single-stream rate
    (CPU, 1, 28.0),                        # 56 / 2
    (CPU, 2, 60.0 / 3),                    # aggregate 60 at 3 (between 56 and 64), shared by 3
    (CPU, 3, 16.0),                        # 64 / 4
    (CPU, 7, 8.0),                         # past the last point: 64 flat, shared by 8
    (GPU, 3, 30.0),                        # linear scaling: every request keeps 30
    (GPU, 5, 20.0),                        # 120 flat past 4, shared by 6
    ((), 0, 0.0),                          # no curve: nothing to offer
    (CPU, -5, 40.0),                       # a negative count is no load
])
def test_marginal_rate_table(curve: Curve, running: int, expected: float) -> None:
    assert marginal_rate(curve, running) == pytest.approx(expected)


@pytest.mark.parametrize(("curve", "concurrency", "expected"), [
    (CPU, 1, 40.0), (CPU, 1.5, 48.0), (CPU, 4, 64.0), (CPU, 100, 64.0), (CPU, 0.5, 20.0), (CPU, 0, 0.0),
])
def test_aggregate_interpolates_linearly_and_stays_flat_past_the_last_point(
        curve: Curve, concurrency: float, expected: float) -> None:
    assert aggregate_at(curve, concurrency) == pytest.approx(expected)


def test_marginal_rate_never_grows_with_load_for_a_clean_curve() -> None:
    for curve in (CPU, GPU, ((1, 10.0),), ((1, 50.0), (2, 40.0), (8, 200.0))):
        cleaned = clean_curve(curve)
        rates = [marginal_rate(cleaned, n) for n in range(12)]
        assert rates == sorted(rates, reverse=True), (curve, rates)


def test_levels_are_capped_at_parallel() -> None:
    assert [curve_levels(p) for p in (0, 1, 2, 3, 4, 8)] == [(1,), (1,), (1, 2), (1, 2), (1, 2, 4), (1, 2, 4)]
    # the probe spends about probe_tokens ÷ 2 per level above 1, never fewer than 8 per sequence
    assert [level_tokens(50, k) for k in (1, 2, 4)] == [50, 12, 8]
    assert [level_tokens(200, k) for k in (1, 2, 4)] == [200, 50, 25]
    assert [level_tokens(5, k) for k in (1, 2, 4)] == [5, 5, 5]


# --------------------------------------------------------------------------------------
# Hostile or broken curves: bounded, finite, a per-sequence share that never grows


@pytest.mark.parametrize(("points", "expected"), [
    ([(1, 40.0), (2, 56.0), (4, 64.0)], CPU),
    ([(4, 64.0), (1, 40.0), (2, 56.0)], CPU),                             # sorted
    ([(1, 10.0), (2, 1000.0), (4, 5000.0)], ((1, 10.0), (2, 20.0), (4, 40.0))),  # superlinear: capped at linear
    ([(1, 10.0), (2, 8.0), (4, 30.0)], ((1, 10.0), (2, 8.0), (4, 16.0))),  # a dip is kept, later points bounded by it
    ([(2, 56.0), (4, 64.0)], ()),                                          # no single-stream point: unusable
    ([(1, float("nan")), (2, 5.0)], ()),
    ([(1, 10.0), (2, float("inf")), (3, -1.0), (4, 0.0)], ((1, 10.0),)),
    ([(1, 10.0), (1, 99.0)], ((1, 10.0),)),                                # repeated level: the first wins
    ([(True, 10.0), (1, True), (1.0, 5.0), ("1", 5.0)], ()),              # bools and non-int levels dropped
    ([(1, 10.0), (0, 5.0), (10**6, 5.0)], ((1, 10.0),)),                   # levels out of range
    ([(1, 2 * CAPABILITY_MAX_TOK_PER_S)], ()),
])
def test_clean_curve_table(points: list[tuple[object, object]], expected: Curve) -> None:
    assert clean_curve(points) == expected


def test_clean_curve_keeps_a_bounded_number_of_points() -> None:
    many = [(level, 10.0 * level) for level in range(1, 200)]
    assert len(clean_curve(many)) == CAPABILITY_CURVE_MAX_POINTS


@pytest.mark.parametrize(("value", "expected"), [
    ([{"concurrency": 1, "tokPerS": 40}, {"concurrency": 2, "tokPerS": 56}], ((1, 40.0), (2, 56.0))),
    (None, ()), ("1:40", ()), ({"concurrency": 1}, ()), ([1, "x", None], ()),
    ([{"concurrency": "1", "tokPerS": 40}], ()),
    ([{"concurrency": 1, "tokPerS": 40}, {"concurrency": 2, "tokPerS": 1e300}], ((1, 40.0),)),
])
def test_curve_json_parse_table(value: object, expected: Curve) -> None:
    assert curve_from_json(value) == expected
    if expected:
        assert curve_from_json(curve_to_json(expected)) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("1:40/2:56/4:64", CPU),
    ("1:40.5/2:60", ((1, 40.5), (2, 60.0))),
    ("2:56/4:64", ()), ("", ()), ("garbage", ()), ("1:x/2:5", ()), ("1:-3", ()),
    ("1:10/2:" + "9" * 40, ((1, 10.0),)), ("1:nan", ()), ("1:inf/2:3", ()), ("00001:10", ()),
])
def test_curve_text_table(text: str, expected: Curve) -> None:
    assert decode_curve_text(text) == expected


def test_curve_text_round_trip_at_one_decimal() -> None:
    assert encode_curve_text(((1, 33.06), (2, 45.0), (4, 58.24))) == "1:33.1/2:45/4:58.2"
    assert decode_curve_text(encode_curve_text(CPU)) == CPU


def test_scale_curve_keeps_the_shape_and_moves_the_level() -> None:
    assert scale_curve(CPU, 20.0) == ((1, 20.0), (2, 28.0), (4, 32.0))
    assert scale_curve((), 20.0) == ((1, 20.0),)


# --------------------------------------------------------------------------------------
# Observed refinement: an EWMA per level (alpha 0.25 here)


@pytest.mark.parametrize(("curve", "level", "rate", "expected"), [
    (CPU, 1, 20.0, ((1, 35.0), (2, 56.0), (4, 64.0))),           # 0.25 × 20 + 0.75 × 40
    (CPU, 2, 20.0, ((1, 40.0), (2, 52.0), (4, 64.0))),           # sample 40 aggregate: 0.25 × 40 + 0.75 × 56
    (CPU, 4, 24.0, ((1, 40.0), (2, 56.0), (4, 72.0))),           # sample 96: 0.25 × 96 + 0.75 × 64
    (((1, 40.0),), 2, 30.0, ((1, 40.0), (2, 60.0))),            # a new level starts at its sample
    ((), 1, 30.0, ((1, 30.0),)),                                 # the first level-1 sample sets the curve
    ((), 2, 30.0, ()),                                           # nothing to anchor a concurrent sample to
    (((1, 10.0),), 2, 50.0, ((1, 10.0), (2, 20.0))),             # bounded: no superlinear gain
])
def test_refine_curve_table(curve: Curve, level: int, rate: float, expected: Curve) -> None:
    refined = refine_curve(curve, level, rate, 0.25)
    assert [level for level, _ in refined] == [level for level, _ in expected]
    assert [rate for _, rate in refined] == pytest.approx([rate for _, rate in expected])


# --------------------------------------------------------------------------------------
# The wire: mDNS TXT ``cc`` and the health answer's ``capabilityCurve``

IDENTITY = NodeIdentity(DeviceIdentity.generate(), "desk", "0123456789abcdef")


def raw_txt(items: dict[str, str]) -> bytes:
    parts = [f"{k}={v}".encode() for k, v in items.items()]
    return b"".join(bytes([len(p)]) + p for p in parts)


def test_txt_carries_the_curve_next_to_the_reference_fields() -> None:
    info = AdvertisedInfo(port=38883, loaded_models=("gemma3-270m", "qwen"),
                          capability={"gemma3-270m": 40.0, "qwen": 9.5}, queue_depth={"qwen": 1},
                          capability_curve={"gemma3-270m": CPU, "qwen": ((1, 9.5),)})
    txt = encode_txt(IDENTITY, info)
    assert (txt["m"], txt["c"], txt["q"]) == ("gemma3-270m,qwen", "40,9.5", "0,1")  # unchanged
    assert txt["cc"] == "1:40/2:56/4:64,"  # one-point curves stay empty
    problems: list[str] = []
    claim = claim_from_txt(decode_txt(raw_txt(txt)), "10.0.0.7", 38883, problems)
    assert problems == [] and claim.capability_curve == {"gemma3-270m": CPU}
    old = {key: value for key, value in txt.items() if key != "cc"}  # an older node
    assert claim_from_txt(decode_txt(raw_txt(old)), "10.0.0.7", 38883, []).capability_curve == {}
    assert "cc" not in encode_txt(IDENTITY, AdvertisedInfo(port=1, loaded_models=("a",), capability={"a": 5.0}))


def test_txt_leaves_the_curve_out_when_it_does_not_fit() -> None:
    models = tuple(f"model-{i:03d}-" + "x" * 40 for i in range(40))
    curve: Curve = ((1, 12345.6), (2, 23456.7), (4, 34567.8))
    txt = encode_txt(IDENTITY, AdvertisedInfo(port=1, loaded_models=models, capability=dict.fromkeys(models, 10.0),
                                              capability_curve=dict.fromkeys(models, curve)))
    assert len(raw_txt(txt)) <= MAX_TXT_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_TXT_ITEM_BYTES for k, v in txt.items())
    if "cc" in txt:
        assert len(txt["cc"].split(",")) == len(txt["m"].split(","))


@pytest.mark.parametrize(("cc", "expected", "problem"), [
    ("1:40/2:56,", {"a": ((1, 40.0), (2, 56.0))}, None),
    ("1:40/2:9999,1:5/2:10", {"a": ((1, 40.0), (2, 80.0)), "b": ((1, 5.0), (2, 10.0))}, None),
    ("1:40", {}, "does not match"),
    ("2:40/4:50,", {}, "unusable capability curve"),
    ("1:nan/2:5,zz", {}, "unusable capability curve"),
])
def test_hostile_txt_curves(cc: str, expected: dict[str, Curve], problem: str | None) -> None:
    txt = {"id": IDENTITY.device_id, "m": "a,b", "c": "40,5", "q": "0,0", "cc": cc}
    problems: list[str] = []
    claim = claim_from_txt(txt, "10.0.0.7", 38883, problems)
    assert claim.capability_curve == expected
    assert (problem is None) == (problems == []) and all(problem in p for p in problems if problem)


def test_health_report_curve_is_parsed_defensively_and_beats_mdns() -> None:
    body: dict[str, Any] = {
        "status": "ok", "deviceId": IDENTITY.device_id, "models": [
            {"id": "m1", "loaded": True, "queueDepth": 1, "capabilityCurve": curve_to_json(CPU)},
            {"id": "m2", "loaded": True, "capabilityCurve": [{"concurrency": 1, "tokPerS": 5},
                                                              {"concurrency": 2, "tokPerS": 500}]},
            {"id": "m3", "loaded": True, "capabilityCurve": "1:5/2:10"},
            {"id": "m4", "loaded": False, "capabilityCurve": curve_to_json(GPU)},
        ]}
    report = parse_health_report(body)
    assert report.capability_curve == {"m1": CPU, "m2": ((1, 5.0), (2, 10.0))}

    claim = claim_from_txt({"id": IDENTITY.device_id, "m": "m1", "c": "40", "q": "0", "cc": "1:40/2:80"},
                           "10.0.0.7", 38883, [])
    entry = PeerEntry(device_id=IDENTITY.device_id, base_url=claim.base_url, via="mdns",
                      claims={"mdns": claim}, first_seen_at=0, last_seen_at=0, health=report)
    peer = to_peer(entry)
    assert peer.capability_curve["m1"] == CPU  # the health answer wins over the advert
    assert peer.to_json()["capabilityCurve"]["m1"] == curve_to_json(CPU)


# --------------------------------------------------------------------------------------
# The policy: peers ranked by marginal rate; this device judged by its own curve and load

NOW = 100_000.0
MODEL = "gemma3-270m"
SETTINGS = PolicySettings(min_local_capability=10.0, verify_max_age=600.0, observed_max_age=120.0,
                          max_forward_attempts=3)


def peer(device_id: str, rate: float, *, running: int = 0, curve: Curve = ()) -> PeerCandidate:
    return PeerCandidate(
        device_id=device_id, device_name=device_id, paired=True, reachable=True, models=frozenset((MODEL,)),
        claimed_tok_per_s=None, verified_tok_per_s=rate, verified_at=NOW - 10, observed_tok_per_s=None,
        queue_depth=running, in_flight=0, circuit_open_until=None, via="mdns", curve=curve,
    )


def local(rate: float | None, *, running: int = 0, curve: Curve = ()) -> LocalState:
    return LocalState("dev-local", MODEL, rate, "probe", queue_depth=running, curve=curve)


@pytest.mark.parametrize(("rate", "running", "curve", "expected"), [
    (40.0, 3, (), 10.0),                  # no curve: rate / (1 + load), as before
    (40.0, 3, CPU, 16.0),                 # the CPU curve at 4 sequences
    (20.0, 3, CPU, 8.0),                  # the claimed shape, anchored at our measured 20 tok/s
    (20.0, 3, ((1, 40.0), (4, 5000.0)), 20.0),  # a hostile claim is bounded to linear scaling
    (20.0, 1, ((2, 5000.0),), 10.0),      # an unusable claim counts as one point
])
def test_ranking_score_table(rate: float, running: int, curve: Curve, expected: float) -> None:
    assert ranking_score(rate, running, 0, curve) == pytest.approx(expected)
    assert ranking_score(rate, 0, running, curve) == pytest.approx(expected)  # ours in flight count the same


@pytest.mark.parametrize(("peers", "expected_order"), [
    # Old formula: busy 40/(1+3) = 10 ties an idle 10. With its CPU curve the busy one still gives 16.
    ([peer("busy-cpu", 40.0, running=3, curve=CPU), peer("idle", 12.0)], ["busy-cpu", "idle"]),
    ([peer("busy-flat", 40.0, running=3), peer("idle", 12.0)], ["idle", "busy-flat"]),
    # A linear-scaling device with 3 running still offers its full 30 tok/s.
    ([peer("gpu", 30.0, running=3, curve=GPU), peer("cpu", 40.0, running=1, curve=CPU)], ["gpu", "cpu"]),
    ([peer("gpu", 30.0, running=6, curve=GPU), peer("cpu", 40.0, running=1, curve=CPU)], ["cpu", "gpu"]),
])
def test_peers_are_ranked_by_marginal_rate(peers: list[PeerCandidate], expected_order: list[str]) -> None:
    decision = decide(OffloadMode.PREFER, local(4.0), peers, MODEL, SETTINGS, NOW)
    assert decision.action is OffloadAction.FORWARD
    assert [p.device_id for p in decision.peers] == expected_order


@pytest.mark.parametrize(("mode", "loc", "peers", "action", "self_reason"), [
    # idle and fast enough: local, whatever the peers
    ("prefer", local(40.0, curve=CPU), [peer("p", 80.0)], "local", Reason.SELECTED),
    # busy: 3 running here leaves a new request 16 tok/s on the CPU curve, still ≥ 10: local
    ("prefer", local(40.0, running=3, curve=CPU), [peer("p", 80.0)], "local", Reason.SELECTED),
    # 7 running: 64 / 8 = 8 < 10, and an idle 30 tok/s peer offers more: forward
    ("prefer", local(40.0, running=7, curve=CPU), [peer("p", 30.0)], "forward", Reason.BELOW_THRESHOLD),
    # 7 running, but the peer is busier still (30 / 5 = 6 < 8): stay here
    ("prefer", local(40.0, running=7, curve=CPU), [peer("p", 30.0, running=4)], "local", Reason.SELECTED),
    # require: a capable device that is only busy queues the request rather than refusing it
    ("require", local(40.0, running=7, curve=CPU), [], "local", Reason.SELECTED),
    # require: a device below the threshold even when idle still refuses
    ("require", local(8.0), [], "refuse", Reason.BELOW_THRESHOLD),
    # without a curve, the old rule: 40 / (1 + 7) = 5 < 10, so a 30 tok/s idle peer wins
    ("prefer", local(40.0, running=7), [peer("p", 30.0)], "forward", Reason.BELOW_THRESHOLD),
])
def test_this_device_is_judged_by_its_own_curve_and_load(
        mode: str, loc: LocalState, peers: list[PeerCandidate], action: str, self_reason: Reason) -> None:
    decision = decide(OffloadMode(mode), loc, peers, MODEL, SETTINGS, NOW)
    assert decision.action.value == action, decision.why
    assert decision.checked[0].reason is self_reason
    if self_reason is Reason.BELOW_THRESHOLD:
        # self is reported with the rate it was judged by (its marginal rate), a finite number
        expected = local_marginal_rate(loc)
        assert expected is not None and decision.checked[0].capability_score == pytest.approx(expected)
        assert math.isfinite(decision.checked[0].capability_score or 0.0)


@pytest.mark.parametrize(("curve", "concurrency", "expected"), [
    ((), 4, 1.0),                 # one request at a time: decode speed does not depend on the queue
    (((1, 40.0),), 4, 1.0),
    (CPU, 1, 1.0),
    (CPU, 2, 0.7),                # 56 / 2 / 40
    (CPU, 4, 0.4),                # 64 / 4 / 40
    (CPU, 9, 0.4),                # capped at the last level: the others wait for a seat
    (GPU, 4, 1.0),
])
def test_decode_share_table(curve: Curve, concurrency: int, expected: float) -> None:
    """How a rate observed at a busy peer maps back to its single-stream rate (router feedback)."""
    assert decode_share(curve, concurrency) == pytest.approx(expected)



@pytest.mark.parametrize(("measured", "share", "best", "expected"), [
    (16.0, 0.4, 40.0, 40.0),      # an honest CPU peer busy with 3: back to the 40 it delivered idle
    (16.0, 0.4, None, 16.0),      # never measured higher: a claim cannot lift it
    (16.0, 0.4, 20.0, 20.0),
    (10.0, 0.25, 10.0, 10.0),     # a peer claiming to be busy with a flat curve gains nothing
    (30.0, 1.0, 40.0, 30.0),      # idle (or one-point): as measured, even below its best
    (30.0, 0.0, 40.0, 30.0),      # a broken share is ignored
])
def test_single_stream_rate_table(measured: float, share: float, best: float | None, expected: float) -> None:
    assert single_stream_rate(measured, share, best) == pytest.approx(expected)



# --------------------------------------------------------------------------------------
# The service: served generations refine the point of the level they ran at (a SIMULATED
# model given 4 seats, so the count of sequences running is set by the test)


async def test_served_generations_refine_the_curve_at_their_level(tmp_path: Any) -> None:
    import json as _json

    from node.capability import CAPABILITY_FILE, CapabilityScore, CapabilityService, CapabilityStore
    from node.common.ewma import ewma
    from node.config import ModelConfig, NodeConfig, OffloadConfig
    from node.constants import CAPABILITY_OBSERVED_ALPHA
    from node.engine.base import GenerationOutcome, ModelInfo
    from node.engine.queue import ModelQueue
    from node.engine.registry import ModelRegistry
    from node.engine.simulated import SimulatedEngine
    from node.engine.slot import ModelSlot

    info = ModelInfo(id="sim", path="simulated", ctx_size=512, embedding=False, size_bytes=1000)
    slot = ModelSlot(SimulatedEngine(info, tok_per_s=100.0), queue_depth=8)
    slot.parallel, slot.queue = 4, ModelQueue("sim", limit=8, seats=4)
    registry = ModelRegistry([(ModelConfig(id="sim", engine="simulated"), slot)], "sim")
    probe = CapabilityScore("sim", 40.0, None, 1.0, "simulated", "probe", 50, curve=CPU)
    (tmp_path / CAPABILITY_FILE).write_text(_json.dumps({"version": 1, "scores": [
        {**probe.to_json(), "modelSizeBytes": 1000}]}))
    config = NodeConfig(state_dir=tmp_path, models=(ModelConfig(id="sim", engine="simulated"),),
                        offload=OffloadConfig(enabled=True, probe_on_start=False))
    service = CapabilityService(config, registry, CapabilityStore(tmp_path))
    announced: list[CapabilityScore] = []
    service.subscribe(announced.append)
    await registry.start()
    await service.start()

    def outcome(rate: float, tokens: int = 21) -> GenerationOutcome:
        return GenerationOutcome(completion_tokens=tokens, first_token_at=0.0, last_token_at=(tokens - 1) / rate)

    try:
        assert service.get_capability() == probe and service.curves() == {"sim": CPU}
        async with slot.queue.turn(2):  # two sequences running: this generation is a level-2 sample
            service._on_outcome(info, outcome(20.0))
        score = service.get_capability()
        assert score is not None and score.source == "observed"
        # the level-2 point moved toward 20 × 2 = 40 aggregate; the others kept the probe's figures
        expected = {1: 40.0, 2: ewma(56.0, 40.0, CAPABILITY_OBSERVED_ALPHA), 4: 64.0}
        assert dict(score.points) == pytest.approx(expected) and expected[2] == pytest.approx(52.0)
        assert announced and announced[-1] == score  # 56 → 52 moved more than 5 %: re-advertised
        async with slot.queue.turn(3):  # three running: not a level the curve has, ignored
            service._on_outcome(info, outcome(5.0))
        assert service.get_capability() == score
        async with slot.queue.turn(1):  # alone: the single-stream point, and tok_per_s with it
            service._on_outcome(info, outcome(60.0))
        alone = service.get_capability()
        assert alone is not None and alone.tok_per_s == pytest.approx(45.0) and alone.points[0][1] == alone.tok_per_s
        assert alone.samples == 2
        async with slot.queue.turn(4):
            service._on_outcome(info, outcome(10.0, tokens=4))  # too short to count
        assert service.get_capability() == alone
    finally:
        await service.stop()
        await registry.stop()
