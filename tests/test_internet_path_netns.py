"""The internet path across real NATs: two homes behind iptables MASQUERADE, a public
network with the rendezvous and coturn (``tests/netns_support.py`` draws it).

The coturn run here uses the shipped ``deploy/rendezvous/turnserver.conf`` (with its
refusal to relay into private ranges), the rendezvous mints its credentials.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import NodeProcess, start_node_process
from .netns_support import SERVER_IP, Homes, make_homes

REPO = Path(__file__).resolve().parent.parent
TURN_SECRET = "netns-test-turn-secret-0123456789"
RENDEZVOUS_URL = f"http://{SERVER_IP}:38980"
pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]


@dataclass
class PublicServers:
    homes: Homes
    processes: list[subprocess.Popen[str]]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}


def _wait_port(homes: Homes, role: str, port: int, proto: str = "tcp", within: float = 15) -> None:
    flag = "-tln" if proto == "tcp" else "-uln"
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        listing = homes.sh(role, "ss", flag, check=False).stdout
        if f":{port} " in listing:
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {proto} {port} in {role}")


@pytest.fixture
def servers() -> Iterator[PublicServers]:
    with public_servers() as running:
        yield running


@contextlib.contextmanager
def public_servers() -> Iterator[PublicServers]:
    """The homes, and the rendezvous and coturn running on the public network."""
    if shutil.which("turnserver") is None:
        pytest.skip("coturn is not installed (apt-get install coturn; .ci/run does)")
    homes = make_homes()
    processes: list[subprocess.Popen[str]] = []
    try:
        processes.append(subprocess.Popen(
            [*homes.exec_prefix("srv"), sys.executable, "-m", "rendezvous", "--host", SERVER_IP, "--port", "38980",
             "--db", ":memory:"],
            env={**_env(), "DVAI_RENDEZVOUS_TURN_SECRET": TURN_SECRET,
                 "DVAI_RENDEZVOUS_TURN_URLS": json.dumps([f"turn:{SERVER_IP}:3478?transport=udp"])},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
        processes.append(subprocess.Popen(
            [*homes.exec_prefix("srv"), "turnserver", "-c", str(REPO / "deploy/rendezvous/turnserver.conf"),
             f"--static-auth-secret={TURN_SECRET}", "--listening-ip", SERVER_IP, "--relay-ip", SERVER_IP,
             "--realm", "netns.test", "--no-tls", "--no-dtls", "--pidfile", "/dev/null",
             "--allowed-peer-ip", "198.51.100.0-198.51.100.255"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True))
        _wait_port(homes, "srv", 38980)
        _wait_port(homes, "srv", 3478, "udp")
        yield PublicServers(homes, processes)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
        homes.delete()


def _link_peer(homes: Homes, side: str, mode: str, seeds: dict[str, str], key: str, ice: list[object],
               *extra: str) -> list[str]:
    other = "b" if side == "a" else "a"
    return [*homes.exec_prefix(side), sys.executable, "-m", "tests.link_peer", mode, "--rendezvous", RENDEZVOUS_URL,
            "--seed", seeds[side], "--peer-seed", seeds[other], "--key", key, "--ice", json.dumps(ice), *extra]


def _call_across(servers: PublicServers, ice: list[object], *extra: str) -> dict[str, object]:
    homes = servers.homes
    seeds = {"a": os.urandom(32).hex(), "b": os.urandom(32).hex()}
    key = os.urandom(32).hex()
    serving = subprocess.Popen(_link_peer(homes, "b", "serve", seeds, key, ice, *extra), cwd=REPO, env=_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert serving.stdout is not None and "ready" in serving.stdout.readline()
        caller = subprocess.run(_link_peer(homes, "a", "call", seeds, key, ice, *extra), cwd=REPO, env=_env(),
                                capture_output=True, text=True, timeout=60)
        lines = [json.loads(line) for line in caller.stdout.splitlines() if line.startswith("{")]
        return lines[-1]
    finally:
        serving.terminate()
        serving.wait(10)


def test_link_across_two_nats_goes_direct_with_stun(servers: PublicServers) -> None:
    result = _call_across(servers, [{"urls": [f"stun:{SERVER_IP}:3478"]}])
    assert result["ok"] is True and result["bytes"] == 256 * 1024, result
    assert result["state"] == "direct"


def test_link_falls_back_to_turn_when_udp_between_the_nats_is_blocked(servers: PublicServers) -> None:
    servers.homes.block_udp_between_nats()
    # TURN credentials minted by the rendezvous (coturn's shared secret), not configured
    result = _call_across(servers, [{"urls": [f"stun:{SERVER_IP}:3478"]}], "--rendezvous-turn")
    assert result["ok"] is True and result["bytes"] == 256 * 1024, result
    assert result["state"] == "relayed"


# -- nodes in the homes ------------------------------------------------------------------------

SIMULATED_NODE = (  # SIMULATED engine: the network is under test here, not the model
    '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 200\n'
    "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n"
    f'rendezvous_url = "{RENDEZVOUS_URL}"\npresence_interval = 0.5\nrendezvous_turn = true\n'
    f'[[offload.ice_servers]]\nurls = ["stun:{SERVER_IP}:3478"]\n'
)


def http_in(homes: Homes, side: str, method: str, url: str, body: object = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """An HTTP request made from inside the ``side`` namespace (where the node's loopback is)."""
    args = [*homes.exec_prefix(side), sys.executable, "-m", "tests.netns_http", method, url,
            json.dumps(body) if body is not None else "", *(f"{k}={v}" for k, v in (headers or {}).items())]
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=90)
    answer = json.loads(done.stdout)
    return answer["status"], answer["headers"], answer["body"]


@dataclass
class HomeNodes:
    homes: Homes
    a: NodeProcess
    b: NodeProcess
    b_id: str


@pytest.fixture
def home_nodes(servers: PublicServers, tmp_path: Path) -> Iterator[HomeNodes]:
    homes = servers.homes
    a = start_node_process(tmp_path / "a", config_text=SIMULATED_NODE, prefix=homes.exec_prefix("a"))
    try:
        b = start_node_process(tmp_path / "b", config_text=SIMULATED_NODE, prefix=homes.exec_prefix("b"))
    except BaseException:
        a.stop()
        raise
    try:
        _, _, health = http_in(homes, "b", "GET", b.root + "/v1/dvai/health")
        b_id = json.loads(health)["deviceId"]
        status, _, offer = http_in(homes, "a", "POST", a.root + "/v1/dvai/pair-qr")
        assert status == 200, offer
        payload = json.loads(offer)
        status, _, scanned = http_in(homes, "b", "POST", b.root + "/v1/dvai/pair-scan",
                                     {"payload": payload["payload"]})
        assert status == 200, scanned  # QR pairing across both NATs, through the rendezvous
        yield HomeNodes(homes, a, b, b_id)
    finally:
        a.stop()
        b.stop()


def wait_for_peer(nodes: HomeNodes, predicate: Callable[[dict[str, Any]], bool], within: float = 40) -> dict[str, Any]:
    deadline = time.monotonic() + within
    peers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        _, _, body = http_in(nodes.homes, "a", "GET", nodes.a.root + "/v1/dvai/peers")
        peers = json.loads(body)["data"]
        for peer in peers:
            if peer["deviceId"] == nodes.b_id and predicate(peer):
                return peer
        time.sleep(0.5)
    raise AssertionError(f"no peer {nodes.b_id} as wanted: {peers}")


def test_qr_paired_nodes_in_two_homes_see_each_other_through_the_rendezvous(home_nodes: HomeNodes) -> None:
    peer = wait_for_peer(home_nodes, lambda p: p["state"] == "reachable")
    assert peer["via"] == "rendezvous" and peer["identityVerified"] is True
    assert peer["link"]["state"] == "direct"  # STUN-discovered addresses through both NATs
