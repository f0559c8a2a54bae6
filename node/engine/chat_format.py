"""Turning chat messages into a prompt.

Three sources, in order: an explicit ``chat_format`` name from config, the
Jinja template stored in the GGUF, or Gemma turns for a base model that has no
template (the built-in default model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import ChatMessage
from .tools import FunctionTool, fallback_messages, template_knows_tools, template_messages

GEMMA_START_OF_TURN = "<start_of_turn>"
GEMMA_END_OF_TURN = "<end_of_turn>"

TURN_MARKERS = (
    GEMMA_START_OF_TURN, GEMMA_END_OF_TURN,                       # Gemma
    "<|im_start|>", "<|im_end|>",                                 # ChatML (SmolLM2, Qwen)
    "<|start_header_id|>", "<|eot_id|>",                          # Llama 3
    "<|user|>", "<|assistant|>", "<|system|>", "<|end|>",         # Phi-3, Zephyr
    "[INST]",                                                     # Mistral, Llama 2
)
"""Markers that open or close a turn: a model that produces one has finished its answer."""


def turn_stops(prompt: str) -> tuple[str, ...]:
    """The turn markers the rendered chat uses: the model must stop on any of them."""
    return tuple(marker for marker in TURN_MARKERS if marker in prompt)


def render_gemma(messages: list[ChatMessage]) -> tuple[str, tuple[str, ...]]:
    """Gemma turns. Gemma has no system role: system text leads the first user turn."""
    system = "\n\n".join(m.content for m in messages if m.role == "system")
    parts: list[str] = []
    pending_system = system
    for message in messages:
        if message.role == "system":
            continue
        role = "model" if message.role == "assistant" else "user"
        content = message.content
        if role == "user" and pending_system:
            content = f"{pending_system}\n\n{content}"
            pending_system = ""
        parts.append(f"<start_of_turn>{role}\n{content}{GEMMA_END_OF_TURN}\n")
    if pending_system:
        parts.append(f"<start_of_turn>user\n{pending_system}{GEMMA_END_OF_TURN}\n")
    parts.append("<start_of_turn>model\n")
    return "".join(parts), (GEMMA_END_OF_TURN, GEMMA_START_OF_TURN)


def render_template(
    template: str,
    messages: list[ChatMessage],
    *,
    bos_token: str,
    eos_token: str,
    tools: Sequence[FunctionTool] = (),
) -> tuple[str, tuple[str, ...]]:
    """Render with the GGUF's Jinja template. ``tools`` (and the messages' calls and results)
    go to the template natively when it knows tools, else in the fallback format of
    :mod:`node.engine.tools`; a template that refuses the native form gets the fallback too."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token)
    uses_tools = bool(tools) or any(m.role == "tool" or m.tool_calls for m in messages)
    if uses_tools and template_knows_tools(template):
        try:
            native: Any = template_messages(messages)
            listed: Any = [t.to_openai() for t in tools] or None
            result = formatter(messages=native, tools=listed)
            return result.prompt, _stops(result.stop, eos_token)
        except ValueError:  # raise_exception() in the template: it wants another shape
            pass
    if uses_tools:
        messages = fallback_messages(messages, tools)
    result = formatter(messages=_as_dicts(messages))
    return result.prompt, _stops(result.stop, eos_token, *turn_stops(result.prompt))


def render_named_format(name: str, messages: list[ChatMessage]) -> tuple[str, tuple[str, ...]]:
    """A format llama-cpp-python knows by name (``chatml``, ``llama3``, ``mistral-instruct``…)."""
    if name == "gemma":
        return render_gemma(messages)
    from llama_cpp import llama_chat_format

    formatter = getattr(llama_chat_format, "format_" + name.replace("-", "_"), None)
    if formatter is None:
        raise ValueError(f"unknown chat_format '{name}'")
    result = formatter(messages=_as_dicts(messages))
    return result.prompt, _stops(result.stop, *turn_stops(result.prompt))


def known_chat_formats() -> list[str]:
    from llama_cpp import llama_chat_format

    names = {n[len("format_"):].replace("_", "-") for n in dir(llama_chat_format) if n.startswith("format_")}
    return sorted(names | {"gemma"})


def _stops(stop: str | list[str] | None, *extra: str) -> tuple[str, ...]:
    if stop is None:
        values: list[str] = []
    elif isinstance(stop, str):
        values = [stop]
    else:
        values = list(stop)
    return tuple(dict.fromkeys(v for v in (*values, *extra) if v))


def _as_dicts(messages: list[ChatMessage]) -> Any:
    return [{"role": m.role, "content": m.content} for m in messages]
