"""The package layering, checked over the source: imports point down, never up, and never in a cycle.

The rules name packages, not files, so they hold while modules move; a rule about a package
that does not exist (yet) checks nothing and fails nothing.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("node", "rendezvous")

_LOWER_LAYERS = ("node.engine", "node.discovery", "node.pairing", "node.audit", "node.security", "node.common")


@dataclass(frozen=True)
class Rule:
    importer: str
    """a package (or module) name; the rule applies to it and everything under it."""
    forbidden: str
    """a regular expression matched against the full name of each imported module."""
    allowed: str = r"(?!)"
    """exceptions to ``forbidden`` (matched the same way)."""
    why: str = ""


RULES: tuple[Rule, ...] = (
    *(
        Rule(layer, r"node\.(api|offload)(\..*)?", why="lower layers never reach up to the HTTP edge or the router")
        for layer in _LOWER_LAYERS
    ),
    Rule("node.offload", r"aiohttp\.web(_\w+)?(\..*)?", why="the router is HTTP-free; the handler owns HTTP"),
    Rule("node.common", r"node(\..*)?", allowed=r"node\.common(\..*)?",
         why="what node and rendezvous share depends on nothing else of the node"),
    Rule("rendezvous", r"node(\..*)?", allowed=r"node\.common(\..*)?|node\.version(\..*)?",
         why="the rendezvous image installs only a few of the node's dependencies"),
)

# Imports that break a rule today, each to be removed by work in flight. The test fails when one
# of them disappears, so this list can only shrink; a new violation is never allowed in.
KNOWN_VIOLATIONS: frozenset[tuple[str, str]] = frozenset()


def _modules() -> Iterator[tuple[str, Path]]:
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path


def _imports(module: str, path: Path) -> set[str]:
    """Every module ``module`` names in an import statement (``from a import b`` names ``a`` and ``a.b``)."""
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names.add(target)
            names.update(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _violations(modules: Iterator[tuple[str, set[str]]] | None = None) -> set[tuple[str, str, str]]:
    found = set()
    for module, imported in modules or ((module, _imports(module, path)) for module, path in _modules()):
        for rule in RULES:
            if not _within(module, rule.importer):
                continue
            for name in imported:
                if re.fullmatch(rule.forbidden, name) and not re.fullmatch(rule.allowed, name):
                    found.add((module, name, rule.why))
    return found


def test_the_rules_see_every_module_and_resolve_relative_imports() -> None:
    modules = dict(_modules())
    assert "node.common.errors" in modules and "rendezvous.cli" in modules and "node" in modules
    assert "node.common.errors" in _imports("node.common.settings", modules["node.common.settings"])
    assert "node.version" in _imports("node", modules["node"])


def test_the_rules_catch_an_upward_import(tmp_path: Path) -> None:
    fake = tmp_path / "fake.py"
    fake.write_text("from ..api.sse import stream_events\nfrom aiohttp import web\nimport node.engine\n")
    found = _violations(iter([
        ("node.engine.fake", _imports("node.engine.fake", fake)),
        ("node.offload.fake", _imports("node.offload.fake", fake)),
        ("node.common.fake", _imports("node.common.fake", fake)),
        ("rendezvous.fake", {"node.identity", "node.common.b64", "node.version"}),
    ]))
    assert {(module, name) for module, name, _ in found} == {
        ("node.engine.fake", "node.api.sse"), ("node.engine.fake", "node.api.sse.stream_events"),
        ("node.offload.fake", "aiohttp.web"),
        ("node.common.fake", "node.engine"), ("node.common.fake", "node.api.sse"),
        ("node.common.fake", "node.api.sse.stream_events"),
        ("rendezvous.fake", "node.identity"),
    }


def test_no_module_imports_upward() -> None:
    found = _violations()
    pairs = {(module, name) for module, name, _ in found}
    new = sorted(f"{module} imports {name}: {why}" for module, name, why in found
                 if (module, name) not in KNOWN_VIOLATIONS)
    assert not new, "imports against the layering:\n" + "\n".join(new)
    gone = sorted(KNOWN_VIOLATIONS - pairs)
    assert not gone, f"fixed, remove from KNOWN_VIOLATIONS: {gone}"


_IMPORT_EACH = r"""
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m.split(".")[0] in ("node", "rendezvous")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=3)
print(json.dumps(failures))
"""


def test_every_module_imports_first_with_no_cycle_at_load_time() -> None:
    """Each module imported first, into an interpreter where none of ours is loaded yet: a cycle at
    load time shows as an ImportError (a partially initialised module) whichever module comes first."""
    names = [name for name, _ in _modules() if not name.endswith("__main__")]
    result = subprocess.run([sys.executable, "-c", _IMPORT_EACH, json.dumps(names)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout)
    assert not failures, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


@pytest.mark.parametrize("statement", ["import rendezvous.cli", "import rendezvous", "import node.common.errors"])
def test_rendezvous_and_common_load_no_engine_discovery_or_offload(statement: str) -> None:
    code = f"{statement}; import json, sys; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = [name for name in json.loads(result.stdout) if _within(name, "node")]
    assert "node" in loaded
    heavy = [name for name in loaded
             if any(_within(name, package) for package in ("node.engine", "node.discovery", "node.offload"))]
    assert not heavy, f"{statement} loads {heavy}"
    assert set(loaded) <= {"node", "node.version"} | {name for name in loaded if _within(name, "node.common")}


_CAP_NAME = re.compile(r"_?(MAX|MIN)_\w+|\w+_(MAX|MIN|LIMIT)(_\w+)?")
CAP_MODULES = ("node.constants", "rendezvous.constants")
NOT_CAPS = {
    "node.engine.simulated.DEFAULT_SIMULATED_MAX_TOKENS",  # a default answer length, not a limit
    "node.security.rendezvous_client.RETRY_MAX_S",  # our own back-off schedule, not a limit on input
    "node.transport.rendezvous_client.RETRY_MAX_S",  # (the same module after the package split)
    "node.cli.admin.AUDIT_DEFAULT_LIMIT",  # a command's default page size, not a limit on input
}


def test_caps_live_in_the_constants_modules() -> None:
    """A module-level numeric limit (``MAX_*``, ``*_MAX_*``, ``*_LIMIT``) outside the constants modules
    is a cap a reader auditing ``node/constants.py`` would miss."""
    stray = []
    for module, path in _modules():
        if module in CAP_MODULES:
            continue
        for statement in ast.parse(path.read_text()).body:
            targets = statement.targets if isinstance(statement, ast.Assign) else (
                [statement.target] if isinstance(statement, ast.AnnAssign) else [])
            value = getattr(statement, "value", None)
            numeric = isinstance(value, (ast.Constant, ast.BinOp)) and not isinstance(
                getattr(value, "value", 0), (str, bytes))
            for target in targets:
                name = f"{module}.{getattr(target, 'id', '')}"
                if isinstance(target, ast.Name) and _CAP_NAME.fullmatch(target.id) and numeric \
                        and name not in NOT_CAPS:
                    stray.append(name)
    assert not stray, f"move these caps to node/constants.py (or rendezvous/constants.py): {stray}"


def test_the_node_package_resolves_its_public_names_on_first_use() -> None:
    code = ("import json, sys, node; before = sorted(m for m in sys.modules if m.startswith('node'));"
            "values = {name: type(getattr(node, name)).__name__ for name in node.__all__};"
            "print(json.dumps([before, values, sorted(set(node.__all__) - set(dir(node)))]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    before, values, missing_from_dir = json.loads(result.stdout)
    assert before == ["node", "node.version"]  # importing the package loads nothing else
    assert {"Node", "NodeConfig", "DVAIError", "load_config", "sign_hmac", "verify_hmac"} <= set(values)
    assert values["Node"] == "type" and values["compose_signed_message"] == "function"
    assert missing_from_dir == []
