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


@pytest.fixture(scope="module")
def servers() -> Iterator[PublicServers]:
    """One topology for the whole module: the namespaces and servers are set up once."""
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


def call_across(servers: PublicServers, ice: list[object], *extra: str) -> dict[str, object]:
    """One link set-up from home A to a link-only echo peer in home B (``bench/link_bench.py``)."""
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

def node_config(rate: float, *, turn: bool = False, rendezvous_url: str = RENDEZVOUS_URL) -> str:
    """A SIMULATED node (the network is under test here, not the model) at ``rate`` tok/s."""
    return ('[models.gemma3-270m]\nengine = "simulated"\n'
            f"simulated_tok_per_s = {rate:g}\n"
            "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\ncircuit_break_s = 1.0\n"
            f'rendezvous_url = "{rendezvous_url}"\npresence_interval = 0.5\nrendezvous_turn = {str(turn).lower()}\n'
            f'[[offload.ice_servers]]\nurls = ["stun:{SERVER_IP}:3478"]\n')


def _http_args(homes: Homes, side: str, method: str, url: str, body: object = None,
               headers: dict[str, str] | None = None, *, stream: bool = False) -> list[str]:
    return [*homes.exec_prefix(side), sys.executable, "-m", "tests.netns_http", *(["--stream"] if stream else []),
            method, url, json.dumps(body) if body is not None else "",
            *(f"{k}={v}" for k, v in (headers or {}).items())]


def http_in(homes: Homes, side: str, method: str, url: str, body: object = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    """An HTTP request made from inside the ``side`` namespace (where the node's loopback is)."""
    args = _http_args(homes, side, method, url, body, headers)
    done = subprocess.run(args, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=90)
    answer = json.loads(done.stdout)
    return answer["status"], answer["headers"], answer["body"]


@dataclass
class HomeNodes:
    homes: Homes
    a: NodeProcess
    b: NodeProcess
    b_id: str


@pytest.fixture(scope="module")
def home_nodes(servers: PublicServers, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HomeNodes]:
    """Shared by the tests below that leave B serving; the last of them kills B."""
    with running_home_nodes(servers, tmp_path_factory.mktemp("homes")) as nodes:
        yield nodes


@contextlib.contextmanager
def running_home_nodes(servers: PublicServers, tmp_path: Path, *, turn: bool = False) -> Iterator[HomeNodes]:
    """A slow node (SIMULATED 2 tok/s) in home A QR-paired with a fast one (SIMULATED 200 tok/s) in B."""
    homes = servers.homes
    a = start_node_process(tmp_path / "a", config_text=node_config(2, turn=turn), prefix=homes.exec_prefix("a"))
    try:
        b = start_node_process(tmp_path / "b", config_text=node_config(200, turn=turn),
                               prefix=homes.exec_prefix("b"))
    except BaseException:
        a.stop()
        raise
    try:
        _, _, health = http_in(homes, "b", "GET", b.root + "/v1/dvai/health")
        b_id = json.loads(health)["deviceId"]
        payload = qr_offer(homes, "a", a)
        status, _, scanned = http_in(homes, "b", "POST", b.root + "/v1/dvai/pair-scan",
                                     {"payload": payload["payload"]})
        assert status == 200, scanned  # QR pairing across both NATs, through the rendezvous
        yield HomeNodes(homes, a, b, b_id)
    finally:
        a.stop()
        b.stop()


def qr_offer(homes: Homes, side: str, node: NodeProcess) -> dict[str, Any]:
    status, _, offer = http_in(homes, side, "POST", node.root + "/v1/dvai/pair-qr")
    assert status == 200, offer
    return dict(json.loads(offer))


def wait_for_peer(nodes: HomeNodes, predicate: Callable[[dict[str, Any]], bool], within: float = 40) -> dict[str, Any]:
    return peer_in(nodes.homes, "a", nodes.a, nodes.b_id, predicate, within)


def peer_in(homes: Homes, side: str, node: NodeProcess, device_id: str,
            predicate: Callable[[dict[str, Any]], bool], within: float = 40) -> dict[str, Any]:
    """``device_id``'s entry in ``node``'s peer table once ``predicate`` holds for it."""
    deadline = time.monotonic() + within
    peers: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        _, _, body = http_in(homes, side, "GET", node.root + "/v1/dvai/peers")
        peers = json.loads(body)["data"]
        for peer in peers:
            if peer["deviceId"] == device_id and predicate(peer):
                return peer
        time.sleep(0.5)
    raise AssertionError(f"no peer {device_id} as wanted: {peers}")


def audit_rows(homes: Homes, side: str, node: NodeProcess) -> list[dict[str, Any]]:
    _, _, body = http_in(homes, side, "GET", node.root + "/v1/dvai/audit")
    return list(json.loads(body)["data"])


class Device:
    """``tests.netns_device`` in home A: a QR-paired device (or a stranger) speaking the link
    protocol itself, so a test can make it misbehave."""

    def __init__(self, homes: Homes, rendezvous_url: str, node_id: str, *, payload: str | None) -> None:
        pairing = ["--payload", payload] if payload else ["--stranger"]
        self.process = subprocess.Popen(
            [*homes.exec_prefix("a"), sys.executable, "-m", "tests.netns_device", "--rendezvous", rendezvous_url,
             "--node", node_id, "--stun", f"stun:{SERVER_IP}:3478", *pairing],
            cwd=REPO, env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        ready = self._line()
        assert "ready" in ready, ready
        self.device_id = str(ready["ready"])

    def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "the device process ended"
        return dict(json.loads(line))

    def do(self, op: str, **fields: object) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.process.stdin.flush()
        return self._line()

    def stop(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


@contextlib.contextmanager
def device(homes: Homes, node_side: str, node: NodeProcess, node_id: str, *, paired: bool = True,
           rendezvous_url: str = RENDEZVOUS_URL) -> Iterator[Device]:
    """A device in home A, QR-paired with ``node`` (unless ``paired`` is false), present at the rendezvous."""
    offer = qr_offer(homes, node_side, node) if paired else None
    me = Device(homes, rendezvous_url, node_id, payload=offer["payload"] if offer else None)
    try:
        if offer is not None:  # the node stores its side once our finish message arrived
            for _ in range(60):
                _, _, body = http_in(homes, node_side, "GET", node.root + f"/v1/dvai/pair-qr/{offer['sessionId']}")
                if json.loads(body).get("state") == "paired":
                    break
                time.sleep(0.25)
        assert me.do("online")["online"] is True
        yield me
    finally:
        me.stop()


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


# The tests run in this order: the two with their own nodes first, then the ones sharing
# ``home_nodes`` (the last of which kills B).


def test_a_malicious_rendezvous_gets_no_link_and_nothing_is_served(servers: PublicServers,
                                                                    tmp_path: Path) -> None:
    """(3) A rendezvous that rewrites the sealed signaling (as if it altered the SDP and its DTLS
    fingerprint) or replays a signaling message gets no link set up, and the node serves nothing."""
    homes = servers.homes
    mode = tmp_path / "tamper-mode"
    mode.write_text("flip")
    url = f"http://{SERVER_IP}:38981"
    tamperer = subprocess.Popen(
        [*homes.exec_prefix("srv"), sys.executable, "-m", "tests.tampering_rendezvous", "--host", SERVER_IP,
         "--port", "38981", "--db", ":memory:"],
        cwd=REPO, env={**_env(), "DVAI_TAMPER_FILE": str(mode)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL)
    node: NodeProcess | None = None
    try:
        _wait_port(homes, "srv", 38981)
        node = start_node_process(tmp_path / "b", config_text=node_config(200, rendezvous_url=url),
                                  prefix=homes.exec_prefix("b"))
        _, _, health = http_in(homes, "b", "GET", node.root + "/v1/dvai/health")
        node_id = json.loads(health)["deviceId"]

        with device(homes, "b", node, node_id, rendezvous_url=url) as altered:  # every sealed message altered
            assert altered.do("send", timeout=5)["error"] == "LinkUnavailableError"
            altered_id = altered.device_id

        mode.write_text("replay")
        with device(homes, "b", node, node_id, rendezvous_url=url) as replayed:
            # the node links to the new device first (to fetch its health): that set-up is genuine
            peer_in(homes, "b", node, replayed.device_id, lambda p: p["state"] != "pending")
            served = replayed.do("send", timeout=15)
            assert served.get("status") == 200 and served["done"], served
            replayed.do("close")  # force a second set-up
            # every later message is replaced by the first one this pair ever exchanged: refused
            assert replayed.do("send", timeout=5)["error"] == "LinkUnavailableError"
            replayed_id = replayed.device_id

        rows = [row["peerDeviceId"] for row in audit_rows(homes, "b", node)]
        assert altered_id not in rows and rows.count(replayed_id) == 1  # only the genuine link served
        _, _, body = http_in(homes, "b", "GET", node.root + "/v1/dvai/peers")
        states = {p["deviceId"]: (p.get("link") or {}).get("state") for p in json.loads(body)["data"]}
        assert states.get(altered_id) not in ("direct", "relayed")
    finally:
        if node is not None:
            node.stop()
        tamperer.terminate()
        tamperer.wait(10)


def test_with_udp_between_the_nats_blocked_the_link_is_relayed_by_turn(servers: PublicServers,
                                                                          tmp_path: Path) -> None:
    servers.homes.block_udp_between_nats()
    try:
        with running_home_nodes(servers, tmp_path, turn=True) as nodes:  # TURN credentials from the rendezvous
            peer = wait_for_peer(nodes, lambda p: p["state"] == "reachable")
            assert peer["link"]["state"] == "relayed"
            status, headers, relayed = http_in(nodes.homes, "a", "POST", nodes.a.base_url + "/chat/completions",
                                               CHAT, REQUIRE)
            assert status == 200 and headers["X-DVAI-Served-By"] == nodes.b_id, relayed[:500]
            text, done, error = sse_text(relayed)
            assert text and done and not error
    finally:
        servers.homes.unblock_udp_between_nats()  # the module's later tests want direct paths again


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


def test_an_unpaired_device_can_neither_link_nor_be_served(home_nodes: HomeNodes) -> None:
    """(4) A device online at the same rendezvous, holding a key B never issued."""
    nodes, homes = home_nodes, home_nodes.homes
    with device(homes, "b", nodes.b, nodes.b_id, paired=False) as stranger:
        assert stranger.do("send", timeout=5)["error"] == "LinkUnavailableError"
    assert all(row["peerDeviceId"] != stranger.device_id for row in audit_rows(homes, "b", nodes.b))
    _, _, body = http_in(homes, "b", "GET", nodes.b.root + "/v1/dvai/peers")
    assert all(peer["deviceId"] != stranger.device_id for peer in json.loads(body)["data"])


def test_hostile_frames_close_the_link_and_the_node_keeps_serving(home_nodes: HomeNodes) -> None:
    """(7) Oversize, garbage, a frame for an unknown stream, 10,000 streams opened: B closes the link."""
    from .netns_device import hostile_payloads

    nodes, homes = home_nodes, home_nodes.homes
    with device(homes, "b", nodes.b, nodes.b_id) as me:
        for name in hostile_payloads():
            outcome = me.do("hostile", name=name)
            assert outcome == {"status": 200, "closed": True}, (name, outcome)  # served, then cut off
    # B keeps serving its other clients: A over its own link, and a local client
    status, headers, relayed = http_in(homes, "a", "POST", nodes.a.base_url + "/chat/completions", CHAT, REQUIRE)
    assert status == 200 and headers["X-DVAI-Served-By"] == nodes.b_id, relayed[:500]
    status, _, _ = http_in(homes, "b", "POST", nodes.b.base_url + "/chat/completions", {**CHAT, "stream": False})
    assert status == 200


def test_peer_killed_mid_stream_ends_with_an_error_and_done_within_3_s(home_nodes: HomeNodes) -> None:
    """(5) B dies while it streams to A's client across the NATs. Kills B: keep this test last."""
    nodes, homes = home_nodes, home_nodes.homes
    wait_for_peer(nodes, lambda p: p["state"] == "reachable")
    client = subprocess.Popen(
        _http_args(homes, "a", "POST", nodes.a.base_url + "/chat/completions", {**CHAT, "max_tokens": 4000},
                   REQUIRE, stream=True),  # 20 s at 200 tok/s
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert client.stdout is not None
        first = json.loads(client.stdout.readline())["first"]
        assert first.startswith("data: "), first
        nodes.b.process.kill()
        killed = time.monotonic()
        answer = json.loads(client.stdout.readline())
        ended = time.monotonic() - killed
    finally:
        client.kill()
        client.wait(5)
    assert answer["status"] == 200 and answer["headers"]["X-DVAI-Served-By"] == nodes.b_id
    events = [json.loads(line[6:]) for line in answer["body"].splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    assert "data: [DONE]" in answer["body"].splitlines(), answer["body"][-400:]
    assert events[-1].get("error", {}).get("code") == "peer_failed", answer["body"][-400:]
    assert ended < 3.0, f"the stream ended {ended:.2f} s after the peer died"
