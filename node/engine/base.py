"""The engine protocol and the plain values that cross it.

An engine is synchronous and runs on its model's worker thread; the async
world talks to it only through :class:`node.engine.slot.ModelSlot`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .tools import FunctionTool

FinishReason = Literal["stop", "length"]
Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call the assistant made: ``arguments`` is JSON text (an object)."""

    id: str
    name: str
    arguments: str


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    """assistant messages: the calls it made."""
    tool_call_id: str | None = None
    """tool messages: the call this is the result of."""
    name: str | None = None
    """tool messages: the function's name (filled from the matching call)."""


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """A model's sampling settings for requests that do not choose their own."""

    temperature: float = 0.8
    top_p: float = 0.95
    repeat_penalty: float = 1.0
    max_tokens: int | None = None
    """None: until end of sequence or the context is full."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int | None = None
    """None: the model's default (``SamplingDefaults.max_tokens``)."""
    temperature: float | None = None
    """None (here and below): the model's default (``SamplingDefaults``)."""
    top_p: float | None = None
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False
    """keep generating past end-of-sequence (the capability probe needs a fixed count)."""
    grammar: str | None = None
    """GBNF text (root rule ``root``): only output the grammar accepts is sampled."""
    logprobs: int | None = None
    """None: no log-probabilities; k ≥ 0: the chosen token's and the k most likely ones'."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: str
    path: str
    ctx_size: int
    embedding: bool
    owned_by: str = "dvai-mesh"
    aliases: tuple[str, ...] = ()
    chat_format: str | None = None
    size_bytes: int = 0
    grammar: bool = True
    """the engine honours ``SamplingParams.grammar`` (the SIMULATED engine does not)."""
    catalog: str | None = None
    """the model catalogue entry it was obtained from (node/catalog.py), if any."""

    @property
    def serves(self) -> tuple[str, ...]:
        return ("embedding",) if self.embedding else ("chat", "completion")

    @property
    def features(self) -> tuple[str, ...]:
        """What requests for this model may ask for (``/v1/models`` and the health report)."""
        if self.embedding:
            return ("embeddings",)
        constrained = ("tools", "structured_outputs") if self.grammar else ()
        return ("chat", "completions", "responses", *constrained)


@dataclass(slots=True)
class GenerationOutcome:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: FinishReason = "stop"
    first_token_at: float | None = None
    """``time.perf_counter()`` of the first generated token."""
    last_token_at: float | None = None
    cached_tokens: int = 0
    """prompt tokens whose KV was reused instead of evaluated again."""

    @property
    def decode_tok_per_s(self) -> float | None:
        """(n − 1) ÷ (last token time − first token time): decode speed without prompt time.

        The one definition used by capability scores, peer verification and forwarding
        (which fill the token times with arrival times at their end). None when fewer than
        two tokens or no time passed."""
        if self.first_token_at is None or self.last_token_at is None:
            return None
        span = self.last_token_at - self.first_token_at
        if self.completion_tokens < 2 or span <= 0:
            return None
        return (self.completion_tokens - 1) / span

    def token_at(self, when: float) -> None:
        """Count one generated token that arrived at ``when``."""
        self.completion_tokens += 1
        if self.first_token_at is None:
            self.first_token_at = when
        self.last_token_at = when


@dataclass(frozen=True, slots=True)
class TopLogprob:
    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token's log-probability under the model, and the most likely alternatives."""

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Delta:
    """Text produced for one choice (``index``) since the previous delta."""

    index: int
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True)
class SequenceRequest:
    """A generation handed to a batching engine; its callbacks run on the worker thread.

    ``n`` choices share one prompt evaluation. ``on_delta`` receives each choice's text;
    ``on_done`` is called exactly once, with one outcome per choice or the exception
    that ended the request.
    """

    params: SamplingParams
    on_delta: Callable[[Delta], None]
    on_done: Callable[[list[GenerationOutcome] | BaseException], None]
    cancel: threading.Event
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    n: int = 1
    tools: tuple[FunctionTool, ...] = ()
    """function tools the chat's prompt presents to the model."""


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    vectors: list[list[float]]
    prompt_tokens: int


TokenSink = Callable[[str], None]
"""Called on the worker thread with each text delta ("" when a token adds no text yet)."""


class Engine(Protocol):
    """What a model backend provides. Every method runs on the model's worker thread."""

    info: ModelInfo

    def load(self) -> None: ...

    def close(self) -> None: ...

    def render_chat(
        self, messages: list[ChatMessage], tools: Sequence[FunctionTool] = ()
    ) -> tuple[str, tuple[str, ...]]:
        """The prompt text for a chat (presenting ``tools``) and the stop strings its format implies."""
        ...

    def generate(
        self,
        prompt: str,
        params: SamplingParams,
        sink: TokenSink,
        cancel: threading.Event,
    ) -> GenerationOutcome: ...

    def embed(self, inputs: list[str]) -> EmbeddingResult: ...


@runtime_checkable
class BatchEngine(Engine, Protocol):
    """An engine that runs several sequences at once in one context.

    ``submit`` may be called from any thread; it returns True when the caller must
    schedule :meth:`run` on the model's worker thread (no step loop is running).
    ``run`` steps every active sequence until none is left.
    """

    parallel: int

    def submit(self, request: SequenceRequest) -> bool: ...

    def run(self) -> None: ...

    def stats(self) -> dict[str, float]: ...

    def seat_states(self) -> list[dict[str, object]]:
        """Per sequence seat: ``id``, ``busy``, ``cachedTokens`` (KV tokens kept for reuse)."""
        ...


def prompt_and_params(
    engine: Engine,
    messages: Sequence[ChatMessage] | None,
    tools: Sequence[FunctionTool],
    prompt: str | None,
    params: SamplingParams,
) -> tuple[str, SamplingParams]:
    """The prompt text a generation runs on and its sampling parameters: a chat is rendered by
    the engine, and the stop strings its format implies join the request's own."""
    if messages is None:
        return prompt or "", params
    text, stops = engine.render_chat(list(messages), tools)
    if stops:
        params = replace(params, stop=tuple(dict.fromkeys((*params.stop, *stops))))
    return text, params
