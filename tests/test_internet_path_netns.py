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


# -- nodes in the homes ------------------------------------------------------------------------

SIMULATED_NODE = (  # SIMULATED engine: the network is under test here, not the model
    '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = {rate}\n'
    "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\ncircuit_break_s = 1.0\n"
    f'rendezvous_url = "{RENDEZVOUS_URL}"\npresence_interval = 0.5\nrendezvous_turn = {{turn}}\n'
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
    with running_home_nodes(servers, tmp_path) as nodes:
        yield nodes


@contextlib.contextmanager
def running_home_nodes(servers: PublicServers, tmp_path: Path, *, turn: bool = False) -> Iterator[HomeNodes]:
    """A slow node (SIMULATED 2 tok/s) in home A QR-paired with a fast one (SIMULATED 200 tok/s) in B."""
    homes = servers.homes
    flag = str(turn).lower()
    a = start_node_process(tmp_path / "a", config_text=SIMULATED_NODE.format(rate=2, turn=flag),
                           prefix=homes.exec_prefix("a"))
    try:
        b = start_node_process(tmp_path / "b", config_text=SIMULATED_NODE.format(rate=200, turn=flag),
                               prefix=homes.exec_prefix("b"))
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


CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Count for me"}], "max_tokens": 32,
        "stream": True}
REQUIRE = {"X-DVAI-Offload": "require"}


def sse_text(sse: str) -> tuple[str, bool, bool]:
    """(content, saw [DONE], saw an error event)."""
    text, done, error = [], False, False
    for line in sse.splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            error = error or "error" in event
            text.extend(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))
    return "".join(text), done, error


def test_require_across_two_nats_is_served_over_a_direct_link_and_survives_the_link_dropping(
        home_nodes: HomeNodes) -> None:
    nodes, homes = home_nodes, home_nodes.homes
    peer = wait_for_peer(nodes, lambda p: p["state"] == "reachable")
    assert peer["via"] == "rendezvous" and peer["identityVerified"] is True
    assert peer["link"]["state"] == "direct"  # STUN-discovered addresses through both NATs
    status, headers, relayed = http_in(homes, "a", "POST", nodes.a.base_url + "/chat/completions", CHAT, REQUIRE)
    assert status == 200 and headers["X-DVAI-Served-By"] == nodes.b_id, relayed[:500]
    _, _, direct = http_in(homes, "b", "POST", nodes.b.base_url + "/chat/completions", CHAT)
    text, done, error = sse_text(relayed)
    assert done and not error and text and text == sse_text(direct)[0]  # intact, as asking B directly

    # B's interface goes down: the link dies; once it is back, the next request sets up a new one
    homes.sh("b", "ip", "link", "set", "eth0", "down")
    status, _, _ = http_in(homes, "a", "POST", nodes.a.base_url + "/chat/completions",
                           {**CHAT, "stream": False}, REQUIRE)
    assert status == 503  # nobody else can serve it
    homes.sh("b", "ip", "link", "set", "eth0", "up")
    homes.sh("b", "ip", "route", "replace", "default", "via", "10.77.2.1")
    time.sleep(1.5)  # B's circuit (circuit_break_s = 1) closes again
    deadline = time.monotonic() + 30
    while True:
        status, headers, again = http_in(homes, "a", "POST", nodes.a.base_url + "/chat/completions", CHAT, REQUIRE)
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert status == 200 and headers["X-DVAI-Served-By"] == nodes.b_id, again[:500]
    assert sse_text(again)[0] == text
    assert wait_for_peer(nodes, lambda p: p["link"]["state"] == "direct")  # a new link


def test_with_udp_between_the_nats_blocked_the_link_is_relayed_by_turn(servers: PublicServers,
                                                                          tmp_path: Path) -> None:
    servers.homes.block_udp_between_nats()
    with running_home_nodes(servers, tmp_path, turn=True) as nodes:  # TURN credentials from the rendezvous
        peer = wait_for_peer(nodes, lambda p: p["state"] == "reachable")
        assert peer["link"]["state"] == "relayed"
        status, headers, relayed = http_in(nodes.homes, "a", "POST", nodes.a.base_url + "/chat/completions",
                                           CHAT, REQUIRE)
        assert status == 200 and headers["X-DVAI-Served-By"] == nodes.b_id, relayed[:500]
        text, done, error = sse_text(relayed)
        assert text and done and not error
