"""Shared fixtures: real nodes in subprocesses or in-process, on free loopback ports."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The built-in GGUF, assembled once per machine into the node's cache dir."""
    from node.engine.default_model import default_model_path

    return default_model_path(progress=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class NodeProcess:
    process: subprocess.Popen[str]
    base_url: str
    state_dir: Path
    output: list[str]

    @property
    def root(self) -> str:
        return self.base_url[: -len("/v1")]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_node_process(
    state_dir: Path,
    *,
    config_text: str | None = None,
    args: list[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    prefix: list[str] | None = None,
) -> NodeProcess:
    """Run ``dvai-node serve`` as a real process; wait until it prints ``ready``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    command = [*(prefix or []), sys.executable, "-m", "node", "serve", "--state-dir", str(state_dir),
               "--port", "0"]
    if config_text is not None:
        config = state_dir / "node.toml"
        config.write_text(config_text)
        command += ["--config", str(config)]
    command += args or []
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    full_env.update(env or {})
    full_env["PYTHONUNBUFFERED"] = "1"
    process = subprocess.Popen(
        command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output: list[str] = []
    base_url = None
    deadline = time.monotonic() + timeout
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        match = re.search(r"OpenAI base URL: (\S+)", line)
        if match:
            base_url = match.group(1)
        if line.strip() in ("ready", "running with failed models"):
            break
    if base_url is None or process.poll() is not None:
        process.kill()
        raise RuntimeError("node did not start:\n" + "".join(output))
    node = NodeProcess(process, base_url, state_dir, output)
    _drain(process, output)
    return node


def _drain(process: subprocess.Popen[str], output: list[str]) -> None:
    import threading

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)

    threading.Thread(target=pump, daemon=True).start()


@pytest.fixture(scope="module")
def real_node(tmp_path_factory: pytest.TempPathFactory, default_model: Path) -> Iterator[NodeProcess]:
    """One real node (real engine, default model, plus an embedding-mode alias) per test module."""
    state = tmp_path_factory.mktemp("node")
    # A shared 2-core machine under load: one thread avoids llama.cpp's spinning threads fighting
    # other processes (10x faster there), and generation_timeout leaves room for slow moments.
    config = f"""
generation_timeout = 170

[models.gemma3-270m]
queue_depth = 16
threads = 1

[models.gemma-embed]
path = "{default_model}"
embedding = true
ctx_size = 512
"""
    node = start_node_process(state, config_text=config)
    try:
        yield node
    finally:
        node.stop()
