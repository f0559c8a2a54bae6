"""Pure parts of discovery: TXT codec, URL and claim validation, health answers, config seeds."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.common.errors import ConfigError
from node.config import KnownPeer
from node.constants import MAX_CUSTOM_PEERS, MAX_TXT_BYTES, MAX_TXT_ITEM_BYTES
from node.discovery.advert import AdvertisedInfo, claim_from_txt, decode_txt, encode_txt, pick_address
from node.discovery.custom import load_custom_discovery, seeds_from_custom_result
from node.discovery.health import parse_health_report
from node.discovery.static import seeds_from_known_peers
from node.discovery.validate import health_url, normalize_base_url
from node.identity import DeviceIdentity, NodeIdentity, make_health_proof

IDENTITY = NodeIdentity(DeviceIdentity.generate(), "desk", "0123456789abcdef")


def raw_txt(items: dict[str, str] | list[bytes]) -> bytes:
    parts = items if isinstance(items, list) else [f"{k}={v}".encode() for k, v in items.items()]
    return b"".join(bytes([len(p)]) + p for p in parts)


def test_txt_round_trip() -> None:
    info = AdvertisedInfo(port=38883, loaded_models=("gemma3-270m", "qwen"),
                          capability={"gemma3-270m": 41.25}, queue_depth={"qwen": 3}, app_id="com.acme")
    txt = encode_txt(IDENTITY, info)
    assert txt["id"] == IDENTITY.device_id and txt["in"] == IDENTITY.instance_id
    assert (txt["m"], txt["c"], txt["q"]) == ("gemma3-270m,qwen", "41.25,", "0,3")
    problems: list[str] = []
    claim = claim_from_txt(decode_txt(raw_txt(txt)), "10.0.0.7", 38883, problems)
    assert problems == []
    assert claim.base_url == "http://10.0.0.7:38883/v1" and claim.source == "mdns"
    assert claim.loaded_models == ("gemma3-270m", "qwen")
    assert claim.capability == {"gemma3-270m": 41.25} and claim.queue_depth == {"gemma3-270m": 0, "qwen": 3}
    assert (claim.device_name, claim.app_id, claim.instance_id) == ("desk", "com.acme", IDENTITY.instance_id)


def test_txt_stays_within_limits_with_many_long_models() -> None:
    models = tuple(f"model-{i:03d}-" + "x" * 100 for i in range(60))
    identity = NodeIdentity(IDENTITY.device, "ü" * 300, IDENTITY.instance_id)
    txt = encode_txt(identity, AdvertisedInfo(port=1, loaded_models=models,
                                              capability=dict.fromkeys(models, 10.0)))
    encoded = raw_txt(txt)
    assert len(encoded) <= MAX_TXT_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_TXT_ITEM_BYTES for k, v in txt.items())
    assert txt["mx"] == "1" and txt["m"].startswith("model-000")
    decode_txt(encoded)  # parses back


def test_absurd_capability_claims_are_dropped_not_fatal() -> None:
    txt = {"id": IDENTITY.device_id, "m": "a,b,c,d,e", "c": "-1,nan,inf,1e12,55", "q": "0,-4,x,1,2"}
    problems: list[str] = []
    claim = claim_from_txt(decode_txt(raw_txt(txt)), "10.0.0.7", 38883, problems)
    assert claim.capability == {"e": 55.0}
    assert claim.queue_depth == {"a": 0, "d": 1, "e": 2}
    assert sum("absurd capability" in p for p in problems) == 4


@pytest.mark.parametrize(
    ("txt", "port", "message"),
    [
        ({"n": "no id"}, 80, "not a device id"),
        ({"id": "dv" + "a" * 10}, 80, "not a device id"),
        ({"id": IDENTITY.device_id}, 0, "bad port"),
        ({"id": IDENTITY.device_id}, 70000, "bad port"),
        ({"id": IDENTITY.device_id, "p": "v1?x=1"}, 80, "API path"),
    ],
)
def test_unusable_records_are_refused(txt: dict[str, str], port: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        claim_from_txt(txt, "10.0.0.7", port, [])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x10short",  # length runs past the end
        raw_txt([b"id=\xff\xfe"]),  # not UTF-8
        raw_txt([b"k=" + b"v" * 250] * 6),  # > 1300 bytes
        raw_txt([b"a=1"] * 100),  # too many strings
    ],
)
def test_malformed_txt_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError):
        decode_txt(raw)


def test_txt_keys_are_case_insensitive_and_first_wins() -> None:
    assert decode_txt(raw_txt([b"ID=one", b"id=two", b"flag", b""])) == {"id": "one", "flag": ""}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=1500))
def test_decode_txt_only_ever_raises_value_error(raw: bytes) -> None:
    try:
        txt = decode_txt(raw)
    except ValueError:
        return
    try:
        claim_from_txt(txt, "10.0.0.1", 80, [])
    except ValueError:
        pass


def test_pick_address_prefers_routable_ipv4() -> None:
    assert pick_address(["fe80::1", "127.0.0.1", "10.1.2.3", "2001:db8::1"]) == "10.1.2.3"
    assert pick_address(["2001:db8::1", "127.0.0.1"]) == "2001:db8::1"
    assert pick_address(["127.0.0.1"]) == "127.0.0.1"
    assert pick_address(["fe80::1", "garbage"]) is None


@pytest.mark.parametrize(
    ("given_url", "expected"),
    [
        ("http://10.0.0.5:38883", "http://10.0.0.5:38883/v1"),
        ("http://10.0.0.5:38883/v1/", "http://10.0.0.5:38883/v1"),
        ("https://node.example/prefix", "https://node.example/prefix/v1"),
        ("http://[fd00::5]:8080/v1", "http://[fd00::5]:8080/v1"),
    ],
)
def test_normalize_base_url(given_url: str, expected: str) -> None:
    assert normalize_base_url(given_url) == expected
    assert health_url(expected).endswith("/v1/dvai/health")


@pytest.mark.parametrize("bad", ["", "ftp://x:1", "http://u:p@h:1", "http://h:1/v1?x=1", "http://:1", 5])
def test_normalize_base_url_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        normalize_base_url(bad)


def health_body(**overrides: object) -> dict[str, object]:
    body: dict[str, object] = {
        "status": "ok", "version": "0.1.0", "uptimeS": 3.5, "deviceId": IDENTITY.device_id,
        "deviceName": "desk", "instanceId": IDENTITY.instance_id,
        "models": [{"id": "m1", "loaded": True, "queueDepth": 2}, {"id": "m2", "loaded": False}],
    }
    body.update(overrides)
    return body


def test_health_report_with_a_valid_proof() -> None:
    body = health_body(identityProof=make_health_proof(IDENTITY, "abc123"))
    report = parse_health_report(body, "abc123")
    assert report.proven and report.loaded_models == ("m1",) and report.queue_depth == {"m1": 2}
    assert report.device_name == "desk" and report.instance_id == IDENTITY.instance_id
    assert not parse_health_report(body, "other").proven  # replayed for another challenge
    impostor = NodeIdentity(DeviceIdentity.generate(), "x", IDENTITY.instance_id)
    forged = health_body(identityProof=make_health_proof(impostor, "abc123"))
    assert not parse_health_report(forged, "abc123").proven
    assert not parse_health_report(health_body(identityProof={"publicKey": 5}), "abc123").proven


@pytest.mark.parametrize(
    "body",
    [[], "ok", health_body(status="broken"), health_body(deviceId="dvnope"), health_body(models={"a": 1})],
)
def test_unusable_health_answers(body: object) -> None:
    with pytest.raises(ValueError):
        parse_health_report(body, "abc")


def test_known_peers_become_static_seeds() -> None:
    seeds = seeds_from_known_peers([KnownPeer("http://10.8.0.2:38883", IDENTITY.device_id, "vpn box")])
    assert seeds[0].base_url == "http://10.8.0.2:38883/v1" and seeds[0].source == "static"
    assert seeds[0].device_id == IDENTITY.device_id and seeds[0].device_name == "vpn box"
    with pytest.raises(ConfigError, match=r"known_peers\[0\].base_url"):
        seeds_from_known_peers([KnownPeer("10.8.0.2")])
    with pytest.raises(ConfigError, match="device_id"):
        seeds_from_known_peers([KnownPeer("http://10.8.0.2:1", "bogus")])


@dataclass
class PeerLike:
    base_url: str
    device_name: str = "obj"


def test_custom_results_are_validated() -> None:
    problems: list[str] = []
    result = [
        {"baseUrl": "http://10.0.0.9:1", "deviceId": IDENTITY.device_id, "deviceName": "a",
         "loadedModels": ["m", 7], "capability": {"m": math.nan, "n": 3}},
        PeerLike("http://10.0.0.10:1"),
        {"baseUrl": "not a url"},
        {"deviceId": "x"},
        "garbage",
    ]
    seeds = seeds_from_custom_result(result, problems)
    assert [s.base_url for s in seeds] == ["http://10.0.0.9:1/v1", "http://10.0.0.10:1/v1"]
    assert seeds[0].loaded_models == ("m",) and seeds[0].capability == {"n": 3.0}
    assert seeds[1].device_name == "obj" and all(s.source == "custom" for s in seeds)
    assert len(problems) == 5
    many = [{"baseUrl": f"http://10.0.{i // 250}.{i % 250}:1"} for i in range(500)]
    assert len(seeds_from_custom_result(many, [])) == MAX_CUSTOM_PEERS
    with pytest.raises(ValueError):
        seeds_from_custom_result(None, [])


def test_custom_discovery_spec_errors_are_config_errors() -> None:
    for spec in ("nocolon", "no_such_module_xyz:f", "json:no_such_function"):
        with pytest.raises(ConfigError, match="custom_discovery"):
            load_custom_discovery(spec)
    assert load_custom_discovery("json:dumps") is not None


async def test_custom_discovery_failures_are_logged_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    from node.discovery.custom import CustomDiscovery

    received: list[tuple[object, ...]] = []

    def broken() -> object:
        raise RuntimeError("registry down")

    async def slow() -> object:
        await asyncio.sleep(10)
        return []

    async def good() -> object:
        return [{"baseUrl": "http://10.0.0.9:1"}]

    for function, expected in ((broken, False), (slow, False), (lambda: 42, False), (good, True)):
        custom = CustomDiscovery(spec="t:f", function=function, interval=0.2, on_seeds=received.append)
        assert await custom.run_once() is expected
    assert len(received) == 1 and received[0][0].base_url == "http://10.0.0.9:1/v1"  # type: ignore[attr-defined]
    assert "registry down" in caplog.text and "TimeoutError" in caplog.text


def test_health_report_features_per_loaded_model() -> None:
    models = [{"id": "m1", "loaded": True, "features": ["chat", "tools", "Bad Name", 7, "tools"]},
              {"id": "m2", "loaded": False, "features": ["tools"]}, {"id": "m3", "loaded": True}]
    report = parse_health_report(health_body(models=models))
    assert report.features == {"m1": ("chat", "tools")}  # m3: an older node, no list; m2 not loaded
    assert parse_health_report(health_body()).features == {}
