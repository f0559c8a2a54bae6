"""Benchmarks are not run by the suite, so they can rot unseen (bench/hub_bench.py once built a
``Pairing`` with a field the store no longer had). Every benchmark module must import, and the
SIMULATED-engine hub benchmark runs end to end at a tiny size."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted(p.stem for p in (REPO / "bench").glob("*.py") if not p.stem.startswith("_"))


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_benchmark_module_imports(name: str) -> None:
    module = importlib.import_module(f"bench.{name}")
    assert module.__doc__, f"bench/{name}.py says what it measures in its docstring"


def test_every_benchmark_is_listed_in_the_runner() -> None:
    runner = (REPO / "bench" / "__main__.py").read_text()
    assert [n for n in BENCHMARKS if f'"bench.{n}"' not in runner and n != "llama_server_build"] == []


@pytest.mark.timeout(120)
def test_the_hub_benchmark_runs_at_a_tiny_size() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.hub_bench", "--requests", "4", "--rounds", "2", "--serial", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split()[0:2] for line in done.stdout.splitlines()]
    assert [["models,", "bearer"], ["models,", "hmac"], ["chat,", "bearer"]] == \
        [r for r in rows if r and r[0] in ("models,", "chat,")], done.stdout
