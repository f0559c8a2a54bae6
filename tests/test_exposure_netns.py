"""A real node bound beyond loopback, in a network namespace the test creates: unsigned LAN callers
are refused unless the operator opted out, loopback callers and signed paired devices are served."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.identity import DeviceIdentity

from .conftest import REPO, start_node_process

pytestmark = pytest.mark.netns

SIMULATED = '[models.m]\nengine = "simulated"\nsimulated_tok_per_s = 500\n'  # SIMULATED engine
NODE_ADDRESS = "10.211.0.1"  # only exists inside the test's own namespace

CLIENT = textwrap.dedent("""
    import asyncio, json, sys, time
    import aiohttp
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from node.identity import DeviceIdentity
    from node.pairing import decode_key, make_handshake_proof
    from node.security import sign_request_headers

    async def main(port, secret):
        identity = DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(secret)))
        me = identity.device_id
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        out = {}
        async with aiohttp.ClientSession() as session:
            async def post(name, host, headers=None):
                async with session.post(f"http://{host}:{port}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json", **(headers or {})}) as r:
                    out[name] = [r.status, (await r.json()).get("error", {}).get("code")]
            await post("loopback", "127.0.0.1")
            await post("lan_unsigned", "%(address)s")
            async with session.get(f"http://%(address)s:{port}/v1/dvai/health") as r:
                node_id = (await r.json())["deviceId"]

            async def shake(name, proof):
                claim = {"peerDeviceId": me, "peerDeviceName": "t", "via": "lan-handshake", **proof}
                async with session.post(f"http://%(address)s:{port}/v1/dvai/handshake", json=claim) as r:
                    answer = await r.json()
                    out[name] = [r.status, answer.get("error", {}).get("code")]
                    return decode_key(answer["pairingKey"]) if r.status == 200 else None

            now = time.time_ns() // 1_000_000
            await shake("handshake_unproven", {})  # claiming the allowlisted id is not enough
            await shake("handshake_other_key", make_handshake_proof(DeviceIdentity.generate(), node_id, now))
            key = await shake("handshake", make_handshake_proof(identity, node_id, now))
            if key is not None:
                await post("lan_signed", "%(address)s",
                           sign_request_headers(key, me, me, "POST", "/v1/chat/completions", body))
            async with session.get(f"http://%(address)s:{port}/v1/dvai/pairings") as r:
                out["admin_from_lan"] = r.status
            async with session.get(f"http://%(address)s:{port}/v1/dvai/health",
                                   headers={"Host": "evil.example:80"}) as r:
                out["rebinding"] = r.status
        print(json.dumps(out))

    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
""") % {"address": NODE_ADDRESS}


def _can_make_namespaces() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def namespace() -> Iterator[str]:
    if not _can_make_namespaces():
        pytest.skip("creating network namespaces needs root and iproute2")
    name = f"dvai-expose-{secrets.token_hex(3)}"
    commands = [
        ["ip", "netns", "add", name],
        ["ip", "-n", name, "link", "set", "lo", "up"],
        ["ip", "-n", name, "link", "add", "ea", "type", "veth", "peer", "name", "eb"],
        ["ip", "-n", name, "addr", "add", f"{NODE_ADDRESS}/24", "dev", "ea"],
        ["ip", "-n", name, "link", "set", "ea", "up"],
        ["ip", "-n", name, "link", "set", "eb", "up"],
    ]
    try:
        for command in commands:
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace here: {done.stderr.strip()}")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def run_client(namespace: str, port: int, device: DeviceIdentity) -> dict[str, object]:
    """Run CLIENT in the namespace as ``device`` (its private key is passed on the command line)."""
    secret = device.private_bytes().hex()
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, str(port), secret],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_exposed_node_requires_signatures_from_the_lan(namespace: str, tmp_path: Path) -> None:
    device = DeviceIdentity.generate()
    config = SIMULATED + f'[security]\npairing_policy = "allowlist"\npairing_allowlist = ["{device.device_id}"]\n'
    node = start_node_process(tmp_path / "n", config_text=config, args=["--host", "0.0.0.0"],
                              prefix=["ip", "netns", "exec", namespace])
    try:
        port = int(node.base_url.rsplit(":", 1)[1].split("/")[0])
        results = run_client(namespace, port, device)
    finally:
        node.stop()
    assert results["loopback"] == [200, None]
    assert results["lan_unsigned"] == [401, "signature_required"]
    assert results["handshake_unproven"] == [403, "device_proof_required"]  # a claimed id is not enough
    assert results["handshake_other_key"] == [401, "device_proof_invalid"]
    assert results["handshake"] == [200, None]  # the allowlisted device, proven, may pair over the LAN …
    assert results["lan_signed"] == [200, None]  # … and then sign its requests
    assert results["admin_from_lan"] in (401, 403)
    assert results["rebinding"] == 403


def test_operator_can_open_the_lan_explicitly(namespace: str, tmp_path: Path) -> None:
    config = SIMULATED + '[security]\nallow_anonymous_lan = true\npairing_policy = "allowlist"\n'
    node = start_node_process(tmp_path / "n", config_text=config, args=["--host", "0.0.0.0"],
                              prefix=["ip", "netns", "exec", namespace])
    try:
        port = int(node.base_url.rsplit(":", 1)[1].split("/")[0])
        results = run_client(namespace, port, DeviceIdentity.generate())
        log = "".join(node.output)
    finally:
        node.stop()
    assert results["lan_unsigned"] == [200, None]
    assert results["admin_from_lan"] in (401, 403)  # admin stays loopback-only
    assert "allow_anonymous_lan" in log and "WARNING" in log


LOCAL_CLIENT = textwrap.dedent("""
    import json, sys
    import openai
    out = {}
    for name, url in (("loopback", sys.argv[1]), ("lan", sys.argv[2])):
        client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0)
        try:
            reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
            out[name] = [200, reply.choices[0].message.content]
        except openai.APIStatusError as exc:
            out[name] = [exc.status_code, exc.body]
    print(json.dumps(out))
""")


def test_node_bound_to_its_lan_address_stays_operable_by_its_owner(namespace: str, tmp_path: Path) -> None:
    """Bound to one LAN address: the node also listens on loopback, its CLI finds it there, a local
    OpenAI client works with the loopback URL it printed, and the LAN URL still demands signatures
    with advice that names the loopback URL."""
    state = tmp_path / "n"
    config = SIMULATED + '[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n'
    node = start_node_process(state, config_text=config, args=["--host", NODE_ADDRESS],
                              prefix=["ip", "netns", "exec", namespace])
    try:
        assert node.base_url.startswith(f"http://{NODE_ADDRESS}:")
        port = node.base_url.rsplit(":", 1)[1].split("/")[0]
        local_url = f"http://127.0.0.1:{port}/v1"
        assert f"from this machine (unsigned): {local_url}" in "".join(node.output)

        def cli(*words: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-m", "node", *words,
                                   "--state-dir", str(state), "--config", str(state / "node.toml")],
                                  capture_output=True, text=True, cwd=REPO, timeout=60)

        listed = cli("pairing", "list", "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
        found = cli("peers", "--json")
        assert found.returncode == 0 and json.loads(found.stdout) == [], found.stderr
        client = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", LOCAL_CLIENT,
                                 local_url, node.base_url], capture_output=True, text=True, cwd=REPO, timeout=60)
        assert client.returncode == 0, client.stderr
        results = json.loads(client.stdout.strip().splitlines()[-1])
        audit = cli("audit", "--json")
        assert audit.returncode == 0, audit.stderr
        rows = json.loads(audit.stdout)
    finally:
        node.stop()
    assert results["loopback"][0] == 200 and results["loopback"][1]
    status, body = results["lan"]
    body = body.get("error", body)  # the SDK's APIStatusError.body: the error object
    assert status == 401 and body["code"] == "signature_required"  # the LAN address still demands signatures
    assert "http://127.0.0.1:<port>/v1" in body["message"] and "allow_anonymous_lan" in body["message"]
    assert [(r["peerDeviceId"], r["status"]) for r in rows[:2]] == [("anonymous", 401), ("self", 200)]
