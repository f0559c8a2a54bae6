"""Internet-path benchmarks: the WebRTC data channel against the LAN HTTP hop.

1. Hop cost, A/B interleaved against the same peer, a real node process with a SIMULATED
   200 tok/s engine (its fixed timing isolates the transport's cost): the same signed,
   hop-marked streaming request sent (A) over HTTP to the peer's port, as the LAN forwarder
   does, and (B) over a WebRTC link to it (signaling through a real rendezvous process,
   the request replayed through the peer's HTTP stack). Printed: decode tok/s through the
   link ÷ through HTTP (target ≥ 0.97) and the added time to first token (target ≤ 5 ms),
   medians over the rounds, order alternating per round.
2. Bulk: a 1 MB body echoed over a link to a link-only echo peer (``tests/link_peer.py``
   in a separate process): MB/s each way.
3. Link set-up time (signaling, ICE, DTLS, SCTP, channel open): on loopback (host
   candidates) every run; across two NATs in network namespaces, direct (STUN) and relayed
   (TURN), when run as root with iproute2, iptables and coturn installed.

    .venv/bin/python bench/link_bench.py [--rounds 12] [--tokens 64] [--setups 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from node.constants import HOP_HEADER, OFFLOAD_HEADER  # noqa: E402
from node.identity import DeviceIdentity  # noqa: E402
from node.security import sign_request_headers  # noqa: E402
from node.transport.link import LinkRequest  # noqa: E402
from node.transport.links import LinkManager  # noqa: E402
from node.transport.presence import PresenceConnection  # noqa: E402
from node.transport.rendezvous_client import QrPairingScanner  # noqa: E402
from tests.conftest import free_port, start_node_process  # noqa: E402

RATE = 200.0



@dataclass
class Timing:
    ttft: float
    tok_per_s: float


def _timing(started: float, arrivals: list[float]) -> Timing:
    rate = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]) if len(arrivals) > 1 else 0.0
    return Timing(arrivals[0] - started, rate)


def _content_events(data: bytes) -> int:
    return sum(1 for line in data.split(b"\n") if line.startswith(b"data: {") and b'"content":"' in line)


@contextlib.asynccontextmanager
async def rendezvous_process(tmp: Path) -> AsyncIterator[str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "rendezvous", "--host", "127.0.0.1", "--port", str(port),  # noqa: ASYNC220
                                "--db", str(tmp / "rv.sqlite3")], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientError):
                    if (await http.get(url + "/healthz")).status == 200:
                        break
                await asyncio.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(10)


async def hop_cost(rounds: int, tokens: int, setups: int) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        async with rendezvous_process(tmp) as url, aiohttp.ClientSession() as http:
            config = (f'[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = {RATE}\nqueue_depth = 4\n'
                      "[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n"
                      f'rendezvous_url = "{url}"\npresence_interval = 0.5\n')
            node = start_node_process(tmp / "peer", config_text=config)
            try:
                peer_id = str((await (await http.get(node.root + "/v1/dvai/health")).json())["deviceId"])
                me = DeviceIdentity.generate()
                offer = await (await http.post(node.root + "/v1/dvai/pair-qr")).json()
                key = (await QrPairingScanner(identity=me, device_name="bench", http=http).pair(
                    offer["payload"])).pairing_key
                await asyncio.sleep(0.5)  # the node stores its side of the pairing
                links = LinkManager(device_id=me.device_id, pairing_key_for={peer_id: key}.get)
                presence = PresenceConnection(base_url=url, identity=me, session=http, links=links,
                                              watched=lambda: [peer_id], on_presence=lambda _o: None,
                                              interval=0.3)
                await links.start()
                await presence.start()
                try:
                    await asyncio.wait_for(presence.connected.wait(), 10)
                    while peer_id not in presence.online:
                        await asyncio.sleep(0.1)
                    await _setup_loopback(links, peer_id, setups)
                    await _interleaved(http, links, node.base_url, peer_id, me.device_id, key, rounds, tokens)
                finally:
                    await presence.stop()
                    await links.stop()
            finally:
                node.stop()


async def _setup_loopback(links: LinkManager, peer_id: str, setups: int) -> None:
    times = []
    for _ in range(setups):
        started = time.perf_counter()
        await links.connect(peer_id, 20)
        times.append((time.perf_counter() - started) * 1000)
        link = links._links.get(peer_id)  # noqa: SLF001 - the bench closes it to measure a fresh set-up
        if link is not None:
            link.close("bench")
            await link.wait_closed()
        await asyncio.sleep(0.3)
    print(f"link set-up, loopback (host candidates): median {statistics.median(times):.0f} ms "
          f"(min {min(times):.0f}, max {max(times):.0f}; {setups} runs)")


async def _interleaved(http: aiohttp.ClientSession, links: LinkManager, base_url: str, peer_id: str,
                       me: str, key: bytes, rounds: int, tokens: int) -> None:
    body = json.dumps({"model": "gemma3-270m", "messages": [{"role": "user", "content": "go"}],
                       "max_tokens": tokens, "stream": True}).encode()
    path = "/v1/chat/completions"

    def headers() -> dict[str, str]:
        return {**sign_request_headers(key, me, me, "POST", path, body), "Content-Type": "application/json",
                OFFLOAD_HEADER: "never", HOP_HEADER: me}

    async def over_http() -> Timing:
        started = time.perf_counter()
        arrivals: list[float] = []
        async with http.post(base_url.removesuffix("/v1") + path, data=body, headers=headers()) as response:
            assert response.status == 200, await response.text()
            async for chunk in response.content.iter_any():
                arrivals.extend([time.perf_counter()] * _content_events(chunk))
        return _timing(started, arrivals)

    async def over_link() -> Timing:
        started = time.perf_counter()
        arrivals: list[float] = []
        response = await links.link_for(peer_id).open(LinkRequest("POST", path, headers(), body), connect_timeout=15)
        assert response.status == 200
        while chunk := await response.read_chunk():
            arrivals.extend([time.perf_counter()] * _content_events(chunk))
        response.release()
        return _timing(started, arrivals)

    await over_http()
    await over_link()  # warm both paths (connection pool, link)
    ratios, added = [], []
    for index in range(rounds):
        if index % 2:
            link = await over_link()
            lan = await over_http()
        else:
            lan = await over_http()
            link = await over_link()
        ratios.append(link.tok_per_s / lan.tok_per_s)
        added.append((link.ttft - lan.ttft) * 1000)
    print(f"decode through the link ÷ LAN HTTP hop (SIMULATED {RATE:g} tok/s peer, {tokens} tokens, "
          f"{rounds} rounds): median {statistics.median(ratios):.3f} (target ≥ 0.97)")
    print(f"time to first token added by the link: median {statistics.median(added):+.2f} ms "
          f"(target ≤ 5 ms; min {min(added):+.2f}, max {max(added):+.2f})")


async def bulk() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        async with rendezvous_process(Path(tmp_name)) as url:
            seeds = [os.urandom(32).hex(), os.urandom(32).hex()]
            key = os.urandom(32).hex()
            echo = subprocess.Popen([sys.executable, "-m", "tests.link_peer", "serve", "--rendezvous", url,  # noqa: ASYNC220
                                     "--seed", seeds[1], "--peer-seed", seeds[0], "--key", key], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            try:
                assert echo.stdout is not None and "ready" in echo.stdout.readline()
                from tests.link_peer import identity

                me, peer = identity(seeds[0]), identity(seeds[1])
                async with aiohttp.ClientSession() as http:
                    links = LinkManager(device_id=me.device_id, pairing_key_for={peer.device_id: bytes.fromhex(key)}.get)
                    presence = PresenceConnection(base_url=url, identity=me, session=http, links=links,
                                                  watched=lambda: [peer.device_id], on_presence=lambda _o: None)
                    await links.start()
                    await presence.start()
                    try:
                        await asyncio.wait_for(presence.connected.wait(), 10)
                        payload = os.urandom(1024 * 1024)
                        rates = []
                        for _ in range(5):
                            started = time.perf_counter()
                            response = await links.link_for(peer.device_id).open(
                                LinkRequest("POST", "/echo", {}, payload), connect_timeout=15)
                            received = bytearray()
                            while chunk := await response.read_chunk():
                                received += chunk
                            response.release()
                            assert bytes(received) == payload
                            rates.append(2 * len(payload) / (time.perf_counter() - started) / 1e6)
                        print(f"bulk: 1 MB body echoed over a loopback link: median {statistics.median(rates[1:]):.1f}"
                              f" MB/s (up + down together; the first, incl. set-up, {rates[0]:.1f})")
                    finally:
                        await presence.stop()
                        await links.stop()
            finally:
                echo.terminate()
                echo.wait(10)


def across_nats(setups: int) -> None:
    if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "iptables", "turnserver")):
        print("link set-up across NATs: skipped (needs root, iproute2, iptables and coturn)")
        return
    import pytest

    from tests import test_internet_path_netns as netns

    for mode in ("direct", "relayed"):
        try:
            with netns.public_servers() as servers:
                extra: tuple[str, ...] = ()
                if mode == "relayed":
                    servers.homes.block_udp_between_nats()
                    extra = ("--rendezvous-turn",)
                times = []
                for _ in range(setups):
                    result = netns.call_across(servers, [{"urls": [f"stun:{netns.SERVER_IP}:3478"]}], *extra)
                    assert result.get("ok") and result.get("state") == mode, result
                    times.append(float(result["setupMs"]))
        except pytest.skip.Exception as exc:
            print(f"link set-up across NATs: skipped ({exc})")
            return
        print(f"link set-up across two NATs, {mode}: median {statistics.median(times):.0f} ms "
              f"(min {min(times):.0f}, max {max(times):.0f}; {setups} runs)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--setups", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(hop_cost(args.rounds, args.tokens, args.setups))
    asyncio.run(bulk())
    across_nats(max(3, args.setups // 2))


if __name__ == "__main__":
    main()
