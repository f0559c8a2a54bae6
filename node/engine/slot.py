"""One loaded model: its state, its worker thread, its request queue, and the bridge to asyncio.

Requests for the same model wait their turn in arrival order in the model's
``ModelQueue`` (``queue.py``: bounded, FIFO). Tokens travel from the worker
thread to the event loop with ``call_soon_threadsafe`` as they are produced;
cancelling the consuming task stops the generation at the next token. The
slot's ``SlotState`` changes only through ``ModelSlot._set_state``, which logs
``old -> new``.
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
from enum import StrEnum

from ..common.errors import (
    DVAIError,
    EngineError,
    GenerationStalledError,
    GenerationTimeoutError,
    ModelUnavailableError,
)
from .base import ChatMessage, EmbeddingResult, Engine, GenerationOutcome, ModelInfo, SamplingParams
from .queue import ModelQueue
from .tools import FunctionTool

log = logging.getLogger(__name__)



class SlotState(StrEnum):
    """A model slot's life cycle; the values are the ``state`` strings of the JSON APIs."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"

OutcomeListener = Callable[[ModelInfo, GenerationOutcome], None]


@dataclass(frozen=True, slots=True)
class GenerationJob:
    """What to generate: a raw prompt, or chat messages rendered by the engine."""

    params: SamplingParams
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    tools: tuple[FunctionTool, ...] = ()
    """function tools the chat's prompt presents to the model."""


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
                    prompt, stops = engine.render_chat(list(job.messages), job.tools)
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
        self.queue = ModelQueue(engine.info.id, limit=queue_depth)
        self.keep_alive = keep_alive
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{engine.info.id}")
        self.state = SlotState.UNLOADED
        self.error: str | None = None
        self.last_used = time.monotonic()
        self._load_lock = asyncio.Lock()
        self._listeners: list[OutcomeListener] = []

    # -- state -------------------------------------------------------------
    def _set_state(self, new: SlotState, *, error: str | None = None) -> None:
        """The one place the state changes (``error`` is kept only with ``FAILED``)."""
        old, self.state, self.error = self.state, new, error
        log.debug("model %s: %s -> %s%s", self.info.id, old.value, new.value, f" ({error})" if error else "")

    @property
    def loaded(self) -> bool:
        return self.state is SlotState.READY

    # -- queue -------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self.queue.waiting

    @property
    def queue_depth(self) -> int:
        """Requests waiting plus the one running."""
        return self.queue.depth

    @property
    def queue_depth_limit(self) -> int:
        return self.queue.limit

    @property
    def busy(self) -> bool:
        return self.queue.busy

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """This request's turn in the model's queue; the slot counts as used when it ends."""
        async with self.queue.turn():
            try:
                yield
            finally:
                self.last_used = time.monotonic()

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
        if self.loaded:
            return
        async with self._load_lock:
            if self.loaded:  # another request loaded it while this one waited
                return
            self._set_state(SlotState.LOADING)
            started = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.load)
            except Exception as exc:
                error = exc.message if isinstance(exc, DVAIError) else str(exc)
                self._set_state(SlotState.FAILED, error=error)
                raise ModelUnavailableError(
                    f"model '{self.info.id}' could not be loaded: {error}", retry_after=30
                ) from exc
            self._set_state(SlotState.READY)
            log.info("model %s loaded in %.1f s", self.info.id, time.perf_counter() - started)

    async def unload(self) -> None:
        async with self._load_lock:
            if self.state is not SlotState.READY:
                return
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.close)
            self._set_state(SlotState.UNLOADED)
            log.info("model %s unloaded", self.info.id)

    async def close(self) -> None:
        await self.unload()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_used

    def keep_alive_left(self, now: float) -> float | None:
        """Seconds until the idle reaper may unload this model; None when it stays (no
        ``keep_alive``) or is not loaded. ``now`` is ``time.monotonic()``."""
        if self.keep_alive is None or not self.loaded:
            return None
        return max(0.0, self.keep_alive - self.idle_for(now))

    # -- observers ---------------------------------------------------------
    def add_listener(self, listener: OutcomeListener) -> None:
        self._listeners.append(listener)

    def notify(self, outcome: GenerationOutcome) -> None:
        for listener in self._listeners:
            try:
                listener(self.info, outcome)
            except Exception:  # noqa: BLE001 - an observer never breaks a request
                log.exception("generation listener failed")
