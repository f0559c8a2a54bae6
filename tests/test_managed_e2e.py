"""Managed mode with real processes: consumers in separate processes, real ``dvai-node serve``s,
real supervisors, the registry on disk.

Every serve here runs the SIMULATED engine (these tests are about spawning, sharing, reaping
and retrying, not inference) except ``test_real_engine_managed_node``, which loads the
built-in model for real.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from node.managed import ManagedModel, managed_node
from node.managed.registry import Registry
from node.managed.transport import http_module

from .managed_support import (
    SIMULATED,
    Consumer,
    clean_registry,
    killed,
    pid_alive,
    simulated_model,
    wait_until,
)


@pytest.fixture
def registry_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "managed-serves"
    yield directory
    clean_registry(directory)


@pytest.fixture
def consumers() -> Iterator[list[Consumer]]:
    started: list[Consumer] = []
    yield started
    for consumer in started:
        consumer.stop()


def start_consumer(consumers: list[Consumer], registry_dir: Path, **options: Any) -> Consumer:
    options.setdefault("models", [simulated_model()])
    consumer = Consumer({"registry_dir": str(registry_dir), **options})
    consumers.append(consumer)
    return consumer


def records(registry_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted(registry_dir.glob("*.json"))]


def test_two_consumer_processes_share_one_node(registry_dir: Path, consumers: list[Consumer]) -> None:
    first = start_consumer(consumers, registry_dir).read()
    second_consumer = start_consumer(consumers, registry_dir)
    second = second_consumer.read()
    assert first["spawned"] and not second["spawned"]
    assert first["pid"] == second["pid"] and first["port"] == second["port"]
    [record] = records(registry_dir)
    assert {c["pid"] for c in record["consumers"]} == {c.process.pid for c in consumers}

    assert consumers[0].send("close") == {"closed": True}  # close() detaches, it does not kill
    time.sleep(0.5)
    assert pid_alive(first["pid"])
    reply = second_consumer.send("chat")
    assert reply["pid"] == first["pid"] and reply["text"]
    [record] = records(registry_dir)
    assert [c["pid"] for c in record["consumers"]] == [second_consumer.process.pid]


def test_different_per_model_config_gets_its_own_node(registry_dir: Path, consumers: list[Consumer]) -> None:
    first = start_consumer(consumers, registry_dir, models=[simulated_model(ctx_size=2048)]).read()
    second = start_consumer(consumers, registry_dir, models=[simulated_model(ctx_size=1024)]).read()
    assert second["spawned"] and first["pid"] != second["pid"]
    assert len(records(registry_dir)) == 2


def test_killed_consumer_is_pruned_and_the_node_reaped_after_idle(
    registry_dir: Path, consumers: list[Consumer]
) -> None:
    idle = 1.0
    consumer = start_consumer(consumers, registry_dir, idle_timeout=idle)
    serve_pid = consumer.read()["pid"]
    [record] = records(registry_dir)
    time.sleep(idle * 2.5)
    assert pid_alive(serve_pid), "reaped while a consumer was alive"

    consumer.process.send_signal(signal.SIGKILL)  # no close(): an abrupt exit
    consumer.process.wait(10)
    killed_at = time.monotonic()
    assert wait_until(lambda: not pid_alive(serve_pid), timeout=15)
    assert time.monotonic() - killed_at >= idle * 0.9, "reaped before the idle timeout"
    assert wait_until(lambda: records(registry_dir) == [], timeout=5)
    assert wait_until(lambda: not pid_alive(record["supervisor"]["pid"]), timeout=5)
    assert not (registry_dir / record["id"]).exists()


def test_dedicated_serve_with_a_pinned_port_ends_with_its_consumer(registry_dir: Path) -> None:
    from .conftest import free_port

    port = free_port()
    with managed_node([simulated_model_spec()], port=port, registry_dir=registry_dir) as node:
        assert node.port == port and node.spawned
        [record] = records(registry_dir)
        assert record["shared"] is False
        pid = node.pid
    assert wait_until(lambda: not pid_alive(pid), timeout=10)
    assert wait_until(lambda: records(registry_dir) == [], timeout=5)


def simulated_model_spec(**config: Any) -> ManagedModel:
    return ManagedModel("GEMMA3_270M", config={**SIMULATED, **config})


def test_killed_node_is_respawned_and_the_refused_request_retried_once(registry_dir: Path) -> None:
    with managed_node([simulated_model_spec()], registry_dir=registry_dir) as node:
        client = node.openai()
        first_pid = node.pid
        assert client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "a"}],
                                              max_tokens=3).choices[0].message.content
        os.kill(first_pid, signal.SIGKILL)
        assert killed(first_pid, node.port)

        reply = client.chat.completions.create(model="GEMMA3_270M", messages=[{"role": "user", "content": "b"}],
                                               max_tokens=3)
        assert reply.choices[0].message.content
        assert node.pid != first_pid and pid_alive(node.pid) and node.generation == 1
        [record] = records(registry_dir)
        assert record["serve"]["pid"] == node.pid
        assert [c["pid"] for c in record["consumers"]] == [os.getpid()]


def test_a_request_that_reached_the_node_is_never_replayed(registry_dir: Path) -> None:
    slow = simulated_model_spec(simulated_tok_per_s=20.0)
    with managed_node([slow], registry_dir=registry_dir) as node:
        client = node.openai()
        first_pid = node.pid
        # Streamed: the node has begun answering when it dies.
        stream = client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "x"}],
                                                max_tokens=400, stream=True)
        chunks = iter(stream)
        assert next(chunks) is not None
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises((openai.APIError, http_module().HTTPError)):
            for _ in chunks:
                pass
        # Whole answer: the request is in flight (the node is generating) when the node dies.
        assert wait_until(lambda: records(registry_dir) == [], timeout=10)
        assert node.generation == 0, "a request that reached the node was re-resolved"

    with managed_node([slow], registry_dir=registry_dir) as node:
        client = node.openai()
        second_pid = node.pid
        threading.Timer(1.0, os.kill, (second_pid, signal.SIGKILL)).start()
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "y"}],
                                           max_tokens=400)
        assert node.generation == 0 and node.pid == second_pid
        assert wait_until(lambda: records(registry_dir) == [], timeout=10)  # nothing respawned


def test_five_processes_starting_at_once_converge_on_one_node(
    registry_dir: Path, consumers: list[Consumer]
) -> None:
    started = [start_consumer(consumers, registry_dir) for _ in range(5)]
    answers = [c.read(timeout=120) for c in started]
    assert len({a["pid"] for a in answers}) == 1, answers
    assert sum(a["spawned"] for a in answers) == 1
    [record] = records(registry_dir)
    assert len(record["consumers"]) == 5


def test_sweep_terminates_a_serve_whose_supervisor_died(registry_dir: Path, consumers: list[Consumer]) -> None:
    consumer = start_consumer(consumers, registry_dir)
    serve_pid = consumer.read()["pid"]
    [record] = records(registry_dir)
    os.kill(record["supervisor"]["pid"], signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(record["supervisor"]["pid"]), timeout=5)
    with managed_node([simulated_model_spec()], registry_dir=registry_dir) as node:
        assert node.spawned and node.pid != serve_pid  # the orphan was not reused...
        assert not pid_alive(serve_pid)  # ...but terminated by the sweep
        assert [r["id"] for r in records(registry_dir)] != [record["id"]]


async def test_async_form_listing_and_respawn(registry_dir: Path) -> None:
    async with managed_node([simulated_model_spec()], registry_dir=registry_dir) as node:
        client = node.async_openai()
        reply = await client.chat.completions.create(model=node.default_model,
                                                     messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert reply.choices[0].message.content
        models = await client.models.list()
        assert models.data[0].id == "gemma3-270m"
        listed = Registry(registry_dir).records()
        assert [r.serve.pid for r in listed] == [node.pid]
        first_pid = node.pid
        os.kill(first_pid, signal.SIGKILL)  # the async client re-resolves on connection refused too
        assert killed(first_pid, node.port)
        again = await client.chat.completions.create(model="gemma3-270m", messages=[{"role": "user", "content": "x"}],
                                                     max_tokens=2)
        assert again.choices[0].message.content and node.pid != first_pid and node.generation == 1
        await client.close()


@pytest.mark.engine
async def test_real_engine_managed_node(registry_dir: Path, default_model: Path) -> None:
    """The one managed test on the real engine: the built-in model from the catalogue."""
    async with managed_node([ManagedModel("GEMMA3_270M", config={"ctx_size": 1024})],
                            registry_dir=registry_dir, idle_timeout=1.0) as node:
        client = node.async_openai()
        reply = await client.chat.completions.create(
            model="GEMMA3_270M", messages=[{"role": "user", "content": "Say hi"}], max_tokens=8, seed=1)
        assert reply.choices[0].message.content and reply.usage and reply.usage.completion_tokens > 0
        listing = (await client.models.list()).model_dump()["data"][0]
        assert listing["catalog"]["name"] == "GEMMA3_270M" and listing["loaded"] is True
        assert listing["catalog"]["sha256"] and listing["context_length"] == 1024
        await client.close()
        pid = node.pid
    assert wait_until(lambda: not pid_alive(pid), timeout=15)  # reaped after the idle timeout
