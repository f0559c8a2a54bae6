"""What every ``dvai-node`` command shares: the ``Command`` record and the common options."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import NodeConfig, model_id_for_path

Run = Callable[[argparse.Namespace, NodeConfig], int]
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Command:
    """One subcommand: its name, the flags it takes (``configure``) and what it does (``run``)."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Run
    aliases: tuple[str, ...] = ()
    description: str | None = None


def add_config_option(parser: argparse.ArgumentParser, text: str = "TOML config file") -> None:
    parser.add_argument("--config", metavar="FILE", help=text)


def add_state_dir_option(parser: argparse.ArgumentParser, text: str) -> None:
    parser.add_argument("--state-dir", metavar="DIR", help=text)


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", choices=LOG_LEVELS, metavar="LEVEL",
                        help=f"how much the node logs: {', '.join(LOG_LEVELS)} (default info)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given, as config overrides (flags beat env and file).

    Each command defines only the flags it uses, so absent attributes are simply skipped.
    """
    out: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        out["state_dir"] = args.state_dir
    if getattr(args, "port", None) is not None:
        out["http_base_port"] = args.port
    if getattr(args, "host", None):
        out["http_bind_host"] = args.host
    if getattr(args, "log_level", None):
        out["log_level"] = args.log_level
    if getattr(args, "hub", False):
        out["hub"] = {"enabled": True}
    if getattr(args, "model", None):
        out["models"] = {model_id_for_path(args.model): {"path": args.model}}
    return out
