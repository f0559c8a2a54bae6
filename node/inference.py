"""Local inference: parsed OpenAI requests in, OpenAI response objects out.

Used by the HTTP handlers and by the embeddable ``Node`` alike, so both speak
exactly the same shapes. Streaming methods yield chunk dicts; the first one is
produced only once the model has started (so queue-full or unknown-model
errors surface as proper HTTP statuses before any byte is sent).
"""

from __future__ import annotations

import base64
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from .api.schemas import ChatRequest, CompletionRequest, EmbeddingRequest
from .config import env_model_name
from .engine.base import GenerationOutcome
from .engine.registry import ModelRegistry
from .engine.slot import GenerationJob, ModelSlot
from .errors import embeddings_not_enabled


@dataclass(frozen=True, slots=True)
class InferenceLimits:
    generation_timeout: float
    max_blank_chunks: int


@dataclass(slots=True)
class UsageRecord:
    """What one served request cost: read by audit, metrics and capability tracking."""

    model: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    decode_tok_per_s: float | None = None


UsageListener = Callable[[UsageRecord], None]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class InferenceService:
    def __init__(self, registry: ModelRegistry, limits: InferenceLimits) -> None:
        self.registry = registry
        self.limits = limits

    def _generate(self, slot: ModelSlot, job: GenerationJob) -> Any:
        return slot.generate(
            job, timeout=self.limits.generation_timeout, max_blank=self.limits.max_blank_chunks
        )

    # -- chat ----------------------------------------------------------------
    async def chat(self, request: ChatRequest, usage: UsageRecord | None = None) -> dict[str, Any]:
        slot = self.registry.resolve(request.model)
        job = GenerationJob(params=request.params, messages=request.messages)
        started = time.perf_counter()
        async with self._generate(slot, job) as generation:
            text = await generation.collect()
            outcome = generation.outcome
        assert outcome is not None
        _fill_usage(usage, slot, outcome, started)
        return {
            "id": new_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": slot.info.id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": outcome.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": _usage(outcome),
        }

    async def chat_stream(
        self, request: ChatRequest, usage: UsageRecord | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        slot = self.registry.resolve(request.model)
        job = GenerationJob(params=request.params, messages=request.messages)
        chunk_id, created, model = new_id("chatcmpl"), int(time.time()), slot.info.id

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": chunk_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
            }

        started = time.perf_counter()
        async with self._generate(slot, job) as generation:
            first = True
            async for text in generation:
                yield chunk({"role": "assistant", "content": text} if first else {"content": text})
                first = False
            outcome = generation.outcome
        assert outcome is not None
        _fill_usage(usage, slot, outcome, started)
        if first:
            yield chunk({"role": "assistant", "content": ""})
        yield chunk({}, outcome.finish_reason)
        if request.include_usage:
            final = chunk({})
            final["choices"] = []
            final["usage"] = _usage(outcome)
            yield final

    # -- legacy completions --------------------------------------------------
    async def completion(
        self, request: CompletionRequest, usage: UsageRecord | None = None
    ) -> dict[str, Any]:
        slot = self.registry.resolve(request.model)
        choices, total = [], GenerationOutcome()
        started = time.perf_counter()
        for index, prompt in enumerate(request.prompts):
            job = GenerationJob(params=request.params, prompt=prompt)
            async with self._generate(slot, job) as generation:
                text = await generation.collect()
                outcome = generation.outcome
            assert outcome is not None
            total.prompt_tokens += outcome.prompt_tokens
            total.completion_tokens += outcome.completion_tokens
            total.first_token_at = total.first_token_at or outcome.first_token_at
            total.last_token_at = outcome.last_token_at
            choices.append(
                {
                    "text": (prompt + text) if request.echo else text,
                    "index": index,
                    "logprobs": None,
                    "finish_reason": outcome.finish_reason,
                }
            )
        _fill_usage(usage, slot, total, started)
        return {
            "id": new_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": slot.info.id,
            "choices": choices,
            "usage": _usage(total),
        }

    async def completion_stream(
        self, request: CompletionRequest, usage: UsageRecord | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        slot = self.registry.resolve(request.model)
        prompt = request.prompts[0]
        job = GenerationJob(params=request.params, prompt=prompt)
        chunk_id, created, model = new_id("cmpl"), int(time.time()), slot.info.id

        def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
            return {
                "id": chunk_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            }

        started = time.perf_counter()
        async with self._generate(slot, job) as generation:
            first = True
            async for text in generation:
                yield chunk((prompt + text) if first and request.echo else text)
                first = False
            outcome = generation.outcome
        assert outcome is not None
        _fill_usage(usage, slot, outcome, started)
        yield chunk("", outcome.finish_reason)
        if request.include_usage:
            final = chunk("")
            final["choices"] = []
            final["usage"] = _usage(outcome)
            yield final

    # -- embeddings ----------------------------------------------------------
    async def embeddings(self, request: EmbeddingRequest, usage: UsageRecord | None = None) -> dict[str, Any]:
        slot = self.registry.resolve(request.model)
        if not slot.info.embedding:  # checked before queueing: a wrong model fails fast
            raise embeddings_not_enabled(slot.info.id, env_model_name(slot.info.id))
        result = await slot.embed(list(request.inputs))
        if usage is not None:
            usage.model = slot.info.id
            usage.prompt_tokens = result.prompt_tokens
        data = [
            {"object": "embedding", "index": i, "embedding": _encode(v, request.encoding_format)}
            for i, v in enumerate(result.vectors)
        ]
        return {
            "object": "list",
            "data": data,
            "model": slot.info.id,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }

    # -- models --------------------------------------------------------------
    def list_models(self) -> dict[str, Any]:
        data = []
        for slot in self.registry.slots():
            info = slot.info
            data.append(
                {
                    "id": info.id,
                    "object": "model",
                    "created": int(self.registry.started_at),
                    "owned_by": info.owned_by,
                    "context_length": info.ctx_size,
                    "serves": list(info.serves),
                    "aliases": list(info.aliases),
                    "loaded": slot.state == "ready",
                }
            )
        return {"object": "list", "data": data}


def _usage(outcome: GenerationOutcome) -> dict[str, int]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def decode_rate(outcome: GenerationOutcome) -> float | None:
    """(n − 1) ÷ (last token time − first token time): decode speed without prompt time."""
    if outcome.first_token_at is None or outcome.last_token_at is None:
        return None
    span = outcome.last_token_at - outcome.first_token_at
    if outcome.completion_tokens < 2 or span <= 0:
        return None
    return (outcome.completion_tokens - 1) / span


def _fill_usage(usage: UsageRecord | None, slot: ModelSlot, outcome: GenerationOutcome, started: float) -> None:
    if usage is None:
        return
    usage.model = slot.info.id
    usage.prompt_tokens = outcome.prompt_tokens
    usage.completion_tokens = outcome.completion_tokens
    if outcome.first_token_at is not None:
        usage.first_token_s = outcome.first_token_at - started
    usage.decode_tok_per_s = decode_rate(outcome)


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
