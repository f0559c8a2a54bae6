"""Two homes behind NATs and a public network, in network namespaces the test creates.

::

    home A 10.77.1.0/24          public 198.51.100.0/24               home B 10.77.2.0/24
    [a] .2 ── .1 [nat-a] .11 ──┐                           ┌── .12 [nat-b] .1 ── .2 [b]
                               └──── br0 (in [pub]) ───────┘
                                        │
                                   .10 [srv]  rendezvous :38980, coturn :3478

Each NAT masquerades its home behind its public address (iptables MASQUERADE), so a
device's own address is unreachable from the other home: a link needs STUN-discovered
(server-reflexive) candidates, or TURN when UDP between the NATs is blocked. The
addresses exist only inside these namespaces; nothing is routed to or from the host.
Needs root, iproute2 and iptables (``.ci/run`` installs iptables and coturn).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

import pytest

PUBLIC = "198.51.100"
SERVER_IP = f"{PUBLIC}.10"
NAT_IP = {"a": f"{PUBLIC}.11", "b": f"{PUBLIC}.12"}
HOME_NET = {"a": "10.77.1", "b": "10.77.2"}


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), check=check, capture_output=True, text=True, timeout=20)


@dataclass
class Homes:
    tag: str
    created: list[str] = field(default_factory=list)

    def ns(self, role: str) -> str:
        """Namespace name for ``pub``, ``srv``, ``nat-a``, ``nat-b``, ``a``, ``b``."""
        return f"{self.tag}{role.replace('-', '')}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns(role)]

    def sh(self, role: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(*self.exec_prefix(role), *args, check=check)

    def create(self) -> None:
        for role in ("pub", "srv", "nat-a", "nat-b", "a", "b"):
            run("ip", "netns", "add", self.ns(role))
            self.created.append(self.ns(role))
            run("ip", "-n", self.ns(role), "link", "set", "lo", "up")
        pub = self.ns("pub")
        run("ip", "-n", pub, "link", "add", "br0", "type", "bridge")
        run("ip", "-n", pub, "link", "set", "br0", "up")
        self._wire(pub, "ps", "srv", "eth0", f"{SERVER_IP}/24", bridge=True)
        for side in ("a", "b"):
            nat = f"nat-{side}"
            self._wire(pub, f"p{side}", nat, "eth0", f"{NAT_IP[side]}/24", bridge=True)
            self._wire(self.ns(nat), "eth1", side, "eth0", f"{HOME_NET[side]}.2/24",
                       near_address=f"{HOME_NET[side]}.1/24")
            run("ip", "-n", self.ns(side), "route", "add", "default", "via", f"{HOME_NET[side]}.1")
            self.sh(nat, "sysctl", "-qw", "net.ipv4.ip_forward=1")
            self.sh(nat, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "eth0", "-j", "MASQUERADE")
            # Only answers to what the home sent may come in (a home router's default).
            self.sh(nat, "iptables", "-A", "FORWARD", "-i", "eth0", "-m", "conntrack", "--ctstate",
                    "ESTABLISHED,RELATED", "-j", "ACCEPT")
            self.sh(nat, "iptables", "-A", "FORWARD", "-i", "eth0", "-j", "DROP")
            # Unsolicited packets to the router itself are dropped before their conntrack entry is
            # confirmed (as home routers do): otherwise the first hole-punching packet from the other
            # side would claim the port the home device's own packets are about to be mapped to.
            self.sh(nat, "iptables", "-A", "INPUT", "-i", "eth0", "-m", "conntrack", "--ctstate", "NEW",
                    "-j", "DROP")

    def _wire(self, near_ns: str, near: str, far_role: str, far: str, far_address: str, *,
              bridge: bool = False, near_address: str | None = None) -> None:
        far_ns = self.ns(far_role)
        run("ip", "-n", near_ns, "link", "add", near, "type", "veth", "peer", "name", far, "netns", far_ns)
        if bridge:
            run("ip", "-n", near_ns, "link", "set", near, "master", "br0")
        if near_address:
            run("ip", "-n", near_ns, "addr", "add", near_address, "dev", near)
        run("ip", "-n", near_ns, "link", "set", near, "up")
        run("ip", "-n", far_ns, "addr", "add", far_address, "dev", far)
        run("ip", "-n", far_ns, "link", "set", far, "up")

    def block_udp_between_nats(self) -> None:
        """Direct paths gone: each NAT drops UDP towards the other's public address."""
        for side, other in (("a", "b"), ("b", "a")):
            self.sh(f"nat-{side}", "iptables", "-I", "FORWARD", "-o", "eth0", "-p", "udp", "-d", NAT_IP[other],
                    "-j", "DROP")

    def unblock_udp_between_nats(self) -> None:
        for side, other in (("a", "b"), ("b", "a")):
            self.sh(f"nat-{side}", "iptables", "-D", "FORWARD", "-o", "eth0", "-p", "udp", "-d", NAT_IP[other],
                    "-j", "DROP", check=False)

    def delete(self) -> None:
        for name in reversed(self.created):
            run("ip", "netns", "del", name, check=False)
        self.created.clear()


def make_homes() -> Homes:
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install iproute2 iptables; .ci/run does)")
    homes = Homes(tag=f"dvi{os.getpid() % 100000}")
    try:
        homes.create()
    except (subprocess.CalledProcessError, OSError) as exc:
        homes.delete()
        detail = getattr(exc, "stderr", "") or ""
        pytest.skip(f"cannot create namespaces with NAT here (needs root): {detail.strip() or exc}")
    return homes
