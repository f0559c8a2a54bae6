"""Managed mode: options, reuse key, synthesized config, registry records, and every typed error.

The errors that need a process (binary not found, spawn failed, start timeout, serve exited,
port allocation failed) are caused for real: a missing or non-executable binary, a binary
that never answers, a real ``dvai-node serve`` given a config it rejects, a pinned port
that is taken.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import config_from_mapping
from node.managed import (
    BinaryNotFoundError,
    DuplicateManagedModelError,
    ManagedErrorCode,
    ManagedModel,
    MultipleDefaultManagedModelsError,
    PortAllocationFailedError,
    ServeExitedError,
    ServeSpawnFailedError,
    ServeStartTimeoutError,
    UnknownManagedModelError,
    managed_node,
)
from node.managed.options import ManagedOptions, resolve_models, reuse_key, synthesize_config
from node.managed.registry import ProcessRef, Registry, ServeRecord

from .managed_support import REPO, SIMULATED, clean_registry, pid_alive


@pytest.fixture
def registry_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "managed-serves"
    yield directory
    clean_registry(directory)


# --------------------------------------------------------------------------
# Pure decisions


def test_models_resolve_to_catalogue_entries_default_first() -> None:
    models = resolve_models([
        ManagedModel("GEMMA3_270M", alias="chat"),
        ManagedModel("gemma3-270m", alias="embed", config={"embedding": True}, default=True),
    ])
    assert [m.alias for m in models] == ["embed", "chat"]
    assert all(m.entry.name == "GEMMA3_270M" for m in models)


def test_unknown_duplicate_and_several_defaults_are_typed_errors() -> None:
    with pytest.raises(UnknownManagedModelError) as unknown:
        resolve_models(["NO_SUCH_MODEL"])
    assert unknown.value.code == ManagedErrorCode.UNKNOWN_MODEL == "unknown_model"
    with pytest.raises(DuplicateManagedModelError) as duplicate:
        resolve_models(["GEMMA3_270M", "gemma3-270m"])
    assert duplicate.value.code == "duplicate_model"
    with pytest.raises(MultipleDefaultManagedModelsError) as defaults:
        resolve_models([ManagedModel("GEMMA3_270M", alias="a", default=True),
                        ManagedModel("GEMMA3_270M", alias="b", default=True)])
    assert defaults.value.code == "multiple_default_models"


def test_reuse_key_covers_models_config_host_and_binary() -> None:
    base = resolve_models([ManagedModel("GEMMA3_270M", config={"ctx_size": 2048})])
    key = reuse_key(base, host="127.0.0.1", binary="/bin/dvai-node")
    assert key == reuse_key(resolve_models([ManagedModel("GEMMA3_270M", config={"ctx_size": 2048})]),
                            host="127.0.0.1", binary="/bin/dvai-node")
    others = [
        reuse_key(resolve_models([ManagedModel("GEMMA3_270M", config={"ctx_size": 4096})]),
                  host="127.0.0.1", binary="/bin/dvai-node"),
        reuse_key(base, host="0.0.0.0", binary="/bin/dvai-node"),
        reuse_key(base, host="127.0.0.1", binary="/other/dvai-node"),
        reuse_key(resolve_models([ManagedModel("GEMMA3_270M", alias="x", config={"ctx_size": 2048})]),
                  host="127.0.0.1", binary="/bin/dvai-node"),
    ]
    assert key not in others and len(set(others)) == len(others)


def test_synthesized_config_loads_as_a_node_config() -> None:
    models = resolve_models([
        ManagedModel("GEMMA3_270M", config={"ctx_size": 2048, "reasoning_budget": 0, "aliases": ["x"]}),
        ManagedModel("GEMMA3_270M", alias="embed \"quoted\"", config={"embedding": True}, preload=False),
    ])
    config = config_from_mapping(tomllib.loads(synthesize_config(models)))
    chat, embed = config.models
    assert (chat.id, chat.catalog, chat.ctx_size, chat.reasoning_budget, chat.aliases) == (
        "gemma3-270m", "GEMMA3_270M", 2048, 0, ("x",))
    assert (embed.id, embed.embedding, embed.preload, embed.aliases) == ('embed "quoted"', True, False, ())
    assert config.default_model_id == "gemma3-270m" and config.http_max_port_attempts == 1


def test_constant_name_becomes_an_alias() -> None:
    config = config_from_mapping(tomllib.loads(synthesize_config(resolve_models(["GEMMA3_270M"]))))
    assert config.models[0].aliases == ("GEMMA3_270M",)


def test_reuse_is_off_when_the_port_is_pinned() -> None:
    assert ManagedOptions(models=("GEMMA3_270M",)).shared
    assert not ManagedOptions(models=("GEMMA3_270M",), port=40000).shared
    assert ManagedOptions(models=("GEMMA3_270M",), port=40000, reuse=True).shared


def test_records_round_trip_and_malformed_ones_are_dropped(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    me = ProcessRef.of(os.getpid())
    record = ServeRecord(id="abc", key="k", shared=True, host="127.0.0.1", port=1234, binary="/b",
                         models=["m"], serve=me, supervisor=me, consumers=[{**me.to_json(), "handle": "h"}],
                         idle_timeout_s=5.0, created_ms=1, status="ready")
    with registry.locked():
        registry.write(record)
        (tmp_path / "junk.json").write_text("{not json")
        (tmp_path / "old.json").write_text(json.dumps({"format": 99, "id": "old"}))
        alive = registry.sweep()
    assert [r.to_json() for r in alive] == [record.to_json()]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["abc.json"]
    assert (tmp_path / "abc.json").stat().st_mode & 0o777 == 0o600
    assert json.loads((tmp_path / "abc.json").read_text())["base_url"] == "http://127.0.0.1:1234/v1"


def test_sweep_drops_dead_serves_and_prunes_dead_consumers(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = ProcessRef(dead.pid, "0")  # a start time no live process has
    me = ProcessRef.of(os.getpid())
    live_consumer = {**me.to_json(), "handle": "1"}
    base = dict(key="k", shared=True, host="127.0.0.1", port=1, binary="/b", models=["m"], supervisor=me,
                idle_timeout_s=5.0, created_ms=1, status="ready")
    with registry.locked():
        registry.write(ServeRecord(id="dead", serve=gone, consumers=[], **base))  # type: ignore[arg-type]
        registry.write(ServeRecord(id="live", serve=me, consumers=[live_consumer, {**gone.to_json(),
                                   "handle": "2"}], **base))  # type: ignore[arg-type]
        alive = registry.sweep()
    assert [r.id for r in alive] == ["live"] and alive[0].consumers == [live_consumer]
    assert registry.read("live") is not None and registry.read("live").consumers == [live_consumer]  # type: ignore[union-attr]
    assert registry.read("dead") is None


def test_a_recycled_pid_is_not_the_process_a_record_names() -> None:
    me = ProcessRef.of(os.getpid())
    assert me.alive() and me.start is not None
    assert not ProcessRef(os.getpid(), str(int(me.start) + 1)).alive()


# --------------------------------------------------------------------------
# Errors that need a process


def _script(path: Path, body: str, *, executable: bool = True) -> str:
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(stat.S_IRWXU if executable else stat.S_IRUSR | stat.S_IWUSR)
    return str(path)


def test_binary_not_found(registry_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BinaryNotFoundError) as error:
        with managed_node(["GEMMA3_270M"], binary=str(tmp_path / "missing" / "dvai-node"),
                          registry_dir=registry_dir):
            pass
    assert error.value.code == "binary_not_found" and isinstance(error.value, FileNotFoundError)


def test_spawn_failed_when_the_binary_cannot_be_executed(registry_dir: Path, tmp_path: Path) -> None:
    binary = _script(tmp_path / "dvai-node", "exit 0", executable=False)
    with pytest.raises(ServeSpawnFailedError) as error:
        with managed_node(["GEMMA3_270M"], binary=binary, registry_dir=registry_dir):
            pass
    assert error.value.code == "serve_spawn_failed" and "Permission denied" in str(error.value)
    assert list(registry_dir.glob("*.json")) == []


def test_start_timeout_terminates_what_it_started(registry_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = _script(tmp_path / "dvai-node", f"echo $$ > {pid_file}\nexec sleep 60")
    with pytest.raises(ServeStartTimeoutError) as error:
        with managed_node(["GEMMA3_270M"], binary=binary, start_timeout=1.0, registry_dir=registry_dir):
            pass
    assert error.value.code == "serve_start_timeout" and isinstance(error.value, TimeoutError)
    assert not pid_alive(int(pid_file.read_text()))  # the hung serve was terminated
    assert list(registry_dir.glob("*.json")) == []


def test_serve_exited_reports_the_serves_own_error(registry_dir: Path) -> None:
    # A real dvai-node serve, given a per-model config it rejects, exits with code 2.
    with pytest.raises(ServeExitedError) as error:
        with managed_node([ManagedModel("GEMMA3_270M", config={**SIMULATED, "ctx_size": 0})],
                          registry_dir=registry_dir):
            pass
    assert error.value.code == "serve_exited" and error.value.exit_code == 2
    assert "ctx_size" in error.value.output and "expected a positive integer" in str(error.value)
    assert list(registry_dir.glob("*.json")) == []


def test_port_allocation_failed_when_the_pinned_port_is_taken(registry_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortAllocationFailedError) as error:
            with managed_node([ManagedModel("GEMMA3_270M", config=SIMULATED)], port=port,
                              registry_dir=registry_dir):
                pass
    assert error.value.code == "port_allocation_failed" and str(port) in str(error.value)


def test_cli_attach_reports_typed_errors_as_json(registry_dir: Path) -> None:
    spec = json.dumps({"models": ["NOPE"], "registry_dir": str(registry_dir)})
    result = subprocess.run([sys.executable, "-m", "node", "managed", "attach", "--spec", spec], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "unknown_model"
