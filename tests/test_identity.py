"""Device identity: key files, device name, copied-state-dir detection, health proofs."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path

import pytest

from node.common.device_ids import device_id_from_public_key, is_valid_device_id
from node.identity import (
    INSTANCE_FILE,
    KEY_FILE,
    DeviceIdentity,
    InstanceRecord,
    check_health_proof,
    copied_state_dir_warnings,
    default_device_name,
    load_or_create_identity,
    make_health_proof,
    open_node_identity,
)


def test_key_is_private_stable_and_names_the_device(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path)
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    again = load_or_create_identity(tmp_path)
    assert first.device_id == again.device_id == device_id_from_public_key(first.public_key)
    assert is_valid_device_id(first.device_id)
    assert load_or_create_identity(tmp_path / "other").device_id != first.device_id


def test_default_device_name_is_the_host_name() -> None:
    assert default_device_name("kitchen-pc.lan") == "kitchen-pc"
    assert default_device_name("") == "dvai-node"
    assert len(default_device_name("x" * 200)) == 63
    assert default_device_name() != ""


def test_open_node_identity_records_the_instance(tmp_path: Path) -> None:
    handle = open_node_identity(tmp_path, "desk", host="h1", machine_id="m1")
    try:
        assert handle.warnings == ()
        assert handle.identity.device_name == "desk" and len(handle.identity.instance_id) == 16
        assert stat.S_IMODE((tmp_path / INSTANCE_FILE).stat().st_mode) == 0o600
    finally:
        handle.close()
    second = open_node_identity(tmp_path, host="h1", machine_id="m1")
    second.close()
    assert second.warnings == ()
    assert second.identity.device_id == handle.identity.device_id
    assert second.identity.instance_id != handle.identity.instance_id
    assert second.identity.device_name == "h1"


def test_two_processes_on_one_state_dir_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = open_node_identity(tmp_path, host="h1", machine_id="m1")
    try:
        with caplog.at_level(logging.WARNING):
            second = open_node_identity(tmp_path, host="h1", machine_id="m1")
        second.close()
        assert any("is running from state dir" in w for w in second.warnings)
        assert "own state_dir" in caplog.text
    finally:
        first.close()


def test_copied_state_dir_is_detected(tmp_path: Path) -> None:
    original = tmp_path / "a"
    open_node_identity(original, host="h1", machine_id="m1").close()
    shutil.copytree(original, tmp_path / "b")
    copy = open_node_identity(tmp_path / "b", host="h1", machine_id="m1")
    copy.close()
    assert len(copy.warnings) == 1 and "delete identity.key" in copy.warnings[0]
    moved_machine = open_node_identity(tmp_path / "b", host="h2", machine_id="m2")
    moved_machine.close()
    assert "another machine (h1)" in moved_machine.warnings[0]
    again = open_node_identity(tmp_path / "b", host="h2", machine_id="m2")
    again.close()
    assert again.warnings == ()  # the copy is now recorded as its own


def test_copied_state_dir_rule_is_pure() -> None:
    base = InstanceRecord("dvid", "/a", "h", "m", 1, 0, "i")
    assert copied_state_dir_warnings(None, base) == ()
    assert copied_state_dir_warnings(base, base) == ()
    other_key = InstanceRecord("dvother", "/b", "h", "m", 1, 0, "i")
    assert copied_state_dir_warnings(other_key, base) == ()
    moved = InstanceRecord("dvid", "/b", "h", "m", 1, 0, "i")
    assert "another path (/b)" in copied_state_dir_warnings(moved, base)[0]
    assert InstanceRecord.from_json({"deviceId": "x"}) is None
    assert InstanceRecord.from_json(base.to_json()) == base


def test_health_proof_round_trip(tmp_path: Path) -> None:
    handle = open_node_identity(tmp_path)
    handle.close()
    identity = handle.identity
    proof = make_health_proof(identity, "00ff")
    assert proof is not None
    assert check_health_proof(proof, "00ff", identity.device_id, identity.instance_id)
    assert not check_health_proof(proof, "00fe", identity.device_id, identity.instance_id)
    assert not check_health_proof(proof, "00ff", identity.device_id, "another-instance")
    other = DeviceIdentity.generate().device_id
    assert not check_health_proof(proof, "00ff", other, identity.instance_id)
    assert make_health_proof(identity, "NOT-HEX") is None
    assert make_health_proof(identity, "a" * 65) is None
    assert not check_health_proof({"publicKey": "!!", "signature": "??"}, "00ff", identity.device_id, "")
