"""A device for the namespace tests: presence and the link stack of ``node.transport``,
run inside a home's namespace, driven by JSON lines on stdin (one JSON answer per line).

    ip netns exec NS python -m tests.netns_device --rendezvous URL --node ID (--payload QR | --stranger)
        [--stun URL]

With ``--payload`` the device scans the node's QR code through the rendezvous (a real,
paired device); with ``--stranger`` it only holds a key the node never issued. It prints
``{"ready": <device id>}`` once it is present at the rendezvous, then answers:

- ``{"op": "online"}``: waits until the node is present → ``{"online": bool}``
- ``{"op": "send", "maxTokens": N, "timeout": S}``: a signed streamed chat over the link →
  ``{"status", "text", "done"}`` or ``{"error": "<exception type>"}``
- ``{"op": "close"}``: closes the current link (the next send sets up a new one)
- ``{"op": "hostile", "name": ...}``: a served request, then the raw frames of
  ``hostile_payloads()[name]`` on the channel → ``{"status", "closed": bool}``
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

import aiohttp

from node.config import IceServer
from node.identity import DeviceIdentity
from node.security import sign_request_headers
from node.transport.link import LinkRequest
from node.transport.links import LinkManager
from node.transport.presence import PresenceConnection
from node.transport.rendezvous_client import QrPairingScanner

CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Count for me"}], "stream": True}


def hostile_payloads() -> dict[str, list[bytes]]:
    """Raw channel messages no well-behaved peer sends, by name."""
    from node.transport.frames import BodyChunk, RequestHead, serialize_frame

    return {
        "garbage": [b"\xc1\x00garbage"],
        "oversize": [b"\x80" * (70 * 1024)],
        "unknown stream": [serialize_frame(BodyChunk(999_999, b"x"))],
        "10,000 streams": [serialize_frame(RequestHead(2 * i + 1, "POST", "/v1/chat/completions"))
                           for i in range(1000, 11_000)],
    }


def sse_content(sse: bytes) -> tuple[str, bool]:
    text, done = [], False
    for line in sse.decode(errors="replace").splitlines():
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text), done


class Device:
    def __init__(self, identity: DeviceIdentity, key: bytes, node_id: str, links: LinkManager,
                 presence: PresenceConnection) -> None:
        self.identity, self.key, self.node_id, self.links, self.presence = identity, key, node_id, links, presence

    async def send(self, max_tokens: int, timeout: float) -> dict[str, Any]:
        body = json.dumps({**CHAT, "max_tokens": max_tokens}).encode()
        path = "/v1/chat/completions"
        headers = sign_request_headers(self.key, self.identity.device_id, self.identity.device_id, "POST", path, body)
        try:
            response = await self.links.link_for(self.node_id).open(
                LinkRequest("POST", path, {**headers, "Content-Type": "application/json"}, body),
                connect_timeout=timeout)
            parts = []
            while chunk := await response.read_chunk():
                parts.append(chunk)
            response.release()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return {"error": type(exc).__name__, "detail": str(exc)[:200]}
        text, done = sse_content(b"".join(parts))
        return {"status": response.status, "text": text, "done": done}

    async def close(self) -> dict[str, Any]:
        link = self.links._links.get(self.node_id)  # noqa: SLF001 - a test device forcing a new set-up
        if link is not None:
            link.close("closed by the test")
            await link.wait_closed()
        return {"closed": link is not None}

    async def hostile(self, name: str) -> dict[str, Any]:
        served = await self.send(4, 20)
        link = self.links._links.get(self.node_id)  # noqa: SLF001 - raw bytes on the channel
        if link is None or link.mux is None:
            return {**served, "closed": None}
        channel = link.mux._channel  # noqa: SLF001
        with contextlib.suppress(Exception):
            for frame in hostile_payloads()[name]:
                channel.send(frame)
        for _ in range(200):
            if not link.state.up:
                break
            await asyncio.sleep(0.05)
        return {"status": served.get("status"), "closed": not link.state.up}

    async def online(self) -> dict[str, Any]:
        for _ in range(200):
            if self.node_id in self.presence.online:
                return {"online": True}
            await asyncio.sleep(0.1)
        return {"online": False}

    async def handle(self, command: dict[str, Any]) -> dict[str, Any]:
        op = command["op"]
        if op == "send":
            return await self.send(int(command.get("maxTokens", 8)), float(command.get("timeout", 15)))
        if op == "close":
            return await self.close()
        if op == "hostile":
            return await self.hostile(str(command["name"]))
        if op == "online":
            return await self.online()
        return {"error": f"unknown op {op}"}


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rendezvous", required=True)
    parser.add_argument("--node", required=True, help="the node's device id")
    parser.add_argument("--payload", help="the node's QR payload: pair with it")
    parser.add_argument("--stranger", action="store_true", help="do not pair; use a key the node never issued")
    parser.add_argument("--stun", action="append", default=[], help="a STUN URL (behind a NAT the link needs one)")
    args = parser.parse_args()
    me = DeviceIdentity.generate()
    async with aiohttp.ClientSession() as http:
        if args.payload:
            key = (await QrPairingScanner(identity=me, device_name="netns-device", http=http)
                   .pair(args.payload)).pairing_key
        else:
            key = os.urandom(32)
        servers = tuple(IceServer(urls=(url,)) for url in args.stun)
        links = LinkManager(device_id=me.device_id, pairing_key_for={args.node: key}.get,
                            ice_servers=lambda: servers, connect_timeout=1)  # each op names its own
        presence = PresenceConnection(base_url=args.rendezvous, identity=me, session=http, links=links,
                                      watched=lambda: [args.node], on_presence=lambda _o: None, interval=0.3)
        await links.start()
        await presence.start()
        device = Device(me, key, args.node, links, presence)
        try:
            await asyncio.wait_for(presence.connected.wait(), 15)
            print(json.dumps({"ready": me.device_id}), flush=True)
            loop = asyncio.get_running_loop()
            while line := await loop.run_in_executor(None, sys.stdin.readline):
                print(json.dumps(await device.handle(json.loads(line))), flush=True)
        finally:
            await presence.stop()
            await links.stop()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
