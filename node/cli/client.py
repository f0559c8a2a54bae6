"""The client side of the commands that ask a running node over its loopback admin API.

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
from collections.abc import Coroutine
from typing import Any

import aiohttp

from ..common.fsutil import read_json
from ..config import NodeConfig
from .base import add_config_option, add_state_dir_option


class AdminError(Exception):
    pass


def add_client_options(parser: argparse.ArgumentParser) -> None:
    """The flags every client command takes: how to find the node, and ``--json``."""
    parser.add_argument("--url", help="the running node's base URL (default: read from the state dir)")
    add_state_dir_option(parser, "the running node's state dir, where it wrote endpoint.json (its URL)")
    add_config_option(parser, "the running node's TOML config file (read only for its state_dir)")
    parser.add_argument("--json", action="store_true", help="print raw JSON")


def node_url(args: argparse.Namespace, config: NodeConfig) -> str:
    """The base URL (``…/v1``) of the node that owns this state dir."""
    if args.url:
        return str(args.url).rstrip("/")
    from ..runtime import ENDPOINT_FILE  # the runtime loads the whole node: only when a command needs it

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


def run_client(coro: Coroutine[Any, Any, int]) -> int:
    """Run one client command: its exit status, or 1 with the reason on stderr."""
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


def format_table(rows: list[list[str]], header: list[str]) -> list[str]:
    """Left-aligned columns two spaces apart, the header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]


def print_table(rows: list[list[str]], header: list[str]) -> None:
    print("\n".join(format_table(rows, header)))


def local_time(ms: Any) -> str:
    """A unix-ms timestamp as local ``YYYY-MM-DD HH:MM:SS`` (``-`` when absent)."""
    if not isinstance(ms, (int, float)):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))
