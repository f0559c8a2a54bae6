"""Embeddings on llama.cpp: several inputs, and several requests, in one ``llama_decode``.

A model loaded with ``embedding = true`` gets one llama.cpp context in
embedding mode (mean pooling) with a unified KV cache of ``batch_tokens``
cells (``min(ctx_size, 2048)``), ``n_batch = n_ubatch = batch_tokens`` and up
to ``batch_sequences`` sequences per batch (``min(batch_tokens,
llama_max_parallel_sequences())``, 256 with the pinned llama.cpp).

``EmbeddingBatcher`` is the collector on the model's worker thread. Requests
(``EmbeddingJob``) are submitted from any thread; a job that arrives while a
batch is being decoded joins the next one. Each batch is planned by
:func:`plan_batch`: the waiting jobs' next inputs, taken round-robin (one input
of each job in turn, so a short request is not stuck behind a long one; a job
that got no input in a batch goes first in the next), each
input its own sequence id, until the batch holds ``batch_tokens`` tokens or
``batch_sequences`` inputs. The KV cache is cleared, ``llama_decode`` runs
once, every input's pooled vector is read with ``llama_get_embeddings_seq``
and L2-normalised, and a job whose inputs are all done gets its own vectors and
its own prompt-token count. A job with an input longer than ``batch_tokens``
fails alone (``400 context_length_exceeded``) before any of its inputs is
decoded; a cancelled job (its client left) is dropped from the next batch and
its results, if any, are thrown away.

How many requests may be in the collector at once is the model's ``parallel``
setting (its queue seats, one per request: ``ModelSlot.embed``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..common.errors import EngineError, InvalidRequestError
from ..constants import EMBEDDING_BATCH_MAX_TOKENS
from .base import EmbeddingResult

log = logging.getLogger(__name__)

EmbeddingCallback = Callable[[EmbeddingResult | BaseException], None]


@dataclass(eq=False)
class EmbeddingJob:
    """One request's inputs; ``on_done`` is called once, on the worker thread, with its result
    or its error (not at all when ``cancel`` was set first)."""

    inputs: tuple[str, ...]
    on_done: EmbeddingCallback
    cancel: threading.Event = field(default_factory=threading.Event)


@runtime_checkable
class BatchEmbedder(Protocol):
    """An engine that coalesces embedding requests (``node.engine.llama.LlamaEngine``).

    ``submit_embedding`` may be called from any thread; it returns True when the caller must
    schedule :meth:`run_embeddings` on the model's worker thread (no collector is running).
    """

    def submit_embedding(self, job: EmbeddingJob) -> bool: ...

    def run_embeddings(self) -> None: ...


def plan_batch(pending: Sequence[Sequence[int]], *, max_tokens: int, max_seqs: int) -> list[int]:
    """How many of each job's next inputs go into the next batch.

    ``pending[j]`` is the token count of job *j*'s inputs not decoded yet, in order. Inputs are
    taken round-robin, one of each job in turn, while they fit in ``max_tokens`` tokens and
    ``max_seqs`` sequences; a job whose next input does not fit takes no more in this batch (its
    inputs stay in order). Every input is at most ``max_tokens`` long, so the first one always
    fits an empty batch.
    """
    taken = [0] * len(pending)
    blocked = [False] * len(pending)
    tokens = seqs = 0
    progress = True
    while progress and seqs < max_seqs:
        progress = False
        for j, sizes in enumerate(pending):
            if blocked[j] or taken[j] >= len(sizes):
                continue
            if seqs >= max_seqs or tokens + sizes[taken[j]] > max_tokens:
                blocked[j] = True
                continue
            tokens += sizes[taken[j]]
            seqs += 1
            taken[j] += 1
            progress = True
    return taken


@dataclass(eq=False)
class _Admitted:
    """A job in the collector: its inputs' tokens and the vectors decoded so far."""

    job: EmbeddingJob
    tokens: list[list[int]]
    vectors: list[list[float] | None]
    next: int = 0
    """inputs handed to a batch so far."""

    @property
    def remaining(self) -> list[int]:
        return [len(t) for t in self.tokens[self.next:]]

    @property
    def done(self) -> bool:
        return all(v is not None for v in self.vectors)


class EmbeddingBatcher:
    """The embedding context and its request collector. Decodes only on the worker thread."""

    def __init__(self, model: Any, *, model_id: str, ctx_size: int, threads: int) -> None:
        import llama_cpp
        from llama_cpp import _internals

        self._llama = llama_cpp
        self.model = model
        self.model_id = model_id
        self.batch_tokens = min(ctx_size, EMBEDDING_BATCH_MAX_TOKENS)
        self.batch_sequences = max(1, min(self.batch_tokens, int(llama_cpp.llama_max_parallel_sequences())))
        self.n_embd = int(llama_cpp.llama_model_n_embd(model.model))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.batch_tokens  # cleared before every batch: one batch's tokens is enough
        params.n_batch = self.batch_tokens
        params.n_ubatch = self.batch_tokens  # a sequence is never split (non-causal models need that)
        params.n_seq_max = self.batch_sequences
        params.kv_unified = True  # one cell pool: any input up to batch_tokens fits next to the others
        params.embeddings = True
        # as llama-cpp-python's Llama (the engine before batching): vectors stay what they were
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.pooling_type = llama_cpp.LLAMA_POOLING_TYPE_MEAN
        params.n_threads = threads
        params.n_threads_batch = threads
        params.no_perf = True
        try:
            self.context: Any = _internals.LlamaContext(model=model, params=params, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"could not create an embedding context for '{model_id}': {exc}") from exc
        self.ctx = self.context.ctx
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.batch_tokens, 0, 1)
        self._inbox: collections.deque[EmbeddingJob] = collections.deque()
        self._active: list[_Admitted] = []
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._running = False
        self._closed = False
        self._stats: dict[str, float] = dict.fromkeys(
            ("embedding_decodes", "embedding_inputs", "embedding_tokens", "embedding_requests",
             "embedding_seconds"), 0.0)

    # -- the collector -----------------------------------------------------------
    def submit(self, job: EmbeddingJob) -> bool:
        """Queue ``job``; True when :meth:`run` must be scheduled on the worker thread."""
        with self._lock:
            closed = self._closed
            if not closed:
                self._inbox.append(job)
                start = not self._running
                self._running = True
        if closed:
            _deliver(job, EngineError(f"model '{self.model_id}' is not loaded"))
            return False
        return start

    def run(self) -> None:
        """Decode batches until no job is waiting or in progress (on the worker thread; a second
        caller waits for the first)."""
        with self._run_lock:
            self._run()

    def _run(self) -> None:
        with self._lock:
            self._running = True
        while True:
            with self._lock:
                if self._closed or (not self._inbox and not self._active):
                    self._running = False
                    orphans = list(self._inbox) if self._closed else []
                    self._inbox.clear()
                    break
                arrived = list(self._inbox)
                self._inbox.clear()
            for job in arrived:
                self._admit(job)
            try:
                self._step()
            except Exception:  # noqa: BLE001 - fail the jobs in progress, keep serving new ones
                log.exception("embedding failure on model %s", self.model_id)
                for admitted in self._active:
                    _deliver(admitted.job, EngineError("the engine failed while embedding; see the node log"))
                self._active = []
        for job in orphans:
            _deliver(job, EngineError(f"model '{self.model_id}' is not loaded"))

    def embed(self, inputs: Sequence[str]) -> EmbeddingResult:
        """One request, start to end, on the calling (worker) thread."""
        results: list[EmbeddingResult | BaseException] = []
        self.submit(EmbeddingJob(inputs=tuple(inputs), on_done=results.append))
        self.run()
        result = results[0] if results else EngineError("the engine did not finish the request")
        if isinstance(result, BaseException):
            raise result
        return result

    def _admit(self, job: EmbeddingJob) -> None:
        if job.cancel.is_set():
            return
        try:
            tokens = [self._tokenize(index, text) for index, text in enumerate(job.inputs)]
        except InvalidRequestError as exc:  # this request alone
            _deliver(job, exc)
            return
        except Exception:  # noqa: BLE001 - this request alone, the collector goes on
            log.exception("could not tokenize an embedding request on model %s", self.model_id)
            _deliver(job, EngineError("the engine failed while embedding; see the node log"))
            return
        if not tokens:
            _deliver(job, EmbeddingResult(vectors=[], prompt_tokens=0))
            return
        self._stats["embedding_requests"] += 1
        self._active.append(_Admitted(job=job, tokens=tokens, vectors=[None] * len(tokens)))

    def _tokenize(self, index: int, text: str) -> list[int]:
        # as llama-cpp-python's Llama.embed: BOS added, special tokens not parsed
        tokens = list(self.model.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        limit = self.batch_tokens
        if len(tokens) > limit:
            raise InvalidRequestError(
                f"input[{index}] is {len(tokens)} tokens; the limit for '{self.model_id}' is {limit}",
                param="input",
                code="context_length_exceeded",
            )
        if not tokens:
            raise InvalidRequestError(f"input[{index}] has no tokens", param="input")
        return tokens

    def _step(self) -> None:
        """One batch: plan it, decode it once, hand out the vectors of finished jobs."""
        import numpy as np

        llama = self._llama
        self._active = [a for a in self._active if not a.job.cancel.is_set()]
        if not self._active:
            return
        plan = plan_batch([a.remaining for a in self._active], max_tokens=self.batch_tokens,
                          max_seqs=self.batch_sequences)
        batch = self.batch
        count = 0
        seats: list[tuple[_Admitted, int]] = []  # seq id -> (job, input index)
        for admitted, take in zip(self._active, plan, strict=True):
            for index in range(admitted.next, admitted.next + take):
                seq_id = len(seats)
                for pos, token in enumerate(admitted.tokens[index]):
                    batch.token[count] = token
                    batch.pos[count] = pos
                    batch.n_seq_id[count] = 1
                    batch.seq_id[count][0] = seq_id
                    batch.logits[count] = 1  # pooling reads every token's output
                    count += 1
                seats.append((admitted, index))
            admitted.next += take
        batch.n_tokens = count
        llama.llama_memory_clear(self.memory, True)
        started = time.perf_counter()
        status = llama.llama_decode(self.ctx, batch)
        elapsed = time.perf_counter() - started
        if status != 0:
            failed = {id(a): a for a, _ in seats}
            for admitted in failed.values():
                _deliver(admitted.job, EngineError(f"the engine could not embed the batch: llama_decode "
                                                   f"returned {status}"))
            self._active = [a for a in self._active if id(a) not in failed]
            return
        stats = self._stats
        stats["embedding_decodes"] += 1
        stats["embedding_inputs"] += len(seats)
        stats["embedding_tokens"] += count
        stats["embedding_seconds"] += elapsed
        for seq_id, (admitted, index) in enumerate(seats):
            pointer = llama.llama_get_embeddings_seq(self.ctx, seq_id)
            if not pointer:
                raise EngineError(f"llama.cpp returned no pooled embedding for sequence {seq_id}")
            vector = np.ctypeslib.as_array(pointer, shape=(self.n_embd,)).astype(np.float64)
            norm = float(np.linalg.norm(vector))
            if norm > 0.0:
                vector = vector / norm
            admitted.vectors[index] = vector.tolist()
        # jobs that got no input in this batch go first in the next one: none is starved
        order = [a for a, take in zip(self._active, plan, strict=True) if take == 0]
        order += [a for a, take in zip(self._active, plan, strict=True) if take > 0]
        still: list[_Admitted] = []
        for admitted in order:
            if not admitted.done:
                still.append(admitted)
            elif not admitted.job.cancel.is_set():
                vectors = [v for v in admitted.vectors if v is not None]
                _deliver(admitted.job, EmbeddingResult(vectors=vectors,
                                                       prompt_tokens=sum(len(t) for t in admitted.tokens)))
        self._active = still

    # -- state -------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        values = dict(self._stats)
        values["embedding_jobs"] = float(len(self._active))
        return values

    def close(self) -> None:
        """Free the context (on the worker thread, after :meth:`run` has returned)."""
        with self._lock:
            self._closed = True
            orphans = list(self._inbox)
            self._inbox.clear()
        for job in orphans:
            _deliver(job, EngineError(f"model '{self.model_id}' was unloaded"))
        for admitted in self._active:
            _deliver(admitted.job, EngineError(f"model '{self.model_id}' was unloaded"))
        self._active = []
        self._llama.llama_batch_free(self.batch)
        self.context.close()


def _deliver(job: EmbeddingJob, result: EmbeddingResult | BaseException) -> None:
    """Hand a job its result; a caller that went away (its event loop closed) loses only its own."""
    try:
        job.on_done(result)
    except Exception:  # noqa: BLE001
        log.exception("could not deliver an embedding result")
