"""The hub's admin commands, each a client of the running node's loopback admin API:
``keys`` (create, list, revoke API keys), ``apps``, ``devices``, ``usage`` and ``quotas``."""

from __future__ import annotations

import argparse
import json
from typing import Any
from urllib.parse import quote, urlencode

from ..common.clock import unix_ms
from ..config import NodeConfig
from .client import AdminError, add_client_options, call, local_time, node_url, print_table, run_client


def _print(result: Any, rows: list[list[str]], header: list[str], *, as_json: bool, empty: str = "(none)") -> None:
    if as_json:
        print(json.dumps(result, indent=2))
    elif rows:
        print_table(rows, header)
    else:
        print(empty)


def _days_option(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument("--days", type=int, default=default, metavar="N",
                        help=f"usage over the last N UTC days, today included (default {default})")


def _tokens(usage: dict[str, Any]) -> str:
    return f"{usage.get('promptTokens', 0)}/{usage.get('completionTokens', 0)}"


# -- keys ------------------------------------------------------------------------------


def configure_keys(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "list", "revoke"])
    parser.add_argument("key_id", nargs="?", help="the key's id (revoke)")
    parser.add_argument("--app", help="create: the app the key belongs to (its requests are audited as this app)")
    parser.add_argument("--name", default="", help="create: a label (who holds it)")
    parser.add_argument("--models", help="create: comma-separated model ids the key may use (default: all)")
    parser.add_argument("--endpoints", help="create: comma-separated paths the key may call; an entry ending in "
                        "/ is a prefix (default: every non-admin path)")
    parser.add_argument("--no-offload", action="store_true", help="create: requests made with the key are "
                        "never served by a peer")
    parser.add_argument("--expires-in", type=float, metavar="SECONDS", help="create: the key expires after this")
    add_client_options(parser)


def key_request(args: argparse.Namespace) -> dict[str, Any]:
    """The ``POST /v1/dvai/keys`` body for ``keys create``'s flags."""
    if not args.app:
        raise AdminError("`keys create` needs --app APP_ID")
    scopes: dict[str, Any] = {}
    for name in ("models", "endpoints"):
        value = getattr(args, name)
        if value:
            scopes[name] = [item.strip() for item in value.split(",") if item.strip()]
    if args.no_offload:
        scopes["offload"] = False
    body: dict[str, Any] = {"appId": args.app, "name": args.name}
    if scopes:
        body["scopes"] = scopes
    if args.expires_in is not None:
        body["expiresIn"] = args.expires_in
    return body


def run_keys(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        if args.action == "create":
            result = await call("POST", f"{base}/dvai/keys", key_request(args))
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                print(f"API key {result['id']} for app {result['appId']} (shown once; the node keeps only its "
                      f"hash):\n{result['key']}")
            return 0
        if args.action == "revoke":
            if not args.key_id:
                raise AdminError("`keys revoke` needs the key's id (`dvai-node keys list` shows it)")
            result = await call("DELETE", f"{base}/dvai/keys/{quote(args.key_id, safe='')}")
            print(json.dumps(result, indent=2) if args.json else f"revoked API key {result['id']}")
            return 0
        result = await call("GET", f"{base}/dvai/keys")
        rows, now = [], unix_ms()
        for key in result["data"]:
            scopes = key.get("scopes") or {}
            expires = key.get("expiresAt")
            state = "revoked" if key.get("revokedAt") else "expired" if isinstance(expires, int) and \
                expires <= now else "active"
            rows.append([key["id"], key.get("appId", ""), key.get("name") or "", state,
                         ",".join(scopes.get("models", ["*"])), "yes" if scopes.get("offload", True) else "no",
                         local_time(key.get("createdAt")), local_time(key.get("expiresAt"))])
        _print(result["data"], rows, ["ID", "APP", "NAME", "STATE", "MODELS", "OFFLOAD", "CREATED", "EXPIRES"],
               as_json=args.json)
        return 0

    return run_client(go())


# -- apps, devices -----------------------------------------------------------------------


def configure_apps(parser: argparse.ArgumentParser) -> None:
    _days_option(parser, 30)
    add_client_options(parser)


def run_apps(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        result = await call("GET", f"{base}/dvai/apps?{urlencode({'days': args.days})}")
        rows = [[a["appId"], str(len(a["pairedDevices"])), str(len(a["activeKeys"])), str(len(a["seenOn"])),
                 str(a["usage"]["requests"]), _tokens(a["usage"])] for a in result["data"]]
        _print(result["data"], rows, ["APP", "PAIRED DEVICES", "ACTIVE KEYS", "SEEN ON", "REQUESTS", "TOKENS"],
               as_json=args.json)
        return 0

    return run_client(go())


def configure_devices(parser: argparse.ArgumentParser) -> None:
    _days_option(parser, 30)
    add_client_options(parser)


def run_devices(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        result = await call("GET", f"{base}/dvai/devices?{urlencode({'days': args.days})}")
        rows = [[d.get("deviceName") or "", d["deviceId"], ",".join(a["appId"] for a in d["apps"]) or "-",
                 "yes" if d["outbound"] else "no", str(d["usage"]["requests"]), _tokens(d["usage"])]
                for d in result["data"]]
        _print(result["data"], rows, ["NAME", "DEVICE ID", "PAIRED APPS", "WE CALL IT", "REQUESTS", "TOKENS"],
               as_json=args.json)
        return 0

    return run_client(go())


# -- usage, quotas -----------------------------------------------------------------------


def configure_usage(parser: argparse.ArgumentParser) -> None:
    _days_option(parser, 7)
    parser.add_argument("--app", help="only this app id")
    add_client_options(parser)


def run_usage(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        query: dict[str, Any] = {"days": args.days}
        if args.app:
            query["app"] = args.app
        result = await call("GET", f"{base}/dvai/usage?{urlencode(query)}")
        rows = [[r["day"], r["appId"], r["deviceId"], r["model"], str(r["requests"]), str(r["promptTokens"]),
                 str(r["completionTokens"])] for r in result["data"]]
        _print(result["data"], rows, ["DAY", "APP", "DEVICE", "MODEL", "REQUESTS", "PROMPT", "COMPLETION"],
               as_json=args.json, empty="(no usage)")
        return 0

    return run_client(go())


def configure_quotas(parser: argparse.ArgumentParser) -> None:
    add_client_options(parser)


def run_quotas(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        base = node_url(args, config)
        result = await call("GET", f"{base}/dvai/quotas")

        def text(value: Any) -> str:
            return "-" if value is None else str(value)

        rows = [[r["appId"], text(r["deviceId"]), text(r["model"]), text(r["requestsPerMinute"]),
                 text(r["tokensPerDay"]), text(r["concurrent"])] for r in result["data"]]
        if not args.json and result.get("hubMode"):
            print("hub mode: on")
        _print(result, rows, ["APP", "DEVICE", "MODEL", "REQ/MIN", "TOKENS/DAY", "CONCURRENT"], as_json=args.json,
               empty="(no quotas: every app is unlimited)")
        return 0

    return run_client(go())
