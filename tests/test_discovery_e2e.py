"""Discovery end to end: real node processes with offload enabled find each other over mDNS on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp

from .conftest import REPO, NodeProcess, start_node_process
from .offload_support import wait_until

# SIMULATED engines keep these processes light; the real engine is covered elsewhere.
CONFIG = """
[models.gemma3-270m]
engine = "simulated"
simulated_tok_per_s = {rate}

[offload]
enabled = true
"""


async def peers_of(session: aiohttp.ClientSession, node: NodeProcess) -> dict[str, dict[str, object]]:
    response = await session.get(node.root + "/v1/dvai/peers")
    assert response.status == 200
    return {p["deviceId"]: p for p in (await response.json())["data"]}


async def device_id(session: aiohttp.ClientSession, node: NodeProcess) -> str:
    return str((await (await session.get(node.root + "/v1/dvai/health")).json())["deviceId"])


async def test_three_nodes_see_each_other_and_notice_leaving_and_crashing(tmp_path: Path) -> None:
    nodes = [start_node_process(tmp_path / f"n{i}", config_text=CONFIG.format(rate=20 * (i + 1)))
             for i in range(3)]
    try:
        async with aiohttp.ClientSession() as session:
            ids = [await device_id(session, n) for n in nodes]

            async def everyone_sees_everyone() -> bool:
                for node, own in zip(nodes, ids, strict=True):
                    seen = await peers_of(session, node)
                    others = set(ids) - {own}
                    if not others <= {d for d, p in seen.items() if p["state"] == "reachable"}:
                        return False
                return True

            await wait_until(everyone_sees_everyone, 10)
            table = await peers_of(session, nodes[0])
            peer = table[ids[1]]
            assert peer["via"] == "mdns" and peer["baseUrl"] == nodes[1].base_url
            assert peer["loadedModels"] == ["gemma3-270m"]

            listing = subprocess.run([sys.executable, "-m", "node", "peers", "--state-dir", str(nodes[0].state_dir)],
                                     cwd=REPO, capture_output=True, text=True, timeout=30)
            assert listing.returncode == 0 and ids[1] in listing.stdout and "mdns" in listing.stdout

            # A clean stop sends a goodbye: the peer is gone from the others' tables.
            nodes[2].stop()

            async def gone() -> bool:
                return ids[2] not in await peers_of(session, nodes[0])

            assert await wait_until(gone, 3) < 3

            # A crash (no goodbye) is noticed by the health check within 5 s.
            os.kill(nodes[1].process.pid, signal.SIGKILL)
            nodes[1].process.wait(5)

            async def unreachable() -> bool:
                entry = (await peers_of(session, nodes[0])).get(ids[1])
                return entry is None or entry["state"] != "reachable"

            assert await wait_until(unreachable, 5.5) <= 5.5
    finally:
        for node in nodes:
            node.stop()


async def test_peers_endpoint_without_offload_says_how_to_enable(tmp_path: Path) -> None:
    node = start_node_process(tmp_path / "solo", config_text='[models.m]\nengine = "simulated"\n')
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(node.root + "/v1/dvai/peers")
            body = await response.json()
        assert response.status == 404 and body["error"]["code"] == "offload_disabled"
        assert "[offload]" in body["error"]["message"]
    finally:
        node.stop()


async def test_static_peer_is_listed(tmp_path: Path) -> None:
    target = start_node_process(tmp_path / "t", config_text=CONFIG.format(rate=50))
    # mDNS off: the only way this node can learn of the target is the static entry.
    static = (CONFIG.format(rate=5) + "discover_lan = false\n"
              + f'[[offload.known_peers]]\nbase_url = "{target.base_url}"\n')
    node = start_node_process(tmp_path / "s", config_text=static)
    try:
        async with aiohttp.ClientSession() as session:
            target_id = await device_id(session, target)

            async def listed() -> bool:
                entry = (await peers_of(session, node)).get(target_id)
                return entry is not None and entry["state"] == "reachable" and entry["via"] == "static"

            await wait_until(listed, 8)
    finally:
        node.stop()
        target.stop()
