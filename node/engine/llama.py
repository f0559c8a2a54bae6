"""The llama-cpp-python engine.

A generative model gets one llama.cpp context with ``parallel`` sequences
(``n_seq_max``, one unified KV cache of ``ctx_size × parallel`` cells) and a
step loop built on llama-cpp-python's low-level API (see docs/engine.md):

* each step puts one token of every decoding sequence, plus a chunk of any
  prompt still being evaluated, into one ``llama_batch`` and calls
  ``llama_decode`` once, so the weights are read once for all of them;
* every sequence samples with its own native sampler chain
  (``llama_sampler_*``: penalties, top-k/top-p/min-p, temperature, seeded
  distribution) straight from the context's logits, without copying the
  vocabulary's logits into Python (only when log-probabilities are asked for,
  or a grammar refuses the sampled token: ``grammar_sampler.py``);
* ``n`` choices evaluate their prompt once and copy its KV with ``seq_cp``;
* a finished or cancelled sequence gives its seat back at once; its KV state
  is copied to the RAM prompt cache (``prompt_cache.py``, within the model's
  ``prompt_cache_mib``) and its cells leave the context, so running sequences
  never attend over idle ones' cells; the next request with the same prefix (a
  chat's next turn) restores it and evaluates only the rest. With no RAM cache
  (``prompt_cache_mib = 0``) the cells stay in the idle seat instead, reused
  until the seat is taken by a request that shares less of them.

An embedding model gets its own context in embedding mode and a collector
that decodes the inputs of several requests in one batch
(``node/engine/embedding.py``).

llama.cpp's own log goes through Python logging (logger ``llama.cpp``, DEBUG),
and models load with the process's output intact: llama-cpp-python's
``verbose=False`` would otherwise point fds 1 and 2 at /dev/null for the whole
process during a load, swallowing every other thread's output (the start
banner included).
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import ctypes
import logging
import math
import os
import random
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..common.errors import EngineError, InvalidRequestError, embeddings_not_enabled
from ..config import env_model_name
from ..constants import DEFAULT_PARALLEL, DEFAULT_PROMPT_CACHE_MIB, MAX_TOP_LOGPROBS
from .base import (
    ChatMessage,
    Delta,
    EmbeddingResult,
    FinishReason,
    GenerationOutcome,
    ModelInfo,
    SamplingDefaults,
    SamplingParams,
    SequenceRequest,
    TokenLogprob,
    TokenSink,
    TopLogprob,
    prompt_and_params,
)
from .chat_format import known_chat_formats, render_gemma, render_named_format, render_template
from .embedding import EmbeddingBatcher, EmbeddingJob
from .grammar_sampler import GrammarCheckedSampler
from .prompt_cache import PromptCache, common_prefix
from .textstream import ReasoningBudget, StopMatcher
from .tools import FunctionTool, fallback_messages

log = logging.getLogger(__name__)
native_log = logging.getLogger("llama.cpp")

GGUF_MAGIC = b"GGUF"


def gguf_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a GGUF model, in words a user can act on; None if it may be one."""
    try:
        if path.is_dir():
            return f"{path} is a directory, not a GGUF file"
        if not path.exists():
            return f"{path}: no such file"
        with path.open("rb") as handle:
            magic = handle.read(len(GGUF_MAGIC))
    except PermissionError:
        return f"{path}: permission denied"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    if magic != GGUF_MAGIC:
        return f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)"
    return None


class _NativeLog:
    """Receives llama.cpp's log lines (through ``llama_log_set``) and hands them to Python logging.

    llama.cpp sends a line in pieces (``GGML_LOG_LEVEL_CONT`` continues the previous one);
    the pieces are joined and logged per line, all at DEBUG: they are llama.cpp's internals
    (``llama_kv_cache_iswa: using full-size SWA cache``), not the node's messages.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._lock = threading.Lock()
        self.callback: Any = None

    def write(self, _level: int, text: bytes | None, _user_data: Any) -> None:
        if not text:
            return
        with self._lock:
            self._buffer += text.decode("utf-8", "replace")
            *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                native_log.debug("%s", line.rstrip())


_NATIVE_LOG = _NativeLog()
"""One per process: llama.cpp has a single log callback, and ctypes needs a live reference to it."""


def route_native_log() -> None:
    """Install the llama.cpp log callback and keep llama-cpp-python from redirecting fds 1 and 2."""
    import llama_cpp
    import llama_cpp._internals as internals
    import llama_cpp.llama as llama_module

    if _NATIVE_LOG.callback is None:
        _NATIVE_LOG.callback = llama_cpp.llama_log_callback(_NATIVE_LOG.write)
    llama_cpp.llama_log_set(_NATIVE_LOG.callback, ctypes.c_void_p(0))
    for module in (llama_module, internals):
        if getattr(module, "suppress_stdout_stderr", None) is not _KeepOutput:
            module.suppress_stdout_stderr = _KeepOutput  # type: ignore[attr-defined]


class _KeepOutput(contextlib.nullcontext[None]):
    """Stands in for llama-cpp-python's ``suppress_stdout_stderr``: leaves the fds alone."""

    def __init__(self, disable: bool = True) -> None:
        super().__init__()

BATCH_TOKENS = 512
"""tokens per ``llama_decode`` call (decode tokens first, then prompt chunks)."""
PREFILL_CHUNK_WHILE_DECODING = 256
"""prompt tokens per step while other sequences are decoding (keeps their tokens flowing)."""
PENALTY_LAST_N = 64


class LlamaEngine:
    """One GGUF model in one llama.cpp context, serving up to ``parallel`` sequences at once."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        threads: int | None = None,
        gpu_layers: int = 99,
        reasoning_budget: int | None = None,
        seed: int | None = None,
        parallel: int = DEFAULT_PARALLEL,
        prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_MIB * 1024 * 1024,
        unavailable: str | None = None,
        defaults: SamplingDefaults | None = None,
    ) -> None:
        if parallel < 1:
            raise ValueError("parallel must be at least 1")
        self.info = info
        self.parallel = parallel
        """sequence seats; for an embedding model, the requests its collector batches together."""
        self.prompt_cache_bytes = max(0, prompt_cache_bytes)
        """host memory for finished sequences' KV state; 0: idle seats keep their cells instead."""
        self._unavailable = unavailable
        self.defaults = defaults or SamplingDefaults()
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._gpu_layers = gpu_layers
        self._reasoning_budget = reasoning_budget
        self._seed = seed
        self._embedder: EmbeddingBatcher | None = None  # embedding mode
        self._model: Any = None  # generation: llama_cpp._internals.LlamaModel
        self._loop: _StepLoop | None = None
        self._chat_mode: str = "gemma"
        self._template: str | None = None
        self._inbox: collections.deque[SequenceRequest] = collections.deque()
        self._lock = threading.Lock()
        self._running = False

    # -- lifecycle -----------------------------------------------------------
    def load(self) -> None:
        if self._unavailable is not None:
            raise EngineError(self._unavailable)
        problem = gguf_problem(Path(self.info.path))
        if problem is not None:
            raise EngineError(problem)
        route_native_log()
        if self.info.embedding:
            self._load_embedding()
            return
        self._load_weights()
        try:
            self._loop = _StepLoop(
                self._model, ctx_size=self.info.ctx_size, parallel=self.parallel, threads=self._threads,
                prompt_cache_bytes=self.prompt_cache_bytes,
            )
            self._choose_chat_mode(self._model.metadata())
        except BaseException:
            self.close()  # a failed slot is never unloaded: free the weights now
            raise

    def _load_weights(self) -> None:
        import llama_cpp
        from llama_cpp import _internals

        llama_cpp.llama_backend_init()
        model_params = llama_cpp.llama_model_default_params()
        model_params.n_gpu_layers = self._gpu_layers
        try:
            self._model = _internals.LlamaModel(path_model=self.info.path, params=model_params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"could not load model '{self.info.id}': {exc}") from exc

    def _load_embedding(self) -> None:
        self._load_weights()
        try:
            self._embedder = EmbeddingBatcher(
                self._model, model_id=self.info.id, ctx_size=self.info.ctx_size, threads=self._threads
            )
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.fail_all(EngineError(f"model '{self.info.id}' was unloaded"))
            loop.close()
        embedder, self._embedder = self._embedder, None
        if embedder is not None:
            embedder.close()
        model, self._model = self._model, None
        if model is not None:
            model.close()

    def _choose_chat_mode(self, metadata: dict[str, str]) -> None:
        if self.info.chat_format:
            known = known_chat_formats()
            if self.info.chat_format not in known:
                raise EngineError(
                    f"unknown chat_format '{self.info.chat_format}' for model '{self.info.id}'; "
                    f"known formats: {', '.join(known)}"
                )
            self._chat_mode = self.info.chat_format
        elif metadata.get("tokenizer.chat_template"):
            self._chat_mode = "template"
            self._template = metadata["tokenizer.chat_template"]
        else:
            # A base model without a template (the built-in Gemma 3 270M): Gemma turns.
            self._chat_mode = "gemma"

    # -- text ------------------------------------------------------------------
    def render_chat(
        self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> tuple[str, tuple[str, ...]]:
        if self._chat_mode == "template" and self._template is not None:
            model = self._model
            bos = model.detokenize([model.token_bos()], special=True).decode("utf-8", "ignore")
            eos = model.detokenize([model.token_eos()], special=True).decode("utf-8", "ignore")
            return render_template(self._template, messages, bos_token=bos, eos_token=eos, tools=tools)
        if tools or any(m.role == "tool" or m.tool_calls for m in messages):
            messages = fallback_messages(messages, tools)
        if self._chat_mode == "gemma":
            return render_gemma(messages)
        return render_named_format(self._chat_mode, messages)

    # -- generation ------------------------------------------------------------
    def submit(self, request: SequenceRequest) -> bool:
        """Queue ``request`` for the step loop; True when :meth:`run` must be scheduled."""
        if self.info.embedding:
            request.on_done(_embedding_only(self.info.id))
            return False
        with self._lock:
            self._inbox.append(request)
            start = not self._running
            self._running = True
        return start

    @property
    def stepping(self) -> bool:
        """The step loop is running (or scheduled) on the worker thread."""
        return self._running

    def run(self) -> None:
        """Step every sequence until none is active or waiting (on the worker thread)."""
        with self._lock:
            self._running = True
        while True:
            loop = self._loop
            admitted: list[SequenceRequest] = []
            with self._lock:
                if loop is None or (not self._inbox and not loop.active):
                    self._running = False
                    orphans = list(self._inbox)
                    self._inbox.clear()
                    break
                free = loop.free_seats
                while self._inbox and self._inbox[0].n <= free:
                    free -= self._inbox[0].n
                    admitted.append(self._inbox.popleft())
            try:
                for request in admitted:
                    loop.admit(request, self)
                loop.step()
            except Exception:  # noqa: BLE001 - fail the running requests, keep serving new ones
                log.exception("step loop failure on model %s", self.info.id)
                loop.fail_all(EngineError("the engine failed while generating; see the node log"))
        for request in orphans:  # only when the model was unloaded under them
            request.on_done(EngineError(f"model '{self.info.id}' is not loaded"))

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        sink: TokenSink,
        cancel: threading.Event,
    ) -> GenerationOutcome:
        """One sequence, start to end, on the calling (worker) thread: the capability probe's path."""
        results: list[list[GenerationOutcome] | BaseException] = []
        request = SequenceRequest(
            params=params, on_delta=lambda delta: sink(delta.text), on_done=results.append,
            cancel=cancel, prompt=prompt,
        )
        self.submit(request)
        self.run()
        result = results[0] if results else EngineError("the engine did not finish the request")
        if isinstance(result, BaseException):
            raise result
        return result[0]

    def prepare(self, request: SequenceRequest) -> tuple[list[int], SamplingParams, frozenset[int]]:
        """The prompt's tokens, the effective sampling parameters (chat stops and the model's
        defaults added) and the stop strings that are single special tokens."""
        prompt, params = prompt_and_params(self, request.messages, request.tools, request.prompt, request.params)
        model = self._model
        bos_text = model.detokenize([model.token_bos()], special=True).decode("utf-8", "ignore")
        add_bos = not (bos_text and prompt.startswith(bos_text))
        tokens = list(model.tokenize(prompt.encode("utf-8"), add_bos=add_bos, special=True))
        if not tokens:
            raise InvalidRequestError("the prompt is empty", param="messages")
        if len(tokens) >= self.info.ctx_size:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens; model '{self.info.id}' has a context of "
                f"{self.info.ctx_size}",
                param="messages",
                code="context_length_exceeded",
            )
        return tokens, self._with_defaults(params), self._marker_tokens(params.stop)

    def _with_defaults(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the model's defaults where the request chose nothing."""
        d = self.defaults
        return replace(
            params,
            temperature=d.temperature if params.temperature is None else params.temperature,
            top_p=d.top_p if params.top_p is None else params.top_p,
            repeat_penalty=d.repeat_penalty if params.repeat_penalty is None else params.repeat_penalty,
            max_tokens=d.max_tokens if params.max_tokens is None else params.max_tokens,
        )

    def _marker_tokens(self, stops: tuple[str, ...]) -> frozenset[int]:
        """The stop strings that are one special token (``<end_of_turn>``, ``<|im_end|>``…).

        A special token decodes to no text, so the text matcher never sees it: a turn marker
        has to be caught by its token id.
        """
        model, out = self._model, set()
        for stop in stops:
            tokens = model.tokenize(stop.encode("utf-8"), add_bos=False, special=True)
            if len(tokens) == 1 and not model.detokenize(tokens, special=False):
                out.add(int(tokens[0]))
        return frozenset(out)

    def new_reasoning(self) -> ReasoningBudget | None:
        return ReasoningBudget(self._reasoning_budget) if self._reasoning_budget is not None else None

    def seed_for(self, params: SamplingParams) -> int:
        seed = params.seed if params.seed is not None else self._seed
        return seed if seed is not None else random.getrandbits(31)

    def stats(self) -> dict[str, float]:
        loop, embedder = self._loop, self._embedder
        if embedder is not None:
            return embedder.stats()
        return loop.stats() if loop is not None else {}

    def seat_states(self) -> list[dict[str, object]]:
        loop = self._loop
        if loop is None:
            return []
        free = {id(seat) for seat in list(loop.free)}
        return [
            {"id": seat.seq_id, "busy": id(seat) not in free, "cachedTokens": len(seat.history)}
            for seat in loop.seats
        ]

    # -- embeddings ------------------------------------------------------------
    def embed(self, inputs: list[str]) -> EmbeddingResult:
        """One request's vectors, on the calling (worker) thread."""
        if not self.info.embedding:
            raise embeddings_not_enabled(self.info.id, env_model_name(self.info.id))
        embedder = self._embedder
        if embedder is None:
            raise EngineError(f"model '{self.info.id}' is not loaded")
        return embedder.embed(inputs)

    def submit_embedding(self, job: EmbeddingJob) -> bool:
        """Queue ``job`` for the collector; True when :meth:`run_embeddings` must be scheduled."""
        embedder = self._embedder
        if not self.info.embedding:
            job.on_done(embeddings_not_enabled(self.info.id, env_model_name(self.info.id)))
            return False
        if embedder is None:
            job.on_done(EngineError(f"model '{self.info.id}' is not loaded"))
            return False
        return embedder.submit(job)

    def run_embeddings(self) -> None:
        """Decode embedding batches until none is waiting (on the worker thread)."""
        embedder = self._embedder
        if embedder is not None:
            embedder.run()


def _plain_greedy(params: SamplingParams) -> bool:
    """Whether ``_StepLoop._sampler`` would build a greedy chain without penalties (params with
    the model's defaults filled in; an ``ignore_eos`` ban only matters when it picks one)."""
    return (params.temperature is not None and params.temperature <= 0
            and params.repeat_penalty in (None, 1.0) and params.frequency_penalty == 0.0
            and params.presence_penalty == 0.0)


def _embedding_only(model_id: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"model '{model_id}' is loaded in embedding mode and cannot generate text", param="model"
    )


# -- the step loop -------------------------------------------------------------


@dataclass(eq=False)
class _Seat:
    """One llama.cpp sequence id and the tokens its KV holds (the prompt cache)."""

    seq_id: int
    history: list[int] = field(default_factory=list)
    released_at: float = 0.0


@dataclass(eq=False)
class _Choice:
    group: _Group
    index: int
    seat: _Seat
    sampler: Any
    limit: int
    grammar: GrammarCheckedSampler | None = None
    """the request's grammar, checked after the chain samples (None: unconstrained)."""
    greedy: bool = False
    """the chain would only take the most likely token: read it off the logits instead."""
    pending: list[int] = field(default_factory=list)
    pos: int = 0
    decoding: bool = False
    waiting_for_prompt: bool = False
    done: bool = False
    outcome: GenerationOutcome = field(default_factory=GenerationOutcome)
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"))
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    reasoning: ReasoningBudget | None = None


@dataclass(eq=False)
class _Group:
    request: SequenceRequest
    params: SamplingParams
    prompt: list[int]
    stop_tokens: frozenset[int] = frozenset()
    """special tokens that end a turn (the chat format's markers), caught by id."""
    choices: list[_Choice] = field(default_factory=list)
    failed: bool = False

    @property
    def finished(self) -> bool:
        return all(c.done for c in self.choices)


class _StepLoop:
    """The context, its batch and its seats. Only ever touched on the worker thread."""

    def __init__(self, model: Any, *, ctx_size: int, parallel: int, threads: int,
                 prompt_cache_bytes: int = 0) -> None:
        import llama_cpp
        import numpy as np
        from llama_cpp import _internals

        self._llama = llama_cpp
        self.model = model
        self.vocab = model.vocab
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.ctx_size = ctx_size
        self.n_swa = int(llama_cpp.llama_model_n_swa(model.model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = ctx_size * parallel
        params.n_batch = BATCH_TOKENS
        params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = parallel
        params.kv_unified = True  # one cell pool: seq_cp shares the prompt's cells between choices
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        try:
            self.context: Any = _internals.LlamaContext(model=model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"could not create a context of {ctx_size * parallel} tokens: {exc}") from exc
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.seats = [_Seat(seq_id) for seq_id in range(parallel)]
        self.free: list[_Seat] = list(self.seats)
        self.groups: list[_Group] = []
        self._piece = ctypes.create_string_buffer(256)
        self._np: Any = np
        self._logit_row = ctypes.c_float * self.n_vocab
        self._eog_bias: Any = None
        self._close_tokens: list[int] | None = None
        self.cache = PromptCache(prompt_cache_bytes)
        """finished sequences' KV state in host memory (disabled: idle seats keep their cells)."""
        self._stats: dict[str, float] = dict.fromkeys(
            ("steps", "prefill_tokens", "decode_tokens", "prefill_seconds", "decode_seconds",
             "prompt_cache_hit_tokens", "prompt_cache_saves", "prompt_cache_restores",
             "prompt_cache_save_seconds", "prompt_cache_restore_seconds"), 0.0)

    # -- seats -----------------------------------------------------------------
    @property
    def active(self) -> bool:
        return bool(self.groups)

    @property
    def free_seats(self) -> int:
        return len(self.free)

    def admit(self, request: SequenceRequest, engine: LlamaEngine) -> None:
        if request.cancel.is_set():
            request.on_done([GenerationOutcome() for _ in range(request.n)])
            return
        try:
            prompt, params, stop_tokens = engine.prepare(request)
        except Exception as exc:  # noqa: BLE001 - reported to this request alone
            request.on_done(exc)
            return
        group = _Group(request=request, params=params, prompt=prompt, stop_tokens=stop_tokens)
        reuse = params.seed is None  # a seeded request evaluates its whole prompt: repeatable logits
        seats = self._take_seats(prompt if reuse else [], request.n)
        seed = engine.seed_for(params)
        limit = self.ctx_size - len(prompt)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        try:
            for index, seat in enumerate(seats):
                grammar = self._grammar(params.grammar) if params.grammar is not None else None
                try:
                    sampler = self._sampler(params, (seed + index) & 0x7FFFFFFF)
                except BaseException:
                    if grammar is not None:
                        grammar.close()
                    raise
                choice = _Choice(group=group, index=index, seat=seat, sampler=sampler, limit=limit,
                                 grammar=grammar, greedy=grammar is None and _plain_greedy(params))
                choice.stops = StopMatcher(params.stop)
                choice.reasoning = engine.new_reasoning()
                choice.outcome = GenerationOutcome(prompt_tokens=len(prompt), finish_reason="length")
                group.choices.append(choice)
        except Exception as exc:  # noqa: BLE001
            for choice in group.choices:
                self._llama.llama_sampler_free(choice.sampler)
                if choice.grammar is not None:
                    choice.grammar.close()
            self.free.extend(seats)
            request.on_done(exc)
            return
        first = group.choices[0]
        if reuse and self.cache.enabled:
            self._restore(first.seat, prompt)
        cached = common_prefix(first.seat.history, prompt) if reuse else 0
        cached = min(cached, len(prompt) - 1)  # the last prompt token is evaluated for its logits
        if cached > 0 and self._reusable(first.seat, cached) and self._llama.llama_memory_seq_rm(
            self.memory, first.seat.seq_id, cached, -1
        ):
            del first.seat.history[cached:]
        else:
            cached = 0
            self._clear(first.seat)
        first.pos = cached
        first.pending = prompt[cached:]
        first.outcome.cached_tokens = cached
        self._stats["prompt_cache_hit_tokens"] += cached
        for choice in group.choices[1:]:
            self._clear(choice.seat)
            choice.waiting_for_prompt = True
        self.groups.append(group)

    def _reusable(self, seat: _Seat, cached: int) -> bool:
        """Whether the seat's KV still holds what tokens after ``cached`` need.

        A sliding-window model keeps only the last ``n_swa`` positions in its window
        layers: once those have moved past ``cached``, the prefix must be evaluated again.
        """
        if self.n_swa <= 0:
            return True
        pos_min = int(self._llama.llama_memory_seq_pos_min(self.memory, seat.seq_id))
        return pos_min == 0 or 0 <= pos_min < cached - self.n_swa

    def _take_seats(self, prompt: list[int], n: int) -> list[_Seat]:
        """The free seat whose cache shares most of ``prompt`` (least recently used on ties), then others."""
        ranked = sorted(self.free, key=lambda s: (-common_prefix(s.history, prompt), s.released_at))
        chosen = ranked[:n]
        for seat in chosen:
            self.free.remove(seat)
        return chosen

    def _clear(self, seat: _Seat) -> None:
        self._llama.llama_memory_seq_rm(self.memory, seat.seq_id, -1, -1)
        seat.history.clear()

    # -- the RAM prompt cache --------------------------------------------------
    def _save(self, seat: _Seat) -> None:
        """Copy the seat's KV state into the RAM cache (when worth keeping)."""
        llama = self._llama
        started = time.perf_counter()
        size = int(llama.llama_state_seq_get_size(self.ctx, seat.seq_id))
        if not self.cache.wants(seat.history, size):
            return
        data = (ctypes.c_uint8 * size)()
        if int(llama.llama_state_seq_get_data(self.ctx, data, size, seat.seq_id)) != size:
            log.warning("could not save sequence %d's KV state (%d bytes)", seat.seq_id, size)
            return
        self.cache.put(seat.history, data, size)
        self._stats["prompt_cache_saves"] += 1
        self._stats["prompt_cache_save_seconds"] += time.perf_counter() - started

    def _restore(self, seat: _Seat, prompt: list[int]) -> None:
        """Fill the (empty) seat with the cached entry sharing most of ``prompt``, if any."""
        entry, shared = self.cache.match(prompt)
        if entry is None or shared == 0 or seat.history:
            return
        started = time.perf_counter()
        if int(self._llama.llama_state_seq_set_data(self.ctx, entry.data, entry.size, seat.seq_id)) != entry.size:
            # no room for its cells in the context now (or a state it refuses): evaluate the prompt instead
            log.debug("could not restore %d cached tokens into sequence %d", len(entry.tokens), seat.seq_id)
            self._clear(seat)
            return
        seat.history = list(entry.tokens)
        self._stats["prompt_cache_restores"] += 1
        self._stats["prompt_cache_restore_seconds"] += time.perf_counter() - started

    # -- sampling --------------------------------------------------------------
    def _sampler(self, params: SamplingParams, seed: int) -> Any:
        llama = self._llama
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama.llama_sampler_chain_init(chain_params)
        try:
            if params.ignore_eos:
                llama.llama_sampler_chain_add(chain, self._eog_ban())
            # prepare() filled the model's defaults in; the fallbacks only satisfy the type checker
            defaults = SamplingDefaults()
            repeat = defaults.repeat_penalty if params.repeat_penalty is None else params.repeat_penalty
            temperature = defaults.temperature if params.temperature is None else params.temperature
            top_p = defaults.top_p if params.top_p is None else params.top_p
            if repeat != 1.0 or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_penalties(
                    self.n_vocab, PENALTY_LAST_N, repeat, params.frequency_penalty, params.presence_penalty))
            if temperature <= 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
                return chain
            if params.top_k > 0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(params.top_k))
            if top_p < 1.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(top_p, 1))
            if params.min_p > 0.0:
                llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_min_p(params.min_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(temperature))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
            return chain
        except BaseException:
            llama.llama_sampler_free(chain)
            raise

    def _grammar(self, text: str) -> GrammarCheckedSampler:
        """The grammar a seat checks its chain's tokens against (not in the chain: applying it
        to the whole vocabulary every step would halve the decode rate)."""
        try:
            return GrammarCheckedSampler(self._llama, self.vocab, self.n_vocab, text)
        except ValueError:
            raise InvalidRequestError("the grammar could not be parsed (GBNF, root rule 'root')",
                                      param="grammar") from None

    def _eog_ban(self) -> Any:
        """A logit-bias sampler that makes every end-of-generation token impossible."""
        llama = self._llama
        if self._eog_bias is None:
            banned = [t for t in range(self.n_vocab) if llama.llama_vocab_is_eog(self.vocab, t)]
            biases = (llama.llama_logit_bias * len(banned))()
            for i, token in enumerate(banned):
                biases[i].token = token
                biases[i].bias = -math.inf
            self._eog_bias = biases
        return llama.llama_sampler_init_logit_bias(self.n_vocab, len(self._eog_bias), self._eog_bias)

    def _close_reasoning_tokens(self) -> list[int]:
        if self._close_tokens is None:
            text = ReasoningBudget.CLOSE_TEXT.encode()
            self._close_tokens = list(self.model.tokenize(text, add_bos=False, special=True))
        return self._close_tokens

    def _piece_bytes(self, token: int, special: bool) -> bytes:
        llama = self._llama
        n = llama.llama_token_to_piece(self.vocab, token, self._piece, len(self._piece), 0, special)
        if n < 0:
            buffer = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buffer, -n, 0, special)
            return buffer.raw[:n]
        return self._piece.raw[:n]

    def _argmax(self, index: int) -> int:
        """The most likely token of output ``index`` (the first of equals, as the greedy sampler
        picks it), read in place: the chain would first copy every logit into a 262,144-entry
        candidate array, ten times the work."""
        pointer = self._llama.llama_get_logits_ith(self.ctx, index)
        row = self._logit_row.from_address(ctypes.addressof(pointer.contents))
        return int(self._np.frombuffer(row, dtype=self._np.float32).argmax())

    def _logprobs(self, index: int, token: int, top: int) -> TokenLogprob:
        import numpy as np

        pointer = self._llama.llama_get_logits_ith(self.ctx, index)
        logits = np.ctypeslib.as_array(pointer, shape=(self.n_vocab,)).astype(np.float64)
        peak = float(logits.max())
        norm = peak + math.log(float(np.exp(logits - peak).sum()))
        alternatives: list[TopLogprob] = []
        if top > 0:
            best = np.argpartition(-logits, top - 1)[:top]
            for candidate in sorted(best.tolist(), key=lambda t: (-logits[t], t)):
                raw = self._piece_bytes(candidate, True)
                alternatives.append(
                    TopLogprob(raw.decode("utf-8", "replace"), float(logits[candidate]) - norm, tuple(raw))
                )
        raw = self._piece_bytes(token, True)
        return TokenLogprob(raw.decode("utf-8", "replace"), min(0.0, float(logits[token]) - norm),
                            tuple(raw), tuple(alternatives))

    # -- one step --------------------------------------------------------------
    def step(self) -> None:
        llama = self._llama
        for group in list(self.groups):
            if group.request.cancel.is_set():
                for choice in group.choices:
                    if not choice.done:
                        self._finish(choice, None)
        self.groups = [g for g in self.groups if not g.finished]
        if not self.groups:
            return
        batch = self.batch
        count = 0
        outputs: list[tuple[_Choice, int]] = []
        decoding = [c for g in self.groups for c in g.choices if c.decoding and c.pending and not c.done]
        prefilling = [c for g in self.groups for c in g.choices if not c.decoding and c.pending and not c.done]
        for choice in decoding:
            count = self._add(choice, len(choice.pending), count, outputs)
        room = BATCH_TOKENS - count
        if decoding:
            room = min(room, PREFILL_CHUNK_WHILE_DECODING)
        prefill_tokens = 0
        for choice in prefilling:
            if room <= 0:
                break
            take = min(room, len(choice.pending))
            count = self._add(choice, take, count, outputs)
            room -= take
            prefill_tokens += take
        if count == 0:
            return
        batch.n_tokens = count
        started = time.perf_counter()
        status = llama.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - started
        if status != 0:
            reason = "the context is full" if status == 1 else f"llama_decode returned {status}"
            for group in {id(c.group): c.group for c in (*decoding, *prefilling)}.values():
                self._fail(group, EngineError(f"the engine could not evaluate the batch: {reason}"))
            return
        stats = self._stats
        stats["steps"] += 1
        stats["prefill_tokens"] += prefill_tokens
        stats["decode_tokens"] += count - prefill_tokens
        share = prefill_tokens / count
        stats["prefill_seconds"] += elapsed * share
        stats["decode_seconds"] += elapsed * (1 - share)
        for choice, index in outputs:
            if choice.done:
                continue
            choice.decoding = True
            forks = [c for c in choice.group.choices if c.waiting_for_prompt] if choice.index == 0 else []
            for fork in forks:  # n > 1: the prompt's KV, evaluated once, becomes every choice's
                llama.llama_memory_seq_cp(self.memory, choice.seat.seq_id, fork.seat.seq_id, -1, -1)
                fork.seat.history = list(choice.seat.history)
                fork.pos = choice.pos
                fork.waiting_for_prompt = False
                fork.decoding = True
            for target in (choice, *forks):
                if not target.done:
                    self._sample(target, index)
        self.groups = [g for g in self.groups if not g.finished]

    def _add(self, choice: _Choice, take: int, count: int, outputs: list[tuple[_Choice, int]]) -> int:
        batch = self.batch
        seq_id = choice.seat.seq_id
        tokens = choice.pending[:take]
        del choice.pending[:take]
        for token in tokens:
            batch.token[count] = token
            batch.pos[count] = choice.pos
            batch.n_seq_id[count] = 1
            batch.seq_id[count][0] = seq_id
            batch.logits[count] = 0
            choice.pos += 1
            count += 1
        choice.seat.history.extend(tokens)
        if not choice.pending:
            batch.logits[count - 1] = 1
            outputs.append((choice, count - 1))
        return count

    def _sample(self, choice: _Choice, index: int) -> None:
        llama = self._llama
        params = choice.group.params
        token = self._argmax(index) if choice.greedy else None
        if token is None or (params.ignore_eos and llama.llama_vocab_is_eog(self.vocab, token)):
            # the chain samples (with ignore_eos: finds the most likely token it does not ban)
            if choice.grammar is not None:
                token = choice.grammar.sample(choice.sampler, self.ctx, index)
            else:
                token = int(llama.llama_sampler_sample(choice.sampler, self.ctx, index))
        logprob = None
        if params.logprobs is not None:
            logprob = self._logprobs(index, token, min(params.logprobs, MAX_TOP_LOGPROBS))
        outcome = choice.outcome
        if not params.ignore_eos and (token in choice.group.stop_tokens or llama.llama_vocab_is_eog(self.vocab, token)):
            self._finish(choice, "stop")
            return
        now = time.perf_counter()
        if outcome.first_token_at is None:
            outcome.first_token_at = now
        outcome.last_token_at = now
        outcome.completion_tokens += 1
        raw = choice.decoder.decode(self._piece_bytes(token, False))
        reasoning = choice.reasoning
        visible = reasoning.feed(raw) if reasoning is not None else raw
        inject: list[int] = []
        if reasoning is not None and reasoning.should_close():
            inject = self._close_reasoning_tokens()
            outcome.completion_tokens += len(inject)
            visible += reasoning.force_close()
            if params.grammar is None:  # a grammar would refuse text it did not produce
                for extra in inject:
                    llama.llama_sampler_accept(choice.sampler, extra)
        visible = choice.stops.feed(visible)
        if visible or not raw or logprob is not None:
            # "" only for a token that decodes to nothing (max_blank_chunks counts those)
            choice.group.request.on_delta(
                Delta(choice.index, visible, (logprob,) if logprob is not None else ())
            )
        if choice.stops.stopped:
            self._finish(choice, "stop")
        elif outcome.completion_tokens >= choice.limit or choice.pos + 1 + len(inject) > self.ctx_size:
            self._finish(choice, "length")
        else:
            choice.pending = [token, *inject]

    def _finish(self, choice: _Choice, reason: FinishReason | None) -> None:
        """End ``choice`` (``reason`` None: cancelled) and give its seat back at once."""
        if reason is not None:
            choice.outcome.finish_reason = reason
            tail = choice.decoder.decode(b"", final=True)
            if choice.reasoning is not None:
                tail = choice.reasoning.feed(tail) + choice.reasoning.flush()
            tail = choice.stops.feed(tail) + choice.stops.flush()
            if tail:
                choice.group.request.on_delta(Delta(choice.index, tail))
        self._release(choice)
        group = choice.group
        if group.finished and not group.failed:
            group.request.on_done([c.outcome for c in group.choices])

    def _release(self, choice: _Choice) -> None:
        if choice.done:
            return
        choice.done = True
        choice.pending = []
        self._llama.llama_sampler_free(choice.sampler)
        if choice.grammar is not None:
            choice.grammar.close()
        seat = choice.seat
        if choice.waiting_for_prompt:
            self._clear(seat)
        elif self.cache.enabled:
            if not choice.group.failed:
                try:
                    self._save(seat)
                except Exception:  # noqa: BLE001 - a lost cache entry only costs a prefill
                    log.exception("could not save sequence %d to the prompt cache", seat.seq_id)
            self._clear(seat)  # an idle seat holds no cells: running sequences attend over fewer
        seat.released_at = time.monotonic()
        self.free.append(seat)  # without a RAM cache its KV stays: the prompt cache for a following request

    def _fail(self, group: _Group, error: BaseException) -> None:
        group.failed = True
        for choice in group.choices:
            if not choice.done:
                self._release(choice)
            self._clear(choice.seat)
        if group in self.groups:
            self.groups.remove(group)
        group.request.on_done(error)

    def fail_all(self, error: BaseException) -> None:
        for group in list(self.groups):
            self._fail(group, error)
        self.groups = []

    def stats(self) -> dict[str, float]:
        values = dict(self._stats)
        values["active_sequences"] = sum(1 for g in self.groups for c in g.choices if not c.done)
        values["slots"] = len(self.seats)
        cache = self.cache
        values["prompt_cache_entries"] = len(cache.entries)
        values["prompt_cache_tokens"] = cache.tokens
        values["prompt_cache_bytes"] = cache.bytes
        values["prompt_cache_budget_bytes"] = cache.budget
        return values

    def close(self) -> None:
        self.cache.clear()
        self._llama.llama_batch_free(self.batch)
        self.context.close()
