"""The per-request record at the HTTP edge: created for every request, read when it ends.

One middleware (just inside the error middleware, so it sees every status) creates the
:class:`~node.engine.record.RequestRecord`, lets the handler and whoever serves the
request fill it, and, once the answer is complete (streams: fully written), hands it to
its readers: the audit log (inference endpoints), the metrics and the request log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..audit.log import AuditLog, AuditRow, wait_committed
from ..common.clock import unix_ms
from ..common.errors import DVAIError
from ..constants import AUDIT_COMMIT_WAIT_S, MAX_METRIC_LABEL_CHARS, REQUEST_ID_HEADER, REQUEST_ID_MAX_CHARS
from ..engine.record import SERVED_LOCAL, RequestRecord
from ..security.guard import attribution_of, audit_peer_of
from .middlewares import REQUEST_ID

__all__ = ["CLIENT_CLOSED_STATUS", "INFERENCE_PATHS", "RECORD", "HandlerOutcome", "RecordReader",
           "audit_reader", "log_request", "make_record_middleware", "route_label"]

log = logging.getLogger("node.requests")

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"})
"""requests that get an audit row, served or refused."""

QUIET_PATHS = frozenset({"/v1/dvai/health", "/metrics"})
"""polled by peers and scrapers: their request log lines go to DEBUG, not INFO."""

CLIENT_CLOSED_STATUS = 499
"""status recorded when the client went away before the answer was complete (nginx's convention)."""

UNMATCHED = "unmatched"

RECORD = web.RequestKey("dvai_record", RequestRecord)
"""``request[RECORD]``: this request's record (set by the record middleware)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RecordReader = Callable[[RequestRecord], "concurrent.futures.Future[bool] | None"]
"""Called once per finished request; must not block (the audit log queues its row). A reader may
return a future that completes once what it recorded is durable (the audit row committed): when
the answer has not been sent yet (a JSON answer or an error), the middleware waits for it, at most
``AUDIT_COMMIT_WAIT_S``, before the answer leaves."""


def make_record_middleware(readers: Iterable[RecordReader], *,
                           now_ms: Callable[[], int] = unix_ms) -> Middleware:
    """Create each request's record and hand it to ``readers`` once the answer is complete."""
    listeners = tuple(readers)

    @web.middleware
    async def record_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        request_id = request.get(REQUEST_ID) or request.headers.get(REQUEST_ID_HEADER, "")[:REQUEST_ID_MAX_CHARS]
        record = RequestRecord(request_id=request_id, method=request.method,
                               endpoint=request.path, arrived_ms=now_ms())
        request[RECORD] = record
        started = time.monotonic()
        outcome = HandlerOutcome()

        def finish() -> list[concurrent.futures.Future[bool]]:
            record.route = route_label(request)
            record.status = outcome.status
            if outcome.code is not None:
                record.error_code = outcome.code
            record.latency_ms = round((time.monotonic() - started) * 1000, 3)
            record.app_id = attribution_of(request).app_id
            record.peer_device_id = audit_peer_of(request)
            pending = []
            for reader in listeners:
                try:
                    confirmation = reader(record)
                except Exception:  # noqa: BLE001 - observers never break a request
                    log.exception("request record reader %r failed", reader)
                    continue
                if confirmation is not None:
                    pending.append(confirmation)
            return pending

        try:
            response = await outcome.run(handler, request)
        except asyncio.CancelledError:
            finish()  # the client is gone: nothing to hold back
            raise
        except Exception:
            await _durable(finish())  # the error answer (written outside) leaves once recorded
            raise
        pending = finish()
        if not response.prepared:
            await _durable(pending)  # a JSON answer: on disk before it leaves
        # A stream was sent already: its row is committed by the writer right after (the
        # documented loss window, docs/security.md "Durability").
        return response

    return record_middleware


async def _durable(pending: list[concurrent.futures.Future[bool]]) -> None:
    for confirmation in pending:
        await wait_committed(confirmation, AUDIT_COMMIT_WAIT_S)


@dataclass(slots=True)
class HandlerOutcome:
    """How a request ended: the status and error code, whether it answered or raised."""

    status: int = 500
    code: str | None = "internal_error"

    async def run(self, handler: Handler, request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
            self.status, self.code = response.status, None
            return response
        except DVAIError as exc:
            self.status, self.code = exc.status, str(exc.code)
            raise
        except web.HTTPException as exc:
            self.status, self.code = exc.status, None
            raise
        except asyncio.CancelledError:
            self.status, self.code = CLIENT_CLOSED_STATUS, "client_closed_request"
            raise


def audit_reader(audit: AuditLog, *, paths: Collection[str] = INFERENCE_PATHS) -> RecordReader:
    """One audit row per request to ``paths``, served or refused."""
    watched = frozenset(paths)

    def read(record: RequestRecord) -> concurrent.futures.Future[bool] | None:
        if record.endpoint not in watched:
            return None
        return audit.record_confirmed(AuditRow(
            ts=record.arrived_ms, request_id=record.request_id, app_id=record.app_id,
            peer_device_id=record.peer_device_id, endpoint=record.endpoint, status=record.status,
            model_requested=record.model_requested, model_served=record.model_served,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            latency_ms=record.latency_ms, served_by=record.served_by or SERVED_LOCAL,
            error_code=record.error_code,
        ))

    return read


def log_request(record: RequestRecord) -> None:
    """One concise line per request: never prompt text, keys or signatures."""
    level = logging.DEBUG if record.endpoint in QUIET_PATHS else logging.INFO
    if not log.isEnabledFor(level):
        return
    parts = [f"{record.method} {record.endpoint} {record.status}"]
    if record.model_requested or record.model_served:
        parts.append(f"model={record.model_served or record.model_requested}")
    if record.completion_tokens is not None:
        parts.append(f"tokens={record.prompt_tokens or 0}+{record.completion_tokens}")
    parts.append(f"{record.latency_ms:.0f}ms")
    if record.served_by is not None:
        parts.append(f"served_by={record.served_by[:16]}")
    if record.error_code:
        parts.append(f"error={record.error_code}")
    if record.request_id:
        parts.append(f"id={record.request_id[:36]}")
    log.log(level, " ".join(parts))


def route_label(request: web.Request) -> str:
    """The matched route's pattern (``/v1/dvai/pairings/{device_id}``), else ``unmatched``."""
    resource = request.match_info.route.resource
    canonical = resource.canonical if resource is not None else None
    return canonical[:MAX_METRIC_LABEL_CHARS] if canonical else UNMATCHED
