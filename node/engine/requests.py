"""The parsed requests the engine service serves: plain frozen values, no HTTP.

The HTTP edge (``node/api/schemas.py``) parses OpenAI bodies into these; the embeddable
``Node`` builds the same values, so both reach the engine through one path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import ChatMessage, SamplingParams
from .tools import FunctionTool, ToolChoice

__all__ = ["ChatRequest", "CompletionRequest", "EmbeddingRequest", "GenerationRequest"]


@dataclass(frozen=True, slots=True)
class ChatRequest:
    model: str
    messages: tuple[ChatMessage, ...]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    """choices sampled from one evaluation of the prompt."""
    logprobs: bool = False
    """``choices[].logprobs.content[]``; ``params.logprobs`` holds ``top_logprobs``."""
    keep_alive: float | None = None
    """seconds the model stays loaded after this request (negative: for ever; 0: unload when done)."""
    tools: tuple[FunctionTool, ...] = ()
    tool_choice: ToolChoice = ToolChoice("none")
    parallel_tool_calls: bool = True

    @property
    def reads_calls(self) -> bool:
        """Whether the output is read for tool calls (tools given, ``tool_choice`` not ``none``)."""
        return bool(self.tools) and self.tool_choice.mode != "none"


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    model: str
    prompts: tuple[str, ...]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    n: int = 1
    keep_alive: float | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingRequest:
    model: str
    inputs: tuple[str, ...]
    encoding_format: str = "float"
    keep_alive: float | None = None


GenerationRequest = ChatRequest | CompletionRequest
"""A request that generates text (as opposed to embeddings)."""
