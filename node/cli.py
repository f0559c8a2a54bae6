"""``dvai-node``: run a node and manage it from the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .common.errors import ConfigError
from .common.signals import wait_for_stop_signal
from .config import ModelConfig, NodeConfig, load_config, model_id_for_path
from .version import __version__

log = logging.getLogger("dvai.cli")

Command = Callable[[argparse.Namespace, NodeConfig], int]
_COMMANDS: dict[str, Command] = {}


def command(name: str) -> Callable[[Command], Command]:
    def register(fn: Command) -> Command:
        _COMMANDS[name] = fn
        return fn

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dvai-node", description="A dvai-mesh inference node.")
    parser.add_argument("--version", action="version", version=f"dvai-node {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="TOML config file")
    common.add_argument("--state-dir", metavar="DIR", help="where identity, pairings and caches live")
    common.add_argument("--port", type=int, help="HTTP base port (default 38883; 0 = any free port)")
    common.add_argument("--host", help="bind address (default 127.0.0.1)")
    common.add_argument("--model", metavar="PATH", help="serve this GGUF file instead of the built-in model")
    common.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("serve", parents=[common], help="run the node (the default command)")
    sub.add_parser("models", parents=[common], help="list the models this node serves")
    for extra in _EXTRA_PARSERS:
        extra(sub, common)
    return parser


_EXTRA_PARSERS: list[Callable[[Any, argparse.ArgumentParser], None]] = []


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Flags that were given, as config overrides (flags beat env and file)."""
    out: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        out["state_dir"] = args.state_dir
    if getattr(args, "port", None) is not None:
        out["http_base_port"] = args.port
    if getattr(args, "host", None):
        out["http_bind_host"] = args.host
    if getattr(args, "log_level", None):
        out["log_level"] = args.log_level
    if getattr(args, "model", None):
        out["models"] = {model_id_for_path(args.model): {"path": args.model}}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    if not words or (words[0].startswith("-") and words[0] not in ("-h", "--help", "--version")):
        words.insert(0, "serve")
    args = parser.parse_args(words)
    try:
        config = load_config(args.config, overrides=overrides_from_args(args))
    except ConfigError as exc:
        print(f"dvai-node: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return _COMMANDS[args.command](args, config)


@command("serve")
def _serve(args: argparse.Namespace, config: NodeConfig) -> int:
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        print(f"dvai-node: {exc}", file=sys.stderr)
        return 2


async def serve(config: NodeConfig, *, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or until ``stop`` is set, for embedders and tests)."""
    from .runtime import Node

    node = Node(config)
    await node.start(wait_ready=False)
    try:
        context = node.context
        assert context is not None
        print(f"dvai-node {__version__}  device {context.identity.device_id} ({context.device_name})")
        print(f"OpenAI base URL: {node.base_url or '(in-process only)'}")
        for model in config.models:
            print(f"  model {model.id}: {describe_source(model)}")
        sys.stdout.flush()
        await context.registry.wait_preloaded()
        failed = context.registry.failed
        if failed:
            for slot in failed:
                print(f"model {slot.info.id} failed to load: {slot.error}", file=sys.stderr)
        print("ready" if not failed else "running with failed models", flush=True)
        await wait_for_stop_signal(stop)
    finally:
        await node.close()
    return 0


def describe_source(model: ModelConfig) -> str:
    if model.engine == "simulated":
        return f"SIMULATED engine at {model.simulated_tok_per_s:g} tok/s"
    return model.path or "built-in Gemma 3 270M (Q4_K_M)"


@command("models")
def _models(args: argparse.Namespace, config: NodeConfig) -> int:
    print(f"{'ID':<24} {'SERVES':<18} {'CTX':>6}  SOURCE")
    for model in config.models:
        serves = "embedding" if model.embedding else "chat,completion"
        source = describe_source(model)
        aliases = f" (aliases: {', '.join(model.aliases)})" if model.aliases else ""
        print(f"{model.id:<24} {serves:<18} {model.ctx_size:>6}  {source}{aliases}")
    return 0


from . import cli_admin  # noqa: E402,F401 - registers pair / pairing / audit
from .capability import command as _capability_command  # noqa: E402,F401 - registers probe

if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
