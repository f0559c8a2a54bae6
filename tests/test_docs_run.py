"""Every runnable code block of README.md and docs/*.md runs (see tests/doc_examples.py).

Python, shell and console blocks run as their own processes against a real
node started as the quick start starts it (the built-in models, plus the
``gemma-embed`` embedding model the docs use) and a real rendezvous; the
documented URLs (``127.0.0.1:38883``, ``127.0.0.1:38980``) are pointed at them.
TOML blocks go through the node's config loader. Blocks marked
``<!-- fragment -->`` are reported as skipped with their reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from node.config import load_config

from .conftest import REPO, NodeProcess, free_port, start_node_process
from .doc_examples import DocBlock, blocks_of, console_script, point_at, runnable_blocks

BLOCKS = runnable_blocks()
BLOCK_TIMEOUT_S = 180.0
"""seconds one example may run (an embedded node loads its model first)."""


@dataclass(frozen=True, slots=True)
class DocsWorld:
    node: NodeProcess
    rendezvous_port: int
    env: dict[str, str]

    def rewrite(self, text: str) -> str:
        text = point_at(text, self.node_port)
        return point_at(text, self.rendezvous_port, documented_port=38980)

    @property
    def node_port(self) -> int:
        return int(self.node.base_url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def docs_world(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[DocsWorld]:
    home = tmp_path_factory.mktemp("docs-home")
    state = home / "node-state"
    node = start_node_process(state, config_text=f"""
[models.smollm2-135m]

[models.gemma3-270m]

[models.gemma-embed]
path = "{default_model}"
embedding = true
ctx_size = 2048
""", timeout=180)
    port = free_port()
    rendezvous = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--port", str(port), "--db", ":memory:",
         "--public-url", f"http://127.0.0.1:{port}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert rendezvous.stdout is not None
    for line in rendezvous.stdout:
        if "listening on" in line:
            break
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    venv_bin = str(Path(sys.executable).parent)
    env.update(
        PATH=f"{venv_bin}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO),
        # Embedded nodes and client commands use the platform's state dir: a fresh one here
        # (the built-in model cache is shared, so nothing is assembled twice).
        XDG_STATE_HOME=str(home / "xdg-state"),
        PYTHONUNBUFFERED="1",
    )
    try:
        yield DocsWorld(node, port, env)
    finally:
        rendezvous.terminate()
        rendezvous.wait(10)
        node.stop()


def test_every_doc_is_read() -> None:
    """Guard the extractor: indented blocks, markers, and every language the docs use."""
    languages = {block.language for block in BLOCKS}
    assert {"python", "sh", "toml"} <= languages
    indented = [b for b in BLOCKS if b.file == "docs/offload.md" and b.language == "python"]
    assert indented and not indented[0].text.startswith(" ")


def test_markers_are_read(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("x\n\n<!-- fragment: needs a phone -->\n```python\nscan()\n```\n\n<!-- fails -->\n"
                    "```sh\nfalse\n```\n\n- item\n\n  ```sh\n  echo hi\n  ```\n")
    blocks = blocks_of(page, tmp_path)
    assert [(b.marker, b.reason, b.text) for b in blocks] == [
        ("fragment", "needs a phone", "scan()\n"), ("fails", "", "false\n"), (None, "", "echo hi\n")]


@pytest.mark.engine
@pytest.mark.parametrize("block", BLOCKS, ids=[block.id for block in BLOCKS])
def test_doc_example_runs(block: DocBlock, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    if block.marker == "fragment":
        pytest.skip(f"{block.id} is marked as a fragment: {block.reason or 'no reason given'}")
    if block.kind == "toml":
        check_toml(block, tmp_path)
        return
    world: DocsWorld = request.getfixturevalue("docs_world")
    result = run_block(block, world, tmp_path)
    output = f"{block.id} printed:\n{result.stdout}\n{result.stderr}"
    if block.marker == "fails":
        assert result.returncode != 0, f"{block.id} is marked <!-- fails --> but succeeded; {output}"
    else:
        assert result.returncode == 0, output
        assert "Traceback" not in result.stderr, output


def run_block(block: DocBlock, world: DocsWorld, cwd: Path) -> subprocess.CompletedProcess[str]:
    text = world.rewrite(block.text)
    (cwd / ".venv").symlink_to(Path(sys.executable).parent.parent)  # `.venv/bin/dvai-node …` works
    if block.kind == "python":
        command, stdin = [sys.executable, "-"], text
    else:
        script = console_script(text) if block.kind == "console" else text
        # A curl that gets an HTTP error status fails the example (unless marked <!-- fails -->).
        prelude = "set -eo pipefail\ncurl() { command curl --fail-with-body \"$@\"; }\n"
        command, stdin = ["bash", "-s"], prelude + script
    return subprocess.run(command, input=stdin, cwd=cwd, env=world.env, capture_output=True, text=True,
                          timeout=BLOCK_TIMEOUT_S)


def check_toml(block: DocBlock, tmp_path: Path) -> None:
    """A node config: it loads, its models are the ones served, its plain values arrive unchanged."""
    file = tmp_path / "example.toml"
    file.write_text(block.text)
    config = load_config(file, env={})
    written = tomllib.loads(block.text)
    if isinstance(written.get("models"), dict):
        assert [m.id for m in config.models] == list(written["models"]), f"{block.id}: models lost"
    for key, value in written.items():
        if isinstance(value, (bool, int, float)) or (isinstance(value, str) and not key.endswith("_dir")):
            assert getattr(config, key) == value, f"{block.id}: {key} = {value!r} not applied"


def test_readme_quick_start_names_the_default_chat_model() -> None:
    """The README's first example chats with the model a fresh node serves by default."""
    from node.config import DEFAULT_MODEL_ID

    readme = [b for b in BLOCKS if b.file == "README.md" and b.language == "python"]
    assert readme and re.search(rf"model=\"{re.escape(DEFAULT_MODEL_ID)}\"", readme[0].text)
    assert "max_tokens" not in readme[0].text  # the first chat needs no limit to end
