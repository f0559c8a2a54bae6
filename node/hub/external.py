"""External engines: models served by another OpenAI-compatible server (Ollama, llama-server,
vLLM, LM Studio, ``llama_cpp.server``, a cloud endpoint), listed and routed like local ones.

Each ``[[hub.external_engines]]`` entry names the server's base URL, an optional API key and
the models it serves. Requests for those models are relayed to it event by event (the same
forwarder and relay as offload to a peer, authenticated with ``Authorization: Bearer``), at
most ``max_concurrent`` at a time with a bounded wait behind them; a health check
(``GET <base>/models``) every ``health_interval`` seconds marks it up or down, and a request
while it is down gets ``503 external_engine_unavailable`` at once. A request it cannot be
reached for (refused connection, no answer in time) marks it down too; one it answers with an
HTTP error leaves it up: ``400 external_engine_refused`` for a 4xx, ``502
external_engine_error`` otherwise, with its message. Audit rows, metrics, quotas
and substitution treat these models like local ones; ``served_by`` is ``external:<name>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from ..common.errors import (
    DVAIError,
    InvalidRequestError,
    QueueFullError,
    ServiceUnavailableError,
    UpstreamError,
)
from ..config import ExternalEngineConfig
from ..constants import QUEUE_RETRY_AFTER
from ..engine.record import RequestRecord
from ..offload.forward import (
    ForwardCall,
    Forwarder,
    ForwardFailed,
    ForwardSettings,
    ForwardTarget,
    PeerAnswer,
)
from ..transport.http_link import HttpPeerLink

__all__ = ["ExternalEngine", "ExternalEngines"]

log = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0
"""seconds an external engine's health check may take before it counts as down."""


class ExternalEngine:
    def __init__(self, config: ExternalEngineConfig, session: aiohttp.ClientSession, forwarder: Forwarder) -> None:
        self.config = config
        self.name = config.name
        self.served_by = f"external:{config.name}"
        self._session = session
        self._forwarder = forwarder
        self._target = ForwardTarget(self.served_by, HttpPeerLink(session, config.base_url), None,
                                     bearer=config.api_key or None)
        self._slots = asyncio.Semaphore(config.max_concurrent)
        self._waiting = 0
        self._running = 0
        self.healthy = True
        self.last_error: str | None = None
        self.checked_at: float | None = None

    @property
    def models(self) -> tuple[str, ...]:
        return self.config.models

    async def open(self, call: ForwardCall, model: str, record: RequestRecord | None,
                   on_finished: Callable[[PeerAnswer], None] | None = None) -> PeerAnswer:
        """Relay ``call`` to the server; the answer holds one of its concurrency slots until closed."""
        if not self.healthy:
            raise ServiceUnavailableError(f"the external engine '{self.name}' is down: {self.last_error}",
                                          code="external_engine_unavailable", retry_after=self.config.health_interval)
        if self._slots.locked() and self._waiting >= self.config.max_waiting:
            raise QueueFullError(f"the external engine '{self.name}' has {self._waiting} requests waiting",
                                 retry_after=QUEUE_RETRY_AFTER)
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        self._running += 1

        def finished(answer: PeerAnswer) -> None:
            self._release()
            result = answer.result
            if record is not None:
                record.served(self.served_by, model=model, prompt_tokens=result.outcome.prompt_tokens,
                              completion_tokens=result.tokens, first_token_s=result.first_byte_s,
                              decode_tok_per_s=result.outcome.decode_tok_per_s, via="external")
            if on_finished is not None:
                on_finished(answer)

        try:
            return await self._forwarder.open(self._target, call, on_finished=finished)
        except ForwardFailed as exc:
            self._release()
            if exc.status is not None:  # it answered, so it is up: this request is what it refused
                raise answered_error(self.name, exc.status, str(exc)) from None
            self.healthy, self.last_error = False, str(exc)
            log.warning("external engine %s failed: %s", self.name, exc)
            raise ServiceUnavailableError(f"the external engine '{self.name}' failed: {exc}",
                                          code="external_engine_unavailable",
                                          retry_after=self.config.health_interval) from None
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        self._running -= 1
        self._slots.release()

    async def check(self) -> bool:
        """``GET <base>/models``: up when it answers 200 with a JSON object. Skipped while requests
        run there: they prove it is up, and some servers (``llama_cpp.server``) cut a running
        stream short when another request arrives."""
        if self._running:
            return self.healthy
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT_S):
                async with self._session.get(self.config.base_url.rstrip("/") + "/models", headers=headers) as r:
                    body = await r.json(content_type=None) if r.status == 200 else None
            ok, error = isinstance(body, dict), None if isinstance(body, dict) else "no model list"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if ok != self.healthy:
            log.warning("external engine %s is %s%s", self.name, "up" if ok else "down", f" ({error})" if error else "")
        self.healthy, self.last_error, self.checked_at = ok, error, time.time()
        return ok


def answered_error(name: str, status: int, message: str) -> DVAIError:
    """The client's error for an HTTP error status an external engine answered a request with."""
    if 400 <= status < 500 and status not in (408, 429):
        return InvalidRequestError(f"the external engine '{name}' refused the request: {message}",
                                   code="external_engine_refused")
    return UpstreamError(f"the external engine '{name}' failed the request: {message}", code="external_engine_error")


class ExternalEngines:
    """Every configured external engine, by the models they serve, with their health checks."""

    def __init__(self, configs: tuple[ExternalEngineConfig, ...], session: aiohttp.ClientSession,
                 forward: ForwardSettings, device_id: str) -> None:
        forwarder = Forwarder(device_id=device_id, settings=forward)
        self.engines = [ExternalEngine(config, session, forwarder) for config in configs]
        self._by_model = {model: engine for engine in self.engines for model in engine.models}
        self._task: asyncio.Task[None] | None = None

    def __bool__(self) -> bool:
        return bool(self.engines)

    def engine_for(self, model: str) -> ExternalEngine | None:
        return self._by_model.get(model)

    def model_ids(self) -> list[str]:
        return list(self._by_model)

    def list_models(self, created: int) -> list[dict[str, Any]]:
        return [{"id": model, "object": "model", "created": created, "owned_by": engine.served_by,
                 "serves": ["chat", "completion"], "aliases": [], "loaded": engine.healthy}
                for model, engine in self._by_model.items()]

    async def start(self) -> None:
        if self.engines and self._task is None:
            await asyncio.gather(*(engine.check() for engine in self.engines))
            self._task = asyncio.create_task(self._watch(), name="external-engine-health")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(min(engine.config.health_interval for engine in self.engines))
            await asyncio.gather(*(engine.check() for engine in self.engines))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
