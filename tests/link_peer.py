"""A link-only peer for namespace tests: presence + one WebRTC link, no engine.

``python -m tests.link_peer serve|call --rendezvous URL --seed HEX --peer-seed HEX --key HEX
[--ice JSON] [--relay-only]``: ``serve`` answers every request with its body streamed back
in 1 KiB pieces; ``call`` opens a link to the peer, sends one 256 KiB request, and prints a
JSON line ``{"ok", "state", "setupMs", "bytes"}``. Identities come from fixed seeds so the
test knows both device ids in advance.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time

import aiohttp
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.config import IceServer
from node.identity import DeviceIdentity
from node.transport.link import LinkRequest
from node.transport.links import LinkManager
from node.transport.mux import InboundRequest, ResponseWriter
from node.transport.presence import PresenceConnection


def identity(seed_hex: str) -> DeviceIdentity:
    return DeviceIdentity.from_private_key(Ed25519PrivateKey.from_private_bytes(bytes.fromhex(seed_hex)))


async def echo(peer_id: str, request: InboundRequest, writer: ResponseWriter) -> None:
    writer.head(200, {"X-Peer": peer_id})
    async for chunk in request.body:  # streamed back as it arrives
        for start in range(0, len(chunk), 1024):
            await writer.write(chunk[start:start + 1024])
    await writer.end()


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("serve", "call"))
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--seed", required=True)
    parser.add_argument("--peer-seed", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--ice", default="[]")
    parser.add_argument("--relay-only", action="store_true")
    parser.add_argument("--rendezvous-turn", action="store_true", help="ask the rendezvous for TURN credentials")
    args = parser.parse_args()
    logging.basicConfig(level=os.environ.get("DVAI_LINK_PEER_LOG", "WARNING"), stream=sys.stderr,
                        format="%(relativeCreated)d %(levelname)s %(name)s %(message)s")
    me, peer = identity(args.seed), identity(args.peer_seed)
    key = bytes.fromhex(args.key)
    servers = tuple(IceServer(urls=tuple(s["urls"]), username=s.get("username"), credential=s.get("credential"))
                    for s in json.loads(args.ice))
    presence: PresenceConnection | None = None

    def ice_servers() -> tuple[IceServer, ...]:
        return (*servers, *(presence.turn_servers() if presence is not None else ()))

    links = LinkManager(device_id=me.device_id, pairing_key_for={peer.device_id: key}.get,
                        ice_servers=ice_servers, relay_only=args.relay_only, connect_timeout=20, on_request=echo)
    async with aiohttp.ClientSession() as http:
        presence = PresenceConnection(base_url=args.rendezvous, identity=me, session=http, links=links,
                                      watched=lambda: [peer.device_id], on_presence=lambda _o: None, interval=0.5,
                                      want_turn=args.rendezvous_turn)
        await links.start()
        await presence.start()
        await asyncio.wait_for(presence.connected.wait(), 15)
        for _ in range(40):
            if not args.rendezvous_turn or presence.turn_servers():
                break
            await asyncio.sleep(0.1)
        print(json.dumps({"ready": me.device_id}), flush=True)
        try:
            if args.mode == "serve":
                await asyncio.Event().wait()
            body = os.urandom(256 * 1024)
            for _ in range(40):  # the peer may connect to the rendezvous a moment later
                if peer.device_id in presence.online:
                    break
                await asyncio.sleep(0.25)
            started = time.perf_counter()
            await links.connect(peer.device_id, 20)
            setup_ms = (time.perf_counter() - started) * 1000
            response = await links.link_for(peer.device_id).open(LinkRequest("POST", "/echo", {}, body),
                                                                 connect_timeout=20)
            received = bytearray()
            while chunk := await response.read_chunk():
                received += chunk
            response.release()
            info = links.info(peer.device_id)
            print(json.dumps({"ok": bytes(received) == body, "bytes": len(received),
                              "state": info.state.value if info else None, "setupMs": round(setup_ms, 1)}),
                  flush=True)
        except Exception as exc:  # noqa: BLE001 - reported to the test as a JSON line
            print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {exc}"}), flush=True)
            return 1
        finally:
            await presence.stop()
            await links.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
