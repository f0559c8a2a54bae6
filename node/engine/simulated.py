"""A SIMULATED engine: filler tokens at a set rate, for routing and scale tests.

It exists so tests and benchmarks can build meshes of many "slow" and "fast"
devices on one machine. It never stands in for the real engine in tests of the
OpenAI surface.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence

from ..common.errors import InvalidRequestError
from .base import ChatMessage, EmbeddingResult, GenerationOutcome, ModelInfo, SamplingParams, TokenSink
from .tools import FunctionTool, fallback_messages

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
DEFAULT_SIMULATED_MAX_TOKENS = 64


class SimulatedEngine:
    """Emits one word per token every ``1 / tok_per_s`` seconds."""

    def __init__(self, info: ModelInfo, *, tok_per_s: float) -> None:
        if tok_per_s <= 0:
            raise ValueError("tok_per_s must be positive")
        self.info = info
        self.tok_per_s = tok_per_s

    def load(self) -> None:
        return None

    def close(self) -> None:
        return None

    def render_chat(
        self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> tuple[str, tuple[str, ...]]:
        plain = fallback_messages(messages, tools)
        return "\n".join(f"{m.role}: {m.content}" for m in plain) + "\nassistant:", ()

    @staticmethod
    def count_tokens(text: str) -> int:
        return max(1, len(text.split()))

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        sink: TokenSink,
        cancel: threading.Event,
    ) -> GenerationOutcome:
        if self.info.embedding:
            raise InvalidRequestError("simulated model is in embedding mode", param="model")
        limit = params.max_tokens or DEFAULT_SIMULATED_MAX_TOKENS
        outcome = GenerationOutcome(prompt_tokens=self.count_tokens(prompt), finish_reason="length")
        interval = 1.0 / self.tok_per_s
        deadline = time.perf_counter()
        for index in range(limit):
            deadline += interval
            if cancel.wait(max(0.0, deadline - time.perf_counter())):
                break
            now = time.perf_counter()
            outcome.first_token_at = outcome.first_token_at or now
            outcome.last_token_at = now
            outcome.completion_tokens += 1
            sink(("" if index == 0 else " ") + _WORDS[index % len(_WORDS)])
        return outcome

    def embed(self, inputs: list[str]) -> EmbeddingResult:
        if not self.info.embedding:
            raise InvalidRequestError("model is not in embedding mode", param="model")
        vectors = []
        for text in inputs:
            digest = hashlib.blake2b(text.encode(), digest_size=8).digest()  # same on every node
            raw = [float(byte) + 1.0 for byte in digest]
            norm = sum(v * v for v in raw) ** 0.5
            vectors.append([v / norm for v in raw])
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(self.count_tokens(t) for t in inputs))
