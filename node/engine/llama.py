"""The llama-cpp-python engine.

Generation drives ``Llama.generate`` token by token, so each token reaches the
client as it is produced: bytes are decoded incrementally (no re-detokenising
of the whole text), stop strings are matched on the stream, and cancellation is
checked between tokens.
"""

from __future__ import annotations

import codecs
import logging
import os
import random
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..common.errors import EngineError, InvalidRequestError, embeddings_not_enabled
from ..config import env_model_name
from .base import ChatMessage, EmbeddingResult, GenerationOutcome, ModelInfo, SamplingParams, TokenSink
from .chat_format import known_chat_formats, render_gemma, render_named_format, render_template
from .grammar_sampler import GrammarCheckedSampler
from .textstream import ReasoningBudget, StopMatcher
from .tools import FunctionTool, fallback_messages

log = logging.getLogger(__name__)


class LlamaEngine:
    """One GGUF model in one llama.cpp context."""

    def __init__(
        self,
        info: ModelInfo,
        *,
        threads: int | None = None,
        gpu_layers: int = 99,
        reasoning_budget: int | None = None,
        seed: int | None = None,
    ) -> None:
        self.info = info
        self._threads = threads or max(1, os.cpu_count() or 1)
        self._gpu_layers = gpu_layers
        self._reasoning_budget = reasoning_budget
        self._seed = seed
        self._llm: Any = None
        self._chat_mode: str = "gemma"
        self._template: str | None = None
        self._eog_ban: Any = None
        self._close_tokens: list[int] | None = None

    # -- lifecycle -----------------------------------------------------------
    def load(self) -> None:
        import llama_cpp

        if not Path(self.info.path).is_file():
            raise EngineError(f"model file not found: {self.info.path}")
        kwargs: dict[str, Any] = {
            "model_path": self.info.path,
            "n_ctx": self.info.ctx_size,
            "n_threads": self._threads,
            "n_threads_batch": self._threads,
            "n_gpu_layers": self._gpu_layers,
            "embedding": self.info.embedding,
            "verbose": False,
        }
        if self.info.embedding:
            batch = min(self.info.ctx_size, 2048)
            kwargs.update(
                n_batch=batch, n_ubatch=batch, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN
            )
        try:
            self._llm = llama_cpp.Llama(**kwargs)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"could not load model '{self.info.id}': {exc}") from exc
        try:
            self._choose_chat_mode()
        except BaseException:
            self.close()  # a failed slot is never unloaded: free the weights now
            raise

    def close(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.close()

    def _choose_chat_mode(self) -> None:
        metadata = self._llm.metadata or {}
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
            llm = self._llm
            bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
            eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", "ignore")
            return render_template(self._template, messages, bos_token=bos, eos_token=eos, tools=tools)
        if tools or any(m.role == "tool" or m.tool_calls for m in messages):
            messages = fallback_messages(messages, tools)
        if self._chat_mode == "gemma":
            return render_gemma(messages)
        return render_named_format(self._chat_mode, messages)

    def _tokenize(self, text: str) -> list[int]:
        llm = self._llm
        bos_text = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", "ignore")
        add_bos = not (bos_text and text.startswith(bos_text))
        return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))

    # -- generation ------------------------------------------------------------
    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        sink: TokenSink,
        cancel: threading.Event,
    ) -> GenerationOutcome:
        import llama_cpp

        if self.info.embedding:
            raise InvalidRequestError(
                f"model '{self.info.id}' is loaded in embedding mode and cannot generate text",
                param="model",
            )
        llm = self._llm
        tokens = self._tokenize(prompt)
        n_ctx = llm.n_ctx()
        if len(tokens) >= n_ctx:
            raise InvalidRequestError(
                f"the prompt is {len(tokens)} tokens; model '{self.info.id}' has a context of {n_ctx}",
                param="messages",
                code="context_length_exceeded",
            )
        room = n_ctx - len(tokens)
        limit = room if params.max_tokens is None else min(params.max_tokens, room)
        if params.seed is not None:
            # Reusing a cached prompt prefix changes the logits' rounding; a seeded request
            # evaluates its whole prompt so the same request samples the same text.
            llm.reset()
        seed = params.seed if params.seed is not None else self._seed
        llm.set_seed(seed if seed is not None else random.getrandbits(31))
        vocab = llm._model.vocab
        outcome = GenerationOutcome(prompt_tokens=len(tokens), finish_reason="length")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopMatcher(params.stop)
        reasoning = ReasoningBudget(self._reasoning_budget) if self._reasoning_budget is not None else None
        processors = self._eog_processor() if params.ignore_eos else None
        if params.grammar is not None:
            self._use_grammar(params.grammar)
        generator = llm.generate(
            tokens,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            frequency_penalty=params.frequency_penalty,
            presence_penalty=params.presence_penalty,
            logits_processor=processors,
        )
        try:
            token = next(generator)
            while not cancel.is_set():
                if not params.ignore_eos and llama_cpp.llama_vocab_is_eog(vocab, token):
                    outcome.finish_reason = "stop"
                    break
                now = time.perf_counter()
                if outcome.first_token_at is None:
                    outcome.first_token_at = now
                outcome.last_token_at = now
                outcome.completion_tokens += 1
                raw = decoder.decode(llm.detokenize([token]))
                visible = reasoning.feed(raw) if reasoning is not None else raw
                inject = None
                if reasoning is not None and reasoning.should_close():
                    inject = self._close_reasoning_tokens()
                    outcome.completion_tokens += len(inject)
                    visible += reasoning.force_close()
                visible = stops.feed(visible)
                if visible or not raw:
                    sink(visible)  # "" only for a token that decodes to nothing (max_blank_chunks)
                if stops.stopped:
                    outcome.finish_reason = "stop"
                    break
                if outcome.completion_tokens >= limit:
                    break
                token = generator.send(inject)
        except StopIteration:
            pass
        finally:
            generator.close()
            llm.__dict__.pop("_init_sampler", None)
        tail = decoder.decode(b"", final=True)
        if reasoning is not None:
            tail = reasoning.feed(tail) + reasoning.flush()
        tail = stops.feed(tail) + stops.flush()
        if tail:
            sink(tail)
        return outcome

    def _close_reasoning_tokens(self) -> list[int]:
        if self._close_tokens is None:
            text = ReasoningBudget.CLOSE_TEXT.encode()
            self._close_tokens = list(self._llm.tokenize(text, add_bos=False, special=True))
        return self._close_tokens

    def _use_grammar(self, text: str) -> None:
        """Make the next ``Llama.generate`` sample under GBNF ``text``, checking each sampled token
        against the grammar before applying it to the whole vocabulary (see ``grammar_sampler``)."""
        llm = self._llm
        try:
            sampler = GrammarCheckedSampler(llm._model.vocab, llm.n_vocab(), text)
        except ValueError as exc:
            log.error("llama.cpp rejected a generated grammar:\n%s", text)
            raise EngineError("the output grammar could not be compiled; see the node log") from exc
        base = type(llm)._init_sampler

        def init_sampler(**kwargs: Any) -> GrammarCheckedSampler:
            return sampler.with_chain(base(llm, **{**kwargs, "grammar": None}))

        llm._init_sampler = init_sampler  # read once by the generate() call that follows

    def _eog_processor(self) -> Any:
        if self._eog_ban is None:
            self._eog_ban = _eog_ban(self._llm, self._llm._model.vocab)
        return self._eog_ban

    # -- embeddings ------------------------------------------------------------
    def embed(self, inputs: list[str]) -> EmbeddingResult:
        if not self.info.embedding:
            raise embeddings_not_enabled(self.info.id, env_model_name(self.info.id))
        llm = self._llm
        limit = llm.n_batch
        for index, text in enumerate(inputs):
            count = len(llm.tokenize(text.encode("utf-8")))
            if count > limit:
                raise InvalidRequestError(
                    f"input[{index}] is {count} tokens; the limit for '{self.info.id}' is {limit}",
                    param="input",
                    code="context_length_exceeded",
                )
        vectors, total = llm.embed(inputs, normalize=True, truncate=False, return_count=True)
        return EmbeddingResult(vectors=[list(map(float, v)) for v in vectors], prompt_tokens=int(total))


def _eog_ban(llm: Any, vocab: Any) -> Any:
    """A logits processor that makes every end-of-generation token impossible."""
    import llama_cpp
    import numpy as np

    banned = np.array(
        [t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.intc
    )

    def ban(_input_ids: Any, scores: Any) -> Any:
        scores[banned] = -np.inf
        return scores

    return llama_cpp.LogitsProcessorList([ban])
