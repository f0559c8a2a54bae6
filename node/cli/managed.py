"""``dvai-node managed``: the registry of managed serves (node/managed/) from the command line.

``attach`` and ``detach`` are how other languages' providers (``clients/ai-sdk``) join
and leave managed serves: they run under the same registry lock and write the same
records as ``managed_node()`` in Python, with the calling process as the consumer.
Their output is one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..config import NodeConfig
from ..managed.errors import ManagedModeError
from ..managed.lifecycle import Attachment, attach, detach, list_serves, plan
from ..managed.options import ManagedModel, ManagedOptions
from ..managed.registry import ProcessRef, ServeRecord

HELP = "list, join and leave managed serves (docs/managed.md)"
DESCRIPTION = ("Managed serves are spawned on demand by managed_node() (Python) or createDvai({mode: "
               "'managed'}) (JavaScript), shared by consumers asking for the same models and reaped when idle.")


def configure(parser: argparse.ArgumentParser) -> None:
    """No node config: the registry is per user, not per node."""
    actions = parser.add_subparsers(dest="managed_action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="the live managed serves")
    listing.add_argument("--json", action="store_true", help="print the registry records as JSON")
    listing.add_argument("--registry-dir", metavar="DIR", help="registry location (default: user state dir)")
    join = actions.add_parser("attach", help="join or spawn a serve; print it as JSON")
    join.add_argument("--spec", required=True, metavar="JSON",
                      help='options as JSON: {"models": [...], "host", "port", "start_timeout", '
                      '"binary", "reuse", "idle_timeout", "registry_dir"}')
    join.add_argument("--consumer-pid", type=int, metavar="PID",
                      help="the consumer process (default: the caller of this command)")
    leave = actions.add_parser("detach", help="leave a serve joined with attach")
    leave.add_argument("--serve-id", required=True)
    leave.add_argument("--handle", required=True)
    leave.add_argument("--registry-dir", metavar="DIR")


def run(args: argparse.Namespace, config: NodeConfig) -> int:
    if args.managed_action == "list":
        return _list(args)
    if args.managed_action == "attach":
        return _attach(args)
    return _detach(args)


def options_from_json(spec: dict[str, Any]) -> ManagedOptions:
    """ManagedOptions from the JSON the JavaScript provider sends (seconds for times)."""
    models: list[str | ManagedModel] = []
    for item in spec.get("models") or []:
        if isinstance(item, str):
            models.append(item)
        elif isinstance(item, dict):
            models.append(ManagedModel(
                name=str(item["name"]), config=dict(item.get("config") or {}),
                preload=bool(item.get("preload", True)), default=bool(item.get("default", False)),
                alias=item.get("alias"),
            ))
        else:
            raise ValueError(f"models: expected names or objects, got {item!r}")
    values: dict[str, Any] = {k: spec[k] for k in ("host", "port", "start_timeout", "binary", "reuse",
                                                   "idle_timeout") if spec.get(k) is not None}
    registry_dir = spec.get("registry_dir")
    return ManagedOptions(models=tuple(models), registry_dir=Path(registry_dir) if registry_dir else None,
                          **values)


def attachment_json(attachment: Attachment) -> dict[str, Any]:
    record = attachment.record
    return {"base_url": record.base_url, "port": record.port, "pid": record.serve.pid,
            "serve_id": record.id, "handle": attachment.handle, "models": record.models,
            "default_model": record.models[0], "spawned": attachment.spawned}


def _attach(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(args.spec)
        if not isinstance(spec, dict):
            raise ValueError("--spec: expected a JSON object")
        options = options_from_json(spec)
        consumer = ProcessRef.of(args.consumer_pid) if args.consumer_pid else None
        if consumer is not None and not consumer.alive():
            raise ValueError(f"--consumer-pid {args.consumer_pid}: no such process")
        attachment = attach(plan(options), consumer=consumer)
    except ManagedModeError as exc:
        print(json.dumps({"error": {"code": exc.code.value, "message": exc.message}}))
        return 1
    except (ValueError, KeyError, TypeError) as exc:
        print(json.dumps({"error": {"code": "invalid_options", "message": str(exc)}}))
        return 2
    print(json.dumps(attachment_json(attachment)), flush=True)
    return 0


def _detach(args: argparse.Namespace) -> int:
    record = ServeRecord(id=args.serve_id, key="", shared=True, host="", port=0, binary="", models=[],
                         serve=ProcessRef(0, None), supervisor=ProcessRef(0, None), consumers=[],
                         idle_timeout_s=0, created_ms=0)
    attachment = Attachment(record, args.handle, ProcessRef(0, None), spawned=False)
    detach(attachment, registry_dir=Path(args.registry_dir) if args.registry_dir else None)
    print(json.dumps({"detached": args.serve_id}))
    return 0


def _list(args: argparse.Namespace) -> int:
    records = list_serves(Path(args.registry_dir) if args.registry_dir else None)
    if args.json:
        print(json.dumps([r.to_json() for r in records], indent=2))
        return 0
    if not records:
        print("no managed serves", file=sys.stderr)
        return 0
    print(f"{'SERVE':<14} {'PID':>7} {'BASE URL':<30} {'CONSUMERS':>9} {'AGE':>7}  MODELS")
    now = time.time() * 1000
    for r in records:
        age = f"{(now - r.created_ms) / 1000:.0f}s"
        shared = "" if r.shared else " (dedicated)"
        print(f"{r.id:<14} {r.serve.pid:>7} {r.base_url:<30} {len(r.consumers):>9} {age:>7}  "
              f"{', '.join(r.models)}{shared}")
    return 0
