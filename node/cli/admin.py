"""``dvai-node models``, and the commands that manage a running node over its loopback admin API:
``pair``, ``pairing``, ``audit``, ``peers``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any
from urllib.parse import quote, urlencode

from ..common.clock import unix_ms
from ..config import NodeConfig
from ..constants import AUDIT_CLI_DEFAULT_ROWS
from ..engine.model_file import model_file_problem
from .base import add_config_option
from .client import AdminError, add_client_options, call, local_time, node_url, print_table, run_client
from .qr import pair_by_qr
from .serve import describe_source

# -- models ------------------------------------------------------------------------------


def configure_models(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    parser.add_argument("--model", metavar="PATH", help="list this GGUF file as `serve --model PATH` would "
                        "serve it (checked: it must exist and be a GGUF file)")
    parser.add_argument("--catalog", action="store_true",
                        help="list the model catalogue instead: every model the node can obtain")
    parser.add_argument("--json", action="store_true", help="with --catalog: print it as JSON")


def run_models(args: argparse.Namespace, config: NodeConfig) -> int:
    """List the configured models; exit 1 naming each model file that is missing or not GGUF."""
    if args.catalog:
        return print_catalog(as_json=args.json)
    problems = []
    print(f"{'ID':<24} {'SERVES':<18} {'CTX':>6}  SOURCE")
    for model in config.models:
        serves = "embedding" if model.embedding else "chat,completion"
        source = describe_source(model)
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"{model.id:<24} {serves:<18} {model.ctx_size:>6}  {source}{aliases}")
        problem = model_file_problem(model.path) if model.engine != "simulated" and model.path else None
        if problem:
            problems.append(f"dvai-node: model {model.id}: {problem}")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


def print_catalog(*, as_json: bool = False) -> int:
    """``dvai-node models --catalog``: the model catalogue (node/catalog.py)."""
    from ..catalog import all_models

    entries = list(all_models())
    if as_json:
        print(json.dumps([m.metadata() for m in entries], indent=2))
        return 0
    print(f"{'NAME':<22} {'ID':<22} {'CATEGORY':<10} {'SIZE':>9} {'CTX':>6}  {'CHAT':<4} {'TOOLS':<5} SOURCE")
    for m in entries:
        size = f"{m.expected_size / 1e6:.0f} MB"
        print(f"{m.name:<22} {m.id:<22} {m.category:<10} {size:>9} {m.ctx_size:>6}  "
              f"{'yes' if m.supports_chat else 'no':<4} {'yes' if m.supports_tools else 'no':<5} "
              f"{m.source.describe()}")
    return 0


# -- pair / pairing ----------------------------------------------------------------------


def configure_pair(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", nargs="?", help="a discovered peer's device id, or its base URL")
    parser.add_argument("--app-id", help="the app id to pair as (default: this device id)")
    parser.add_argument("--qr", action="store_true", help="show a QR code for a device elsewhere to scan")
    parser.add_argument("--scan", metavar="PAYLOAD", help="complete a QR pairing from its dvai://pair payload")
    add_client_options(parser)


def run_pair(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        if args.qr or args.scan:
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

    return run_client(go())


def configure_pairing(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["list", "revoke", "pending", "approve", "deny"])
    parser.add_argument("device_id", nargs="?", help="the peer (revoke, approve, deny)")
    parser.add_argument("--app", help="revoke: only this app's pairing on the device (default: every pairing with "
                        "it); approve, deny: the app whose request to settle (needed when several wait)")
    add_client_options(parser)


def run_pairing(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        if args.action in ("revoke", "approve", "deny") and not args.device_id:
            raise AdminError(f"`pairing {args.action}` needs a device id")
        if args.action == "list":
            result = await call("GET", f"{base}/dvai/pairings")
            rows = [[p.get("peerDeviceName") or "", p["peerDeviceId"], p.get("role", ""), p.get("via", ""),
                     p.get("ourAppId") or "-", p.get("peerAppId") or "-", local_time(p.get("pairedAt"))]
                    for p in result["data"]]
            header = ["NAME", "DEVICE ID", "ROLE", "VIA", "WE SIGN AS", "PEER SIGNS AS", "PAIRED AT"]
        elif args.action == "pending":
            result = await call("GET", f"{base}/dvai/pairing-requests")
            rows = [[r.get("peerDeviceName") or "", r["peerDeviceId"], "yes" if r.get("proven") else "NO",
                     r.get("remote", ""), r.get("appId") or "", local_time(r.get("receivedAt"))]
                    for r in result["data"]]
            header = ["NAME", "DEVICE ID", "ID PROVEN", "FROM", "APP", "RECEIVED"]
        elif args.action == "revoke":
            app = f"?{urlencode({'appId': args.app})}" if args.app else ""
            result = await call("DELETE", f"{base}/dvai/pairings/{quote(args.device_id, safe='')}{app}")
            what = f"app {args.app} on {args.device_id}" if args.app else f"every pairing with {args.device_id}"
            print(f"revoked {what}") if not args.json else print(json.dumps(result))
            return 0
        else:
            app = f"?{urlencode({'appId': args.app})}" if args.app else ""
            result = await call("POST", f"{base}/dvai/pairing-requests/{quote(args.device_id, safe='')}/"
                                f"{args.action}{app}")
            print(f"{args.action}d {args.device_id} (app {result.get('appId')})") if not args.json \
                else print(json.dumps(result))
            return 0
        if args.json:
            print(json.dumps(result["data"], indent=2))
        elif rows:
            print_table(rows, header)
        else:
            print("(none)")
        return 0

    return run_client(go())


# -- audit -------------------------------------------------------------------------------


def configure_audit(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--since", type=float, metavar="SECONDS", help="only rows newer than this many seconds")
    parser.add_argument("--until", type=float, metavar="SECONDS",
                        help="only rows older than this many seconds (with --since: a window in the past)")
    parser.add_argument("--app", help="only this app id")
    parser.add_argument("--peer", help="only this peer device id (or self / anonymous)")
    parser.add_argument("--status", type=int, help="only this HTTP status")
    parser.add_argument("--limit", type=int, default=AUDIT_CLI_DEFAULT_ROWS, metavar="N",
                        help=f"show at most N rows, newest first (1 to 10000, default {AUDIT_CLI_DEFAULT_ROWS})")
    add_client_options(parser)


def audit_query(args: argparse.Namespace, now_ms: int) -> dict[str, str]:
    """The ``GET /v1/dvai/audit`` query for the flags: ages in seconds become unix-ms bounds."""
    query = {"limit": str(args.limit)}
    for key, age in (("since", args.since), ("until", args.until)):
        if age is not None:
            query[key] = str(int(now_ms - age * 1000))
    for key, value in (("app_id", args.app), ("peer", args.peer), ("status", args.status)):
        if value is not None:
            query[key] = str(value)
    return query


def run_audit(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        query = audit_query(args, unix_ms())
        result = await call("GET", f"{base}/dvai/audit?{urlencode(query)}")
        if args.json:
            print(json.dumps(result["data"], indent=2))
            return 0
        rows = [[local_time(r.get("ts")), r.get("endpoint", ""), str(r.get("status", "")), r.get("appId") or "",
                 r.get("peerDeviceId") or "", r.get("modelServed") or r.get("modelRequested") or "",
                 f"{r.get('promptTokens') or 0}/{r.get('completionTokens') or 0}",
                 f"{r.get('latencyMs', 0):.0f}", r.get("servedBy") or ""] for r in result["data"]]
        if rows:
            print_table(rows, ["TIME", "ENDPOINT", "STATUS", "APP", "PEER", "MODEL", "TOKENS", "MS", "SERVED BY"])
        else:
            print("(no rows)")
        return 0

    return run_client(go())


# -- peers -------------------------------------------------------------------------------


def configure_peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--fresh", action="store_true", help="health-check every peer before listing")
    add_client_options(parser)


def link_text(link: object) -> str:
    """A WebRTC link as the peers table shows it: ``direct 23 ms``, ``relayed``, ``failed``, ``-``."""
    if not isinstance(link, dict) or not isinstance(link.get("state"), str):
        return "-"
    rtt = link.get("rttMs")
    return f"{link['state']} {rtt:.0f} ms" if isinstance(rtt, (int, float)) and link["state"] in (
        "direct", "relayed") else str(link["state"])


def run_peers(args: argparse.Namespace, config: NodeConfig) -> int:
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
            rows.append([peer.get("deviceName", ""), peer["deviceId"], peer.get("address", "") or "-",
                         ",".join(peer.get("loadedModels", [])) or "-", speeds, peer.get("via", ""),
                         peer.get("state", ""), link_text(peer.get("link")), ago])
        if rows:
            print_table(rows, ["NAME", "DEVICE ID", "ADDRESS", "MODELS", "TOK/S (claimed)", "VIA", "STATE",
                               "LINK", "LAST SEEN"])
        else:
            print("(no peers)")
        return 0

    return run_client(go())
