"""The documentation keeps up with the code.

Everything here is read from the code, not listed by hand: a config key,
route or ``dvai-node`` command added later fails these tests until it is
documented.

- every key of every config dataclass is in docs/configuration.md, in the
  section of its table, with its environment variable;
- every flag of ``dvai-node serve`` is in docs/configuration.md;
- every route ``build_app`` registers is in docs/api.md as ``METHOD /path``;
- every ``dvai-node`` subcommand is named in the docs;
- the complete TOML example shows every key.

Every runnable code block (TOML included) is run by tests/test_docs_run.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.app import build_app
from node.cli import build_parser
from node.config import NodeConfig, load_config
from node.runtime import Node

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
API = DOCS / "api.md"
MODELS_FIELD = "models"
"""The one list of tables the loader reads as a table of aliases: ``[models.<alias>]``."""


# --------------------------------------------------------------------------
# Reading the docs


@dataclass(frozen=True, slots=True)
class Section:
    level: int
    title: str
    body: str


def sections(text: str) -> list[Section]:
    """Markdown sections; each body runs to the next heading of the same or a higher level."""
    lines = text.splitlines()
    headings = []
    fenced = False
    for index, line in enumerate(lines):
        if line.startswith("```"):
            fenced = not fenced
        match = None if fenced else re.match(r"^(#{1,6})\s+(.*)$", line)
        if match:
            headings.append((index, len(match.group(1)), match.group(2)))
    out = []
    for position, (start, level, title) in enumerate(headings):
        end = len(lines)
        for later, later_level, _ in headings[position + 1:]:
            if later_level <= level:
                end = later
                break
        out.append(Section(level, title, "\n".join(lines[start + 1:end])))
    return out


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def all_docs_text() -> str:
    files = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
    return "\n".join(path.read_text() for path in files if path.is_file())


# --------------------------------------------------------------------------
# Reading the config dataclasses


@dataclass(frozen=True, slots=True)
class ConfigKey:
    table: str
    """``""`` (top level), ``offload``, ``models.<alias>``, ``offload.known_peers[]``, …"""
    name: str
    env: str | None
    """the environment variable, or None inside an array of tables (set as JSON on the array)."""

    @property
    def path(self) -> str:
        return f"{self.table}.{self.name}" if self.table else self.name

    @property
    def heading_marker(self) -> str:
        """What the heading of this key's section contains."""
        if not self.table:
            return "Top-level keys"
        if self.table.endswith("[]"):
            return f"`[[{self.table[:-2]}]]`"
        return f"`[{self.table}]`"


def _nested_dataclass(hint: typing.Any) -> tuple[type | None, bool]:
    """(the dataclass a field holds, whether it is a list of them)."""
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return hint, False
    if typing.get_origin(hint) is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        if len(args) == 1 and isinstance(args[0], type) and dataclasses.is_dataclass(args[0]):
            return args[0], True
    return None, False


def config_keys(cls: type = NodeConfig, table: str = "", env_prefix: str | None = "DVAI_") -> Iterator[ConfigKey]:
    """Every key, recursively; ``env_prefix`` is None inside arrays of tables."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        env = None if env_prefix is None else env_prefix + field.name.upper()
        yield ConfigKey(table, field.name, env)
        nested, is_list = _nested_dataclass(hints[field.name])
        if nested is None:
            continue
        path = f"{table}.{field.name}" if table else field.name
        if is_list and path == MODELS_FIELD:
            yield from config_keys(nested, f"{path}.<alias>", None if env is None else f"{env}__<ALIAS>__")
        elif is_list:
            yield from config_keys(nested, f"{path}[]", None)
        else:
            yield from config_keys(nested, path, None if env is None else f"{env}__")


def test_config_key_walk_sees_every_table() -> None:
    """Guard the walker itself: nested tables, the models table and arrays of tables."""
    keys = {key.path: key for key in config_keys()}
    assert keys["http_base_port"].env == "DVAI_HTTP_BASE_PORT"
    assert keys["offload.min_local_capability"].env == "DVAI_OFFLOAD__MIN_LOCAL_CAPABILITY"
    assert keys["models.<alias>.ctx_size"].env == "DVAI_MODELS__<ALIAS>__CTX_SIZE"
    assert keys["offload.known_peers[].base_url"].env is None
    assert keys["offload.known_peers[].base_url"].heading_marker == "`[[offload.known_peers]]`"
    assert {"security.pairing_policy", "audit.max_rows"} <= set(keys)


CONFIG_KEYS = list(config_keys())


@pytest.mark.parametrize("key", CONFIG_KEYS, ids=[k.path for k in CONFIG_KEYS])
def test_every_config_key_is_documented(key: ConfigKey) -> None:
    text = CONFIGURATION.read_text()
    matching = [s for s in sections(text) if key.heading_marker in s.title]
    assert matching, f"docs/configuration.md has no section titled with {key.heading_marker}"
    row = re.compile(rf"^\|\s*`{re.escape(key.name)}`\s*\|", re.M)
    assert any(row.search(s.body) for s in matching), (
        f"config key {key.path} is not documented: add a '| `{key.name}` |' row under "
        f"the {key.heading_marker} heading of docs/configuration.md"
    )
    if key.env is not None:
        assert f"`{key.env}`" in text or f"`{key.env}=" in text, (
            f"config key {key.path}: its environment variable {key.env} is not in docs/configuration.md"
        )


def _serve_flags() -> list[str]:
    serve = _subcommands(build_parser())["serve"]
    return sorted(
        option
        for action in serve._actions  # noqa: SLF001 - argparse has no public list of options
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            return dict(action.choices)
    return {}


@pytest.mark.parametrize("flag", _serve_flags())
def test_every_serve_flag_is_documented(flag: str) -> None:
    assert f"`{flag}" in CONFIGURATION.read_text(), f"dvai-node serve {flag} is not in docs/configuration.md"


@pytest.mark.parametrize("name", sorted(_subcommands(build_parser())))
def test_every_cli_command_is_documented(name: str) -> None:
    assert re.search(rf"dvai-node {re.escape(name)}\b", all_docs_text()), (
        f"`dvai-node {name}` is not named in README.md or docs/*.md"
    )


def test_version_flag_is_documented() -> None:
    assert "dvai-node --version" in API.read_text()


# --------------------------------------------------------------------------
# Routes


async def _registered_routes(tmp_path: Path) -> list[tuple[str, str]]:
    config = load_config(env={}, overrides={"state_dir": str(tmp_path), "models": {"sim": {"engine": "simulated"}}})
    node = Node(config)
    context = node._build_context()  # noqa: SLF001 - the same context the runtime builds, without a port
    node.context = context
    try:
        app = build_app(context)
        routes = {
            (route.method, route.resource.canonical)
            for route in app.router.routes()
            if route.method != "HEAD" and route.resource is not None
        }
    finally:
        await node.close()
    return sorted(routes)


async def test_every_route_is_documented(tmp_path: Path) -> None:
    text = API.read_text()
    routes = await _registered_routes(tmp_path)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/dvai/health") in routes
    missing = [
        f"{method} {path}"
        for method, path in routes
        if not re.search(rf"{re.escape(method)} {re.escape(path)}(?![\w/{{-])", text)
    ]
    assert not missing, f"routes missing from docs/api.md (write them as `METHOD /path`): {missing}"


# --------------------------------------------------------------------------
# Examples


def test_configuration_has_a_complete_example() -> None:
    blocks = code_blocks(CONFIGURATION.read_text(), "toml")
    assert blocks, "docs/configuration.md has no toml example"
    complete = blocks[-1]
    for key in CONFIG_KEYS:
        if key.name == "id" and key.table.startswith(f"{MODELS_FIELD}."):
            continue  # a model's id is its table name
        if key.name == "require_pairing":
            continue  # unset means "decide from the bind address": the example explains it in a comment
        assert re.search(rf"\b{re.escape(key.name)}\b", complete), (
            f"the complete example in docs/configuration.md does not show {key.path}"
        )
