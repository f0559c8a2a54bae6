"""A stub node in its own process, for crash and network-namespace tests and the bench.

    python -m tests.discovery_node --state-dir DIR --name NAME --host ADDR [--interfaces A,B]

Prints one JSON line per event on stdout: ``{"event": "ready", "deviceId", "baseUrl"}``
first, then ``{"event": "added"|"updated"|"removed", "deviceId", "name", "state", "address", "t"}``
for every change of its peer table (``t``: unix seconds). SIGTERM or SIGINT stops it
cleanly (mDNS goodbye); SIGKILL is a crash.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

from node.discovery.peers import PeerChange
from tests.discovery_stub import StubNode


def _emit(event: dict[str, object]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _main(args: argparse.Namespace) -> None:
    interfaces = tuple(i for i in args.interfaces.split(",") if i)
    node = StubNode(Path(args.state_dir), name=args.name, host=args.host, interfaces=interfaces)
    if not interfaces:
        node.addresses = ()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def on_change(change: PeerChange) -> None:
        peer = change.peer
        _emit({"event": change.kind.value, "deviceId": peer.device_id, "name": peer.device_name,
               "state": peer.state.value, "address": peer.address, "t": time.time()})

    node.table.subscribe(on_change)
    await node.start()
    _emit({"event": "ready", "deviceId": node.device_id, "baseUrl": node.server.base_url,
           "t": time.time()})
    await stop.wait()
    await node.stop()
    _emit({"event": "stopped", "t": time.time()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--interfaces", default="127.0.0.1", help="comma-separated; empty = all")
    asyncio.run(_main(parser.parse_args()))


if __name__ == "__main__":
    main()
