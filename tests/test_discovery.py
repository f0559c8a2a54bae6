"""Discovery end to end on loopback: real zeroconf multicast on 127.0.0.1, stub health servers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from node.config import KnownPeer
from node.constants import MDNS_SERVICE_TYPE
from node.discovery.advert import AdvertisedInfo, encode_txt
from node.discovery.peers import PeerState, PeerTable
from node.identity import DeviceIdentity, NodeIdentity
from tests.discovery_stub import HealthStubServer, StubNode

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(60)

CUSTOM_RESULT: list[dict[str, object]] = []
"""What ``custom_peers`` returns; a test sets it (custom discovery takes no arguments)."""


def custom_peers() -> list[dict[str, object]]:
    return list(CUSTOM_RESULT)


@pytest.fixture
async def make_node(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    nodes: list[StubNode] = []

    async def make(name: str, **kwargs: object) -> StubNode:
        node = StubNode(tmp_path / name, name=name, **kwargs)  # type: ignore[arg-type]
        nodes.append(node)
        await node.start()
        return node

    yield make
    for node in reversed(nodes):
        await node.stop()


def everyone_sees_everyone(nodes: list[StubNode]) -> Callable[[PeerTable], bool]:
    return lambda _table: all(a.sees(*[b for b in nodes if b is not a]) for a in nodes)


async def wait_all(nodes: list[StubNode], predicate: Callable[[], bool], within: float) -> float:
    """Seconds until ``predicate()`` held (polled every 10 ms); fails after ``within``."""
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within, "condition not reached in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_three_nodes_find_each_other_a_new_one_joins_and_leaves(make_node: Callable[..., object]) -> None:
    nodes = [await make_node(f"node{i}") for i in range(3)]  # type: ignore[misc]
    await wait_all(nodes, lambda: everyone_sees_everyone(nodes)(nodes[0].table), within=3.0)
    ours = {n.device_id for n in nodes}
    for node in nodes:
        # Other processes may advertise on loopback too: look only at this test's nodes.
        peers = [p for p in node.table.snapshot() if p.device_id in ours]
        assert {p.device_id for p in peers} == ours - {node.device_id}  # no asymmetry, no self
        for peer in peers:
            assert peer.via == "mdns" and peer.identity_verified and peer.state is PeerState.REACHABLE
            assert peer.loaded_models == ("gemma3-270m",) and peer.capability == {"gemma3-270m": 42.5}
            assert peer.base_url.startswith("http://127.0.0.1:")

    late = await make_node("late")  # type: ignore[misc]
    joined = await wait_all(nodes, lambda: all(n.sees(late) for n in nodes) and late.sees(*nodes), 1.5)
    assert joined <= 1.5

    started = time.monotonic()
    await late.stop()
    await wait_all(nodes, lambda: all(late.device_id not in n.table for n in nodes), within=1.0)
    assert time.monotonic() - started <= 1.0


async def test_advertisement_updates_reach_peers(make_node: Callable[..., object]) -> None:
    a = await make_node("a")  # type: ignore[misc]
    b = await make_node("b")  # type: ignore[misc]
    await wait_all([b], lambda: b.sees(a), within=3.0)
    a.server.models.loaded = {"gemma3-270m": 42.5, "qwen3-0.6b": 17.0}
    await a.service.update_advertisement()
    await wait_all([b], lambda: b.table.get(a.device_id).capability.get("qwen3-0.6b") == 17.0, 4.0)
    assert set(b.table.get(a.device_id).loaded_models) == {"gemma3-270m", "qwen3-0.6b"}


async def test_killed_node_is_marked_unreachable_within_5_seconds(
    make_node: Callable[..., object], tmp_path: Path
) -> None:
    watchers = [await make_node("w1"), await make_node("w2")]  # type: ignore[misc]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.discovery_node", "--state-dir", str(tmp_path / "victim"),
        "--name", "victim", cwd=REPO, stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert process.stdout is not None
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 20))
        victim = ready["deviceId"]

        def all_see(state: str) -> bool:
            return all((p := w.table.get(victim)) is not None and p.state.value == state for w in watchers)

        await wait_all(watchers, lambda: all_see("reachable"), within=3.0)
        seen = set()
        while len(seen) < 2:  # the victim sees the watchers too
            event = json.loads(await asyncio.wait_for(process.stdout.readline(), 3))
            if event.get("state") == "reachable":
                seen.add(event["deviceId"])
        process.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await process.wait()
        await wait_all(watchers, lambda: all_see("unreachable"), within=5.0)
        assert time.monotonic() - killed <= 5.0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_static_and_custom_peers_appear(make_node: Callable[..., object], tmp_path: Path) -> None:
    identities = [NodeIdentity(DeviceIdentity.generate(), f"s{i}", f"i{i}") for i in range(3)]
    servers = [HealthStubServer(identity) for identity in identities]
    for server in servers:
        await server.start()
    try:
        CUSTOM_RESULT[:] = [{"baseUrl": servers[2].base_url, "deviceName": "from-registry",
                             "capability": {"gemma3-270m": 99.0}}]
        node = await make_node(  # type: ignore[misc]
            "hub", discover_lan=False, custom_discovery="tests.test_discovery:custom_peers",
            custom_discovery_interval=0.2,
            known_peers=[KnownPeer(servers[0].base_url, identities[0].device_id, "configured"),
                         KnownPeer(servers[1].base_url.removesuffix("/v1"))],
        )
        ids = [identity.device_id for identity in identities]
        await wait_all([node], lambda: all(node.table.get(i) is not None and
                                           node.table.get(i).reachable for i in ids), within=3.0)
        static0, static1, custom = (node.table.get(i) for i in ids)
        assert static0.via == static1.via == "static" and custom.via == "custom"
        assert static0.device_name == "configured" and static1.device_name == "s1"
        assert custom.device_name == "from-registry" and custom.capability == {"gemma3-270m": 99.0}
        assert all(p.identity_verified for p in (static0, static1, custom))

        CUSTOM_RESULT.clear()  # the registry forgets it: the custom peer goes
        await wait_all([node], lambda: ids[2] not in node.table, within=2.0)
        assert ids[0] in node.table and ids[1] in node.table
    finally:
        CUSTOM_RESULT.clear()
        for server in servers:
            await server.stop()


async def _silent_server() -> tuple[asyncio.Server, int]:
    """Accepts connections and never answers: a port that never responds."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def _raw_txt(items: list[bytes]) -> bytes:
    return b"".join(bytes([len(item)]) + item for item in items)


async def test_hostile_records_are_survived_with_one_warning_each(
    make_node: Callable[..., object], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="node")
    a = await make_node("a")  # type: ignore[misc]  # the only node running discovery here
    b_identity = NodeIdentity(DeviceIdentity.generate(), "b", "b-instance")
    b = HealthStubServer(b_identity)  # a well-behaved peer, announced below
    impostor = HealthStubServer(NodeIdentity(DeviceIdentity.generate(), "evil", "evil"),
                                answer_as=b_identity.device_id)
    for server in (b, impostor):
        await server.start()
    silent, silent_port = await _silent_server()
    absurd_id = DeviceIdentity.generate().device_id
    # A node announces itself as <device id>._dvai._tcp; the hostile records use other names.
    records = {
        b_identity.device_id: (encode_txt(b_identity, AdvertisedInfo(port=b.port)), b.port),
        "noid": (_raw_txt([b"n=no id here"]), 1234),
        "badid": (_raw_txt([b"id=dv-not-an-id"]), 1234),
        "oversize": (_raw_txt([b"id=" + b"x" * 250] + [b"k%d=" % i + b"v" * 240 for i in range(6)]), 1234),
        "binary": (_raw_txt([b"id=\xff\xfe\xfd", b"\x00\x01"]), 1234),
        absurd_id: (_raw_txt([f"id={absurd_id}".encode(), b"m=x,y", b"c=nan,1e99", b"q=-1,2"]), silent_port),
        "impostor": (_raw_txt([f"id={b_identity.device_id}".encode(), b"in=evil"]), impostor.port),
        "clone": (_raw_txt([f"id={a.device_id}".encode(), b"in=someone-else"]), 1234),
    }
    hostile = AsyncZeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    infos = [
        AsyncServiceInfo(MDNS_SERVICE_TYPE, f"{label}.{MDNS_SERVICE_TYPE}", port=port, properties=txt,
                         server=f"{label}.local.", addresses=[socket.inet_aton("127.0.0.1")])
        for label, (txt, port) in records.items()
    ]
    try:
        await hostile.async_register_service(infos[0], cooperating_responders=True)
        await wait_all([a], lambda: a.table.get(b_identity.device_id) is not None
                       and a.table.get(b_identity.device_id).identity_verified, within=3.0)
        for info in infos[1:]:
            await hostile.async_register_service(info, cooperating_responders=True)
        await wait_all([a], lambda: absurd_id in a.table, within=3.0)
        await asyncio.sleep(0.5)
        for info in infos:  # announce everything again: still one warning per source
            await hostile.async_update_service(info)
        await wait_all([a], lambda: a.table.get(absurd_id).state is PeerState.UNREACHABLE, within=5.0)

        # The impostor's goodbye (it claims b's id under another name) must not evict b.
        await hostile.async_unregister_service(infos[list(records).index("impostor")])
        await asyncio.sleep(0.5)
        peer_b = a.table.get(b_identity.device_id)
        assert peer_b is not None and peer_b.reachable and peer_b.base_url == b.base_url  # not hijacked
        absurd = a.table.get(absurd_id)
        assert absurd.capability == {} and absurd.queue_depth == {"y": 2}
        assert a.device_id not in a.table
        assert not [p for p in a.table.snapshot() if p.address == "127.0.0.1:1234"]  # all refused
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        for label in ("noid", "badid", "oversize", "binary"):
            assert sum(f"'{label}." in w for w in warnings) == 1, (label, warnings)
        assert sum("absurd capability" in w and f"'{absurd_id}." in w for w in warnings) == 2
        assert sum("'impostor." in w and "does not match the device id" in w for w in warnings) == 1
        assert sum("THIS node's device id" in w for w in warnings) == 1
        assert sum("health check failed" in w and str(silent_port) in w for w in warnings) == 1
    finally:
        await hostile.async_close()
        for server in (b, impostor):
            await server.stop()
        silent.close()


async def test_copied_state_dir_is_reported_by_both_copies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    original = StubNode(tmp_path / "orig", name="orig")
    await original.start()
    shutil.copytree(tmp_path / "orig", tmp_path / "copy", ignore=shutil.ignore_patterns("node.lock"))
    with caplog.at_level(logging.WARNING):
        copy = StubNode(tmp_path / "copy", name="copy")
        await copy.start()
        try:
            assert any("delete identity.key" in w for w in copy.handle.warnings)
            deadline = time.monotonic() + 3
            while caplog.text.count("THIS node's device id") < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            await copy.stop()
            await original.stop()
    assert caplog.text.count("THIS node's device id") >= 2  # each copy noticed the other
