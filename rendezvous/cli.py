"""``dvai-rendezvous``: parse flags → config → serve."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from node.common.errors import ConfigError
from node.version import __version__

from .config import ENV_PREFIX, RendezvousConfig, load_rendezvous_config
from .server import RendezvousServer, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dvai-rendezvous",
        description="Self-hostable rendezvous for dvai-mesh: QR pairing sessions and presence relay.",
        epilog=f"Every setting can also come from a TOML file (--config) or {ENV_PREFIX}<KEY> variables; "
        "flags win over the environment, which wins over the file.",
    )
    parser.add_argument("--version", action="version", version=f"dvai-rendezvous {__version__}")
    parser.add_argument("--config", metavar="FILE", help="TOML config file")
    parser.add_argument("--host", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 38980; 0 = any free port)")
    parser.add_argument("--public-url", help="URL clients reach this service at (goes into QR codes)")
    parser.add_argument("--tls-cert", metavar="FILE", help="TLS certificate chain (PEM)")
    parser.add_argument("--tls-key", metavar="FILE", help="TLS private key (PEM)")
    parser.add_argument("--db", metavar="FILE", help="SQLite file, or :memory: to keep nothing")
    parser.add_argument("--session-ttl", type=float, metavar="SECONDS", help="pairing session lifetime (default 120)")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), metavar="LEVEL",
                        help="how much the service logs: debug, info, warning, error (default info)")
    return parser


def config_from_args(args: argparse.Namespace) -> RendezvousConfig:
    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "public_url": args.public_url,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
        "db": args.db,
        "session_ttl": args.session_ttl,
        "log_level": args.log_level,
    }
    return load_rendezvous_config(args.config, overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"dvai-rendezvous: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warning = config.public_url_warning()
    if warning is not None:
        logging.getLogger("dvai.rendezvous").warning("%s", warning)

    def ready(server: RendezvousServer) -> None:
        print(f"dvai-rendezvous listening on {server.url} (public URL {server.config.base_url}, "
              f"db {config.resolved_db()})",
              flush=True)

    try:
        asyncio.run(serve(config, on_ready=ready))
    except OSError as exc:
        print(f"dvai-rendezvous: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
