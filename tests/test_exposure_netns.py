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
    import asyncio, json, sys
    import aiohttp
    from node.security import decode_key, sign_request_headers

    async def main(port, me):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
        out = {}
        async with aiohttp.ClientSession() as session:
            async def post(name, host, headers=None):
                async with session.post(f"http://{host}:{port}/v1/chat/completions", data=body,
                                        headers={"Content-Type": "application/json", **(headers or {})}) as r:
                    out[name] = [r.status, (await r.json()).get("error", {}).get("code")]
            await post("loopback", "127.0.0.1")
            await post("lan_unsigned", "%(address)s")
            async with session.post(f"http://%(address)s:{port}/v1/dvai/handshake",
                                    json={"peerDeviceId": me, "peerDeviceName": "t", "via": "lan-handshake"}) as r:
                out["handshake"] = r.status
                key = decode_key((await r.json())["pairingKey"]) if r.status == 200 else None
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


def run_client(namespace: str, port: int, device_id: str) -> dict[str, object]:
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c", CLIENT, str(port), device_id],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_exposed_node_requires_signatures_from_the_lan(namespace: str, tmp_path: Path) -> None:
    device = DeviceIdentity.generate().device_id
    config = SIMULATED + f'[security]\npairing_policy = "allowlist"\npairing_allowlist = ["{device}"]\n'
    node = start_node_process(tmp_path / "n", config_text=config, args=["--host", "0.0.0.0"],
                              prefix=["ip", "netns", "exec", namespace])
    try:
        port = int(node.base_url.rsplit(":", 1)[1].split("/")[0])
        results = run_client(namespace, port, device)
    finally:
        node.stop()
    assert results["loopback"] == [200, None]
    assert results["lan_unsigned"] == [401, "signature_required"]
    assert results["handshake"] == 200  # the allowlisted device may pair over the LAN …
    assert results["lan_signed"] == [200, None]  # … and then sign its requests
    assert results["admin_from_lan"] in (401, 403)
    assert results["rebinding"] == 403


def test_operator_can_open_the_lan_explicitly(namespace: str, tmp_path: Path) -> None:
    config = SIMULATED + '[security]\nallow_anonymous_lan = true\npairing_policy = "allowlist"\n'
    node = start_node_process(tmp_path / "n", config_text=config, args=["--host", "0.0.0.0"],
                              prefix=["ip", "netns", "exec", namespace])
    try:
        port = int(node.base_url.rsplit(":", 1)[1].split("/")[0])
        results = run_client(namespace, port, DeviceIdentity.generate().device_id)
        log = "".join(node.output)
    finally:
        node.stop()
    assert results["lan_unsigned"] == [200, None]
    assert results["admin_from_lan"] in (401, 403)  # admin stays loopback-only
    assert "allow_anonymous_lan" in log and "WARNING" in log
