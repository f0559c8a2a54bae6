"""Signed requests: the message, the MAC, nonces, replay memory and the full verification matrix."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.common.errors import AuthenticationError
from node.pairing.store import Pairing, PairingStore
from node.security.signing import (
    HEADER_APP_ID,
    HEADER_NONCE,
    HEADER_PEER_DEVICE_ID,
    HEADER_SIGNATURE,
    SIGNED_HEADERS,
    Attribution,
    NonceCache,
    compose_signed_message,
    new_nonce,
    parse_nonce_timestamp,
    path_with_query_of,
    sign_hmac,
    sign_request_headers,
    verify_hmac,
    verify_signed_request,
)

NOW = 1_778_184_673_778
KEY = bytes(range(32))
DEVICE = "phone-pixel-9"
APP = "com.acme.chat"
METHOD = "POST"
PATH = "/v1/chat/completions?stream=false"
BODY = b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}]}'

# The worked example of docs/security.md: another implementation must reproduce these bytes.
EXAMPLE_NONCE = "1778184673778.Zm9vYmFyYmF6cXV4"
EXAMPLE_MESSAGE = (
    b"dvai-sig-v1\n"
    b"1778184673778.Zm9vYmFyYmF6cXV4\n"
    b"POST\n"
    b"/v1/chat/completions?stream=false\n"
    b"6858a8d7f1b90d76c094e5b87171b77c33084aed92fb150d7c1d91bd6dcfce3b"
)
EXAMPLE_SIGNATURE = "3cf68d9e7a2d46d3beddfb750f2f9e3138f87b365c401797bd98e344aff1c82b"


def pairing(key: bytes = KEY, device: str = DEVICE, app: str = APP, role: str = "inbound") -> Pairing:
    ids = {"our_app_id": app} if role == "outbound" else {"peer_app_id": app}
    if role == "mutual":
        ids = {"our_app_id": app, "peer_app_id": app}
    return Pairing(peer_device_id=device, peer_device_name="Pixel 9", key=key,
                   via="lan-handshake", paired_at=NOW, role=role, **ids)  # type: ignore[arg-type]


def signed(now_ms: int = NOW, key: bytes = KEY, **overrides: object) -> dict[str, object]:
    """A valid signed request as keyword arguments for verify_signed_request."""
    headers = sign_request_headers(key, DEVICE, APP, METHOD, PATH, BODY, now_ms=now_ms)
    request: dict[str, object] = {"headers": headers, "method": METHOD, "path_with_query": PATH, "body": BODY}
    request.update(overrides)
    return request


def verify(request: dict[str, object], *, pairings: dict[str, Pairing] | None = None,
           nonces: NonceCache | None = None, now_ms: int = NOW) -> Attribution:
    table = {DEVICE: pairing()} if pairings is None else pairings
    return verify_signed_request(
        request["headers"], request["method"], request["path_with_query"], request["body"],  # type: ignore[arg-type]
        lookup_key=lambda device, _app: table.get(device), now_ms=now_ms,
        nonces=NonceCache() if nonces is None else nonces,
    )


def error_code(request: dict[str, object], **kwargs: object) -> str:
    with pytest.raises(AuthenticationError) as caught:
        verify(request, **kwargs)  # type: ignore[arg-type]
    assert caught.value.status == 401
    return str(caught.value.code)


# --------------------------------------------------------------------------
# The message and the worked example


def test_message_layout_is_exact() -> None:
    body_hash = hashlib.sha256(BODY).hexdigest()
    message = compose_signed_message(EXAMPLE_NONCE, "post", PATH, BODY)
    assert message == f"dvai-sig-v1\n{EXAMPLE_NONCE}\nPOST\n{PATH}\n{body_hash}".encode()
    assert compose_signed_message(EXAMPLE_NONCE, "POST", PATH, BODY.decode()) == message


def test_worked_example_from_the_docs() -> None:
    message = compose_signed_message(EXAMPLE_NONCE, METHOD, PATH, BODY)
    assert message == EXAMPLE_MESSAGE
    assert sign_hmac(KEY, message) == EXAMPLE_SIGNATURE
    assert verify_hmac(KEY, EXAMPLE_MESSAGE, EXAMPLE_SIGNATURE)
    docs = (Path(__file__).resolve().parent.parent / "docs" / "security.md").read_text()
    assert EXAMPLE_SIGNATURE in docs and EXAMPLE_MESSAGE.decode().split("\n")[-1] in docs


@pytest.mark.parametrize("field", ["nonce", "method", "path_with_query"])
@pytest.mark.parametrize("bad", ["", "a\nb", "a\rb"])
def test_message_refuses_ambiguous_fields(field: str, bad: str) -> None:
    args = {"nonce": EXAMPLE_NONCE, "method": METHOD, "path_with_query": PATH, "body": BODY}
    args[field] = bad
    with pytest.raises(ValueError):
        compose_signed_message(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("signature", [
    "", "zz" * 32, "ab" * 31, "ab" * 33, "ab" * 31 + " a", "ａｂ" * 32, None, 123,
])
def test_malformed_signatures_do_not_verify(signature: object) -> None:
    assert verify_hmac(KEY, EXAMPLE_MESSAGE, signature) is False  # type: ignore[arg-type]


def test_upper_case_hex_verifies() -> None:
    assert verify_hmac(KEY, EXAMPLE_MESSAGE, sign_hmac(KEY, EXAMPLE_MESSAGE).upper())


def test_nonce_format() -> None:
    nonce = new_nonce(NOW)
    stamp, _, random_part = nonce.partition(".")
    assert stamp == str(NOW) and len(random_part) >= 16
    assert parse_nonce_timestamp(nonce) == NOW
    assert new_nonce(NOW) != nonce
    for bad in ["", "123", "abc.defghijkl", "123.short", "123.has space!", f"{NOW}." + "a" * 65, "-1.abcdefgh"]:
        assert parse_nonce_timestamp(bad) is None, bad


def test_path_with_query_matches_what_aiohttp_sends() -> None:
    assert path_with_query_of("http://10.0.0.2:38883/v1/chat/completions?stream=false") == PATH
    assert path_with_query_of("http://h/v1/a b?x=1 2") == "/v1/a%20b?x=1+2"


# --------------------------------------------------------------------------
# The verification matrix


def test_valid_request_is_attributed() -> None:
    assert verify(signed()) == Attribution(peer_device_id=DEVICE, app_id=APP, signed=True)


def test_no_headers_is_anonymous() -> None:
    attribution = verify(signed(headers={"Content-Type": "application/json"}))
    assert attribution == Attribution("anonymous", "anonymous", False)


@pytest.mark.parametrize("missing", SIGNED_HEADERS)
def test_each_missing_header_is_all_four_or_none(missing: str) -> None:
    request = signed()
    request["headers"] = {k: v for k, v in request["headers"].items() if k != missing}  # type: ignore[attr-defined]
    with pytest.raises(AuthenticationError, match="all four or none") as caught:
        verify(request)
    assert caught.value.code == "incomplete_signature_headers" and missing in caught.value.message


def test_headers_are_case_insensitive_in_plain_dicts() -> None:
    request = signed()
    request["headers"] = {k.lower(): v for k, v in request["headers"].items()}  # type: ignore[attr-defined]
    assert verify(request).signed


def with_header(request: dict[str, object], name: str, value: str) -> dict[str, object]:
    return {**request, "headers": {**request["headers"], name: value}}  # type: ignore[dict-item]


TAMPERS = {
    "method": lambda r: {**r, "method": "PUT"},
    "path": lambda r: {**r, "path_with_query": "/v1/embeddings?stream=false"},
    "query": lambda r: {**r, "path_with_query": "/v1/chat/completions?stream=true"},
    "body": lambda r: {**r, "body": BODY.replace(b"hi", b"ho")},
    "nonce": lambda r: with_header(r, HEADER_NONCE, f"{NOW}.AAAAAAAAAAAAAAAAAAAAAA"),
    "signature": lambda r: with_header(r, HEADER_SIGNATURE, "0" * 64),
}


@pytest.mark.parametrize("field", sorted(TAMPERS))
def test_each_tampered_field_fails_the_signature(field: str) -> None:
    assert error_code(TAMPERS[field](signed())) == "bad_signature"


def test_tampered_device_id_fails() -> None:
    other = pairing(key=bytes(32), device="laptop")
    tampered = with_header(signed(), HEADER_PEER_DEVICE_ID, "laptop")
    assert error_code(tampered, pairings={DEVICE: pairing(), "laptop": other}) == "bad_signature"
    assert error_code(tampered) == "unknown_pairing"


def test_tampered_app_id_fails() -> None:
    assert error_code(with_header(signed(), HEADER_APP_ID, "com.evil.app")) == "app_id_mismatch"


def test_wrong_key_fails() -> None:
    assert error_code(signed(key=bytes(32))) == "bad_signature"


def test_replayed_nonce_fails() -> None:
    nonces = NonceCache()
    request = signed()
    assert verify(request, nonces=nonces).signed
    assert error_code(request, nonces=nonces) == "nonce_replayed"
    assert error_code(request, nonces=nonces, now_ms=NOW + 299_000) == "nonce_replayed"


def test_stale_and_future_nonces_fail() -> None:
    assert error_code(signed(now_ms=NOW - 300_001)) == "nonce_expired"
    assert error_code(signed(now_ms=NOW + 300_001)) == "nonce_from_future"
    assert verify(signed(now_ms=NOW - 299_000)).signed
    assert verify(signed(now_ms=NOW + 299_000)).signed


def test_malformed_nonce_fails() -> None:
    assert error_code(with_header(signed(), HEADER_NONCE, "any unique string")) == "malformed_nonce"


def test_unknown_pairing_fails() -> None:
    assert error_code(signed(), pairings={}) == "unknown_pairing"


def test_outbound_pairing_cannot_be_used_to_call_us(tmp_path: Path) -> None:
    store = PairingStore(tmp_path / "pairings.json", [pairing(role="outbound")])
    request = signed()
    with pytest.raises(AuthenticationError) as caught:
        verify_signed_request(request["headers"], METHOD, PATH, BODY, lookup_key=store.credential_for,
                              nonces=NonceCache(), now_ms=NOW)
    assert caught.value.code == "unknown_pairing"


async def test_revoked_pairing_fails_at_once(tmp_path: Path) -> None:
    store = PairingStore(tmp_path / "pairings.json", [pairing()])
    nonces = NonceCache()
    assert verify_signed_request(**signed(), lookup_key=store.credential_for, nonces=nonces,
                                 now_ms=NOW).signed  # type: ignore[arg-type]
    await store.revoke(DEVICE)
    with pytest.raises(AuthenticationError) as caught:
        verify_signed_request(**signed(), lookup_key=store.credential_for, nonces=nonces,
                              now_ms=NOW)  # type: ignore[arg-type]
    assert caught.value.code == "unknown_pairing" and "revoked" in caught.value.message


def test_oversized_and_unprintable_ids_are_refused() -> None:
    assert error_code(with_header(signed(), HEADER_APP_ID, "x" * 129)) == "malformed_signature_header"
    assert error_code(with_header(signed(), HEADER_PEER_DEVICE_ID, "a b")) == "malformed_signature_header"


def test_duplicate_header_is_refused() -> None:
    from multidict import CIMultiDict

    request = signed()
    headers: CIMultiDict[str] = CIMultiDict(request["headers"])  # type: ignore[arg-type]
    headers.add(HEADER_NONCE, new_nonce(NOW))
    assert error_code({**request, "headers": headers}) == "duplicate_signature_header"


# --------------------------------------------------------------------------
# Replay memory under a flood


def test_nonce_cache_expires_old_entries() -> None:
    cache = NonceCache(window_s=300, max_entries=10)
    for i in range(5):
        assert cache.remember(DEVICE, f"{NOW}.n{i:07d}", NOW, NOW) == "fresh"
    assert len(cache) == 5
    assert cache.remember(DEVICE, f"{NOW + 400_000}.later00", NOW + 400_000, NOW + 400_000) == "fresh"
    assert len(cache) == 1


def test_nonce_cache_stays_bounded_and_never_forgets_a_replay() -> None:
    cache = NonceCache(window_s=300, max_entries=100)
    first = f"{NOW - 1000}.victim00"
    assert cache.remember("victim", first, NOW - 1000, NOW) == "fresh"
    for i in range(1000):  # a flood of newer, validly signed nonces from another peer
        assert cache.remember("flooder", f"{NOW}.f{i:07d}", NOW + i, NOW) == "fresh"
        assert len(cache) <= 100
    assert cache.floor_ms is not None and cache.floor_ms >= NOW - 1000
    assert cache.remember("victim", first, NOW - 1000, NOW) == "below_floor"
    assert cache.remember("flooder", f"{NOW}.f{999:07d}", NOW + 999, NOW) == "replayed"
    assert cache.remember("victim", f"{NOW}.fresh000", NOW + 5000, NOW) == "fresh"


def test_nonce_cache_refuses_an_entry_older_than_everything_when_full() -> None:
    cache = NonceCache(window_s=300, max_entries=3)
    for i in range(3):
        cache.remember(DEVICE, f"{NOW}.n{i:07d}", NOW + i, NOW)
    assert cache.remember(DEVICE, f"{NOW}.older000", NOW - 10, NOW) == "below_floor"
    assert len(cache) == 3


def test_nonce_cache_flood_is_fast() -> None:
    cache = NonceCache(max_entries=20_000)
    for i in range(60_000):
        cache.remember("flooder", f"{NOW}.f{i:07d}", NOW + (i % 1000), NOW)
    assert len(cache) == 20_000


# --------------------------------------------------------------------------
# Properties


keys = st.binary(min_size=32, max_size=32)
messages = st.binary(max_size=512)


@settings(max_examples=200, deadline=None)
@given(key=keys, message=messages, other_key=keys, other_message=messages)
def test_signature_verifies_only_for_exactly_what_it_signed(
    key: bytes, message: bytes, other_key: bytes, other_message: bytes
) -> None:
    signature = sign_hmac(key, message)
    assert verify_hmac(key, message, signature)
    assert verify_hmac(other_key, message, signature) == (other_key == key)
    assert verify_hmac(key, other_message, signature) == (other_message == message)


@settings(max_examples=200, deadline=None)
@given(key=keys, message=st.binary(min_size=1, max_size=256), index=st.integers(min_value=0),
       bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_fails(key: bytes, message: bytes, index: int, bit: int) -> None:
    signature = sign_hmac(key, message)
    position = index % len(message)
    flipped = bytearray(message)
    flipped[position] ^= 1 << bit
    assert not verify_hmac(key, bytes(flipped), signature)
    flipped_key = bytearray(key)
    flipped_key[index % 32] ^= 1 << bit
    assert not verify_hmac(bytes(flipped_key), message, signature)


field_text = st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=["Cs"]),
                     min_size=1, max_size=40)
requests = st.tuples(field_text, st.sampled_from(["GET", "POST", "DELETE"]), field_text, st.binary(max_size=64))


@settings(max_examples=300, deadline=None)
@given(first=requests, second=requests)
def test_distinct_requests_compose_distinct_messages(
    first: tuple[str, str, str, bytes], second: tuple[str, str, str, bytes]
) -> None:
    same = compose_signed_message(*first) == compose_signed_message(*second)
    assert same == (first == second)


@settings(max_examples=100, deadline=None)
@given(body=st.binary(max_size=256), path=st.sampled_from(["/v1/models", "/v1/chat/completions?a=1"]))
def test_signed_headers_round_trip(body: bytes, path: str) -> None:
    headers = sign_request_headers(KEY, DEVICE, APP, "POST", path, body, now_ms=NOW)
    attribution = verify_signed_request(headers, "POST", path, body, lookup_key=lambda _d, _a: pairing(),
                                        nonces=NonceCache(), now_ms=NOW)
    assert attribution.signed and attribution.peer_device_id == DEVICE
    changed = dataclasses.replace(pairing(), key=bytes(32))
    with pytest.raises(AuthenticationError):
        verify_signed_request(headers, "POST", path, body, lookup_key=lambda _d, _a: changed,
                              nonces=NonceCache(), now_ms=NOW)
