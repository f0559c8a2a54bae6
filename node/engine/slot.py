"""One loaded model: its state, its worker thread, its request queue, and the bridge to asyncio.

A batching engine serves ``parallel`` sequences at once (one step loop on the
worker thread decodes a token for each of them per step); requests beyond the
free seats wait their turn in the model's ``ModelQueue`` (``queue.py``: bounded,
fair across apps, each app's requests in arrival order). Tokens travel from the worker
thread to the event loop as they are produced, a step's worth in one
``call_soon_threadsafe`` (``_Handoff``); cancelling the consuming task stops that
sequence at the next step. The slot's ``SlotState`` changes only through
``ModelSlot._set_state``, which logs
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
from typing import Any

from ..common.errors import (
    DVAIError,
    EngineError,
    GenerationStalledError,
    InvalidRequestError,
    ModelUnavailableError,
)
from .base import (
    BatchEngine,
    ChatMessage,
    Delta,
    EmbeddingResult,
    Engine,
    GenerationOutcome,
    ModelInfo,
    SamplingParams,
    SequenceRequest,
    prompt_and_params,
)
from .embedding import BatchEmbedder, EmbeddingJob
from .queue import NO_APP, ModelQueue
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
    n: int = 1
    """choices sampled from one evaluation of the prompt (at most the model's ``parallel``)."""
    tools: tuple[FunctionTool, ...] = ()
    """function tools the chat's prompt presents to the model."""


class Generation:
    """A running generation: iterate for text deltas, then read ``outcome``.

    Use it as ``async with slot.generate(job) as gen: async for text in gen: …``
    so that leaving early (or being cancelled) always stops the engine. A job with
    ``n > 1`` choices (or logprobs) is read with :meth:`deltas` instead, which yields
    :class:`Delta` values carrying the choice index; ``outcomes`` then has one entry
    per choice.
    """

    def __init__(self, slot: ModelSlot, job: GenerationJob, timeout: float, max_blank: int,
                 keep_alive: float | None = None, app: str = NO_APP) -> None:
        self._slot = slot
        self._job = job
        self._keep_alive = keep_alive
        self._app = app
        self._timeout = timeout
        self._max_blank = max_blank
        self.outcome: GenerationOutcome | None = None
        self.outcomes: list[GenerationOutcome] = []
        self._iterator: AsyncIterator[Delta] | None = None

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> AsyncIterator[str]:
        return self._texts()

    async def _texts(self) -> AsyncIterator[str]:
        async for delta in self.deltas():
            if delta.text:
                yield delta.text

    def deltas(self) -> AsyncIterator[Delta]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    async def aclose(self) -> None:
        if self._iterator is not None:
            await self._iterator.aclose()  # type: ignore[attr-defined]

    async def collect(self) -> str:
        return "".join([text async for text in self])

    async def _run(self) -> AsyncIterator[Delta]:
        slot = self._slot
        job = self._job
        async with slot.turn(seats=job.n, keep_alive=self._keep_alive, app=self._app):
            await slot.ensure_loaded()
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[Delta | None] = asyncio.Queue()
            cancel = threading.Event()
            future = slot.start(job, queue, cancel)
            # One timer for the whole generation (not a ``wait_for`` per token): like max_tokens,
            # the engine stops at the next token, the text so far is kept, and the outcome's
            # finish_reason stays "length".
            timer = loop.call_later(self._timeout, _time_out, slot.info.id, self._timeout, cancel)
            blank = [0] * job.n
            try:
                while True:
                    delta = await queue.get()
                    if delta is None:
                        break
                    if not delta.text and not delta.logprobs:
                        blank[delta.index] += 1
                        if blank[delta.index] >= self._max_blank:
                            raise GenerationStalledError(
                                f"the model produced {blank[delta.index]} empty chunks in a row "
                                "(max_blank_chunks)"
                            )
                        continue
                    blank[delta.index] = 0
                    yield delta
                self.outcomes = _result(future)
                self.outcome = self.outcomes[0]
                for outcome in self.outcomes:
                    slot.notify(outcome)
            finally:
                timer.cancel()
                cancel.set()
                if not future.done():
                    with contextlib.suppress(BaseException):
                        await asyncio.shield(future)


def _time_out(model_id: str, timeout: float, cancel: threading.Event) -> None:
    if not cancel.is_set():
        log.info("generation on %s reached generation_timeout (%g s); ending it", model_id, timeout)
        cancel.set()


class _Handoff:
    """The worker thread's reports (deltas, results) to the event loop, in bursts.

    A step of the batching engine reports a token for every running sequence: each report
    is queued here, and only the first of a burst wakes the event loop
    (``call_soon_threadsafe``: a lock, a self-pipe write, a wake-up); the rest ride along with it.
    Reports run on the loop in the order they were posted.
    """

    __slots__ = ("_items", "_lock", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: list[tuple[Callable[[Any], None], Any]] = []
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, callback: Callable[[Any], None], arg: Any) -> None:
        """On any thread: run ``callback(arg)`` on the loop soon."""
        with self._lock:
            self._items.append((callback, arg))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for callback, arg in items:
            try:
                callback(arg)
            except Exception:  # noqa: BLE001 - one report's failure never drops the others
                log.exception("a worker report failed on the event loop")


def _log_runner_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("the model's step loop failed", exc_info=future.exception())


def _result(future: asyncio.Future[list[GenerationOutcome]]) -> list[GenerationOutcome]:
    try:
        return future.result()
    except DVAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine internals never reach the client
        log.exception("engine failure")
        raise EngineError("the engine failed while generating; see the node log") from exc


def _name_field(exc: BaseException, job: GenerationJob) -> BaseException:
    if isinstance(exc, DVAIError) and exc.param in ("messages", "prompt"):  # the field the client sent
        exc.param = "messages" if job.messages is not None else "prompt"
    return exc


class ModelSlot:
    """Owns one engine, the single thread that runs it, and its request queue."""

    def __init__(self, engine: Engine, *, queue_depth: int, keep_alive: float | None = None) -> None:
        self.engine = engine
        self.info = engine.info
        self.parallel = engine.parallel if isinstance(engine, BatchEngine) else 1
        self.queue = ModelQueue(engine.info.id, limit=queue_depth, seats=self.parallel)
        self.keep_alive = keep_alive
        """the configured keep_alive: seconds an idle model stays loaded (None: for ever)."""
        self.current_keep_alive = keep_alive
        """the keep_alive in force: the last request's own ``keep_alive``, else the configured one."""
        self._unloading: asyncio.Task[None] | None = None
        self.has_loaded = False
        """the model has been loaded at least once (unloaded since is not "still loading")."""
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"model-{engine.info.id}")
        self.state = SlotState.UNLOADED
        self.error: str | None = None
        self.last_used = time.monotonic()
        self._load_lock = asyncio.Lock()
        self._listeners: list[OutcomeListener] = []
        self._handoff: _Handoff | None = None

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
    def running(self) -> int:
        """Requests holding seats now."""
        return self.queue.running

    @property
    def active_sequences(self) -> int:
        """Seats taken (one per choice of each running request)."""
        return self.queue.seats_taken

    def engine_stats(self) -> dict[str, float]:
        """The batching engine's counters (prefill/decode time and tokens, prompt-cache hits)."""
        engine = self.engine
        return engine.stats() if isinstance(engine, BatchEngine) else {}

    def seat_states(self) -> list[dict[str, object]]:
        engine = self.engine
        if isinstance(engine, BatchEngine) and self.loaded:
            return engine.seat_states()
        return []

    @property
    def queue_depth(self) -> int:
        """Requests waiting plus those running."""
        return self.queue.depth

    @property
    def queue_depth_limit(self) -> int:
        return self.queue.limit

    @property
    def busy(self) -> bool:
        return self.queue.busy

    @contextlib.asynccontextmanager
    async def turn(self, seats: int = 1, *, keep_alive: float | None = None,
                   app: str = NO_APP) -> AsyncIterator[None]:
        """This request's ``seats`` (all of them: ``seats=slot.parallel``, an exclusive turn) in the
        model's queue, scheduled fairly among the waiting requests of other apps (``app``: the
        caller's app id; ``NO_APP`` for a caller without one); the slot counts as used when it ends.

        ``keep_alive`` (seconds; negative: for ever) is how long the model stays loaded once the
        request is done (Ollama's per-request ``keep_alive``); unset: the configured one.
        """
        if not 1 <= seats <= self.parallel:
            raise InvalidRequestError(
                f"model '{self.info.id}' serves at most {self.parallel} sequences at once "
                f"(its 'parallel' setting); asked for {seats}",
                param="n",
            )
        try:
            async with self.queue.turn(seats, app=app):
                try:
                    yield
                finally:
                    self.last_used = time.monotonic()
                    if keep_alive is not None:
                        self.current_keep_alive = None if keep_alive < 0 else keep_alive
                    else:
                        self.current_keep_alive = self.keep_alive
        finally:
            if self.current_keep_alive == 0 and not self.busy and self.loaded:
                self._unload_soon()

    def _unload_soon(self) -> None:
        if self._unloading is None or self._unloading.done():
            self._unloading = asyncio.get_running_loop().create_task(
                self._unload_quietly(), name=f"unload-{self.info.id}")

    async def _unload_quietly(self) -> None:
        try:
            await self.unload()
        except Exception:  # noqa: BLE001 - the next request loads it again
            log.exception("could not unload model %s", self.info.id)

    # -- work --------------------------------------------------------------
    def generate(self, job: GenerationJob, *, timeout: float, max_blank: int,
                 keep_alive: float | None = None, app: str = NO_APP) -> Generation:
        return Generation(self, job, timeout, max_blank, keep_alive, app)

    def start(
        self, job: GenerationJob, queue: asyncio.Queue[Delta | None], cancel: threading.Event
    ) -> asyncio.Future[list[GenerationOutcome]]:
        """Start ``job`` on the engine (the caller holds its seats); deltas go to ``queue``.

        The returned future resolves with one outcome per choice once the engine has
        finished the job and freed its sequences; ``None`` then ends the queue.
        """
        loop = asyncio.get_running_loop()
        engine = self.engine

        handoff = self._handoff
        if handoff is None or handoff.loop is not loop:
            handoff = self._handoff = _Handoff(loop)
        put = queue.put_nowait

        def on_delta(delta: Delta) -> None:
            handoff.post(put, delta)

        if isinstance(engine, BatchEngine):
            future: asyncio.Future[list[GenerationOutcome]] = loop.create_future()

            def settle(result: list[GenerationOutcome] | BaseException) -> None:
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(_name_field(result, job))
                    else:
                        future.set_result(result)
                queue.put_nowait(None)

            def on_done(result: list[GenerationOutcome] | BaseException) -> None:
                handoff.post(settle, result)

            request = SequenceRequest(
                params=job.params, on_delta=on_delta, on_done=on_done, cancel=cancel,
                prompt=job.prompt, messages=job.messages, n=job.n, tools=job.tools,
            )
            if engine.submit(request):
                runner = loop.run_in_executor(self.executor, engine.run)
                runner.add_done_callback(_log_runner_failure)
            return future
        return self._start_serial(job, on_delta, queue, cancel)

    def _start_serial(
        self,
        job: GenerationJob,
        on_delta: Callable[[Delta], None],
        queue: asyncio.Queue[Delta | None],
        cancel: threading.Event,
    ) -> asyncio.Future[list[GenerationOutcome]]:
        """An engine without batching: one ``generate`` call on the worker thread."""
        engine = self.engine
        if job.n != 1:
            raise InvalidRequestError(f"model '{self.info.id}' serves one choice per request", param="n")

        def work() -> list[GenerationOutcome]:
            prompt, params = prompt_and_params(engine, job.messages, job.tools, job.prompt, job.params)
            try:
                return [engine.generate(prompt, params, lambda text: on_delta(Delta(0, text)), cancel)]
            except DVAIError as exc:
                raise _name_field(exc, job) from None

        future = asyncio.get_running_loop().run_in_executor(self.executor, work)
        future.add_done_callback(lambda _f: queue.put_nowait(None))
        return future

    async def embed(self, inputs: list[str], *, keep_alive: float | None = None,
                    app: str = NO_APP) -> EmbeddingResult:
        """The vectors of ``inputs``. An engine that batches embeddings (``BatchEmbedder``) takes
        one seat per request: up to ``parallel`` requests share its batches; any other engine
        serves one request at a time."""
        engine = self.engine
        batching = isinstance(engine, BatchEmbedder)
        async with self.turn(seats=1 if batching else self.parallel, keep_alive=keep_alive, app=app):
            await self.ensure_loaded()
            if isinstance(engine, BatchEmbedder):
                return await self._embed_batched(engine, inputs)
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

    async def _embed_batched(self, engine: BatchEmbedder, inputs: list[str]) -> EmbeddingResult:
        """Hand ``inputs`` to the engine's collector; a cancelled caller's result is dropped."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[EmbeddingResult] = loop.create_future()

        def settle(result: EmbeddingResult | BaseException) -> None:
            if future.done():
                return
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

        def on_done(result: EmbeddingResult | BaseException) -> None:
            loop.call_soon_threadsafe(settle, result)

        job = EmbeddingJob(inputs=tuple(inputs), on_done=on_done)
        if engine.submit_embedding(job):
            runner = loop.run_in_executor(self.executor, engine.run_embeddings)
            runner.add_done_callback(_log_runner_failure)
        try:
            return await future
        except DVAIError:
            raise
        except asyncio.CancelledError:
            job.cancel.set()  # the collector drops it; nothing to wait for
            raise
        except Exception as exc:  # noqa: BLE001
            log.error("embedding failure", exc_info=exc)
            raise EngineError("the engine failed while embedding; see the node log") from exc

    # -- lifecycle ---------------------------------------------------------
    async def ensure_loaded(self) -> None:
        if self.loaded:
            return
        async with self._load_lock:
            if self.loaded:  # another request loaded it while this one waited
                return
            self._set_state(SlotState.LOADING)
            size = f", {self.info.size_bytes / 1e6:.0f} MB" if self.info.size_bytes else ""
            log.info("loading model %s (%s%s)", self.info.id, self.info.path, size)
            started = time.perf_counter()
            try:
                await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.load)
            except Exception as exc:
                error = exc.message if isinstance(exc, DVAIError) else str(exc)
                self._set_state(SlotState.FAILED, error=error)
                raise ModelUnavailableError(
                    f"model '{self.info.id}' could not be loaded: {error}", retry_after=30
                ) from exc
            self.has_loaded = True
            self._set_state(SlotState.READY)
            log.info("model %s loaded in %.1f s", self.info.id, time.perf_counter() - started)

    async def unload(self) -> None:
        """Free the weights, after the running request (if any); the next request loads it again."""
        async with self.queue.exclusive(), self._load_lock:  # never while a generation uses the weights
            if self.state is not SlotState.READY:
                return
            await asyncio.get_running_loop().run_in_executor(self.executor, self.engine.close)
            self._set_state(SlotState.UNLOADED)
            log.info("model %s unloaded", self.info.id)

    async def close(self) -> None:
        task, self._unloading = self._unloading, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.unload()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def idle_for(self, now: float) -> float:
        return 0.0 if self.busy else now - self.last_used

    def keep_alive_left(self, now: float) -> float | None:
        """Seconds until the idle reaper may unload this model; None when it stays (no
        ``keep_alive`` in force: the last request's own, else the configured one) or is not
        loaded. ``now`` is ``time.monotonic()``."""
        if self.current_keep_alive is None or not self.loaded:
            return None
        return max(0.0, self.current_keep_alive - self.idle_for(now))

    # -- observers ---------------------------------------------------------
    def add_listener(self, listener: OutcomeListener) -> None:
        self._listeners.append(listener)

    def notify(self, outcome: GenerationOutcome) -> None:
        for listener in self._listeners:
            try:
                listener(self.info, outcome)
            except Exception:  # noqa: BLE001 - an observer never breaks a request
                log.exception("generation listener failed")
