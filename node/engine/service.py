"""The engine service: parsed requests in, OpenAI response objects and chunks out.

Used by the HTTP handlers and by the embeddable ``Node`` alike, so both speak exactly
the same shapes. Chat and legacy completions share one generation path
(:meth:`InferenceService.stream`); a whole answer is the same stream gathered
(:meth:`InferenceService.complete`). The first chunk is produced only once the model
has started, so queue-full or unknown-model errors surface as proper HTTP statuses
before any byte is sent.
"""

from __future__ import annotations

import base64
import contextlib
import json
import struct
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

from ..common.errors import InvalidRequestError, embeddings_not_enabled
from ..config import env_model_name
from .base import FinishReason, GenerationOutcome, TokenLogprob
from .queue import NO_APP
from .record import SERVED_LOCAL, RequestRecord
from .registry import ModelRegistry
from .requests import ChatRequest, EmbeddingRequest, GenerationRequest
from .slot import GenerationJob, ModelSlot
from .tool_output import stream_delta
from .tools import StreamEvent, TextDelta, ToolCallStream

__all__ = ["InferenceLimits", "InferenceService", "new_id"]


@dataclass(frozen=True, slots=True)
class InferenceLimits:
    generation_timeout: float
    max_blank_chunks: int


def _app_of(record: RequestRecord | None) -> str:
    """The scheduling class of a request in its model's queue: the caller's app id, set on the
    record by the HTTP edge once the caller is authenticated (``NO_APP`` without a record)."""
    return record.app_id if record is not None and record.app_id else NO_APP


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class InferenceService:
    def __init__(self, registry: ModelRegistry, limits: InferenceLimits) -> None:
        self.registry = registry
        self.limits = limits

    # -- text generation: one path -------------------------------------------
    def stream(self, request: GenerationRequest, record: RequestRecord | None = None,
               ) -> AsyncIterator[dict[str, Any]]:
        """The answer as OpenAI chunks (``chat.completion.chunk`` or streamed ``text_completion``)."""
        return self._chunks(request, record, with_usage=request.include_usage)

    async def _chunks(self, request: GenerationRequest, record: RequestRecord | None, *, with_usage: bool,
                      ) -> AsyncGenerator[dict[str, Any], None]:
        slot = self.registry.resolve(request.model)
        check_constrainable(slot, request)
        shape = _Shape.of(request, slot.info.id)
        total = GenerationOutcome()
        single: GenerationOutcome | None = None
        started = time.perf_counter()
        want_logprobs = request.params.logprobs is not None
        reads_calls = isinstance(request, ChatRequest) and request.reads_calls
        for base, job, echo in _jobs(request):
            fresh = [True] * job.n
            readers = [_CallReader(request) for _ in range(job.n)] if isinstance(request, ChatRequest) \
                and reads_calls else None
            pending: list[list[TokenLogprob]] = [[] for _ in range(job.n)]
            async with slot.generate(job, timeout=self.limits.generation_timeout,
                                     max_blank=self.limits.max_blank_chunks,
                                     keep_alive=request.keep_alive, app=_app_of(record)) as generation:
                async for delta in generation.deltas():
                    at = delta.index
                    if readers is None:
                        first = fresh[at]
                        fresh[at] = False
                        yield shape.chunk(base + at, (echo + delta.text) if first else delta.text,
                                          first=first, logprobs=list(delta.logprobs) if want_logprobs else None)
                        continue
                    pending[at] += delta.logprobs  # carried by the next chunk the call reader lets out
                    for piece in readers[at].feed(delta.text):
                        yield shape.delta_chunk(base + at, piece, first=fresh[at],
                                                logprobs=pending[at] if want_logprobs else None)
                        fresh[at] = False
                        pending[at] = []
                outcomes = generation.outcomes
            _add(total, outcomes)
            single = single or outcomes[0]
            for at, outcome in enumerate(outcomes):
                finish: FinishReason | Literal["tool_calls"] = outcome.finish_reason
                if readers is not None:
                    for piece in readers[at].finish():
                        yield shape.delta_chunk(base + at, piece, first=fresh[at],
                                                logprobs=pending[at] if want_logprobs else None)
                        fresh[at] = False
                        pending[at] = []
                    finish = readers[at].finish_reason(outcome.finish_reason)
                if fresh[at] and (shape.chat or echo):  # nothing generated: still answer the role / echo
                    yield shape.chunk(base + at, echo, first=True)
                yield shape.chunk(base + at, None, finish=finish)
        # one sequence's decode rate (n choices together would read as n times faster)
        _fill(record, slot, total, started, single)
        if with_usage:
            yield shape.usage_chunk(total)

    async def complete(self, request: GenerationRequest, record: RequestRecord | None = None) -> dict[str, Any]:
        """The whole answer (``chat.completion`` or ``text_completion``): the stream, gathered."""
        texts: dict[int, list[str]] = {}
        finishes: dict[int, str] = {}
        logprobs: dict[int, list[Any]] = {}
        calls: dict[int, dict[int, dict[str, Any]]] = {}
        shape: _Shape | None = None
        usage: dict[str, Any] | None = None
        async with contextlib.aclosing(self._chunks(request, record, with_usage=True)) as chunks:
            async for chunk in chunks:
                shape = shape or _Shape.from_chunk(chunk, request)
                if "usage" in chunk:
                    usage = chunk["usage"]
                for choice in chunk["choices"]:
                    texts.setdefault(choice["index"], []).append(_choice_text(choice) or "")
                    _gather_calls(calls.setdefault(choice["index"], {}), choice)
                    if choice["finish_reason"] is not None:
                        finishes[choice["index"]] = choice["finish_reason"]
                    if choice["logprobs"] is not None:
                        logprobs.setdefault(choice["index"], []).append(choice["logprobs"])
        assert shape is not None and usage is not None
        wanted = request.params.logprobs is not None
        merged = {i: _merge_logprobs(logprobs.get(i, []), chat=shape.chat) for i in texts} if wanted else {}
        whole_calls = {i: [c for c in found.values() if _complete(c) or finishes.get(i) != "length"]
                       for i, found in calls.items()}
        return shape.whole({i: "".join(parts) for i, parts in texts.items()}, finishes, usage, merged,
                           whole_calls)

    # -- embeddings ----------------------------------------------------------
    async def embeddings(self, request: EmbeddingRequest, record: RequestRecord | None = None) -> dict[str, Any]:
        slot = self.registry.resolve(request.model)
        if not slot.info.embedding:  # checked before queueing: a wrong model fails fast
            raise embeddings_not_enabled(slot.info.id, env_model_name(slot.info.id))
        result = await slot.embed(list(request.inputs), keep_alive=request.keep_alive, app=_app_of(record))
        if record is not None:
            record.served(SERVED_LOCAL, model=slot.info.id, prompt_tokens=result.prompt_tokens, completion_tokens=0)
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
                    "features": list(info.features),
                    "aliases": list(info.aliases),
                    "loaded": slot.state == "ready",
                    "state": slot.state,
                    "catalog": catalog_metadata(info.catalog),
                }
            )
        return {"object": "list", "data": data}


def catalog_metadata(name: str | None) -> dict[str, Any] | None:
    """The catalogue entry's metadata (category, size, sha256, source, …) for ``/v1/models``."""
    from ..catalog import lookup

    entry = lookup(name) if name is not None else None
    return entry.metadata() if entry is not None else None


# --------------------------------------------------------------------------
# Response shaping


@dataclass(frozen=True, slots=True)
class _Shape:
    """How chat and legacy completions differ: ids, object names, where the text goes."""

    chat: bool
    id: str
    created: int
    model: str

    @classmethod
    def of(cls, request: GenerationRequest, model: str) -> _Shape:
        chat = isinstance(request, ChatRequest)
        return cls(chat, new_id("chatcmpl" if chat else "cmpl"), int(time.time()), model)

    @classmethod
    def from_chunk(cls, chunk: dict[str, Any], request: GenerationRequest) -> _Shape:
        return cls(isinstance(request, ChatRequest), chunk["id"], chunk["created"], chunk["model"])

    def _head(self, whole: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion" if whole else "chat.completion.chunk"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def delta_chunk(self, index: int, delta: dict[str, Any], *, first: bool = False,
                    logprobs: list[TokenLogprob] | None = None) -> dict[str, Any]:
        """A chat chunk with any ``delta`` (text or tool calls); the first also names the role."""
        delta = {"role": "assistant", **delta} if first else delta
        choice = {"index": index, "delta": delta, "finish_reason": None,
                  "logprobs": None if logprobs is None else _chat_logprobs(logprobs)}
        return {**self._head(False), "choices": [choice]}

    def chunk(self, index: int, text: str | None, *, first: bool = False,
              finish: str | None = None, logprobs: list[TokenLogprob] | None = None,
              ) -> dict[str, Any]:
        """One streamed chunk: a text delta, or (``text`` None) the finish of choice ``index``.

        ``logprobs`` (when the request asked for them) are the tokens this delta came from."""
        if self.chat:
            delta: dict[str, Any] = {} if text is None else (
                {"role": "assistant", "content": text} if first else {"content": text})
            choice = {"index": index, "delta": delta, "finish_reason": finish,
                      "logprobs": None if logprobs is None else _chat_logprobs(logprobs)}
        else:
            choice = {"text": text or "", "index": index,
                      "logprobs": None if logprobs is None else _completion_logprobs(logprobs),
                      "finish_reason": finish}
        return {**self._head(False), "choices": [choice]}

    def usage_chunk(self, outcome: GenerationOutcome) -> dict[str, Any]:
        return {**self._head(False), "choices": [], "usage": _usage(outcome)}

    def whole(self, texts: dict[int, str], finishes: dict[int, str], usage: dict[str, Any],
              logprobs: dict[int, dict[str, Any]], calls: dict[int, list[dict[str, Any]]] | None = None,
              ) -> dict[str, Any]:
        choices = []
        for index in sorted(texts):
            if self.chat:
                message: dict[str, Any] = {"role": "assistant", "content": texts[index]}
                if calls and calls.get(index):
                    message = {"role": "assistant", "content": texts[index] or None, "tool_calls": calls[index]}
                choices.append({"index": index, "message": message,
                                "finish_reason": finishes.get(index, "stop"), "logprobs": logprobs.get(index)})
            else:
                choices.append({"text": texts[index], "index": index, "logprobs": logprobs.get(index),
                                "finish_reason": finishes.get(index, "stop")})
        return {**self._head(True), "choices": choices, "usage": usage}


def check_constrainable(slot: ModelSlot, request: GenerationRequest) -> None:
    """A grammar on a model whose engine cannot honour it (SIMULATED) is a 400, never ignored."""
    if request.params.grammar is None or slot.info.grammar:
        return
    param = "tool_choice" if isinstance(request, ChatRequest) and request.tool_choice.forced else "response_format"
    raise InvalidRequestError(
        f"model '{slot.info.id}' cannot constrain its output (a SIMULATED engine): {param} needs a model "
        "whose /v1/models entry lists 'tools' and 'structured_outputs'", param=param)


class _CallReader:
    """A chat's output read for tool calls: text and call deltas in OpenAI's chat shapes."""

    def __init__(self, request: ChatRequest) -> None:
        self._request = request
        self._stream = ToolCallStream(request.tools)

    def feed(self, text: str) -> list[dict[str, Any]]:
        return self._deltas(self._stream.feed(text))

    def finish(self) -> list[dict[str, Any]]:
        return self._deltas(self._stream.finish())

    def finish_reason(self, engine_reason: FinishReason) -> FinishReason | Literal["tool_calls"]:
        """``tool_calls`` when it made calls, unless ``max_tokens`` cut the last one short."""
        stream = self._stream
        if stream.calls and (engine_reason != "length" or stream.last_complete):
            return "tool_calls"
        return engine_reason

    def _deltas(self, events: list[StreamEvent] | Any) -> list[dict[str, Any]]:
        out = []
        for event in events:
            if self._request.tool_choice.forced and isinstance(event, TextDelta):
                continue  # a forced output is calls only: text is a call cut short by max_tokens
            delta = stream_delta(event, self._request.parallel_tool_calls)
            if delta is not None:
                out.append(delta)
        return out


def _gather_calls(calls: dict[int, dict[str, Any]], choice: dict[str, Any]) -> None:
    """Reassemble ``delta.tool_calls`` pieces into whole calls (``message.tool_calls``)."""
    for piece in (choice.get("delta") or {}).get("tool_calls") or []:
        function = piece.get("function") or {}
        call = calls.get(piece["index"])
        if call is None:
            calls[piece["index"]] = call_json_from(piece.get("id", ""), function.get("name", ""),
                                                   function.get("arguments", ""))
        else:
            call["function"]["arguments"] += function.get("arguments") or ""


def call_json_from(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _complete(call: dict[str, Any]) -> bool:
    """Whether a call's arguments are a whole JSON object (``max_tokens`` may cut the last one)."""
    try:
        return isinstance(json.loads(call["function"]["arguments"]), dict)
    except ValueError:
        return False


def _jobs(request: GenerationRequest) -> list[tuple[int, GenerationJob, str]]:
    """(index of its first choice, what to generate, text echoed before the first delta) per prompt.

    A job yields ``n`` choices from one evaluation of its prompt; with several prompts, choice
    ``index`` is prompt number × ``n`` + choice (as OpenAI numbers them)."""
    n = request.n
    if isinstance(request, ChatRequest):
        tools = request.tools if request.reads_calls else ()
        return [(0, GenerationJob(params=request.params, messages=request.messages, n=n, tools=tools), "")]
    return [(number * n, GenerationJob(params=request.params, prompt=prompt, n=n),
             prompt if request.echo else "")
            for number, prompt in enumerate(request.prompts)]


def _choice_text(choice: dict[str, Any]) -> str | None:
    if "delta" in choice:
        content = choice["delta"].get("content")
        return content if isinstance(content, str) else None
    text = choice.get("text")
    return text if isinstance(text, str) else None


def _usage(outcome: GenerationOutcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def _add(total: GenerationOutcome, outcomes: list[GenerationOutcome]) -> None:
    """Add one prompt's choices: its prompt counts once, every choice's tokens count."""
    first = outcomes[0]
    total.prompt_tokens += first.prompt_tokens
    total.cached_tokens += first.cached_tokens
    total.completion_tokens += sum(o.completion_tokens for o in outcomes)
    total.first_token_at = total.first_token_at or first.first_token_at
    total.last_token_at = max((o.last_token_at for o in outcomes if o.last_token_at is not None),
                              default=total.last_token_at)
    total.finish_reason = first.finish_reason


def _fill(record: RequestRecord | None, slot: ModelSlot, outcome: GenerationOutcome, started: float,
          single: GenerationOutcome | None) -> None:
    if record is None:
        return
    first = None if outcome.first_token_at is None else outcome.first_token_at - started
    record.served(SERVED_LOCAL, model=slot.info.id, prompt_tokens=outcome.prompt_tokens,
                  completion_tokens=outcome.completion_tokens, first_token_s=first,
                  decode_tok_per_s=single.decode_tok_per_s if single is not None else None)


def _chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's ``choices[].logprobs`` for chat."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.bytes),
                "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.bytes)} for a in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _completion_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object (``text_offset`` counts characters within the delta)."""
    offsets: list[int] = []
    position = 0
    for t in tokens:
        offsets.append(position)
        position += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens],
        "text_offset": offsets,
    }


def _merge_logprobs(parts: list[dict[str, Any]], *, chat: bool) -> dict[str, Any]:
    """The streamed chunks' logprobs of one choice as the whole answer's."""
    if chat:
        return {"content": [entry for part in parts for entry in part["content"]], "refusal": None}
    merged: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    position = 0
    for part in parts:
        merged["tokens"] += part["tokens"]
        merged["token_logprobs"] += part["token_logprobs"]
        merged["top_logprobs"] += part["top_logprobs"]
        for token in part["tokens"]:
            merged["text_offset"].append(position)
            position += len(token)
    return merged


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector
