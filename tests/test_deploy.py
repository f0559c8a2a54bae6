"""The rendezvous deploy files say what the code does."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from rendezvous.config import RendezvousConfig, load_rendezvous_config

from .conftest import REPO, free_port

DEPLOY = REPO / "deploy" / "rendezvous"


def test_sample_config_shows_the_real_defaults() -> None:
    """Every key the sample sets is the default, except public_url (which has none)."""
    written = tomllib.loads((DEPLOY / "rendezvous.toml").read_text())
    loaded = load_rendezvous_config(DEPLOY / "rendezvous.toml", env={})
    defaults = RendezvousConfig()
    assert set(written) <= {f.name for f in dataclasses.fields(RendezvousConfig)}
    differing = {key for key in written if getattr(loaded, key) != getattr(defaults, key)}
    assert differing == {"public_url"}, f"rendezvous.toml claims defaults it does not have: {differing}"
    assert written["trust_forwarded_for"] is False


def test_sample_config_explains_the_proxy_setting() -> None:
    text = (DEPLOY / "rendezvous.toml").read_text()
    before = text[: text.index("trust_forwarded_for")]
    assert "X-Forwarded-For" in before[-600:] and "Never" in before[-600:]


def test_docker_example_behind_a_proxy_trusts_forwarded_for() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    run = re.search(r"docker run .*?dvai-rendezvous\n", text, re.S)
    assert run is not None and "DVAI_RENDEZVOUS_TRUST_FORWARDED_FOR=true" in run.group(0)
    assert "-p 127.0.0.1:" in run.group(0)  # the proxy is the only way in


def test_systemd_documentation_path_is_installed_by_its_own_instructions() -> None:
    text = (DEPLOY / "dvai-rendezvous.service").read_text()
    documentation = re.search(r"^Documentation=file://(\S+)$", text, re.M)
    assert documentation is not None
    installed = re.findall(r"install .* (/\S+)$", text, re.M)
    assert documentation.group(1) in installed, installed


def test_loopback_public_url_is_warned_about() -> None:
    assert RendezvousConfig().public_url_warning() is not None
    assert "127.0.0.1" in (RendezvousConfig().public_url_warning() or "")
    assert RendezvousConfig(host="0.0.0.0").public_url_warning() is not None
    assert RendezvousConfig(public_url="https://r.example.org").public_url_warning() is None
    assert RendezvousConfig(host="203.0.113.5").public_url_warning() is None


def test_rendezvous_started_without_public_url_logs_the_warning(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "rendezvous", "--port", str(free_port()), "--db", ":memory:"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert process.stdout is not None
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "listening on" in line:
                break
        text = "".join(lines)
        assert "WARNING" in text and "no public_url set" in text and "http://127.0.0.1:" in text
    finally:
        process.terminate()
        process.wait(10)
