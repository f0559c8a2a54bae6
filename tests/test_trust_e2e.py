"""Trust end to end: two real node processes pair through the CLI, sign, audit, revoke, restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from node.pairing import decode_key
from node.security import sign_request_headers

from .conftest import REPO, NodeProcess, start_node_process

pytestmark = pytest.mark.engine

SIMULATED = '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 200\n'  # SIMULATED engine


def cli(state: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node", *args, "--state-dir", str(state)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def outbound_key(state: Path, peer: str) -> tuple[bytes, str]:
    records = json.loads((state / "pairings.json").read_text())
    items = records["pairings"] if isinstance(records, dict) else records
    for item in items:
        if item["peerDeviceId"] == peer and item["role"] in ("outbound", "mutual"):
            return decode_key(item["pairingKey"]), item["ourAppId"]  # the app id this side signs as
    raise AssertionError(f"no outbound pairing with {peer} in {records}")


async def signed_chat(node: NodeProcess, key: bytes, device: str, app: str, *, tamper: bool = False) -> int:
    body = json.dumps({"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 3}).encode()
    headers = sign_request_headers(key, device, app, "POST", "/v1/chat/completions", body)
    if tamper:
        headers["X-DVAI-Signature"] = ("0" if headers["X-DVAI-Signature"][0] != "0" else "1") + \
            headers["X-DVAI-Signature"][1:]
    headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as session:
        response = await session.post(node.base_url + "/chat/completions", data=body, headers=headers)
        await response.read()
        return response.status


async def test_pair_by_prompt_sign_audit_restart_revoke(tmp_path: Path, default_model: Path) -> None:
    a_state, b_state = tmp_path / "a", tmp_path / "b"
    a = start_node_process(a_state, config_text='[security]\npairing_policy = "prompt"\n')
    b = start_node_process(b_state, config_text=SIMULATED)
    try:
        a_id = (await _health(a))["deviceId"]
        b_id = (await _health(b))["deviceId"]

        # B's default policy is deny: an unsolicited handshake is refused.
        async with aiohttp.ClientSession() as session:
            refused = await session.post(b.root + "/v1/dvai/handshake",
                                         json={"peerDeviceId": a_id, "peerDeviceName": "x", "via": "lan-handshake"})
            assert refused.status == 403
            assert (await refused.json())["error"]["type"] == "permission_error"

        # B asks A; A's operator sees the request and approves it.
        pairing = subprocess.Popen([sys.executable, "-m", "node", "pair", a.base_url, "--state-dir", str(b_state)],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        pending: list[dict[str, str]] = []
        for _ in range(100):
            listed = cli(a_state, "pairing", "pending", "--json")
            assert listed.returncode == 0, listed.stderr
            pending = json.loads(listed.stdout)
            if pending:
                break
            time.sleep(0.1)
        assert [(p["peerDeviceId"], p["proven"]) for p in pending] == [(b_id, True)]  # B proved its id
        assert cli(a_state, "pairing", "approve", b_id).returncode == 0
        out, err = pairing.communicate(timeout=30)
        assert pairing.returncode == 0, err
        assert a_id in out

        a_list = json.loads(cli(a_state, "pairing", "list", "--json").stdout)
        assert [(p["peerDeviceId"], p["role"]) for p in a_list] == [(b_id, "inbound")]
        assert "key" not in a_list[0]
        key, app = outbound_key(b_state, a_id)
        assert len(key) == 32

        # Signed by B: served and attributed; a tampered signature: refused; both audited.
        assert app == b_id  # `pair` without --app-id binds B's own device id
        assert await signed_chat(a, key, b_id, app) == 200
        # The other way round the pairing gives nothing: B holds an outbound record only.
        assert await signed_chat(b, key, a_id, app) == 401
        assert await signed_chat(a, key, b_id, app, tamper=True) == 401
        rows = json.loads(cli(a_state, "audit", "--json").stdout)
        statuses = {(r["peerDeviceId"], r["status"]) for r in rows}
        assert (b_id, 200) in statuses
        served = next(r for r in rows if r["status"] == 200)
        assert served["completionTokens"] >= 1 and served["modelServed"] == "gemma3-270m"
        assert any(r["status"] == 401 and r["errorCode"] for r in rows)
        table = cli(a_state, "audit")
        assert "SERVED BY" in table.stdout and "/v1/chat/completions" in table.stdout

        # The pairing survives a restart of A.
        a.stop()
        a = start_node_process(a_state, config_text='[security]\npairing_policy = "prompt"\n')
        assert await signed_chat(a, key, b_id, app) == 200

        # Revoked: the key stops working at once.
        assert cli(a_state, "pairing", "revoke", b_id).returncode == 0
        assert await signed_chat(a, key, b_id, app) == 401
        assert json.loads(cli(a_state, "pairing", "list", "--json").stdout) == []
    finally:
        a.stop()
        b.stop()


async def test_denied_pairing_reports_failure(tmp_path: Path) -> None:
    a_state, b_state = tmp_path / "a", tmp_path / "b"
    a = start_node_process(a_state, config_text=SIMULATED + '[security]\npairing_policy = "prompt"\n')
    b = start_node_process(b_state, config_text=SIMULATED)
    try:
        b_id = (await _health(b))["deviceId"]
        pairing = subprocess.Popen([sys.executable, "-m", "node", "pair", a.base_url, "--state-dir", str(b_state)],
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(100):
            if json.loads(cli(a_state, "pairing", "pending", "--json").stdout):
                break
            time.sleep(0.1)
        assert cli(a_state, "pairing", "deny", b_id).returncode == 0
        _, err = pairing.communicate(timeout=30)
        assert pairing.returncode == 1 and "403" in err
        assert json.loads(cli(b_state, "pairing", "list", "--json").stdout) == []
        missing = cli(a_state, "pairing", "approve", b_id)
        assert missing.returncode == 1 and "404" in missing.stderr
    finally:
        a.stop()
        b.stop()


def test_admin_commands_without_a_running_node(tmp_path: Path) -> None:
    result = cli(tmp_path / "nowhere", "pairing", "list")
    assert result.returncode == 1 and "no running node" in result.stderr


async def test_foreign_web_origin_cannot_post(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "o", config_text=SIMULATED)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(node.base_url + "/chat/completions", data=b"{}",
                                          headers={"Origin": "https://evil.example", "Content-Type": "text/plain"})
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "origin_not_allowed"
    finally:
        node.stop()


async def _health(node: NodeProcess) -> dict[str, object]:
    async with aiohttp.ClientSession() as session:
        response = await session.get(node.root + "/v1/dvai/health")
        return dict(await response.json())
