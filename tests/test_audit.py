"""The audit log: off-loop writes, queries, retention, durability and file mode."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node.audit.log import AUDIT_FILE, AuditLog, AuditLogError, AuditRow
from node.config import AuditConfig

NOW = 1_778_184_673_778
DAY = 86_400_000


def row(ts: int = NOW, **changes: object) -> AuditRow:
    values: dict[str, object] = {
        "ts": ts, "request_id": f"req-{ts}", "app_id": "com.acme.chat", "peer_device_id": "phone-pixel-9",
        "endpoint": "/v1/chat/completions", "status": 200, "model_requested": "gemma3-270m",
        "model_served": "gemma3-270m", "prompt_tokens": 12, "completion_tokens": 34, "latency_ms": 56.5,
        "served_by": "local",
    }
    values.update(changes)
    return AuditRow(**values)  # type: ignore[arg-type]


async def open_log(tmp_path: Path, **options: object) -> AuditLog:
    return await AuditLog.open(tmp_path, AuditConfig(), now_ms=lambda: NOW, **options)


async def test_rows_are_written_by_the_writer_thread_not_the_loop(tmp_path: Path) -> None:
    writers: set[int] = set()
    release, holding = threading.Event(), threading.Event()

    def on_commit(count: int) -> None:
        writers.add(threading.get_ident())
        holding.set()
        release.wait(5)  # hold the writer: the loop must keep going

    log = await open_log(tmp_path, on_commit=on_commit, queue_max=50)
    try:
        log.record(row(NOW))
        assert await asyncio.to_thread(holding.wait, 5)
        started = time.monotonic()
        accepted = [log.record(row(NOW + i)) for i in range(1, 200)]
        assert time.monotonic() - started < 0.5
        assert sum(accepted) == 50 and log.dropped == 149
        release.set()
        await log.flush()
        assert writers and threading.get_ident() not in writers
        assert len(await log.query(limit=1000)) == 1 + sum(accepted)
    finally:
        release.set()
        await log.close()


async def test_query_filters_and_order(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    try:
        log.record(row(NOW - 3000, app_id="anonymous", peer_device_id="anonymous", status=401,
                       model_served=None, prompt_tokens=None, completion_tokens=None, error_code="signature_required"))
        log.record(row(NOW - 2000, peer_device_id="self", served_by="dv-peer"))
        log.record(row(NOW - 1000))
        log.record(row(NOW, status=503, error_code="no_capable_device"))
        newest_first = await log.query()
        assert [r.ts for r in newest_first] == [NOW, NOW - 1000, NOW - 2000, NOW - 3000]
        assert newest_first[-1] == row(NOW - 3000, app_id="anonymous", peer_device_id="anonymous", status=401,
                                       model_served=None, prompt_tokens=None, completion_tokens=None,
                                       error_code="signature_required")
        assert [r.ts for r in await log.query(since=NOW - 2000, until=NOW)] == [NOW - 1000, NOW - 2000]
        assert [r.ts for r in await log.query(app_id="anonymous")] == [NOW - 3000]
        assert [r.ts for r in await log.query(peer="self")] == [NOW - 2000]
        assert [r.ts for r in await log.query(status=503)] == [NOW]
        assert [r.ts for r in await log.query(limit=2)] == [NOW, NOW - 1000]
        assert await log.query(peer="nobody") == []
        assert newest_first[2].to_json()["servedBy"] == "dv-peer"
    finally:
        await log.close()


async def test_retention_by_age(tmp_path: Path) -> None:
    clock = [NOW]
    log = await AuditLog.open(tmp_path, AuditConfig(retention_days=1), now_ms=lambda: clock[0])
    try:
        log.record(row(NOW - 2 * DAY))
        log.record(row(NOW - DAY // 2))
        log.record(row(NOW))
        assert await log.prune() == 1
        assert [r.ts for r in await log.query()] == [NOW, NOW - DAY // 2]
        clock[0] = NOW + DAY
        assert await log.prune() == 1
        assert [r.ts for r in await log.query()] == [NOW]
    finally:
        await log.close()


async def test_retention_by_row_count(tmp_path: Path) -> None:
    log = await AuditLog.open(tmp_path, AuditConfig(max_rows=10), now_ms=lambda: NOW)
    try:
        for i in range(25):
            log.record(row(NOW - 25 + i))
        assert await log.prune() == 15
        kept = await log.query(limit=100)
        assert len(kept) == 10 and kept[-1].ts == NOW - 10
    finally:
        await log.close()


async def test_periodic_retention_runs_without_being_asked(tmp_path: Path) -> None:
    log = await AuditLog.open(tmp_path, AuditConfig(max_rows=5), now_ms=lambda: NOW, prune_interval_s=0.05)
    try:
        for i in range(20):
            log.record(row(NOW + i))
        for _ in range(100):
            if len(await log.query(limit=100)) == 5:
                break
            await asyncio.sleep(0.02)
        assert len(await log.query(limit=100)) == 5
    finally:
        await log.close()


async def test_close_flushes_and_rows_survive_reopen(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    for i in range(300):
        log.record(row(NOW + i))
    await log.close()
    assert log.record(row()) is False
    reopened = await open_log(tmp_path)
    try:
        assert len(await reopened.query(limit=1000)) == 300
    finally:
        await reopened.close()


async def test_database_files_are_private(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    log.record(row())
    await log.flush()
    names = await asyncio.to_thread(os.listdir, tmp_path)
    files = [tmp_path / name for name in names if name.startswith(AUDIT_FILE)]
    assert tmp_path / AUDIT_FILE in files
    for path in files:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    await log.close()


async def test_corrupt_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / AUDIT_FILE).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(AuditLogError, match="move it aside"):
        await open_log(tmp_path)


async def test_hostile_values_are_clipped(tmp_path: Path) -> None:
    log = await open_log(tmp_path)
    try:
        log.record(row(model_requested="m" * 10_000, app_id="a" * 1000))
        stored = (await log.query())[0]
        assert len(stored.model_requested or "") == 256 and len(stored.app_id) == 256
    finally:
        await log.close()


async def test_disabled_log_records_nothing(tmp_path: Path) -> None:
    log = await AuditLog.open(tmp_path, AuditConfig(enabled=False))
    assert log.record(row()) is False
    assert await log.query() == []
    await log.close()
    assert not (tmp_path / AUDIT_FILE).exists()


# --------------------------------------------------------------------------
# One row per inference request, served or refused, through the real middlewares


async def test_the_audit_reader_records_served_and_refused_requests(aiohttp_client: Any, tmp_path: Path) -> None:
    from aiohttp import web

    from node.api.record import RECORD, audit_reader, make_record_middleware
    from node.common.errors import DVAIError, ServiceUnavailableError
    from node.config import NodeConfig
    from node.pairing.store import Pairing, PairingStore
    from node.security.guard import make_security_middleware
    from node.security.signing import NonceCache, sign_request_headers

    store = PairingStore(tmp_path / "pairings.json")
    await store.add(Pairing(peer_device_id="dv-peer", peer_device_name="p", peer_app_id="com.acme.chat", key=b"k" * 32,
                            via="static", paired_at=NOW, role="inbound"))
    log = await open_log(tmp_path)

    @web.middleware
    async def render(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except DVAIError as exc:
            return web.json_response(exc.to_body(), status=exc.status)

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        record = request[RECORD]
        record.requested(body["model"])
        if body["model"] == "busy":
            raise ServiceUnavailableError("no capable device", code="no_capable_device")
        record.served("dv-big", model="gemma3-270m", prompt_tokens=7, completion_tokens=9)
        return web.json_response({"ok": True})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"data": []})

    app = web.Application(middlewares=[
        render,
        make_record_middleware([audit_reader(log)], now_ms=lambda: NOW),
        make_security_middleware(NodeConfig(http_bind_host="0.0.0.0"), store, NonceCache(), now_ms=lambda: NOW,
                                 remote_addr=lambda r: r.headers.get("X-Test-Remote-Addr", r.remote),
                                 render_errors=False),
    ])
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    client = await aiohttp_client(app)
    body = b'{"model":"gemma3-270m"}'
    lan = {"X-Test-Remote-Addr": "192.168.1.20"}
    try:
        signed = sign_request_headers(b"k" * 32, "dv-peer", "com.acme.chat", "POST", "/v1/chat/completions", body,
                                      now_ms=NOW)
        calls = [
            ({**lan, **signed, "X-Request-Id": "r-signed"}, body, 200),
            ({**lan, "X-Request-Id": "r-refused"}, body, 401),
            ({"X-Request-Id": "r-local"}, body, 200),
            ({"X-Request-Id": "r-busy"}, b'{"model":"busy"}', 503),
        ]
        for headers, data, status in calls:
            async with client.post("/v1/chat/completions", data=data, headers=headers) as response:
                assert response.status == status
        async with client.get("/v1/models") as response:
            assert response.status == 200
        await log.flush()
        rows = {r.request_id: r for r in await log.query()}
        assert set(rows) == {"r-signed", "r-refused", "r-local", "r-busy"}  # /v1/models is not inference
        signed_row = rows["r-signed"]
        assert (signed_row.peer_device_id, signed_row.app_id, signed_row.status) == ("dv-peer", "com.acme.chat", 200)
        assert (signed_row.model_served, signed_row.prompt_tokens, signed_row.served_by) == ("gemma3-270m", 7, "dv-big")
        assert signed_row.latency_ms is not None and signed_row.ts == NOW
        refused = rows["r-refused"]
        assert (refused.status, refused.error_code, refused.peer_device_id) == (401, "signature_required", "anonymous")
        assert rows["r-local"].peer_device_id == "self" and rows["r-local"].app_id == "anonymous"
        busy = rows["r-busy"]
        assert (busy.status, busy.error_code, busy.model_requested) == (503, "no_capable_device", "busy")
    finally:
        await log.close()


async def test_a_value_sqlite_cannot_bind_loses_nothing_else(tmp_path: Path) -> None:
    """A value of the wrong type is stored as NULL; a row that still cannot be stored (NULL status)
    is dropped alone and counted, and the rows around it are written."""
    now = int(time.time() * 1000)  # rows older than the retention would be pruned by the first pass
    audit = AuditLog(tmp_path / "audit.sqlite3")
    await audit.start()
    try:
        audit.record(row(now, prompt_tokens=object()))  # type: ignore[arg-type]
        audit.record(row(now + 1, status="x"))  # type: ignore[arg-type]
        audit.record(row(now + 2))
        await audit.flush()
        audit.record(row(now + 3))
        stored = await asyncio.wait_for(audit.query(), 5)
        assert [r.ts for r in stored] == [now + 3, now + 2, now]
        assert stored[-1].prompt_tokens is None
        assert audit.health()["writeErrors"] == 1 and audit.health()["state"] == "ok"
    finally:
        await audit.close()


async def test_bad_rows_and_failing_writes_do_not_stop_the_writer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Lone surrogates and out-of-range numbers are made storable; a write that fails is counted,
    shown by health() as failing, and the next rows are written again."""
    import node.audit.log as audit_module

    now = int(time.time() * 1000)  # rows older than the retention would be pruned
    audit = AuditLog(tmp_path / "audit.sqlite3")
    await audit.start()
    try:
        assert await audit.record_durably(row(now, request_id="\udcff\udcfe", model_requested="\ud800x",
                                              prompt_tokens=10**30, latency_ms=float("inf")))
        stored = (await audit.query())[0]
        assert stored.request_id == "\\udcff\\udcfe" and stored.model_requested == "\\ud800x"
        assert stored.prompt_tokens == 2**63 - 1 and stored.latency_ms is None
        real = audit_module._row_values
        monkeypatch.setattr(audit_module, "_row_values", lambda r: (_ for _ in ()).throw(RuntimeError("disk")))
        assert await audit.record_durably(row(now + 1)) is False  # failed, counted, not raised
        assert audit.health()["state"] == "failing" and audit.health()["writeErrors"] == 1
        assert "disk" in (audit.health()["lastError"] or "")
        monkeypatch.setattr(audit_module, "_row_values", real)
        assert await audit.record_durably(row(now + 2))
        assert audit.health()["state"] == "ok" and audit.health()["writeErrors"] == 1
        assert [r.ts for r in await audit.query()] == [now + 2, now]
    finally:
        await audit.close()
    assert audit.health()["state"] == "stopped"


async def test_a_dead_writer_fails_callers_instead_of_hanging(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(conn: object, batch: object) -> tuple[int, bool]:
        raise RuntimeError("a bug in the writer")

    audit = AuditLog(tmp_path / "audit.sqlite3")
    await audit.start()
    try:
        monkeypatch.setattr(audit, "_process", broken)
        audit.record(row())  # the writer thread dies on an unexpected error
        with pytest.raises(AuditLogError):
            await asyncio.wait_for(audit.query(), 5)
        assert audit.record(row()) is False  # later rows are dropped, not queued forever
    finally:
        await asyncio.wait_for(audit.close(), 5)
