"""The router's view of the world: local state, candidates from the peer table, pairings,
verification and health, built from the real components (no HTTP; nothing is forwarded here)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from node.capability import CapabilityService, CapabilityStore
from node.config import load_config
from node.discovery.peers import HealthReport, PeerClaim, PeerTable
from node.engine.registry import ModelRegistry
from node.identity import load_or_create_identity
from node.offload.breaker import PeerAttempt
from node.offload.policy import OffloadAction, OffloadMode, Reason
from node.offload.router import OffloadRouter, _with_model
from node.offload.verify import PeerVerifier, ProbeTarget
from node.pairing.store import Pairing, PairingStore
from node.transport.http_link import HttpPeerLink


class World:
    def __init__(self, tmp_path: Path, session: aiohttp.ClientSession) -> None:
        self.config = load_config(env={}, overrides={
            "state_dir": str(tmp_path / "self"),
            "models": {"sim": {"engine": "simulated", "simulated_tok_per_s": 2.0, "aliases": ["my-alias"]}},
            "offload": {"enabled": True, "min_local_capability": 10.0},
        })
        self.now = 1_000_000.0
        self.self_id = load_or_create_identity(tmp_path / "self").device_id
        self.peer_id = load_or_create_identity(tmp_path / "peer").device_id
        registry = ModelRegistry.from_config(self.config)
        self.table = PeerTable.from_config(self.config.offload, self_device_id=self.self_id,
                                           now=lambda: int(self.now * 1000))
        self.pairings = PairingStore(tmp_path / "pairings.json")
        self.router = OffloadRouter(
            config=self.config, device_id=self.self_id, registry=registry,
            capability=CapabilityService(self.config, registry, CapabilityStore(tmp_path / "self")),
            peers=self.table, pairings=self.pairings, links=lambda peer: HttpPeerLink(session, peer.base_url),
            clock=lambda: self.now)
        self.probed: list[ProbeTarget] = []
        self.measured = 40.0

        async def measure(target: ProbeTarget) -> tuple[float | None, int]:
            self.probed.append(target)
            return self.measured, 32

        self.router.verifier = PeerVerifier(measure, clock=lambda: self.now)

    def add_peer(self, *, models: tuple[str, ...] = ("sim",), claim: float | None = 30.0,
                 proven: bool = True, queue: int = 0, curve: tuple[tuple[int, float], ...] = ()) -> None:
        url = "http://127.0.0.1:9/v1"
        capability = {m: claim for m in models} if claim is not None else {}
        self.table.observe(PeerClaim(self.peer_id, url, "static", loaded_models=models, capability=capability))
        self.table.health_ok(self.peer_id, url, HealthReport(
            self.peer_id, "ok", loaded_models=models, queue_depth={m: queue for m in models}, proven=proven,
            capability_curve={m: curve for m in models} if curve else {}))

    async def pair(self) -> None:
        await self.pairings.add(Pairing(self.peer_id, "peer", bytes(32), "lan-handshake", 0, "outbound",
                                        our_app_id=self.self_id, base_url="http://127.0.0.1:9/v1"))


@pytest.fixture
async def world(tmp_path: Path) -> World:
    async with aiohttp.ClientSession() as session:
        yield World(tmp_path, session)


async def test_an_unpaired_peer_is_not_even_probed(world: World) -> None:
    world.add_peer()
    decision = world.router.decide(OffloadMode.PREFER, "sim")
    assert decision.action is OffloadAction.LOCAL and decision.needs_verification == ()
    assert [(c.device_id, c.reason) for c in decision.checked] == [("self", Reason.SELECTED),
                                                                  (world.peer_id, Reason.NOT_PAIRED)]
    assert decision.checked[0].capability_score == 2.0  # the SIMULATED engine's rate (heuristic)


async def test_a_paired_peer_is_used_only_once_verified_by_us(world: World) -> None:
    world.add_peer(claim=500.0)
    await world.pair()
    before = world.router.decide(OffloadMode.PREFER, "sim")
    assert before.action is OffloadAction.LOCAL and before.needs_verification == (world.peer_id,)
    await world.router.verifier.verify(world.router._probe_targets(before.needs_verification, "sim"), wait=1)
    after = world.router.decide(OffloadMode.PREFER, "sim")
    assert after.action is OffloadAction.FORWARD and after.peers[0].device_id == world.peer_id
    assert after.peers[0].verified_tok_per_s == 40.0  # our measurement; the claim (500) plays no part
    # A local alias is sent to the peer under the id it serves.
    assert world.router.decide(OffloadMode.PREFER, "my-alias").action is OffloadAction.FORWARD
    assert json.loads(_with_model({"model": "my-alias", "stream": True}, "sim")) == {"model": "sim",
                                                                                         "stream": True}


async def test_a_peer_that_has_not_proven_its_key_never_gets_prompts(world: World) -> None:
    world.add_peer(claim=500.0, proven=False)  # e.g. an impostor answering for a paired device's id
    await world.pair()
    decision = world.router.decide(OffloadMode.REQUIRE, "sim")
    assert decision.action is OffloadAction.REFUSE and decision.needs_verification == ()
    assert decision.checked[1].reason is Reason.UNREACHABLE


async def test_a_peer_measured_below_its_claim_is_not_used(world: World) -> None:
    world.add_peer(claim=1000.0)
    await world.pair()
    world.measured = 6.0
    decision = world.router.decide(OffloadMode.REQUIRE, "sim")
    await world.router.verifier.verify(world.router._probe_targets(decision.needs_verification, "sim"), wait=1)
    refused = world.router.decide(OffloadMode.REQUIRE, "sim")
    assert refused.action is OffloadAction.REFUSE
    assert refused.checked[1].reason is Reason.BELOW_THRESHOLD and refused.checked[1].capability_score == 6.0


async def test_hop_marked_requests_stay_here(world: World) -> None:
    world.add_peer()
    await world.pair()
    await world.router.verifier.verify([ProbeTarget(world.peer_id, "http://x/v1", world.pairings.list()[0],
                                                    "sim")], wait=1)
    assert world.router.decide(OffloadMode.PREFER, "sim").action is OffloadAction.FORWARD
    # signed by a paired device: served here whatever the mode
    assert world.router.decide(OffloadMode.REQUIRE, "sim", hop=True).action is OffloadAction.LOCAL
    # unsigned: not forwardable, judged on the local score alone
    unsigned = world.router.decide(OffloadMode.REQUIRE, "sim", forwardable=False)
    assert unsigned.action is OffloadAction.REFUSE and [c.device_id for c in unsigned.checked] == ["self"]


async def test_failures_open_the_circuit_and_load_shifts_the_ranking(world: World) -> None:
    world.add_peer()
    await world.pair()
    await world.router.verifier.verify([ProbeTarget(world.peer_id, "http://x/v1", world.pairings.list()[0],
                                                    "sim")], wait=1)
    attempt = world.router.health.begin(world.peer_id, world.now)
    assert isinstance(attempt, PeerAttempt)
    attempt.failed(world.now)
    decision = world.router.decide(OffloadMode.PREFER, "sim")
    assert decision.action is OffloadAction.LOCAL and decision.checked[1].reason is Reason.CIRCUIT_OPEN
    world.now += world.config.offload.circuit_break_s + 1
    assert world.router.decide(OffloadMode.PREFER, "sim").action is OffloadAction.FORWARD  # half-open trial


async def test_a_stale_verification_is_probed_again(world: World) -> None:
    world.add_peer()
    await world.pair()
    await world.router.verifier.verify([ProbeTarget(world.peer_id, "http://x/v1", world.pairings.list()[0],
                                                    "sim")], wait=1)
    world.now += world.config.offload.verify_max_age + 1
    world.add_peer()  # a fresh health answer keeps the peer reachable
    decision = world.router.decide(OffloadMode.PREFER, "sim")
    assert decision.action is OffloadAction.LOCAL and decision.checked[1].reason is Reason.VERIFICATION_STALE
    assert decision.needs_verification == (world.peer_id,)


async def test_a_peer_reported_curve_and_load_set_its_marginal_rate(world: World) -> None:
    # Measured by us at 40 tok/s; its health answer reports 3 requests running and a CPU-like
    # curve (aggregate 40, 56, 64 at 1, 2, 4). A new request there would get 64 / 4 = 16 tok/s.
    world.add_peer(queue=3, curve=((1, 40.0), (2, 56.0), (4, 64.0)))
    await world.pair()
    await world.router.verifier.verify([ProbeTarget(world.peer_id, "http://x/v1", world.pairings.list()[0],
                                                    "sim")], wait=1)
    world.router._record_report(world.table.get(world.peer_id))  # type: ignore[arg-type]
    candidate = world.router._candidate(world.table.get(world.peer_id), "sim", world.now)  # type: ignore[arg-type]
    assert candidate.curve == ((1, 40.0), (2, 56.0), (4, 64.0)) and candidate.queue_depth == 3
    from node.offload.policy import peer_marginal_rate

    assert peer_marginal_rate(candidate, 40.0) == 16.0  # the old rate / (1 + 3) would say 10
    decision = world.router.decide(OffloadMode.PREFER, "sim")
    assert decision.action is OffloadAction.FORWARD  # 16 > this device's 2 tok/s (SIMULATED)
    # A probe or forwarded stream sent there now decodes at 64 / 4 ÷ 40 = 0.4 of the single-stream
    # rate: measured rates are divided by that share before they are kept.
    assert world.router._decode_share(world.peer_id, "sim") == pytest.approx(0.4)
    # Such a measurement is lifted by the share only up to the best rate measured there before.
    assert world.router._single_stream(world.peer_id, "sim", 16.0, 0.4) == 16.0  # nothing better measured yet
    assert world.router._single_stream(world.peer_id, "sim", 40.0, 1.0) == 40.0  # measured idle
    assert world.router._single_stream(world.peer_id, "sim", 16.0, 0.4) == pytest.approx(40.0)
    # The same peer without a curve (an older node): rate / (1 + queue), as before.
    world.add_peer(queue=3)
    flat = world.router._candidate(world.table.get(world.peer_id), "sim", world.now)  # type: ignore[arg-type]
    assert flat.curve == () and peer_marginal_rate(flat, 40.0) == 10.0
    assert world.router._decode_share(world.peer_id, "sim") == 1.0
