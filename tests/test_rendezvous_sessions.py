"""Pure rendezvous rules: the session state machine, token buckets, and config loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.common.errors import AuthenticationError, ConfigError, InvalidRequestError
from node.common.tokenbucket import TokenBucket
from node.identity import DeviceIdentity
from rendezvous import sessions as rules
from rendezvous.config import RendezvousConfig, load_rendezvous_config
from rendezvous.constants import MAX_ABORT_REASON
from rendezvous.ratelimit import ClientRateLimiter, RateRule
from rendezvous.sessions import (
    PairingSession,
    Role,
    SessionAbortedError,
    SessionExpiredError,
    SessionState,
    SessionStateError,
    ThirdPartyJoinError,
)

KEY_A = "A" * 43
KEY_B = "B" * 42 + "A"
SCANNER_ID = DeviceIdentity.generate().device_id


def _new(now: float = 1000.0, ttl: float = 120.0) -> PairingSession:
    return rules.create_session(
        session_id=rules.new_session_id(bytes(range(16))), initiator_public_key=KEY_A,
        initiator_token="itok", now=now, ttl=ttl,
    )


def _joined(now: float = 1001.0) -> PairingSession:
    session, error = rules.join(_new(), scanner_public_key=KEY_B, scanner_device_id=SCANNER_ID,
                                scanner_token="stok", now=now)
    assert error is None
    return session


def test_happy_path_walks_every_state() -> None:
    session = _joined()
    assert session.state is SessionState.JOINED
    assert session.events[-1].data == {"scanner_public_key": KEY_B, "scanner_device_id": SCANNER_ID}
    session = rules.confirm(session, role=Role.SCANNER, message="m1", now=1002)
    session = rules.confirm(session, role=Role.INITIATOR, message="m2", now=1003)
    session = rules.finish(session, role=Role.SCANNER, message="m3", now=1004)
    assert session.state is SessionState.COMPLETED
    assert [e.kind for e in session.events] == ["created", "joined", "confirm", "confirm", "finish"]
    assert [e.seq for e in session.events] == [1, 2, 3, 4, 5]
    assert PairingSession.from_record(session.to_record()) == session


def test_session_id_has_at_least_64_random_bits() -> None:
    with pytest.raises(ValueError):
        rules.new_session_id(bytes(7))
    assert rules.is_valid_session_id(rules.new_session_id(bytes(16)))
    assert len(rules.new_session_id(bytes(16))) == 22


def test_tokens_select_the_role_and_nothing_else() -> None:
    session = _joined()
    assert rules.role_for_token(session, "itok") is Role.INITIATOR
    assert rules.role_for_token(session, "stok") is Role.SCANNER
    for bad in (None, "", "other"):
        with pytest.raises(AuthenticationError):
            rules.role_for_token(session, bad)
    assert "itok" not in str(session.to_record())


def test_second_join_aborts_for_both_and_reports_an_error() -> None:
    session, error = rules.join(_joined(), scanner_public_key=KEY_A, scanner_device_id=SCANNER_ID,
                                scanner_token="third", now=1002)
    assert isinstance(error, ThirdPartyJoinError) and error.status == 409
    assert session.state is SessionState.ABORTED
    assert session.events[-1].kind == "aborted"
    assert session.scanner_public_key == KEY_B, "the third party's key is never recorded"
    with pytest.raises(SessionAbortedError):
        rules.confirm(session, role=Role.SCANNER, message="m", now=1003)


def test_expiry() -> None:
    session = _new(now=1000, ttl=5)
    assert rules.refresh(session, 1004.9) is session
    expired = rules.refresh(session, 1005)
    assert expired.state is SessionState.EXPIRED and expired.events[-1].kind == "expired"
    with pytest.raises(SessionExpiredError) as info:
        rules.join(session, scanner_public_key=KEY_B, scanner_device_id=SCANNER_ID, scanner_token="s", now=1006)
    assert info.value.status == 410


def test_steps_out_of_order_are_refused() -> None:
    with pytest.raises(SessionStateError):
        rules.confirm(_new(), role=Role.SCANNER, message="m", now=1001)
    with pytest.raises(SessionStateError):
        rules.confirm(_joined(), role=Role.INITIATOR, message="m", now=1002)
    confirmed = rules.confirm(_joined(), role=Role.SCANNER, message="m", now=1002)
    with pytest.raises(SessionStateError):
        rules.confirm(confirmed, role=Role.SCANNER, message="again", now=1003)
    with pytest.raises(SessionStateError):
        rules.finish(confirmed, role=Role.SCANNER, message="m", now=1003)
    both = rules.confirm(confirmed, role=Role.INITIATOR, message="m", now=1003)
    with pytest.raises(SessionStateError):
        rules.finish(both, role=Role.INITIATOR, message="m", now=1004)


def test_completed_session_is_single_use() -> None:
    session = rules.finish(
        rules.confirm(rules.confirm(_joined(), role=Role.SCANNER, message="1", now=1002),
                      role=Role.INITIATOR, message="2", now=1003),
        role=Role.SCANNER, message="3", now=1004,
    )
    with pytest.raises(SessionStateError, match="single-use"):
        rules.join(session, scanner_public_key=KEY_B, scanner_device_id=SCANNER_ID, scanner_token="x", now=1005)
    assert rules.abort(session, role=Role.SCANNER, reason="late", now=1005) is session


def test_abort_keeps_a_bounded_reason() -> None:
    session = rules.abort(_joined(), role=Role.INITIATOR, reason="x" * 1000, now=1002)
    assert session.state is SessionState.ABORTED
    assert session.events[-1].data["by"] == "initiator"
    assert len(session.events[-1].data["reason"]) == MAX_ABORT_REASON


@pytest.mark.parametrize("value", [None, 5, "", "A" * 42, "A" * 44, "A" * 42 + "B", "A" * 42 + "+", "A" * 42 + "="])
def test_public_key_parsing_refuses_anything_but_32_bytes(value: object) -> None:
    with pytest.raises(InvalidRequestError):
        rules.parse_public_key(value, "k")


def test_public_key_parsing_accepts_canonical_keys() -> None:
    assert rules.parse_public_key(KEY_A, "k") == KEY_A


# --------------------------------------------------------------------------
# Rate limits


def test_token_bucket() -> None:
    bucket = TokenBucket.full(rate=1.0, burst=2.0, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(1.0)
    assert bucket.take(0.5) == pytest.approx(0.5)
    assert bucket.take(1.0) == 0


def test_rate_limiter_is_per_client_and_bounded() -> None:
    limiter = ClientRateLimiter({"create": RateRule(per_minute=60, burst=1)}, max_clients=3)
    assert limiter.check("create", "10.0.0.1", 0) == 0
    assert limiter.check("create", "10.0.0.1", 0) > 0
    assert limiter.check("create", "10.0.0.2", 0) == 0
    for i in range(100):
        limiter.check("create", f"10.1.0.{i}", 0)
    assert len(limiter) == 3


# --------------------------------------------------------------------------
# Config


def test_config_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    file = tmp_path / "rendezvous.toml"
    file.write_text('port = 1000\nsession_ttl = 30.0\nhost = "0.0.0.0"\npublic_url = "https://rv.example"\n')
    env = {"DVAI_RENDEZVOUS_PORT": "2000", "DVAI_RENDEZVOUS_SESSION_TTL": "45", "OTHER": "x"}
    config = load_rendezvous_config(file, env=env, overrides={"port": 3000, "host": None})
    assert config.port == 3000
    assert config.session_ttl == 45.0
    assert config.host == "0.0.0.0"
    assert config.base_url == "https://rv.example"
    assert load_rendezvous_config(env={}).port == RendezvousConfig().port


def test_config_unknown_keys_fail_naming_the_key(tmp_path: Path) -> None:
    file = tmp_path / "rendezvous.toml"
    file.write_text("sesion_ttl = 3\n")
    with pytest.raises(ConfigError, match="sesion_ttl"):
        load_rendezvous_config(file, env={})
    with pytest.raises(ConfigError, match="bogus"):
        load_rendezvous_config(env={"DVAI_RENDEZVOUS_BOGUS": "1"})


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DVAI_RENDEZVOUS_PORT": "http"}, "port"),
        ({"DVAI_RENDEZVOUS_SESSION_TTL": "0"}, "session_ttl"),
        ({"DVAI_RENDEZVOUS_TLS_CERT": "/c.pem"}, "tls_key"),
        ({"DVAI_RENDEZVOUS_PUBLIC_URL": "rv.example"}, "public_url"),
        ({"DVAI_RENDEZVOUS_MAX_BODY_BYTES": "10"}, "max_body_bytes"),
    ],
)
def test_config_bad_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_rendezvous_config(env=env)


def test_default_base_url_uses_the_bind_address() -> None:
    assert RendezvousConfig(port=5).base_url == "http://127.0.0.1:5"
    assert RendezvousConfig(host="::1", port=5).base_url == "http://[::1]:5"
    assert RendezvousConfig(db=":memory:").resolved_db() == ":memory:"


def test_cli_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rendezvous.cli import build_parser, config_from_args, main

    monkeypatch.setenv("DVAI_RENDEZVOUS_PORT", "4000")
    monkeypatch.setenv("DVAI_RENDEZVOUS_SESSION_TTL", "50")
    args = build_parser().parse_args(["--port", "5000", "--db", ":memory:", "--public-url", "https://rv.example"])
    config = config_from_args(args)
    assert (config.port, config.session_ttl, config.db, config.base_url) == (5000, 50.0, ":memory:", "https://rv.example")
    monkeypatch.setenv("DVAI_RENDEZVOUS_UNKNOWN", "1")
    assert main(["--db", ":memory:"]) == 2
