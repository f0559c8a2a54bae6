"""The pure QR pairing crypto: RFC 7748 vectors, the fixed-transcript KAT, payload, confirmation."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from node.common.b64 import b64url_encode as b64encode
from node.common.device_ids import device_id_from_public_key
from node.identity import DeviceIdentity
from node.pairing.qr import (
    PairingFailedError,
    PairingTranscript,
    QrPayload,
    Role,
    SessionKeys,
    build_confirmation,
    build_finish,
    derive_session_keys,
    length_prefixed,
    parse_pairing_uri,
    public_bytes,
    render_qr_png,
    render_qr_svg,
    render_qr_text,
    verify_confirmation,
    verify_finish,
    x25519_shared_secret,
)

# --------------------------------------------------------------------------
# RFC 7748 through the cryptography library


@pytest.mark.parametrize(
    ("scalar", "u", "expected"),
    [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ],
)
def test_rfc7748_section_5_2_vectors(scalar: str, u: str, expected: str) -> None:
    private = X25519PrivateKey.from_private_bytes(bytes.fromhex(scalar))
    assert x25519_shared_secret(private, bytes.fromhex(u)).hex() == expected


def test_rfc7748_section_5_2_iterated_1_and_1000() -> None:
    k = u = (9).to_bytes(32, "little")
    seen = {}
    for i in range(1, 1001):
        k, u = X25519PrivateKey.from_private_bytes(k).exchange(X25519PublicKey.from_public_bytes(u)), k
        seen[i] = k.hex()
    assert seen[1] == "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    assert seen[1000] == "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"


ALICE_PRIVATE = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a"
ALICE_PUBLIC = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a"
BOB_PRIVATE = "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb"
BOB_PUBLIC = "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f"
RFC_SHARED = "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742"


def test_rfc7748_section_6_1_diffie_hellman() -> None:
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(ALICE_PRIVATE))
    bob = X25519PrivateKey.from_private_bytes(bytes.fromhex(BOB_PRIVATE))
    assert public_bytes(alice).hex() == ALICE_PUBLIC
    assert public_bytes(bob).hex() == BOB_PUBLIC
    assert x25519_shared_secret(alice, bytes.fromhex(BOB_PUBLIC)).hex() == RFC_SHARED
    assert x25519_shared_secret(bob, bytes.fromhex(ALICE_PUBLIC)).hex() == RFC_SHARED


@pytest.mark.parametrize("low_order", [bytes(32), (1).to_bytes(32, "little"), bytes.fromhex(
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")])
def test_low_order_peer_key_is_refused(low_order: bytes) -> None:
    with pytest.raises(PairingFailedError, match="all-zero"):
        x25519_shared_secret(X25519PrivateKey.generate(), low_order)


def test_derive_refuses_all_zero_shared_secret() -> None:
    with pytest.raises(PairingFailedError):
        derive_session_keys(bytes(32), bytes(32), _kat_transcript())


# --------------------------------------------------------------------------
# The fixed transcript (docs/pairing-protocol.md, "Known-answer values")

KAT_INITIATOR_ID = device_id_from_public_key(
    bytes.fromhex("d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a")
)
KAT_SCANNER_ID = device_id_from_public_key(
    bytes.fromhex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c")
)
KAT_SESSION_ID = "AAECAwQFBgcICQoLDA0ODw"
KAT_SECRET = bytes(range(32))


def _kat_transcript() -> PairingTranscript:
    return PairingTranscript(
        KAT_SESSION_ID, bytes.fromhex(ALICE_PUBLIC), bytes.fromhex(BOB_PUBLIC), KAT_INITIATOR_ID, KAT_SCANNER_ID
    )


def test_kat_device_ids() -> None:
    assert KAT_INITIATOR_ID == "dveh7ddx5bksrgcytl7bkai36se4nxx3kl"
    assert KAT_SCANNER_ID == "dvhh3rhufgiqst6bcssqq3t5i3tmejphii"


def test_kat_info_layout() -> None:
    info = _kat_transcript().info()
    assert info.hex() == (
        "000c647661692d706169722d7631"
        "0016" + b"AAECAwQFBgcICQoLDA0ODw".hex()
        + "0020" + ALICE_PUBLIC
        + "0020" + BOB_PUBLIC
        + "0022" + KAT_INITIATOR_ID.encode().hex()
        + "0022" + KAT_SCANNER_ID.encode().hex()
    )
    assert len(info) == 178
    assert hashlib.sha256(info).hexdigest() == "4b133fc8e69c1c0e4c0b4baeae01f8b7a84a018af1dcc621b0d652d74be9c7e1"


def test_kat_keys_and_short_code() -> None:
    keys = derive_session_keys(bytes.fromhex(RFC_SHARED), KAT_SECRET, _kat_transcript())
    assert keys.pairing_key.hex() == "a21ec6a2bdcf28ac7acc80b5bf935dd9ec57c37d022097ec50fdcfc331bd16a7"
    assert keys.confirmation_key.hex() == "5688fa8adb4ef514cdb9a6a635380d0bc6e51369480dfa3b56f4dd85ba43ab69"
    assert keys.short_code == "013409"
    assert json.loads(build_finish(keys, _kat_transcript()))["mac"] == b64encode(
        bytes.fromhex("88137d9c8a3414fcbbcbec088aa5aa2822d086156ddac6ac4cf68b8dadcd5521")
    )


def test_kat_matches_an_independent_hkdf() -> None:
    """RFC 5869 written out with hmac, so the KAT does not just echo the library call."""
    prk = hmac.new(KAT_SECRET, bytes.fromhex(RFC_SHARED), hashlib.sha256).digest()
    okm, block = b"", b""
    for counter in range(1, 4):
        block = hmac.new(prk, block + _kat_transcript().info() + bytes([counter]), hashlib.sha256).digest()
        okm += block
    keys = derive_session_keys(bytes.fromhex(RFC_SHARED), KAT_SECRET, _kat_transcript())
    assert okm[:32] == keys.pairing_key and okm[32:64] == keys.confirmation_key
    assert f"{int.from_bytes(okm[64:72], 'big') % 1_000_000:06d}" == keys.short_code


def test_every_bound_value_changes_the_key() -> None:
    base = _kat_transcript()
    shared = bytes.fromhex(RFC_SHARED)
    reference = derive_session_keys(shared, KAT_SECRET, base).pairing_key
    variants = [
        PairingTranscript("AAECAwQFBgcICQoLDA0ODx", *list(_fields(base))[1:]),
        PairingTranscript(base.session_id, bytes.fromhex(BOB_PUBLIC), bytes.fromhex(ALICE_PUBLIC),
                          base.initiator_device_id, base.scanner_device_id),
        PairingTranscript(*list(_fields(base))[:3], base.scanner_device_id, base.initiator_device_id),
    ]
    for variant in variants:
        assert derive_session_keys(shared, KAT_SECRET, variant).pairing_key != reference
    assert derive_session_keys(shared, bytes(32), base).pairing_key != reference


def _fields(t: PairingTranscript) -> tuple[object, ...]:
    return (t.session_id, t.initiator_public_key, t.scanner_public_key, t.initiator_device_id, t.scanner_device_id)


def test_length_prefix_keeps_fields_apart() -> None:
    assert length_prefixed(b"ab", b"c") != length_prefixed(b"a", b"bc")


# --------------------------------------------------------------------------
# The payload


def _payload() -> QrPayload:
    return QrPayload("https://rv.example.org:8443/base", KAT_SESSION_ID, bytes.fromhex(ALICE_PUBLIC),
                     KAT_INITIATOR_ID, KAT_SECRET)


def test_payload_round_trip() -> None:
    uri = _payload().to_uri()
    assert uri.startswith("dvai://pair?v=1&r=https%3A%2F%2Frv.example.org%3A8443%2Fbase&s=")
    assert parse_pairing_uri(uri) == _payload()
    assert parse_pairing_uri("  " + uri + "\n") == _payload()


def test_payload_secret_is_not_in_repr() -> None:
    assert KAT_SECRET.hex() not in repr(_payload()) and "secret" not in repr(_payload())


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda u: u.replace("dvai://pair?", "http://pair?"), "must start with"),
        (lambda u: u.replace("v=1", "v=2"), "version"),
        (lambda u: u.replace("&t=", "&x="), "'t' must appear exactly once"),
        (lambda u: u + "&s=AAECAwQFBgcICQoLDA0ODw", "'s' must appear exactly once"),
        (lambda u: u.replace("https%3A", "ftp%3A"), "'r'"),
        (lambda u: u.replace("s=AAECAwQFBgcICQoLDA0ODw", "s=short"), "'s'"),
        (lambda u: u.replace("d=dv", "d=xx"), "'d'"),
        (lambda u: u.replace("k=", "k=AA"), "'k'"),
        (lambda u: u.replace("t=AAEC", "t=AA"), "'t'"),
        (lambda u: u + "&pad=" + "x" * 3000, "too long"),
    ],
)
def test_payload_parse_errors(mutate: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_pairing_uri(mutate(_payload().to_uri()))  # type: ignore[operator]


def test_payload_refuses_a_short_secret() -> None:
    short = QrPayload("https://a.example", KAT_SESSION_ID, bytes(32), KAT_INITIATOR_ID, bytes(15)).to_uri()
    with pytest.raises(ValueError, match="'t' must be"):
        parse_pairing_uri(short)


def test_qr_renderings() -> None:
    uri = _payload().to_uri()
    text = render_qr_text(uri)
    assert text.count("\n") > 20 and "█" in text
    assert render_qr_png(uri).startswith(b"\x89PNG\r\n\x1a\n")
    assert render_qr_svg(uri).lstrip().startswith("<svg")


# --------------------------------------------------------------------------
# Key confirmation


def _exchange() -> tuple[PairingTranscript, SessionKeys, DeviceIdentity, DeviceIdentity]:
    initiator_identity, scanner_identity = DeviceIdentity.generate(), DeviceIdentity.generate()
    a, b = X25519PrivateKey.generate(), X25519PrivateKey.generate()
    transcript = PairingTranscript(KAT_SESSION_ID, public_bytes(a), public_bytes(b),
                                   initiator_identity.device_id, scanner_identity.device_id)
    keys = derive_session_keys(x25519_shared_secret(a, public_bytes(b)), KAT_SECRET, transcript)
    return transcript, keys, initiator_identity, scanner_identity


def test_confirmation_round_trip_both_directions() -> None:
    transcript, keys, initiator, scanner = _exchange()
    from_scanner = build_confirmation(keys, transcript, Role.SCANNER, scanner, "phone")
    peer = verify_confirmation(keys, transcript, Role.SCANNER, from_scanner)
    assert (peer.device_id, peer.device_name) == (scanner.device_id, "phone")
    from_initiator = build_confirmation(keys, transcript, Role.INITIATOR, initiator, "laptop")
    assert verify_confirmation(keys, transcript, Role.INITIATOR, from_initiator).device_name == "laptop"
    verify_finish(keys, transcript, build_finish(keys, transcript))


def test_confirmation_is_not_reflectable() -> None:
    """Distinct labels: the scanner's message does not verify as the initiator's."""
    transcript, keys, _, scanner = _exchange()
    message = build_confirmation(keys, transcript, Role.SCANNER, scanner, "phone")
    with pytest.raises(PairingFailedError):
        verify_confirmation(keys, transcript, Role.INITIATOR, message)


@pytest.mark.parametrize("field", ["device_name", "identity_key", "signature", "mac"])
def test_confirmation_detects_each_altered_field(field: str) -> None:
    transcript, keys, _, scanner = _exchange()
    message = json.loads(build_confirmation(keys, transcript, Role.SCANNER, scanner, "phone"))
    if field == "device_name":
        message[field] = "evil"
    elif field == "identity_key":
        message[field] = b64encode(DeviceIdentity.generate().public_key)
    else:
        raw = bytearray(_unb64(message[field]))
        raw[0] ^= 1
        message[field] = b64encode(bytes(raw))
    with pytest.raises(PairingFailedError):
        verify_confirmation(keys, transcript, Role.SCANNER, json.dumps(message))


def test_confirmation_from_a_device_other_than_the_claimed_id_fails() -> None:
    """A scanner that claims another device's id cannot prove it with its own key."""
    transcript, keys, _, _ = _exchange()
    impostor = DeviceIdentity.generate()
    message = build_confirmation(keys, transcript, Role.SCANNER, impostor, "phone")
    with pytest.raises(PairingFailedError, match="did not prove"):
        verify_confirmation(keys, transcript, Role.SCANNER, message)


def test_confirmation_under_other_keys_fails() -> None:
    transcript, keys, _, scanner = _exchange()
    _, other_keys, _, _ = _exchange()
    message = build_confirmation(keys, transcript, Role.SCANNER, scanner, "phone")
    with pytest.raises(PairingFailedError, match="MAC"):
        verify_confirmation(other_keys, transcript, Role.SCANNER, message)
    with pytest.raises(PairingFailedError):
        verify_finish(other_keys, transcript, build_finish(keys, transcript))


@pytest.mark.parametrize("message", ["", "not json", "[]", "{}", '{"v":2,"mac":"x"}', "x" * 5000,
                                     '{"v":1,"device_name":"a","identity_key":1,"signature":"","mac":""}'])
def test_malformed_confirmations_fail_cleanly(message: str) -> None:
    transcript, keys, _, _ = _exchange()
    with pytest.raises(PairingFailedError):
        verify_confirmation(keys, transcript, Role.SCANNER, message)


@pytest.mark.parametrize("name", ["", "a\nb", "x" * 200])
def test_bad_device_names_are_refused(name: str) -> None:
    transcript, keys, _, scanner = _exchange()
    with pytest.raises(ValueError):
        build_confirmation(keys, transcript, Role.SCANNER, scanner, name)


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
