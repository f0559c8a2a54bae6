"""The `dvai-node` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from .conftest import REPO, start_node_process


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)


def test_version() -> None:
    from node import __version__

    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout


def test_models_lists_configured_models(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[models.chat]\naliases = ["gpt-4o-mini"]\n[models.embed]\nembedding = true\nctx_size = 512\n')
    result = run_cli("models", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split()[:3] == ["chat", "chat,completion", "4096"] and "gpt-4o-mini" in lines[1]
    assert lines[2].split()[:3] == ["embed", "embedding", "512"]


def test_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("http_base_prot = 1\n")
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 2
    assert "http_base_prot" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.engine
async def test_serve_prints_base_url_and_models(tmp_path: Path, default_model: Path) -> None:
    node = start_node_process(tmp_path / "state")
    try:
        text = "".join(node.output)
        assert "OpenAI base URL: http://127.0.0.1:" in text
        assert "model gemma3-270m" in text
        async with aiohttp.ClientSession() as session:
            response = await session.get(node.base_url + "/models")
            assert response.status == 200
            assert (await response.json())["data"][0]["id"] == "gemma3-270m"
    finally:
        node.stop()
    assert node.process.returncode == 0  # SIGTERM is a clean shutdown
