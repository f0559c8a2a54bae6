"""``dvai-node`` commands that manage a running node over its loopback admin API.

The running node owns its state files (pairings, audit); these commands ask it
instead of editing files behind its back. The node is found through
``endpoint.json`` in the state dir, or ``--url``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp

from .cli import _EXTRA_PARSERS, command
from .common.clock import unix_ms
from .common.fsutil import read_json
from .config import NodeConfig
from .runtime import ENDPOINT_FILE


def _add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    admin = argparse.ArgumentParser(add_help=False, parents=[common])
    admin.add_argument("--url", help="the running node's base URL (default: read from the state dir)")
    admin.add_argument("--json", action="store_true", help="print raw JSON")

    pair = sub.add_parser("pair", parents=[admin], help="pair with a peer (by device id or URL)")
    pair.add_argument("target", nargs="?", help="a discovered peer's device id, or its base URL")
    pair.add_argument("--app-id", help="the app id to pair as (default: this device id)")
    pair.add_argument("--qr", action="store_true", help="show a QR code for a device elsewhere to scan")
    pair.add_argument("--scan", metavar="PAYLOAD", help="complete a QR pairing from its dvai://pair payload")

    pairing = sub.add_parser("pairing", parents=[admin], help="list, revoke and approve pairings")
    pairing.add_argument("action", choices=["list", "revoke", "pending", "approve", "deny"])
    pairing.add_argument("device_id", nargs="?", help="the peer (revoke, approve, deny)")

    audit = sub.add_parser("audit", parents=[admin], help="show the audit log of served requests")
    audit.add_argument("--since", type=float, metavar="SECONDS", help="only rows newer than this many seconds")
    audit.add_argument("--app", help="only this app id")
    audit.add_argument("--peer", help="only this peer device id (or self / anonymous)")
    audit.add_argument("--status", type=int, help="only this HTTP status")
    audit.add_argument("--limit", type=int, default=50)


    peers = sub.add_parser("peers", parents=[admin], help="show the peers this node has discovered")
    peers.add_argument("--fresh", action="store_true", help="health-check every peer before listing")


_EXTRA_PARSERS.append(_add_parsers)


class AdminError(Exception):
    pass


def node_url(args: argparse.Namespace, config: NodeConfig) -> str:
    """The base URL (``…/v1``) of the node that owns this state dir."""
    if args.url:
        return str(args.url).rstrip("/")
    record = read_json(config.resolved_state_dir() / ENDPOINT_FILE, default=None, tolerate_corrupt=True)
    if isinstance(record, dict) and isinstance(record.get("baseUrl"), str):
        return str(record["baseUrl"])
    raise AdminError(
        f"no running node found for state dir {config.resolved_state_dir()}; start `dvai-node serve` "
        "or pass --url"
    )


async def call(method: str, url: str, body: Any = None, *, timeout: float = 30.0) -> Any:  # noqa: ASYNC109
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        try:
            async with session.request(method, url, json=body) as response:
                payload = await response.json(content_type=None)
        except aiohttp.ClientError as exc:
            raise AdminError(f"cannot reach the node at {url}: {exc}") from exc
        except json.JSONDecodeError as exc:
            raise AdminError(f"unexpected answer from {url}") from exc
    if response.status >= 400:
        error = payload.get("error", {}) if isinstance(payload, dict) else {}
        raise AdminError(f"{response.status}: {error.get('message', payload)}")
    return payload


def _run(coro: Any) -> int:
    try:
        return int(asyncio.run(coro) or 0)
    except AdminError as exc:
        print(f"dvai-node: {exc}", file=sys.stderr)
        return 1
    except TimeoutError:
        print("dvai-node: the node did not answer in time", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def _ago(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


@command("pair")
def _pair(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        if args.qr or args.scan:
            from .cli_qr import pair_by_qr

            return await pair_by_qr(args, base)
        if not args.target:
            raise AdminError("give a device id or URL to pair with (or --qr / --scan)")
        target = args.target
        body: dict[str, Any] = {"url": target} if target.startswith(("http://", "https://")) else {
            "deviceId": target}
        if args.app_id:
            body["appId"] = args.app_id
        print(f"asking {target} to pair (the peer's owner may have to approve)…", file=sys.stderr)
        result = await call("POST", f"{base}/dvai/pairings", body, timeout=180)
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"paired with {result.get('peerDeviceName') or ''} {result['peerDeviceId']} "
                  f"({result.get('via')})")
        return 0

    return _run(go())


@command("pairing")
def _pairing(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        if args.action in ("revoke", "approve", "deny") and not args.device_id:
            raise AdminError(f"`pairing {args.action}` needs a device id")
        if args.action == "list":
            result = await call("GET", f"{base}/dvai/pairings")
            rows = [[p.get("peerDeviceName") or "", p["peerDeviceId"], p.get("role", ""), p.get("via", ""),
                     p.get("appId") or "", _ago(p.get("pairedAt"))] for p in result["data"]]
            header = ["NAME", "DEVICE ID", "ROLE", "VIA", "APP", "PAIRED AT"]
        elif args.action == "pending":
            result = await call("GET", f"{base}/dvai/pairing-requests")
            rows = [[r.get("peerDeviceName") or "", r["peerDeviceId"], "yes" if r.get("proven") else "NO",
                     r.get("remote", ""), r.get("appId") or "", _ago(r.get("receivedAt"))] for r in result["data"]]
            header = ["NAME", "DEVICE ID", "ID PROVEN", "FROM", "APP", "RECEIVED"]
        elif args.action == "revoke":
            result = await call("DELETE", f"{base}/dvai/pairings/{quote(args.device_id, safe='')}")
            print(f"revoked {args.device_id}") if not args.json else print(json.dumps(result))
            return 0
        else:
            result = await call("POST", f"{base}/dvai/pairing-requests/{quote(args.device_id, safe='')}/{args.action}")
            print(f"{args.action}d {args.device_id}") if not args.json else print(json.dumps(result))
            return 0
        if args.json:
            print(json.dumps(result["data"], indent=2))
        elif rows:
            print_table(rows, header)
        else:
            print("(none)")
        return 0

    return _run(go())


@command("audit")
def _audit(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        query = {"limit": str(args.limit)}
        if args.since is not None:
            query["since"] = str(unix_ms() - int(args.since * 1000))
        for key, value in (("app_id", args.app), ("peer", args.peer), ("status", args.status)):
            if value is not None:
                query[key] = str(value)
        url = f"{base}/dvai/audit?{urlencode(query)}"
        result = await call("GET", url)
        if args.json:
            print(json.dumps(result["data"], indent=2))
            return 0
        rows = [[_ago(r.get("ts")), r.get("endpoint", ""), str(r.get("status", "")), r.get("appId") or "",
                 r.get("peerDeviceId") or "", r.get("modelServed") or r.get("modelRequested") or "",
                 f"{r.get('promptTokens') or 0}/{r.get('completionTokens') or 0}",
                 f"{r.get('latencyMs', 0):.0f}", r.get("servedBy") or ""] for r in result["data"]]
        if rows:
            print_table(rows, ["TIME", "ENDPOINT", "STATUS", "APP", "PEER", "MODEL", "TOKENS", "MS", "SERVED BY"])
        else:
            print("(no rows)")
        return 0

    return _run(go())


@command("peers")
def _peers(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        result = await call("GET", f"{base}/dvai/peers" + ("?fresh=1" if args.fresh else ""))
        if args.json:
            print(json.dumps(result["data"], indent=2))
            return 0
        now_ms = unix_ms()
        rows = []
        for peer in result["data"]:
            speeds = ", ".join(f"{m} {v:g}" for m, v in sorted(peer.get("capability", {}).items())) or "-"
            seen = peer.get("lastSeenAt")
            ago = f"{max(0.0, (now_ms - seen) / 1000):.1f}s ago" if isinstance(seen, (int, float)) else "-"
            rows.append([peer.get("deviceName", ""), peer["deviceId"], peer.get("address", ""),
                         ",".join(peer.get("loadedModels", [])) or "-", speeds, peer.get("via", ""),
                         peer.get("state", ""), ago])
        if rows:
            print_table(rows, ["NAME", "DEVICE ID", "ADDRESS", "MODELS", "TOK/S (claimed)", "VIA", "STATE",
                               "LAST SEEN"])
        else:
            print("(no peers)")
        return 0

    return _run(go())
