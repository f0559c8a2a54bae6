"""The probe: a cold run of N decode tokens on a model's slot, timed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from ..common.errors import DVAIError, EngineError, GenerationTimeoutError, InvalidRequestError
from ..constants import (
    CAPABILITY_MAX_TOK_PER_S,
    CAPABILITY_PROBE_LEVEL_MIN_TOKENS,
    CAPABILITY_PROBE_MAX_TOKENS,
    DEFAULT_GENERATION_TIMEOUT,
)
from ..engine.base import BatchEngine, Delta, GenerationOutcome, SamplingParams
from ..engine.slot import GenerationJob, ModelSlot
from .curve import Curve, clean_curve, curve_levels
from .score import CapabilityScore, library_version_for, prompt_rate

log = logging.getLogger(__name__)

_T = TypeVar("_T")

PROBE_PROMPT = (
    "Note {salt}. The following is a short description of an ordinary day in a small coastal "
    "town, written in plain and simple language for a general audience. In the morning, the"
)
"""A few dozen tokens of plain prose any text model can continue. The leading salt defeats
llama.cpp's prompt-prefix cache, so every probe evaluates its whole prompt (a cold run)."""

WARM_UP_TOKENS = 2
"""decode tokens of the untimed run before the timed one (see ``probe``)."""


def level_tokens(tokens: int, level: int) -> int:
    """Tokens per sequence at concurrency ``level`` > 1: about ``tokens ÷ 2`` in all (a level
    costs about ``tokens ÷ (2 × level)`` decode steps; the engine samples every sequence, so
    the probe's cost grows with the tokens of all levels together), at least
    ``CAPABILITY_PROBE_LEVEL_MIN_TOKENS`` each (and never more than ``tokens``)."""
    if level <= 1:
        return tokens
    return max(min(tokens, CAPABILITY_PROBE_LEVEL_MIN_TOKENS), tokens // (2 * level))


async def probe(
    slot: ModelSlot,
    tokens: int = 50,
    *,
    library_version: str | None = None,
    prompt: str | None = None,
    time_limit: float = DEFAULT_GENERATION_TIMEOUT,
    on_token: Callable[[], None] | None = None,
    now: Callable[[], float] = time.time,
    token_times: list[float] | None = None,
    levels: Sequence[int] | None = None,
) -> CapabilityScore:
    """Time ``tokens`` decode tokens on ``slot``, after waiting its turn in the model's queue.

    End of sequence is suppressed, so exactly ``tokens`` tokens are produced (fewer only
    when the context fills). Greedy sampling keeps runs comparable; a 2-token untimed run
    precedes the timed one. ``on_token`` is called on the event loop as each timed token
    arrives (for progress displays). ``token_times``, when given, receives the
    ``perf_counter()`` of each timed token as the engine produced it (for ``probe_disturbance``).

    Then, on a batching engine, the capability curve: for each concurrency ``level`` above 1
    (``levels``, default 2 and 4 capped at the model's ``parallel``), ``level`` sequences of
    ``level_tokens(tokens, level)`` tokens decode together from one prompt evaluation
    (``n = level``), and the aggregate rate is the sum of their decode rates (each
    ``GenerationOutcome.decode_tok_per_s``; they run over the same steps). The score's
    ``tok_per_s`` stays the single-stream rate; ``curve`` has every level.
    """
    check_probe_tokens(tokens)
    if slot.info.embedding:
        raise InvalidRequestError(
            f"model '{slot.info.id}' serves embeddings; only text-generation models can be probed",
            param="model",
        )
    salt = random.randrange(10**6)
    text = prompt if prompt is not None else PROBE_PROMPT.format(salt=salt)
    params = SamplingParams(
        max_tokens=tokens, temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0,
        ignore_eos=True,
    )
    async with slot.turn(seats=slot.parallel):  # alone on the model: a single-stream rate
        await slot.ensure_loaded()
        # A short untimed run first: one-off first-use costs of a freshly loaded model (compute
        # buffers, first touch of the weights) would otherwise read 5-15 % slow on decode and
        # ~2x slow on the prompt. Its different salt keeps the timed prompt uncached.
        warm_up = replace(params, max_tokens=WARM_UP_TOKENS)
        await _run_on_worker(slot, PROBE_PROMPT.format(salt=salt + 1), warm_up, time_limit, None)
        started, outcome = await _run_on_worker(slot, text, params, time_limit, on_token, token_times)
        wanted = curve_levels(slot.parallel) if levels is None else tuple(levels)
        aggregates: dict[int, float] = {}
        if isinstance(slot.engine, BatchEngine):
            for level in sorted(set(wanted)):
                if not 1 < level <= slot.parallel:
                    continue
                batch = replace(params, max_tokens=level_tokens(tokens, level))
                outcomes = await _run_batch(slot, PROBE_PROMPT.format(salt=salt + 1 + level), batch, level,
                                            time_limit)
                rates = [o.decode_tok_per_s for o in outcomes]
                if len(rates) == level and all(r is not None for r in rates):
                    aggregates[level] = sum(r for r in rates if r is not None)
    if library_version is None:
        library_version = await asyncio.to_thread(library_version_for, slot.engine)
    return score_from_outcome(
        slot.info.id, outcome, started, library_version=library_version, measured_at=now(),
        aggregates=aggregates,
    )


def check_probe_tokens(tokens: object) -> int:
    """``tokens`` if it is a usable probe length, else ``InvalidRequestError``."""
    if (
        not isinstance(tokens, int)
        or isinstance(tokens, bool)
        or not 2 <= tokens <= CAPABILITY_PROBE_MAX_TOKENS
    ):
        raise InvalidRequestError(
            f"tokens must be an integer from 2 to {CAPABILITY_PROBE_MAX_TOKENS}", param="tokens"
        )
    return tokens


def score_from_outcome(
    model_id: str, outcome: GenerationOutcome, started: float, *, library_version: str, measured_at: float,
    aggregates: dict[int, float] | None = None,
) -> CapabilityScore:
    """The probe score of one timed run (``started``: ``perf_counter()`` when the engine began);
    ``aggregates``: aggregate tok/s measured at concurrency levels above 1, for the curve."""
    rate = outcome.decode_tok_per_s
    if rate is None:
        raise EngineError(f"the probe of '{model_id}' produced too few tokens to time")
    rate = min(rate, CAPABILITY_MAX_TOK_PER_S)
    curve: Curve = clean_curve([(1, rate), *sorted((aggregates or {}).items())]) if aggregates else ()
    return CapabilityScore(
        model_id=model_id,
        tok_per_s=rate,
        prompt_tok_per_s=prompt_rate(outcome.prompt_tokens, started, outcome.first_token_at),
        measured_at=measured_at,
        library_version=library_version,
        source="probe",
        samples=outcome.completion_tokens,
        curve=curve,
    )


async def _run_batch(
    slot: ModelSlot, prompt: str, params: SamplingParams, level: int, time_limit: float
) -> list[GenerationOutcome]:
    """``level`` sequences from one prompt evaluation on the batching engine (the caller holds
    every seat); one outcome per sequence. Not through ``ModelSlot.generate``, for the same
    reason as ``_run_on_worker``: the probe is not served traffic."""
    cancel = threading.Event()
    deltas: asyncio.Queue[Delta | None] = asyncio.Queue()
    future = slot.start(GenerationJob(params=params, prompt=prompt, n=level), deltas, cancel)
    return await _probe_result(future, cancel, time_limit)


async def _run_on_worker(
    slot: ModelSlot,
    prompt: str,
    params: SamplingParams,
    time_limit: float,
    on_token: Callable[[], None] | None,
    token_times: list[float] | None = None,
) -> tuple[float, GenerationOutcome]:
    """Run the engine on the model's thread; the caller holds the slot's turn.

    Not through ``ModelSlot.generate``: the probe needs the moment the engine starts (for
    the prompt rate), and its run must not reach the slot's listeners as served traffic.
    """
    loop = asyncio.get_running_loop()
    cancel = threading.Event()

    def sink(_text: str) -> None:
        if token_times is not None:
            token_times.append(time.perf_counter())
        if on_token is not None:
            loop.call_soon_threadsafe(on_token)

    def work() -> tuple[float, GenerationOutcome]:
        started = time.perf_counter()
        return started, slot.engine.generate(prompt, params, sink, cancel)

    future = loop.run_in_executor(slot.executor, work)
    return await _probe_result(future, cancel, time_limit)


async def _probe_result(future: asyncio.Future[_T], cancel: threading.Event, time_limit: float) -> _T:
    """The probe run's result within ``time_limit``; engine failures become clean errors, and a
    run left behind (timeout, caller cancelled) is told to stop and awaited."""
    try:
        return await asyncio.wait_for(asyncio.shield(future), time_limit)
    except TimeoutError:
        raise GenerationTimeoutError(f"the capability probe took longer than {time_limit:g} s") from None
    except DVAIError:
        raise
    except Exception as exc:  # noqa: BLE001 - engine internals never reach the client
        log.exception("capability probe failed")
        raise EngineError("the engine failed during the capability probe; see the node log") from exc
    finally:
        if not future.done():
            cancel.set()
            with contextlib.suppress(BaseException):
                await asyncio.shield(future)
