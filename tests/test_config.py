"""Config sources and precedence: flags > env > file > defaults; errors name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.common.errors import ConfigError
from node.config import NodeConfig, load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def test_defaults() -> None:
    config = load_config(env={})
    assert config.http_bind_host == "127.0.0.1"
    assert config.http_base_port == 38883 and config.http_max_port_attempts == 16
    assert [(m.id, m.preload) for m in config.models] == [("smollm2-135m", True), ("gemma3-270m", False)]
    assert config.default_model_id == "smollm2-135m" and config.models[0].ctx_size == 4096
    assert config.models[0].gpu_layers == 99 and config.models[0].queue_depth == 16
    assert config.on_model_load_failure == "exit"
    assert config.offload.enabled is False and config.offload.min_local_capability == 10
    assert config.generation_timeout == 60 and config.max_blank_chunks == 20
    assert config.max_body_bytes == 8 * 1024 * 1024


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    file = write(tmp_path, 'http_base_port = 38000\nhttp_bind_host = "127.0.0.2"\nlog_level = "debug"\n'
                           "[offload]\nmin_local_capability = 5\n")
    env = {"DVAI_HTTP_BASE_PORT": "38900", "DVAI_OFFLOAD__MIN_LOCAL_CAPABILITY": "25",
           "DVAI_OFFLOAD__ENABLED": "true"}
    config = load_config(file, env=env, overrides={"http_base_port": 39000})
    assert config.http_base_port == 39000  # flag
    assert config.offload.min_local_capability == 25.0  # env beats file
    assert config.offload.enabled is True  # env
    assert config.http_bind_host == "127.0.0.2"  # file
    assert config.log_level == "debug"  # file
    assert load_config(file, env=env).http_base_port == 38900


def test_state_dir_and_models_from_env(tmp_path: Path) -> None:
    config = load_config(env={"DVAI_STATE_DIR": str(tmp_path), "DVAI_MODELS__TINY__CTX_SIZE": "2048",
                              "DVAI_MODELS__TINY__EMBEDDING": "yes"})
    assert config.state_dir == tmp_path
    tiny = config.models[2]  # added beside the built-in defaults, not instead of them
    assert [m.id for m in config.models] == ["smollm2-135m", "gemma3-270m", "tiny"]
    assert tiny.ctx_size == 2048 and tiny.embedding


def test_env_names_reach_model_ids_with_dashes(tmp_path: Path) -> None:
    config = load_config(env={"DVAI_MODELS__GEMMA3_270M__EMBEDDING": "true"})
    assert [(m.id, m.embedding, m.preload) for m in config.models] == [
        ("smollm2-135m", False, True), ("gemma3-270m", True, False)]  # the built-in defaults, one changed
    file = write(tmp_path, "[models.my-chat]\nctx_size = 1024\n")
    config = load_config(file, env={"DVAI_MODELS__MY_CHAT__CTX_SIZE": "2048"})
    assert [(m.id, m.ctx_size) for m in config.models] == [("my-chat", 2048)]
    assert config.models[0].prompt_cache_mib == 256  # the RAM prompt cache's default budget
    zero = load_config(file, env={"DVAI_MODELS__MY_CHAT__PROMPT_CACHE_MIB": "0"})
    assert zero.models[0].prompt_cache_mib == 0


def test_model_flag_replaces_the_model_table(tmp_path: Path) -> None:
    file = write(tmp_path, "[models.a]\n[models.b]\n")
    config = load_config(file, env={}, overrides={"models": {"other": {"path": "/m/other.gguf"}}})
    assert [m.id for m in config.models] == ["other"]


def test_empty_model_table_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="models"):
        load_config(write(tmp_path, "models = []\n"), env={})


def test_model_tables_and_lists(tmp_path: Path) -> None:
    file = write(tmp_path, '[models.chat]\npath = "/m/a.gguf"\naliases = ["gpt-4o-mini"]\npreload = false\n'
                           "keep_alive = 300\n[models.embed]\nembedding = true\n"
                           '[[offload.known_peers]]\nbase_url = "http://10.9.0.2:38883/v1"\n')
    config = load_config(file, env={"DVAI_CORS_ORIGIN": "http://a.test,http://b.test"})
    assert [m.id for m in config.models] == ["chat", "embed"]
    assert config.models[0].aliases == ("gpt-4o-mini",) and config.models[0].keep_alive == 300.0
    assert config.offload.known_peers[0].base_url == "http://10.9.0.2:38883/v1"
    assert config.cors_origin == ("http://a.test", "http://b.test")
    assert config.default_model_id == "chat"


@pytest.mark.parametrize(
    ("text", "env", "fragment"),
    [
        ("htp_port = 1\n", {}, "unknown config key 'htp_port'"),
        ("[offload]\nenabeld = true\n", {}, "offload.enabeld"),
        ('http_base_port = "x"\n', {}, "http_base_port: expected an integer"),
        ("", {"DVAI_HTTP_BASE_PORT": "eighty"}, "http_base_port: expected an integer"),
        ("", {"DVAI_OFFLOAD__ENABLED": "maybe"}, "offload.enabled: expected a boolean"),
        ("", {"DVAI_OFFLOAD__MIN_LOCAL_CAPABILITY": "fast"}, "offload.min_local_capability: expected a number"),
        ('[security]\npairing_policy = "open"\n', {}, "security.pairing_policy: expected one of"),
        ("[models.a]\nctx_size = 0\n", {}, "models.a.ctx_size"),
        ("[models.a]\nprompt_cache_mib = -1\n", {}, "models.a.prompt_cache_mib"),
        ("[models.a]\nturbo = true\n", {}, "models.a.turbo"),
        ('default_model = "zzz"\n', {}, "default_model"),
        ("this is = not toml", {}, "not valid TOML"),
        ("", {"DVAI_NOPE": "1"}, "unknown config key 'nope'"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), env=env)
    assert fragment in str(caught.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/node.toml", env={})


def test_config_is_frozen() -> None:
    config = NodeConfig()
    with pytest.raises(AttributeError):
        config.http_base_port = 1  # type: ignore[misc]
