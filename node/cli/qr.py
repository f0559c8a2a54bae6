"""``dvai-node pair --qr`` / ``--scan PAYLOAD``: QR pairing through the running node."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from .client import AdminError, call

POLL_INTERVAL_S = 0.5


async def pair_by_qr(args: argparse.Namespace, base: str) -> int:
    if args.scan:
        result = await call("POST", f"{base}/dvai/pair-scan", {"payload": args.scan}, timeout=180)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"paired with {result.get('peerDeviceName')} {result['peerDeviceId']} via rendezvous")
            print(f"short code: {result['shortCode']}  (it must match the code on the other device)")
        return 0
    offer = await call("POST", f"{base}/dvai/pair-qr")
    session = offer["sessionId"]
    if args.json:
        print(json.dumps({k: offer[k] for k in ("sessionId", "payload", "expiresAt", "rendezvousUrl")}))
    else:
        print(offer["qr"]["text"])
        print("Scan this code on the other device, or run there:")
        print(f"  dvai-node pair --scan '{offer['payload']}'")
    sys.stdout.flush()
    shown = False
    deadline = time.time() + max(5.0, offer["expiresAt"] / 1000 - time.time() + 10)
    try:
        while time.time() < deadline:
            status = await call("GET", f"{base}/dvai/pair-qr/{session}")
            if status.get("shortCode") and not shown and not args.json:
                print(f"short code: {status['shortCode']}  (compare it with the other device)", flush=True)
                shown = True
            if status["state"] == "paired":
                if args.json:
                    print(json.dumps(status))
                else:
                    print(f"paired with {status.get('peerDeviceName')} {status['peerDeviceId']}")
                return 0
            if status["state"] in ("failed", "cancelled"):
                raise AdminError(f"pairing {status['state']}: {status.get('error')}")
            await asyncio.sleep(POLL_INTERVAL_S)
    except (KeyboardInterrupt, asyncio.CancelledError):
        await call("DELETE", f"{base}/dvai/pair-qr/{session}")
        raise
    raise AdminError("the QR code expired before anyone scanned it")
