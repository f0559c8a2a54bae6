"""``dvai-node serve``: run the node until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import sys

from ..common.errors import ConfigError
from ..common.signals import wait_for_stop_signal
from ..config import ModelConfig, NodeConfig
from ..version import __version__
from .base import add_config_option, add_log_level_option, add_state_dir_option

STATE_DIR_HELP = ("where the node keeps its state: device identity key, pairings, audit log, capability "
                  "scores, endpoint.json (not the model cache)")


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_option(parser)
    add_state_dir_option(parser, STATE_DIR_HELP)
    parser.add_argument("--port", type=int, help="HTTP base port (default 38883; 0 = any free port)")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--model", metavar="PATH", help="serve this GGUF file instead of the built-in model")
    parser.add_argument("--hub", action="store_true", help="hub mode: safe defaults for a node many apps on many "
                        "devices share (per-app pairing approved by the operator, default per-app quotas, audit "
                        "on; docs/hub.md). Bind it to the LAN with --host")
    add_log_level_option(parser)


def run(args: argparse.Namespace, config: NodeConfig) -> int:
    from ..identity import StateDirInUseError

    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:
        return 0
    except ConfigError as exc:
        print(f"dvai-node: {exc}", file=sys.stderr)
        return 2
    except StateDirInUseError as exc:
        print(f"dvai-node: {exc}", file=sys.stderr)
        return 1


async def serve(config: NodeConfig, *, stop: asyncio.Event | None = None) -> int:
    """Run until SIGINT/SIGTERM (or until ``stop`` is set, for embedders and tests).

    Returns 1 when a preloaded model cannot load and ``on_model_load_failure`` is ``exit``.
    """
    from ..runtime import Node

    node = Node(config)
    await node.start(wait_ready=False)
    try:
        context = node.context
        assert context is not None
        print(f"dvai-node {__version__}  device {context.identity.device_id} ({context.device_name})")
        print(f"OpenAI base URL: {node.base_url or '(in-process only)'}")
        if context.local_base_url and context.local_base_url != node.base_url:
            print(f"  from this machine (unsigned): {context.local_base_url}")
        for line in hub_summary(config):
            print(line)
        for model in config.models:
            lazy = "" if model.preload else " (loads on first use)"
            print(f"  model {model.id}: {describe_source(model)}{lazy}")
        sys.stdout.flush()
        await context.registry.wait_preloaded()
        failed = context.registry.failed
        for slot in failed:
            print(f"dvai-node: model {slot.info.id} could not be loaded: {slot.error}", file=sys.stderr)
        if failed and config.on_model_load_failure == "exit":
            print("dvai-node: exiting (set on_model_load_failure = \"continue\" to serve the other models "
                  "anyway)", file=sys.stderr, flush=True)
            return 1
        print("ready" if not failed else "running with failed models", flush=True)
        await wait_for_stop_signal(stop)
    finally:
        await node.close()
    return 0


def hub_summary(config: NodeConfig) -> list[str]:
    """What ``serve`` prints about hub mode: empty when it is off."""
    if not config.hub.enabled:
        return []
    from ..security import is_exposed

    security = config.security
    rules = ", ".join(f"{r.app_id}={r.policy}" for r in security.app_pairing) or "none"
    lines = [f"hub mode: pairing per app (device policy {security.pairing_policy}; app rules: {rules}), "
             f"{len(config.hub.quotas)} quota rule(s) (`dvai-node quotas`), audit "
             f"{'on' if config.audit.enabled else 'off'}"]
    if not is_exposed(config.http_bind_host):
        lines.append(f"hub mode: bound to {config.http_bind_host}: only this machine can reach the node; "
                     "give --host (a LAN address or 0.0.0.0) to serve other devices")
    return lines


def describe_source(model: ModelConfig) -> str:
    if model.engine == "simulated":
        return f"SIMULATED engine at {model.simulated_tok_per_s:g} tok/s"
    if model.path:
        return model.path
    from ..engine.default_model import builtin_model_for

    return f"built-in {builtin_model_for(model.id).title}"
