"""``dvai-node status`` (alias ``ps``): what the running node has loaded, queued and for how long.

Reads ``GET /v1/dvai/status`` from the node's loopback admin API (docs/api.md).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import NodeConfig
from .client import add_client_options, call, format_table, node_url, run_client


def configure(parser: argparse.ArgumentParser) -> None:
    add_client_options(parser)


def run(args: argparse.Namespace, config: NodeConfig) -> int:
    async def go() -> int:
        body = await call("GET", f"{node_url(args, config)}/dvai/status")
        if args.json:
            print(json.dumps(body, indent=2))
        else:
            print(render_status(body))
        return 0

    return run_client(go())


def render_status(body: dict[str, Any]) -> str:
    """The status as text: a node line, a model table, the offload counts and a peer table."""
    lines = [f"{body.get('deviceName', '')} {body.get('deviceId', '')}  {body.get('baseUrl') or ''}  "
             f"{body.get('status', '')}, up {duration(body.get('uptimeS'))}"]
    models = [[m["id"], str(m.get("state", "")), f"{m.get('queueDepth', 0)}/{m.get('queueLimit', '?')}",
               keep_alive_text(m), ",".join(m.get("serves", [])), str(m.get("error") or "")]
              for m in body.get("models", [])]
    header = ["MODEL", "STATE", "QUEUE", "KEEP ALIVE", "SERVES", "ERROR"]
    if not any(row[-1] for row in models):  # the error column only when a model failed
        header, models = header[:-1], [row[:-1] for row in models]
    lines += ["", *format_table(models, header)]
    offload = body.get("offload") or {}
    if not offload.get("enabled"):
        lines += ["", "offload: disabled (no peers are discovered)"]
        return "\n".join(lines)
    lines += ["", f"offload: {offload.get('forwarded', 0)} forwarded to peers, {offload.get('failed', 0)} "
                  f"failed, {offload.get('inFlight', 0)} in flight"]
    peers = [[p.get("deviceName") or "", p["deviceId"], p.get("state", ""), ",".join(p.get("loadedModels", []))
              or "-", str(p.get("forwarded", 0)), str(p.get("failed", 0)), p.get("circuit", "closed")]
             for p in body.get("peers", [])]
    if peers:
        lines += ["", *format_table(peers, ["PEER", "DEVICE ID", "STATE", "MODELS", "FORWARDED", "FAILED", "CIRCUIT"])]
    else:
        lines.append("peers: none discovered")
    return "\n".join(lines)


def keep_alive_text(model: dict[str, Any]) -> str:
    """``4m 59s`` left, ``forever`` (no keep_alive), or ``-`` when the model is not loaded."""
    if model.get("state") != "ready":
        return "-"
    left = model.get("keepAliveLeftS")
    return "forever" if left is None else duration(left)


def duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "-"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"

