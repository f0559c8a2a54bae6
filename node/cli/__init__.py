"""``dvai-node``: run a node and manage it from the command line.

Every command is listed once, in ``COMMANDS``: its name, its help, the function
that adds its flags and the function that runs it. Importing this package
registers nothing elsewhere and starts nothing; ``main()`` builds the parser
from the table. One module per group of commands:

- ``serve``: ``serve``;
- ``admin``: ``models`` and the admin-API clients ``pair``, ``pairing``, ``audit``, ``peers``
  (``client`` finds the running node and calls it; ``qr`` runs ``pair --qr`` / ``--scan``);
- ``hub``: the hub's admin-API clients ``keys``, ``apps``, ``devices``, ``usage``, ``quotas``;
- ``status``: ``status`` / ``ps``, what the running node has loaded and queued;
- ``probe``: ``probe``, an in-process speed measurement;
- ``managed``: ``managed list|attach|detach``, the registry of managed serves (node/managed/).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from ..common.errors import ConfigError
from ..config import load_config
from ..version import __version__
from . import admin, hub, managed, probe, serve, status
from .base import Command, overrides_from_args

COMMANDS: tuple[Command, ...] = (
    Command("serve", "run the node (the default command)", serve.configure, serve.run),
    Command("models", "list the models this node's configuration serves", admin.configure_models,
            admin.run_models),
    Command("status", "show what the running node has loaded, queued and for how long", status.configure,
            status.run, aliases=("ps",)),
    Command("peers", "show the peers this node has discovered", admin.configure_peers, admin.run_peers),
    Command("pair", "pair with a peer (by device id or URL)", admin.configure_pair, admin.run_pair),
    Command("pairing", "list, revoke and approve pairings", admin.configure_pairing, admin.run_pairing),
    Command("audit", "show the audit log of served requests", admin.configure_audit, admin.run_audit),
    Command("keys", "create, list and revoke API keys (Authorization: Bearer)", hub.configure_keys, hub.run_keys),
    Command("apps", "list the apps that use this node: paired devices, API keys, usage", hub.configure_apps,
            hub.run_apps),
    Command("devices", "list the devices that use this node and the apps paired on each", hub.configure_devices,
            hub.run_devices),
    Command("usage", "show requests and tokens per day, app, device and model", hub.configure_usage,
            hub.run_usage),
    Command("quotas", "show the quota rules in force", hub.configure_quotas, hub.run_quotas),
    Command("probe", "measure this device's decode speed (tok/s) for a model and save it", probe.configure,
            probe.run, description=probe.DESCRIPTION),
    Command("managed", managed.HELP, managed.configure, managed.run, description=managed.DESCRIPTION),
)

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvai-node", description="A dvai-mesh inference node.")
    parser.add_argument("--version", action="version", version=f"dvai-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, aliases=list(command.aliases), help=command.help,
                               description=command.description or command.help[:1].upper() + command.help[1:])
        command.configure(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or (words[0].startswith("-") and words[0] not in ("-h", "--help", "--version")):
        words.insert(0, "serve")
    args = parser.parse_args(words)
    try:
        config = load_config(getattr(args, "config", None), overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"dvai-node: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return int(args.run(args, config))
