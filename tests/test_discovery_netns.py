"""Discovery across hosts: stub nodes in separate network namespaces joined by a bridge.

The test creates one namespace holding a bridge and one namespace per node, linked by
veth pairs, with addresses from 10.213.77.0/24 that exist only inside these namespaces
(nothing is routed to or from the host). Each node runs ``tests.discovery_node`` with
the default "all interfaces" mDNS setting, so discovery goes over real multicast on the
veth links. Skipped only where namespaces cannot be created (not root, no iproute2,
no CAP_SYS_ADMIN); the namespaces are always deleted.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SUBNET = "10.213.77"
pytestmark = [pytest.mark.netns, pytest.mark.timeout(90)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@dataclass
class Namespaces:
    bridge: str
    nodes: list[str]
    created: list[str] = field(default_factory=list)

    def create(self) -> None:
        _ip("netns", "add", self.bridge)
        self.created.append(self.bridge)
        _ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge, "link", "set", "br0", "up")
        for index, name in enumerate(self.nodes, start=1):
            _ip("netns", "add", name)
            self.created.append(name)
            port = f"p{index}"
            _ip("-n", self.bridge, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", name)
            _ip("-n", self.bridge, "link", "set", port, "master", "br0", "up")
            _ip("-n", name, "link", "set", "lo", "up")
            _ip("-n", name, "addr", "add", f"{SUBNET}.{index}/24", "dev", "eth0")
            _ip("-n", name, "link", "set", "eth0", "up", "multicast", "on")

    def delete(self) -> None:
        for name in reversed(self.created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        self.created.clear()


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed: cannot create network namespaces")
    tag = f"dvt{os.getpid() % 100000}"
    spaces = Namespaces(bridge=f"{tag}br", nodes=[f"{tag}n{i}" for i in range(1, 4)])
    try:
        spaces.create()
    except (subprocess.CalledProcessError, OSError) as exc:
        spaces.delete()
        detail = getattr(exc, "stderr", b"") or b""
        pytest.skip(f"cannot create network namespaces here (needs root/CAP_SYS_ADMIN): "
                    f"{detail.decode(errors='replace').strip() or exc}")
    try:
        yield spaces
    finally:
        spaces.delete()


class NodeProcess:
    def __init__(self, namespace: str, index: int, state_dir: Path) -> None:
        command = [
            "ip", "netns", "exec", namespace, sys.executable, "-m", "tests.discovery_node",
            "--state-dir", str(state_dir), "--name", f"ns-node-{index}",
            "--host", f"{SUBNET}.{index}", "--interfaces", "",
        ]
        env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.events: queue.Queue[dict[str, object]] = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        self.device_id = ""
        self.peers: dict[str, str] = {}
        self.addresses: dict[str, str] = {}

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                continue

    def _pump_stderr(self) -> None:
        assert self.process.stderr is not None
        self.stderr.extend(self.process.stderr)

    def drain(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if event["event"] == "ready":
                self.device_id = str(event["deviceId"])
            elif event["event"] == "removed":
                self.peers.pop(str(event["deviceId"]), None)
            elif event["event"] in ("added", "updated"):
                self.peers[str(event["deviceId"])] = str(event["state"])
                self.addresses[str(event["deviceId"])] = str(event["address"])

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def _wait(nodes: list[NodeProcess], condition: object, within: float) -> None:
    deadline = time.monotonic() + within
    while True:
        for node in nodes:
            node.drain()
        if condition():  # type: ignore[operator]
            return
        if time.monotonic() > deadline:
            details = {n.device_id: n.peers for n in nodes}
            logs = "".join("".join(n.stderr[-20:]) for n in nodes)
            raise AssertionError(f"not reached in {within}s: {details}\n{logs}")
        time.sleep(0.02)


def test_nodes_in_separate_namespaces_discover_each_other(namespaces: Namespaces, tmp_path: Path) -> None:
    nodes = [NodeProcess(ns, i, tmp_path / ns) for i, ns in enumerate(namespaces.nodes, start=1)]
    try:
        _wait(nodes, lambda: all(n.device_id for n in nodes), within=30)
        ids = {n.device_id for n in nodes}

        def everyone_reachable() -> bool:
            return all(
                {i for i, state in n.peers.items() if state == "reachable"} == ids - {n.device_id}
                for n in nodes
            )

        _wait(nodes, everyone_reachable, within=5)
        for node in nodes:  # reached over the veth links, at the namespace addresses
            assert all(a.startswith(f"{SUBNET}.") for a in node.addresses.values()), node.addresses
        leaving = nodes.pop()
        leaving.stop()  # clean stop: goodbye over the bridge
        _wait(nodes, lambda: all(leaving.device_id not in n.peers for n in nodes), within=2)
    finally:
        for node in nodes:
            node.stop()
