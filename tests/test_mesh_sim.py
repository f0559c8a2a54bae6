"""The SIMULATED mesh benchmark (bench/mesh_sim.py) as a quick regression on ranking quality."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "bench" / "mesh_sim.py"
_spec = importlib.util.spec_from_file_location("mesh_sim", _PATH)
assert _spec is not None and _spec.loader is not None
mesh_sim = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("mesh_sim", mesh_sim)
_spec.loader.exec_module(mesh_sim)

CLOSED = mesh_sim.Scenario("closed", entries=3, clients_per_entry=6)
POISSON = mesh_sim.Scenario("Poisson", entries=3, load=0.8)


@pytest.mark.parametrize("scenario", [CLOSED, POISSON], ids=["closed", "poisson"])
def test_policy_beats_baselines_on_p95_and_keeps_throughput(scenario) -> None:
    results = {r: mesh_sim.simulate(scenario, r, seed=3, duration=1200.0) for r in mesh_sim.ROUTERS}
    ours = results["dvai"]
    for name in ("round-robin", "least-used", "least-in-flight"):
        assert ours.p95 < results[name].p95, (name, ours.p95, results[name].p95)
    if scenario is CLOSED:
        assert ours.throughput_ratio >= 0.9
    else:
        assert ours.throughput_ratio >= 0.95 * ours.offered_ratio
    assert ours.completed > 100


def test_simulation_is_deterministic_for_a_seed() -> None:
    a = mesh_sim.simulate(POISSON, "dvai", seed=11, duration=600.0)
    b = mesh_sim.simulate(POISSON, "dvai", seed=11, duration=600.0)
    c = mesh_sim.simulate(POISSON, "dvai", seed=12, duration=600.0)
    assert a.latencies == b.latencies
    assert a.latencies != c.latencies
