"""The `dvai-node` command line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from node.constants import DEFAULT_QUEUE_DEPTH

from .conftest import REPO, start_node_process
from .offload_support import (
    PEERS_FILE_ENV,
    chat,
    device_id_for,
    node_config,
    pair,
    peer_state,
    simulated_models,
    wait_until,
    write_forged_capability,
)


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
        assert "model smollm2-135m: built-in SmolLM2 135M Instruct" in text
        assert "model gemma3-270m: built-in Gemma 3 270M base (Q4_K_M) (loads on first use)" in text
        async with aiohttp.ClientSession() as session:
            response = await session.get(node.base_url + "/models")
            assert response.status == 200
            models = (await response.json())["data"]
            assert [(m["id"], m["loaded"]) for m in models] == [("smollm2-135m", True), ("gemma3-270m", False)]
    finally:
        node.stop()
    assert node.process.returncode == 0  # SIGTERM is a clean shutdown


# --------------------------------------------------------------------------
# Flags: each command shows its own


CLIENT_COMMANDS = ("peers", "pair", "pairing", "audit", "status", "ps")
SERVE_ONLY_FLAGS = ("--model", "--host", "--port", "--log-level")


def help_text(*command: str) -> str:
    result = run_cli(*command, "--help")
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.parametrize("command", CLIENT_COMMANDS)
def test_client_commands_show_their_own_flags_not_the_serve_flags(command: str) -> None:
    text = help_text(command)
    assert "--url" in text and "--state-dir" in text and "--json" in text
    assert not [flag for flag in SERVE_ONLY_FLAGS if flag in text], text


def test_models_takes_config_and_model_only() -> None:
    text = help_text("models")
    assert "--config" in text and "--model PATH" in text
    assert not [flag for flag in ("--host", "--port", "--log-level", "--url") if flag in text], text


def test_serve_help_describes_the_state_dir_and_log_level() -> None:
    text = " ".join(help_text("serve").split())
    assert "caches live" not in text and "(not the model cache)" in text
    assert "identity key, pairings, audit log" in text
    assert "--log-level LEVEL how much the node logs: debug, info, warning, error (default info)" in text


def test_audit_help_documents_until_and_limit() -> None:
    text = " ".join(help_text("audit").split())
    assert "--until SECONDS only rows older than this many seconds" in text
    assert "--limit N show at most N rows, newest first (1 to 10000, default 50)" in text


def test_rendezvous_version() -> None:
    from node import __version__

    result = subprocess.run([sys.executable, "-m", "rendezvous", "--version"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"dvai-rendezvous {__version__}"


# --------------------------------------------------------------------------
# models checks the files it lists


def test_models_fails_naming_what_is_wrong_with_the_model_file(tmp_path: Path) -> None:
    missing = run_cli("models", "--model", str(tmp_path / "missing.gguf"))
    assert missing.returncode == 1 and f"{tmp_path / 'missing.gguf'}: no such file" in missing.stderr
    directory = run_cli("models", "--model", str(tmp_path))
    assert directory.returncode == 1 and "is a directory, not a GGUF file" in directory.stderr
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a model\n")
    not_gguf = run_cli("models", "--model", str(text_file))
    assert not_gguf.returncode == 1 and "notes.gguf: not a GGUF file" in not_gguf.stderr
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00")  # the magic number: models only checks the file type
    listed = run_cli("models", "--model", str(gguf))
    assert listed.returncode == 0 and listed.stderr == "" and "tiny" in listed.stdout
    for result in (missing, directory, not_gguf):
        assert "Traceback" not in result.stderr and result.stdout.startswith("ID")


# --------------------------------------------------------------------------
# Against a running node


SIMULATED_NODE = '[models.sim]\nengine = "simulated"\nsimulated_tok_per_s = 200\n'


async def test_audit_until_bounds_rows_by_age(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "state", config_text=SIMULATED_NODE)
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            async with session.post(node.base_url + "/chat/completions", json=body) as response:
                assert response.status == 200
        state = ["--state-dir", str(node.state_dir), "--json"]
        everything = json.loads(run_cli("audit", *state, "--until", "0").stdout)
        assert [row["endpoint"] for row in everything] == ["/v1/chat/completions"]
        older_than_an_hour = run_cli("audit", *state, "--until", "3600")
        assert older_than_an_hour.returncode == 0 and json.loads(older_than_an_hour.stdout) == []
        window = json.loads(run_cli("audit", *state, "--since", "3600", "--until", "0").stdout)
        assert window == everything
        refused = run_cli("audit", *state, "--limit", "0")
        assert refused.returncode == 1 and "limit" in refused.stderr
    finally:
        node.stop()


@pytest.mark.engine
async def test_status_shows_models_state_queue_and_keep_alive(tmp_path: Path, default_model: Path) -> None:
    config = (f'[models.gemma3-270m]\nqueue_depth = 3\nkeep_alive = 300\n'
              f'[models.later]\npath = "{default_model}"\npreload = false\n')
    node = start_node_process(tmp_path / "state", config_text=config)
    try:
        async with aiohttp.ClientSession() as session:
            body = {"model": "gemma3-270m", "prompt": "Hello", "max_tokens": 2}
            async with session.post(node.base_url + "/completions", json=body) as response:
                assert response.status == 200
            async with session.get(node.base_url + "/dvai/status", headers={"Origin": "http://evil.example"}) as r:
                assert r.status == 403  # loopback admin endpoint: browsers are refused
        state = ["--state-dir", str(node.state_dir)]
        result = run_cli("status", *state, "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        models = {m["id"]: m for m in status["models"]}
        ready, later = models["gemma3-270m"], models["later"]
        assert (ready["state"], ready["queueDepth"], ready["queueLimit"], ready["keepAliveS"]) == ("ready", 0, 3, 300)
        assert 240 < ready["keepAliveLeftS"] <= 300
        assert (later["state"], later["keepAliveLeftS"]) == ("unloaded", None)
        assert status["offload"]["enabled"] is False and status["peers"] == []
        assert status["baseUrl"] == node.base_url and status["status"] == "ok"

        text = run_cli("ps", *state)
        assert text.returncode == 0, text.stderr
        rows = {line.split()[0]: line.split() for line in text.stdout.splitlines() if line.strip()}
        assert rows["gemma3-270m"][1:3] == ["ready", "0/3"] and rows["gemma3-270m"][3] in ("4m", "5m")
        assert rows["later"][1:4] == ["unloaded", f"0/{DEFAULT_QUEUE_DEPTH}", "-"]
        assert "offload: disabled" in text.stdout
    finally:
        node.stop()


async def test_status_shows_peers_and_offload_counts(tmp_path: Path) -> None:
    """Two real node processes on SIMULATED engines: a slow one offloads to a fast paired peer."""
    fast_state, slow_state = tmp_path / "fast", tmp_path / "slow"
    slow_id = device_id_for(slow_state)
    fast = start_node_process(fast_state, config_text=node_config(simulated_models({"sim": 40}), offload=False,
                                                                  allow=[slow_id]))
    slow = None
    try:
        peers_file = tmp_path / "peers.json"
        fast_id = device_id_for(fast_state)
        peers_file.write_text(json.dumps([{"baseUrl": fast.base_url, "deviceId": fast_id,
                                           "capability": {"sim": 30}}]))
        write_forged_capability(slow_state, "sim", 2.0)
        slow = start_node_process(slow_state, config_text=node_config(simulated_models({"sim": 2}), threshold=4,
                                                                      custom_discovery=True),
                                  env={PEERS_FILE_ENV: str(peers_file)})
        async with aiohttp.ClientSession() as session:
            async def reachable() -> bool:
                return await peer_state(session, slow.root, fast_id) == "reachable"

            await wait_until(reachable, 15)
            await pair(session, slow.root, fast.base_url)
            async with session.post(slow.base_url + "/chat/completions", json=chat("sim", max_tokens=3)) as response:
                assert response.status == 200 and response.headers["X-DVAI-Served-By"] == fast_id
        result = run_cli("status", "--state-dir", str(slow_state), "--json")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert status["offload"] == {"enabled": True, "forwarded": 1, "failed": 0, "inFlight": 0}
        [peer] = status["peers"]
        assert (peer["deviceId"], peer["state"], peer["forwarded"], peer["circuit"]) == (fast_id, "reachable", 1,
                                                                                        "closed")
        text = run_cli("status", "--url", slow.base_url).stdout
        assert "offload: 1 forwarded to peers, 0 failed, 0 in flight" in text
        [line] = [line for line in text.splitlines() if fast_id in line]
        assert line.split()[-5:] == ["reachable", "sim", "1", "0", "closed"]
    finally:
        fast.stop()
        if slow is not None:
            slow.stop()
