"""Hostile input, crashes and restarts against real node processes (SIMULATED engine).

Each finding of issue 16 has a test here: the 500s of the fuzz run reproduced one by one, the
parser-level 400s, the audit writer surviving bad rows, replay across a restart, the audit row
of an answered request surviving ``kill -9``, temporary files of an interrupted write, a
restart keeping its port. ``test_fuzz_*`` is a hypothesis fuzz over the JSON bodies and
headers of every route: ``DVAI_FUZZ_EXAMPLES`` raises its example count (bench/nightly mode:
``DVAI_FUZZ_EXAMPLES=20000 pytest tests/test_hardening.py -k fuzz``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from node.api import keys, mesh, metrics, offload, openai, peers, trust
from node.pairing import encode_key
from node.security import sign_request_headers

from .conftest import REPO, NodeProcess, free_port, start_node_process

MODELS = (
    '[models.gemma3-270m]\nengine = "simulated"\nsimulated_tok_per_s = 2000\n'  # SIMULATED engine
    '[models.embed]\nengine = "simulated"\nembedding = true\n'  # SIMULATED embeddings
)
CONFIG = MODELS + '[offload]\nenabled = true\ndiscover_lan = false\nprobe_on_start = false\n'
FUZZ_EXAMPLES = int(os.environ.get("DVAI_FUZZ_EXAMPLES", "1500"))
CHAT = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    process = start_node_process(tmp_path_factory.mktemp("hardening"), config_text=CONFIG)
    try:
        yield process
    finally:
        process.stop()


def port_of(node: NodeProcess) -> int:
    return int(node.base_url.rsplit(":", 1)[1].split("/")[0])


# --------------------------------------------------------------------------
# A raw HTTP/1.1 client: any bytes on the wire, one request per connection


def raw_request(port: int, data: bytes, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = _dechunk(body)
    return status, headers, body


def _dechunk(data: bytes) -> bytes:
    out, rest = [], data
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out.append(rest[:size])
        rest = rest[size + 2:]
    return b"".join(out)


def build_request(method: str, target: str, port: int, body: bytes = b"",
                  headers: list[tuple[bytes, bytes]] = (), content_type: bytes = b"application/json") -> bytes:  # type: ignore[assignment]
    lines = [f"{method} {target} HTTP/1.1".encode(), f"Host: 127.0.0.1:{port}".encode(), b"Connection: close",
             b"Content-Type: " + content_type, f"Content-Length: {len(body)}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


BY_DESIGN = {(503, "no_capable_device"), (502, "upstream_error")}
"""(status, error type or code) of 5xx answers that are by design: no peer could serve a
``require`` request, a pairing target that cannot be reached."""


def check_answer(status: int, headers: dict[str, str], body: bytes, what: str) -> None:
    """No 5xx unless by design; every error body OpenAI-shaped."""
    if status < 400:
        return
    assert "application/json" in headers.get("content-type", ""), (what, status, headers, body[:300])
    error = json.loads(body)["error"]
    assert isinstance(error["message"], str) and error["message"], (what, body[:300])
    assert isinstance(error["type"], str) and "code" in error and "param" in error, (what, body[:300])
    if status >= 500:
        assert (status, error["type"]) in BY_DESIGN or (status, error["code"]) in BY_DESIGN, (what, body[:300])


def assert_no_traceback(node: NodeProcess) -> None:
    log = "".join(node.output)
    assert "Traceback" not in log, log[-3000:]


# --------------------------------------------------------------------------
# The seven causes of the fuzz run's 500s, one by one


def post(node: NodeProcess, path: str, body: bytes, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict[str, Any]]:  # type: ignore[assignment]
    status, response_headers, raw = raw_request(port_of(node), build_request("POST", path, port_of(node), body,
                                                                               headers))
    check_answer(status, response_headers, raw, path)
    return status, json.loads(raw) if raw else {}


@pytest.mark.parametrize(("path", "body", "code"), [
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":[],"content":"hi"}]}', "invalid_request"),
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":{"a":1},"content":"hi"}]}',
     "invalid_request"),
    ("/v1/chat/completions", b"[" * 5000 + b"]" * 5000, "json_too_deep"),
    ("/v1/dvai/handshake", b'{"a":' * 1200 + b"1" + b"}" * 1200, "json_too_deep"),
    ("/v1/embeddings", b'{"model":"embed","input":"x","n":' + b"9" * 5000 + b"}", "number_too_long"),
    ("/v1/completions", b'{"model":"gemma3-270m","prompt":"\\ud800"}', "invalid_text"),
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":"user","content":"a\\udfff"}]}',
     "invalid_text"),
    ("/v1/embeddings", b'{"model":"embed","input":["ok","\\ud83d"]}', "invalid_text"),
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}],'
     b'"temperature":' + b"7" * 400 + b"}", "number_too_long"),
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}],'
     b'"top_p":' + b"7" * 90 + b"}", "invalid_request"),
    ("/v1/chat/completions", b'{"model":"gemma3-270m","messages":[{"role":"user","content":"hi"}],'
     b'"presence_penalty":NaN}', "invalid_request"),
])
def test_each_fuzz_finding_is_a_400(node: NodeProcess, path: str, body: bytes, code: str) -> None:
    status, answer = post(node, path, body)
    assert status == 400 and answer["error"]["code"] == code, answer
    assert_no_traceback(node)


def test_audit_query_numbers_beyond_64_bits_are_a_400(node: NodeProcess) -> None:
    for query in ("until=100000000000000000000", "since=-99999999999999999999", "status=9223372036854775808",
                  "since=" + "9" * 5000, "app=%ED%A0%80", "peer=%FF"):
        status, headers, body = raw_request(port_of(node), build_request("GET", f"/v1/dvai/audit?{query}",
                                                                         port_of(node)))
        check_answer(status, headers, body, query)
        # numbers out of range are refused; undecodable text matches nothing (the URL decoder
        # replaces what is not UTF-8)
        assert status == (200 if query.startswith(("app", "peer")) else 400), (query, body)
    assert_no_traceback(node)


async def test_a_bad_audited_field_cannot_switch_auditing_off(node: NodeProcess) -> None:
    """A lone surrogate in the model name (answered 404) and a non-UTF-8 X-Request-Id (served): the
    writer survives, later rows are written, health and metrics say the log is fine."""
    status, _ = post(node, "/v1/chat/completions",
                     b'{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}')
    assert status == 400
    status, _ = post(node, "/v1/chat/completions", b'{"model":"nope\\u00e9","messages":[{"role":"user",'
                     b'"content":"hi"}],"max_tokens":2}')
    assert status == 404
    status, headers, raw = raw_request(port_of(node), build_request(
        "POST", "/v1/chat/completions", port_of(node), json.dumps({**CHAT, "max_tokens": 2}).encode(),
        [(b"X-Request-Id", b"\xff\xfe-bad")]))
    assert status == 200, raw
    assert headers["x-request-id"] != "\xff\xfe-bad" and headers["x-request-id"].isascii()
    marker = f"after-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as session:
        async with session.post(node.base_url + "/chat/completions", json=CHAT,
                                headers={"X-Request-Id": marker}) as response:
            assert response.status == 200
        async with session.get(node.root + "/v1/dvai/audit", params={"limit": "50"}) as response:
            assert response.status == 200
            rows = (await response.json())["data"]
        async with session.get(node.root + "/v1/dvai/health") as response:
            health = await response.json()
        async with session.get(node.root + "/metrics") as response:
            exposition = await response.text()
    ids = [row["requestId"] for row in rows]
    assert marker in ids and headers["x-request-id"] in ids
    assert any(row["modelRequested"] == "nope\u00e9" and row["status"] == 404 for row in rows)
    assert health["audit"] == {"state": "ok", "writeErrors": 0, "droppedRows": 0}
    assert "dvai_audit_log_up 1.0" in exposition
    assert_no_traceback(node)


@pytest.mark.parametrize(("name", "request_bytes"), [
    ("lowercase method", b"get /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("unknown method", b"FROB\x01 /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("control character in a header value", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x01b\r\n\r\n"),
    ("request line over 8 KB", b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
    ("10,000 headers", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     + b"".join(b"X-%d: 1\r\n" % i for i in range(10_000)) + b"\r\n"),
    ("bad content length", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: x\r\n\r\n"),
    ("HTTP/1.1 without Host", b"GET /v1/models HTTP/1.1\r\nConnection: close\r\n\r\n"),
    ("two Host headers", b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: 127.0.0.2\r\n\r\n"),
    ("Content-Length with chunked", b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
     b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n"),
])
def test_parser_level_errors_are_openai_shaped_without_traceback(node: NodeProcess, name: str,
                                                                   request_bytes: bytes) -> None:
    status, headers, body = raw_request(port_of(node), request_bytes)
    assert 400 <= status < 500, (name, status, body)
    check_answer(status, headers, body, name)
    assert json.loads(body)["error"]["code"] == "bad_http_request"
    assert_no_traceback(node)


def test_idle_connections_are_closed_after_the_documented_timeout(node: NodeProcess) -> None:
    from node.constants import IDLE_CONNECTION_TIMEOUT_S

    assert IDLE_CONNECTION_TIMEOUT_S <= 60
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(node)), timeout=IDLE_CONNECTION_TIMEOUT_S + 30) as sock:
        sock.sendall(b"GET /v1/mod")  # half a request line, then silence
        assert sock.recv(1024) == b""  # closed by the node
    waited = time.monotonic() - started
    assert IDLE_CONNECTION_TIMEOUT_S - 1 <= waited <= IDLE_CONNECTION_TIMEOUT_S + 20, waited


# --------------------------------------------------------------------------
# The fuzz test


def _routes() -> list[tuple[str, str]]:
    out = []
    for table in (openai.routes, mesh.routes, trust.routes, peers.routes, metrics.routes, offload.routes,
                  keys.routes):
        for route in table:
            method, path = getattr(route, "method", None), getattr(route, "path", None)
            if method in ("GET", "POST", "DELETE") and isinstance(path, str):
                out.append((method, path))
    return out


ROUTES = _routes()
BASE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": {"model": "gemma3-270m", "prompt": "Once", "max_tokens": 3},
    "/v1/embeddings": {"model": "embed", "input": ["a", "b"]},
    "/v1/dvai/handshake": {"peerDeviceId": "dv-fuzz", "peerDeviceName": "fuzz", "via": "lan-handshake"},
    "/v1/dvai/pairings": {"deviceId": "dv-fuzz"},
    "/v1/dvai/pair-scan": {"payload": "not a payload"},
    "/v1/dvai/probe": {"model": "gemma3-270m", "tokens": 4},
    "/v1/dvai/keys": {"appId": "com.fuzz", "scopes": {"models": ["gemma3-270m"]}, "expiresIn": 60},
}
SMALL_OR_HUGE_INT = st.integers(-10, 10) | st.integers(min_value=2**21, max_value=2**80) | st.integers(
    max_value=-(2**21), min_value=-(2**80))
"""ints a fuzzed field may take: small, or far beyond any limit (never a valid but slow max_tokens)."""
SCALARS = (st.none() | st.booleans() | SMALL_OR_HUGE_INT | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=12))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
KEYS = st.sampled_from(["model", "messages", "prompt", "input", "max_tokens", "temperature", "top_p", "stream",
                        "stop", "n", "seed", "role", "content", "peerDeviceId", "appId", "payload", "tokens",
                        "stream_options", "response_format", "encoding_format", "presence_penalty"]) | st.text(
    max_size=8)
RAW_BODIES = st.sampled_from([
    b"[" * 3000 + b"]" * 3000, b'{"a":' * 900 + b"0" + b"}" * 900, b"9" * 4400, b"-" + b"1" * 5000 + b".5e3",
    b'"\\ud800"', b'{"model":"\\udc00x"}', b"\xff\xfe{}", b"{", b"", b"NaN", b"[Infinity]", b"null",
    b'{"messages":[{"role":"user","content":"\\ud800\\u0041"}],"model":"gemma3-270m"}',
])


@st.composite
def json_bodies(draw: st.DrawFn, path: str) -> bytes:
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(RAW_BODIES)
    if choice == 1:
        return draw(st.binary(max_size=64))
    body: Any = dict(BASE_BODIES.get(path, {}))
    if choice == 2:
        body = draw(JSON_VALUES)
    else:
        for _ in range(draw(st.integers(1, 3))):
            if body and draw(st.booleans()) and isinstance(body, dict):
                key = draw(st.sampled_from(sorted(body)))
                if draw(st.integers(0, 4)) == 0:
                    del body[key]
                    continue
            else:
                key = draw(KEYS)
            if isinstance(body, dict):
                body[key] = draw(JSON_VALUES)
    text = json.dumps(body)
    if draw(st.integers(0, 5)) == 0 and '"' in text:  # a lone surrogate escape inside some string
        at = text.index('"') + 1
        text = text[:at] + draw(st.sampled_from(["\\ud800", "\\udfff", "\\udbff\\u0041"])) + text[at:]
    if draw(st.integers(0, 6)) == 0:
        text = text.replace("3", "3" + "0" * draw(st.integers(90, 5000)), 1)  # a huge number literal
    return text.encode("utf-8", "surrogatepass")


def _fill(path: str, draw: st.DrawFn) -> str:
    parts = []
    for segment in path.split("/"):
        if segment.startswith("{"):
            if ":" in segment:
                segment = draw(st.sampled_from(["approve", "deny"]))
            else:
                segment = urllib.parse.quote(draw(st.text(min_size=1, max_size=16)), safe="")
        parts.append(segment)
    return "/".join(parts)


@st.composite
def fuzz_requests(draw: st.DrawFn) -> tuple[str, str, bytes, list[tuple[bytes, bytes]]]:
    method, path = draw(st.sampled_from(ROUTES))
    target = _fill(path, draw)
    if draw(st.booleans()):
        query = {draw(st.sampled_from(["since", "until", "status", "limit", "app", "peer", "fresh", "challenge",
                                       "model"])): str(draw(SMALL_OR_HUGE_INT | st.text(max_size=8)))
                 for _ in range(draw(st.integers(1, 3)))}
        target += "?" + urllib.parse.urlencode(query)
    body = draw(json_bodies(path)) if method == "POST" else b""
    header_values = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
    names = st.sampled_from([b"X-Request-Id", b"X-DVAI-Offload", b"X-DVAI-Peer-Device-Id", b"X-DVAI-App-Id",
                             b"X-DVAI-Nonce", b"X-DVAI-Signature", b"X-DVAI-Hop", b"Origin", b"Sec-Fetch-Site",
                             b"Accept", b"X-Forwarded-For", b"Authorization"])
    headers = draw(st.lists(st.tuples(names, header_values | st.sampled_from(
        [b"require", b"never", b"prefer", b"\xff", b"1778184673778.abcdefgh", b"0" * 64, b"Bearer dvai-x",
         b"Bearer \xff"])), max_size=4))
    return method, target, body, headers


def _no_outbound_addresses(body: bytes) -> bool:
    """Never let a fuzzed pairing request point the node at a network address."""
    return b"//" not in body and b"dvai:" not in body


@pytest.mark.timeout(max(180, FUZZ_EXAMPLES // 4))  # ~30 ms per example, with room for a busy machine
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=False,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture])
@given(request=fuzz_requests())
def test_fuzz_every_route(node: NodeProcess, request: tuple[str, str, bytes, list[tuple[bytes, bytes]]]) -> None:
    method, target, body, headers = request
    assume(_no_outbound_addresses(body))
    port = port_of(node)
    status, response_headers, raw = raw_request(port, build_request(method, target, port, body, headers))
    check_answer(status, response_headers, raw, f"{method} {target} {body[:200]!r} {headers!r}")


async def test_after_the_fuzz_a_normal_request_is_served_and_audited(node: NodeProcess) -> None:
    """Runs after ``test_fuzz_every_route`` (file order): the node is sound and logged nothing alarming."""
    marker = f"final-{uuid.uuid4().hex}"
    async with aiohttp.ClientSession() as session:
        async with session.post(node.base_url + "/chat/completions", json=CHAT,
                                headers={"X-Request-Id": marker}) as response:
            assert response.status == 200
            assert (await response.json())["choices"][0]["message"]["content"]
        async with session.get(node.root + "/v1/dvai/audit", params={"limit": "20"}) as response:
            rows = (await response.json())["data"]
        async with session.get(node.root + "/v1/dvai/health") as response:
            health = await response.json()
    assert any(row["requestId"] == marker and row["status"] == 200 for row in rows)
    assert health["status"] == "ok" and health["audit"]["state"] == "ok"
    assert health["audit"]["writeErrors"] == 0
    assert_no_traceback(node)


# --------------------------------------------------------------------------
# Crashes and restarts


def _seed_inbound_pairing(state: Path, device: str, key: bytes) -> None:
    state.mkdir(parents=True, exist_ok=True)
    record = {"peerDeviceId": device, "peerDeviceName": device, "peerAppId": device, "ourAppId": None,
              "pairingKey": encode_key(key), "via": "lan-handshake", "pairedAt": 0, "role": "inbound",
              "baseUrl": None, "admin": False}
    (state / "pairings.json").write_text(json.dumps({"version": 2, "pairings": [record]}))
    os.chmod(state / "pairings.json", 0o600)


def _kill(node: NodeProcess) -> None:
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(10)


def test_a_request_captured_before_a_restart_cannot_be_replayed_after_it(tmp_path: Path) -> None:
    state, device, key = tmp_path / "n", "dv-replayer", b"r" * 32
    _seed_inbound_pairing(state, device, key)
    port = free_port()
    body = json.dumps(CHAT).encode()
    first = start_node_process(state, config_text=MODELS, args=["--port", str(port)])
    try:
        headers = sign_request_headers(key, device, device, "POST", "/v1/chat/completions", body)
        wire = build_request("POST", "/v1/chat/completions", port, body, [(k.encode(), v.encode())
                                                                          for k, v in headers.items()])
        assert raw_request(port, wire)[0] == 200
        assert raw_request(port, wire)[0] == 401  # replay within the same process
    finally:
        _kill(first)
    second = start_node_process(state, config_text=MODELS, args=["--port", str(port)])
    try:
        status, response_headers, raw = raw_request(port, wire)  # the same bytes, well inside 300 s
        check_answer(status, response_headers, raw, "replay")
        assert status == 401 and json.loads(raw)["error"]["code"] == "nonce_below_replay_floor"
        fresh = sign_request_headers(key, device, device, "POST", "/v1/chat/completions", body)
        assert raw_request(port, build_request("POST", "/v1/chat/completions", port, body,
                                               [(k.encode(), v.encode()) for k, v in fresh.items()]))[0] == 200
    finally:
        second.stop()


def _audit_ids(state: Path) -> set[str]:
    with sqlite3.connect(state / "audit.sqlite3") as conn:
        return {row[0] for row in conn.execute("SELECT request_id FROM audit")}


def test_an_answered_request_keeps_its_audit_row_through_kill_9(tmp_path: Path) -> None:
    """JSON answers: the row is committed before the answer leaves, so a SIGKILL right after the
    client has it loses nothing. Streams: the row is committed within the documented window."""
    state = tmp_path / "n"
    expected: set[str] = set()
    for round_ in range(3):
        node = start_node_process(state, config_text=MODELS)
        port = port_of(node)
        try:
            for kind in ("json", "error"):
                marker = f"{kind}-{round_}-{uuid.uuid4().hex}"
                body = json.dumps(CHAT if kind == "json" else {**CHAT, "model": "missing"}).encode()
                status = raw_request(port, build_request("POST", "/v1/chat/completions", port, body,
                                                         [(b"X-Request-Id", marker.encode())]))[0]
                assert status == (200 if kind == "json" else 404)
                expected.add(marker)
            marker = f"stream-{round_}-{uuid.uuid4().hex}"
            streamed = raw_request(port, build_request("POST", "/v1/chat/completions", port,
                                                       json.dumps({**CHAT, "stream": True}).encode(),
                                                       [(b"X-Request-Id", marker.encode())]))
            assert streamed[0] == 200 and b"[DONE]" in streamed[2]
            expected.add(marker)
            time.sleep(0.5)  # the documented window for a streamed answer's row
            marker = f"last-{round_}-{uuid.uuid4().hex}"
            assert raw_request(port, build_request("POST", "/v1/chat/completions", port,
                                                   json.dumps(CHAT).encode(),
                                                   [(b"X-Request-Id", marker.encode())]))[0] == 200
            expected.add(marker)
        finally:
            _kill(node)  # at once, after the last answer arrived
        assert expected <= _audit_ids(state), expected - _audit_ids(state)


def test_temporary_files_of_an_interrupted_write_are_removed_at_start(tmp_path: Path) -> None:
    state = tmp_path / "n"
    state.mkdir()
    writer = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, sys, time\n"
            "from pathlib import Path\n"
            "from node.common import fsutil\n"
            "os.replace = lambda *a: (print('written', flush=True), time.sleep(600))\n"
            "fsutil.atomic_write_json(Path(sys.argv[1]) / 'pairings.json', {'version': 2, 'pairings': []})\n"
        ), str(state)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "written"
    finally:
        writer.kill()
        writer.wait(10)
    leftovers = list(state.glob(".pairings.json.*.tmp"))
    assert len(leftovers) == 1  # what a kill in the middle of an atomic write leaves
    node = start_node_process(state, config_text=MODELS)
    try:
        assert list(state.glob(".*.tmp")) == []
        assert not (state / "pairings.json").exists()  # the interrupted write never happened
    finally:
        node.stop()


_LINGERING = {"04", "05", "06", "0B"}
"""FIN_WAIT1, FIN_WAIT2, TIME_WAIT, CLOSING (/proc/net/tcp states): a closed connection the kernel
still keeps, which makes a plain bind() of its port fail with EADDRINUSE."""


def _lingering_connection_on(port: int) -> bool:
    """A closed TCP connection whose local port is ``port`` still held by the kernel."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] in _LINGERING and int(fields[1].rsplit(":", 1)[1], 16) == port:
                return True
    return False


async def test_a_restart_keeps_its_port_and_a_taken_port_is_reported(tmp_path: Path) -> None:
    port = free_port()
    state = tmp_path / "n"
    first = start_node_process(state, config_text=MODELS, args=["--port", str(port)])
    assert port_of(first) == port
    session = aiohttp.ClientSession()  # keep-alive: the connection stays open until the node closes it
    try:
        for _ in range(2):
            async with session.get(first.base_url + "/models") as response:
                assert response.status == 200
        # never two live listeners: a second node on the same port moves on, and says so
        other = start_node_process(tmp_path / "other", config_text=MODELS, args=["--port", str(port)])
        try:
            moved = port_of(other)  # port + 1, unless another program on this machine holds that one
            assert port < moved < port + 16
            assert f"port {port} busy, using {moved}" in "".join(other.output)
            assert "WARNING" in "".join(line for line in other.output if "busy" in line)
        finally:
            other.stop()
        stopped = time.monotonic()
        first.stop()
        assert _lingering_connection_on(port)  # the node closed the keep-alive connection first
        second = start_node_process(state, config_text=MODELS, args=["--port", str(port)])
        try:
            assert time.monotonic() - stopped < 5.0
            assert port_of(second) == port
            assert "busy" not in "".join(second.output)
            async with aiohttp.ClientSession() as fresh, fresh.get(second.base_url + "/models") as response:
                assert response.status == 200
        finally:
            second.stop()
    finally:
        await session.close()


async def test_the_listener_sets_so_reuseaddr_and_not_so_reuseport(tmp_path: Path) -> None:
    from node import Node
    from node.config import load_config

    config = load_config(env={}, overrides={
        "state_dir": str(tmp_path / "n"), "http_base_port": 0,
        "models": {"m": {"engine": "simulated", "simulated_tok_per_s": 100}}})
    async with Node(config) as node:
        runner = node._runner  # noqa: SLF001 - the test inspects the real listening socket
        assert runner is not None
        sockets = [sock for site in runner.sites
                   for sock in (getattr(site._server, "sockets", None) or ())]  # noqa: SLF001
        assert sockets
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
