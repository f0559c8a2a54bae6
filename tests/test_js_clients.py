"""The Vercel AI SDK (tests/js, run with node) against a real node on the real engine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import NodeProcess

pytestmark = pytest.mark.engine

JS = Path(__file__).resolve().parent / "js"


def test_vercel_ai_sdk(real_node: NodeProcess) -> None:
    node = shutil.which("node")
    assert node is not None, "node (Node.js >= 18) is needed for the JavaScript client tests"
    assert (JS / "node_modules" / "ai").is_dir(), "run `npm ci --prefix tests/js` first (.ci/run does)"
    env = {**os.environ, "DVAI_BASE_URL": real_node.base_url, "DVAI_MODEL": "gemma3-270m"}
    result = subprocess.run([node, "--test", "agent.test.mjs"], cwd=JS, env=env, capture_output=True,
                            text=True, timeout=170)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# pass 2" in result.stdout and "# fail 0" in result.stdout, result.stdout
