"""One loaded model: its worker thread, its FIFO queue, and the bridge to asyncio.

Requests for the same model wait their turn in arrival order; the queue is
bounded, and a request whose client leaves while waiting is simply dropped
(its task is cancelled while it awaits the lock). Tokens travel from the
worker thread to the event loop with ``call_soon_threadsafe`` as they are
produced; cancelling the consuming task stops the generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

from ..common.errors import (
    DVAIError,
    EngineError,
    GenerationStalledError,
    GenerationTimeoutError,
    ModelUnavailableError,
    QueueFullError,
)
from ..constants import QUEUE_RETRY_AFTER
from .base import ChatMessage, EmbeddingResult, Engine, GenerationOutcome, ModelInfo, SamplingParams

log = logging.getLogger(__name__)

SlotState = Literal["unloaded", "loading", "ready", "failed"]
OutcomeListener = Callable[[ModelInfo, GenerationOutcome], None]


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """What to generate: a raw prompt, or chat messages rendered by the engine."""

    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None


class Generation:
    """A running generation: iterate for text deltas, then read ``outcome``.

    Use it as ``async with slot.generate(job) as gen: async for text in gen: …``
    so that leaving early (or being cancelled) always stops the engine.
    """

    def __init__(self, slot: ModelSlot, job: GenerationJob, timeout: float, max_blank: int) -> None:
        self._slot = slot
        self._job = job
        self._timeout = timeout
        self._max_blank = max_blank
        self.outcome: GenerationOutcome | None = None
        self._iterator: AsyncIterator[str] | None = None

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        if self._iterator is not None:
            await self._iterator.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> str:
        return "".join([text async for text in self])

    async def _run(self) -> AsyncIterator[str]:
        slot = self._slot
        async with slot.turn():
            await slot.ensure_loaded()
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            cancel = threading.Event()
            job = self._job

            def sink(text: str) -> None:
                loop.call_soon_threadsafe(queue.put_nowait, text)

            def work() -> GenerationOutcome:
                engine = slot.engine
                if job.messages is not None:
                    prompt, stops = engine.render_chat(list(job.messages))
                    params = job.params
                    if stops:
                        from dataclasses import replace

                        params = replace(params, stop=tuple(dict.fromkeys((*params.stop, *stops))))
                else:
                    prompt, params = job.prompt or "", job.params
                try:
                    return engine.generate(prompt, params, sink, cancel)
                except DVAIError as exc:
                    if exc.param in ("messages", "prompt"):  # name the field the client sent
                        exc.param = "messages" if job.messages is not None else "prompt"
                    raise

            future = loop.run_in_executor(slot.executor, work)
            future.add_done_callback(lambda _f: queue.put_nowait(None))
            deadline = loop.time() + self._timeout
            blank = 0
            try:
                while True:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise GenerationTimeoutError(
                            f"generation took longer than {self._timeout:g} s (generation_timeout)"
                        )
                    try:
                        text = await asyncio.wait_for(queue.get(), remaining)
                    except TimeoutError:
                        continue
                    if text is None:
                        break
                    if not text:
                        blank += 1
                        if blank >= self._max_blank:
                            raise GenerationStalledError(
                                f"the model produced {blank} empty chunks in a row (max_blank_chunks)"
                            )
                        continue
                    blank = 0
                    yield text
                self.outcome = _result(future)
                slot.notify(self.outcome)
            finally:
                cancel.set()
                if not future.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(future)


def _result(future: asyncio.Future[GenerationOutcome]) -> GenerationOutcome:
    try:
        return future.result()
    except DVAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine internals never reach the client
        log.exception("engine failure")
        raise EngineError("the engine failed while generating; see the node log") from exc


class ModelSlot:
    """Owns one engine, the single thread that runs it, and its request queue."""

    def __init__(self, engine: Engine, *, queue_depth: int, keep_alive: float | None = None) -> None:
        self.engine = engine
        self.info = engine.info
        self.queue_depth_limit = queue_depth
        self.keep_alive = keep_alive
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{engine.info.id}")
        self.state: SlotState = "unloaded"
        self.error: str | None = None
        self.last_used = time.monotonic()
        self._lock = asyncio.Lock()
        self._load_lock = asyncio.Lock()
        self._waiting = 0
        self._running = 0
        self._listeners: list[OutcomeListener] = []

    # -- queue -------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def queue_depth(self) -> int:
        """Requests waiting plus the one running."""
        return self._waiting + self._running

    @property
    def busy(self) -> bool:
        return self._lock.locked() or self._waiting > 0

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        if self._lock.locked() and self._waiting >= self.queue_depth_limit:
            raise QueueFullError(
                f"model '{self.info.id}' has {self._waiting} requests waiting (queue_depth "
                f"{self.queue_depth_limit}); retry later",
                retry_after=QUEUE_RETRY_AFTER,
            )
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._running = 1
        try:
            yield
        finally:
            self._running = 0
            self.last_used = time.monotonic()
            self._lock.release()

    # -- work --------------------------------------------------------------
    def generate(self, job: GenerationJob, *, timeout: float, max_blank: int) -> Generation:
        return Generation(self, job, timeout, max_blank)

    async def embed(self, inputs: list[str]) -> EmbeddingResult:
        async with self.turn():
            await self.ensure_loaded()
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(self.executor, self.engine.embed, inputs)
            try:
                return await asyncio.shield(future)
            except DVAIError:
                raise
            except asyncio.CancelledError:
                with contextlib.suppress(BaseException):
                    await future
                raise
            except Exception as exc:  # noqa: BLE001
                log.exception("embedding failure")
                raise EngineError("the engine failed while embedding; see the node log") from exc

    # -- lifecycle ---------------------------------------------------------
    async def ensure_loaded(self) -> None:
        if self.state == "ready":
            return
        async with self._load_lock:
            if self.state == "ready":  # type: ignore[comparison-overlap]  # loaded while we waited
                return
            self.state = "loading"
            started = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.load)
            except Exception as exc:
                self.state = "failed"
                self.error = exc.message if isinstance(exc, DVAIError) else str(exc)
                raise ModelUnavailableError(
                    f"model '{self.info.id}' could not be loaded: {self.error}", retry_after=30
                ) from exc
            self.state, self.error = "ready", None
            log.info("model %s loaded in %.1f s", self.info.id, time.perf_counter() - started)

    async def unload(self) -> None:
        async with self._load_lock:
            if self.state != "ready":
                return
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.close)
            self.state = "unloaded"
            log.info("model %s unloaded", self.info.id)

    async def close(self) -> None:
        await self.unload()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_used

    # -- observers ---------------------------------------------------------
    def add_listener(self, listener: OutcomeListener) -> None:
        self._listeners.append(listener)

    def notify(self, outcome: GenerationOutcome) -> None:
        for listener in self._listeners:
            try:
                listener(self.info, outcome)
            except Exception:  # noqa: BLE001 - an observer never breaks a request
                log.exception("generation listener failed")
