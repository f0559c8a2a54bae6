"""QR pairing end to end: a real `dvai-rendezvous` process and two real node processes, driven by the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from node.pairing import Pairing
from node.security import sign_with_pairing

from .conftest import REPO, NodeProcess, free_port, start_node_process
from .offload_support import peer_state, wait_until

SIMULATED = '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 200\n'  # SIMULATED engine


@pytest.fixture
def rendezvous(tmp_path: Path):  # noqa: ANN201
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--host", "127.0.0.1", "--port", str(port),
         "--db", str(tmp_path / "rv.sqlite3")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    import urllib.request

    for _ in range(100):
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.1)
    else:
        process.kill()
        raise RuntimeError("rendezvous did not start")
    yield url
    process.terminate()
    process.wait(10)


def node_config(rendezvous_url: str) -> str:
    return SIMULATED + f'[offload]\nrendezvous_url = "{rendezvous_url}"\n'


async def test_qr_pairing_through_the_cli(tmp_path: Path, rendezvous: str) -> None:
    """Pair by QR with the CLI, then use the pairing both ways: signed requests from each side (signed
    as the signer's own record says) and an offload from the slow node to the fast one."""
    a_state, b_state = tmp_path / "a", tmp_path / "b"
    b = start_node_process(b_state, config_text=node_config(rendezvous))  # 200 tok/s, offload off
    slow = (f'[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 2\n'  # SIMULATED, slow
            f'[offload]\nrendezvous_url = "{rendezvous}"\nenabled = true\ndiscover_lan = false\n'
            'probe_on_start = false\nmin_local_capability = 4\nhealth_interval = 0.5\n'
            f'[[offload.known_peers]]\nbase_url = "{b.base_url}"\n')
    a = start_node_process(a_state, config_text=slow)
    try:
        shower = subprocess.Popen([sys.executable, "-m", "node", "pair", "--qr", "--state-dir", str(a_state)],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert shower.stdout is not None
        payload = None
        lines = []
        for _ in range(200):
            line = shower.stdout.readline()
            lines.append(line)
            match = re.search(r"--scan '(dvai://pair\?[^']+)'", line)
            if match:
                payload = match.group(1)
                break
        assert payload is not None, "".join(lines)
        assert "█" in "".join(lines) or "▀" in "".join(lines)  # a QR code was drawn in the terminal
        scan = subprocess.run([sys.executable, "-m", "node", "pair", "--scan", payload, "--state-dir", str(b_state)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        assert scan.returncode == 0, scan.stderr
        code_b = re.search(r"short code: (\d{6})", scan.stdout)
        out, err = shower.communicate(timeout=30)
        assert shower.returncode == 0, err
        code_a = re.search(r"short code: (\d{6})", out)
        assert code_a and code_b and code_a.group(1) == code_b.group(1)

        a_id, b_id = await _device_id(a), await _device_id(b)
        for target, signer_state, target_id, signer_id in ((a, b_state, a_id, b_id), (b, a_state, b_id, a_id)):
            record = _record(signer_state, target_id)  # what the signing node itself holds
            assert record.our_app_id == signer_id and record.peer_app_id == target_id
            assert await _signed_status(target, record, signer_id) == 200  # accepted in each direction
            forged = Pairing(**{**{f: getattr(record, f) for f in ("peer_device_id", "peer_device_name", "via",
                                                                    "paired_at", "role", "our_app_id",
                                                                    "peer_app_id")}, "key": bytes(32)})
            assert await _signed_status(target, forged, signer_id) == 401
        listed = subprocess.run([sys.executable, "-m", "node", "pairing", "list", "--json", "--state-dir",
                                 str(a_state)], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert [(p["peerDeviceId"], p["via"], p["role"], p["ourAppId"], p["peerAppId"])
                for p in json.loads(listed.stdout)] == [(b_id, "rendezvous", "mutual", a_id, b_id)]

        # The node's own forwarder signs over the QR pairing: the slow node hands the request to B.
        async with aiohttp.ClientSession() as session:
            async def b_reachable() -> bool:
                return await peer_state(session, a.root, b_id) == "reachable"

            await wait_until(b_reachable, 20)
            async with session.post(a.base_url + "/chat/completions", headers={"X-DVAI-Offload": "require"},
                                    json={"model": "gemma3-270m", "max_tokens": 3,
                                          "messages": [{"role": "user", "content": "hi"}]}) as response:
                body = await response.json()
                assert response.status == 200, body
                assert response.headers["X-DVAI-Served-By"] == b_id
            async with session.get(b.root + "/v1/dvai/audit", params={"peer": a_id}) as response:
                rows = (await response.json())["data"]
            assert rows and rows[0]["appId"] == a_id and rows[0]["status"] == 200
    finally:
        a.stop()
        b.stop()


async def test_pair_qr_without_rendezvous_is_a_clear_error(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "n", config_text=SIMULATED)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.post(node.root + "/v1/dvai/pair-qr")
            body = await response.json()
            assert response.status == 409 and "rendezvous_url" in body["error"]["message"]
            bad = await session.post(node.root + "/v1/dvai/pair-scan", json={"payload": "http://x"})
            assert bad.status == 400 and (await bad.json())["error"]["param"] == "payload"
    finally:
        node.stop()


def _record(state: Path, peer: str) -> Pairing:
    records = json.loads((state / "pairings.json").read_text())
    assert records["version"] == 3
    return next(Pairing.from_json(i) for i in records["pairings"] if i["peerDeviceId"] == peer)


async def _device_id(node: NodeProcess) -> str:
    async with aiohttp.ClientSession() as session:
        return str((await (await session.get(node.root + "/v1/dvai/health")).json())["deviceId"])


async def _signed_status(node: NodeProcess, pairing: Pairing, caller: str) -> int:
    body = json.dumps({"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    headers = sign_with_pairing(pairing, caller, "POST", "/v1/chat/completions", body)
    headers["X-DVAI-Offload"] = "never"
    headers["Content-Type"] = "application/json"
    async with aiohttp.ClientSession() as session:
        response = await session.post(node.base_url + "/chat/completions", data=body, headers=headers)
        await response.read()
        return response.status
