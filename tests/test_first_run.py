"""The first ten minutes: a node started as the quick start starts it chats, and says what it does.

Real node processes (``dvai-node serve`` with no config: the built-in models), the
real engine, real clients.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from openai import AsyncOpenAI

from node.config import DEFAULT_MODEL_ID
from node.engine.chat_format import TURN_MARKERS

from .conftest import REPO, NodeProcess, start_node_process

pytestmark = pytest.mark.engine

HELLO = [{"role": "user", "content": "Hello!"}]
SEED = 42
"""Seeded so that the run repeats: unseeded, the 135M model now and then answers a bare "Hello!",
which this test could not tell from an echo."""
FIRST_CHAT_LIMIT_S = 30.0
"""the acceptance limit for a chat with no max_tokens on 2 cores."""


@pytest.fixture(scope="module")
def quick_start_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """``dvai-node serve`` with nothing configured, as ``make serve`` runs it."""
    node = start_node_process(tmp_path_factory.mktemp("quick-start"), timeout=180)
    try:
        yield node
    finally:
        node.stop()


def assert_a_real_answer(text: str) -> None:
    """Something beyond the prompt, said once (a greeting may start with "Hello!"), and no turn."""
    assert text.strip() and text.strip() != "Hello!", f"no answer: {text!r}"
    assert text.count("Hello!") <= 1, f"the answer echoes the prompt: {text!r}"
    leaked = [marker for marker in TURN_MARKERS if marker in text]
    assert not leaked, f"turn markers leaked into {text!r}"
    assert not any(role in text for role in ("user\n", "assistant\n", "system\n")), f"a new turn in {text!r}"


async def test_default_model_answers_hello_and_stops(quick_start_node: NodeProcess) -> None:
    client = AsyncOpenAI(base_url=quick_start_node.base_url, api_key="unused", max_retries=0)
    started = time.perf_counter()
    reply = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=HELLO, seed=SEED)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - started
    choice = reply.choices[0]
    assert elapsed < FIRST_CHAT_LIMIT_S, f"first chat took {elapsed:.1f} s"
    assert choice.finish_reason == "stop", (choice.finish_reason, choice.message.content)
    assert_a_real_answer(choice.message.content or "")
    print(f"first chat: {elapsed:.2f} s, {reply.usage}: {choice.message.content!r}")


async def test_default_model_streams_hello_through_the_sdk(quick_start_node: NodeProcess) -> None:
    client = AsyncOpenAI(base_url=quick_start_node.base_url, api_key="unused", max_retries=0)
    started = time.perf_counter()
    stream = await client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=HELLO, stream=True,  # type: ignore[arg-type]
                                                  seed=SEED)
    parts, finish = [], None
    async for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert time.perf_counter() - started < FIRST_CHAT_LIMIT_S
    assert finish == "stop"
    assert_a_real_answer("".join(parts))


async def test_gemma_chat_stops_on_its_turn_markers(quick_start_node: NodeProcess) -> None:
    """The base model is built in too; a chat with it ends (no max_tokens) without leaking markers."""
    client = AsyncOpenAI(base_url=quick_start_node.base_url, api_key="unused", max_retries=0)
    started = time.perf_counter()
    reply = await client.chat.completions.create(model="gemma3-270m", messages=HELLO, temperature=0)  # type: ignore[arg-type]
    assert time.perf_counter() - started < FIRST_CHAT_LIMIT_S
    text = reply.choices[0].message.content or ""
    assert not [marker for marker in TURN_MARKERS if marker in text], text


async def test_health_aliases_and_keep_alive_zero_unloads(quick_start_node: NodeProcess) -> None:
    root = quick_start_node.root
    async with aiohttp.ClientSession() as http:
        bodies = []
        for path in ("/v1/dvai/health", "/health", "/healthz"):
            async with http.get(root + path) as response:
                assert response.status == 200, path
                bodies.append(await response.json())
        assert {b["deviceId"] for b in bodies} == {bodies[0]["deviceId"]}
        assert all(b["status"] == "ok" for b in bodies)

        body = {"model": DEFAULT_MODEL_ID, "messages": HELLO, "max_tokens": 4, "keep_alive": 0}
        async with http.post(quick_start_node.base_url + "/chat/completions", json=body) as response:
            assert response.status == 200
        assert await model_state(http, root, DEFAULT_MODEL_ID, want="unloaded") == "unloaded"
        async with http.get(root + "/health") as response:  # unloaded on purpose is not "loading"
            assert response.status == 200 and (await response.json())["status"] == "ok"
        # the next request loads it again; a duration string keeps it loaded for that long
        body.update(keep_alive="5m")
        async with http.post(quick_start_node.base_url + "/chat/completions", json=body) as response:
            assert response.status == 200
        async with http.get(root + "/health") as response:
            models = {m["id"]: m for m in (await response.json())["models"]}
        assert models[DEFAULT_MODEL_ID]["state"] == "ready"
        assert 250 < models[DEFAULT_MODEL_ID]["keepAliveLeftS"] <= 300

        async with http.post(quick_start_node.base_url + "/chat/completions",
                             json={**body, "keep_alive": "soon"}) as response:
            assert response.status == 400
            assert (await response.json())["error"]["param"] == "keep_alive"


async def test_admin_call_unloads_and_loads_a_model(quick_start_node: NodeProcess) -> None:
    root = quick_start_node.root
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{root}/v1/dvai/models/{DEFAULT_MODEL_ID}/unload") as response:
            assert response.status == 200 and (await response.json())["state"] == "unloaded"
        async with http.post(f"{root}/v1/dvai/models/{DEFAULT_MODEL_ID}/load") as response:
            assert response.status == 200 and (await response.json())["state"] == "ready"
        async with http.post(f"{root}/v1/dvai/models/no-such-model/load") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "model_not_found"


async def model_state(http: aiohttp.ClientSession, root: str, model_id: str, *, want: str) -> str:
    state = ""
    for _ in range(100):
        async with http.get(root + "/healthz") as response:
            state = {m["id"]: m["state"] for m in (await response.json())["models"]}[model_id]
        if state == want:
            break
        await asyncio.sleep(0.05)
    return state


def test_banner_and_log_survive_a_model_load_into_a_file(tmp_path: Path) -> None:
    """Output redirected to a file keeps the banner; llama.cpp's own log stays out of it (INFO)."""
    log = tmp_path / "node.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "node", "serve", "--state-dir", str(tmp_path / "state"), "--port", "0"],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while "ready" not in log.read_text() and time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(20)
    text = log.read_text()
    assert "OpenAI base URL: http://127.0.0.1:" in text, text
    assert "ready" in text and "loading model smollm2-135m" in text and "model smollm2-135m loaded" in text
    assert "llama_" not in text and "SWA cache" not in text, text  # llama.cpp's log is DEBUG


def test_llama_log_goes_to_python_logging_at_debug(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "node", "probe", "--state-dir", str(tmp_path), "--tokens", "2",
         "--log-level", "debug"],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert "DEBUG llama.cpp: " in result.stderr + result.stdout


def run_serve(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DVAI_")}
    return subprocess.run(
        [sys.executable, "-m", "node", "serve", "--state-dir", str(tmp_path / "state"), "--port", "0", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("case", ["missing", "directory", "not-gguf"])
def test_a_node_whose_only_model_cannot_load_exits_with_the_reason(tmp_path: Path, case: str) -> None:
    target = tmp_path / "model.gguf"
    if case == "directory":
        target.mkdir()
    elif case == "not-gguf":
        target.write_text("this is not a model\n")
    result = run_serve(tmp_path, "--model", str(target))
    expected = {"missing": "no such file", "directory": "is a directory", "not-gguf": "not a GGUF file"}[case]
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert "on_model_load_failure" in result.stderr


def test_continue_keeps_a_node_with_failed_models_running(tmp_path: Path) -> None:
    config = f'on_model_load_failure = "continue"\n[models.ghost]\npath = "{tmp_path / "none.gguf"}"\n'
    node = start_node_process(tmp_path / "state", config_text=config)
    try:
        assert any("running with failed models" in line for line in node.output)
        assert node.process.poll() is None
    finally:
        node.stop()


def test_second_node_on_the_same_state_dir_is_refused(tmp_path: Path) -> None:
    config = '[models.sim]\nengine = "simulated"\n'
    first = start_node_process(tmp_path / "state", config_text=config)
    try:
        result = run_serve(tmp_path, "--config", str(tmp_path / "state" / "node.toml"))
        assert result.returncode == 1
        assert "already running from state dir" in result.stderr and "--state-dir" in result.stderr
        assert "Traceback" not in result.stderr
    finally:
        first.stop()
    assert first.process.returncode == 0


def test_assembling_gemma_shows_progress_on_a_terminal_and_a_line_otherwise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from node.engine.default_model import gemma3_path

    caplog.set_level("INFO", logger="node.engine.default_model")
    bar = gemma3_path(tmp_path / "tty", progress=True)
    drawn = capsys.readouterr().err
    assert "assembling gemma3-270m" in drawn and "100%" in drawn  # tqdm's bar
    assert "assembling the built-in model" not in caplog.text
    quiet = gemma3_path(tmp_path / "pipe", progress=False)
    assert "assembling gemma3-270m" not in capsys.readouterr().err
    assert "assembling the built-in model gemma3-270m into" in caplog.text
    assert bar.stat().st_size == quiet.stat().st_size > 200e6


def test_make_shows_the_first_build() -> None:
    """The install step says what is about to take minutes and lets pip show its progress."""
    makefile = (REPO / "Makefile").read_text()
    install = next(line for line in makefile.splitlines() if "pip install" in line and "-e " in line)
    assert "--quiet" not in install and "-q " not in install
    assert "compiles from source" in makefile and "@echo" in makefile
