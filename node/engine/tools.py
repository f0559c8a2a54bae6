"""Function tools: how they reach the prompt, the grammar that forces a call, and reading calls back.

The wire format of a call in model output is the Hermes/Qwen one, which many tool-trained
GGUF templates already teach their models::

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

- **Rendering.** A chat template that mentions ``tools`` receives them (and the messages'
  ``tool_calls``, tool results) natively. Any other model gets the *fallback format*:
  a system preamble listing the tools as JSON and the call syntax above, assistant calls
  written in that syntax, and tool results as user turns
  ``<tool_response>{"name": …, "content": …}</tool_response>`` (:func:`fallback_messages`).
- **Forcing.** For ``tool_choice`` ``required`` or a named function, :func:`call_grammar`
  gives a GBNF grammar whose every sentence is one call (or up to ``MAX_PARALLEL_CALLS``
  with ``parallel_tool_calls``) with arguments matching the tool's schema.
- **Reading.** :func:`parse_tool_calls` finds calls in a finished output (``<tool_call>``
  blocks, Mistral's ``[TOOL_CALLS]`` array, or an output that is only a call's JSON);
  :class:`ToolCallStream` does the same on a stream, holding back only text that may
  still turn into a call.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..constants import MAX_PARALLEL_CALLS
from .base import ChatMessage, ToolCall
from .grammar import GrammarBuilder, compact_json, gbnf_literal

__all__ = [
    "CALL_CLOSE",
    "CALL_OPEN",
    "FunctionTool",
    "MAX_PARALLEL_CALLS",
    "ToolChoice",
    "ToolCallStream",
    "ToolCallStart",
    "ToolArgumentsDelta",
    "TextDelta",
    "call_grammar",
    "fallback_messages",
    "new_call_id",
    "parse_tool_calls",
    "template_knows_tools",
]

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"


@dataclass(frozen=True, slots=True)
class FunctionTool:
    name: str
    description: str | None
    parameters: Mapping[str, Any]
    """the JSON schema of the arguments (an object schema)."""
    strict: bool = False

    def to_openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": dict(self.parameters)}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True, slots=True)
class ToolChoice:
    mode: Literal["none", "auto", "required", "function"] = "auto"
    name: str | None = None
    """the function ``mode == "function"`` forces."""

    @property
    def forced(self) -> bool:
        return self.mode in ("required", "function")


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def template_knows_tools(template: str) -> bool:
    """Whether a Jinja chat template renders a ``tools`` list (HF convention)."""
    return re.search(r"\btools\b", template) is not None


# -- rendering -----------------------------------------------------------------------

FALLBACK_PREAMBLE = (
    "You can call these functions. Each is described as a JSON object:\n{tools}\n\n"
    "To call a function, reply with only:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}</tool_call>\n'
    "Results come back as <tool_response>…</tool_response>. Otherwise answer normally."
)


def fallback_messages(messages: Sequence[ChatMessage], tools: Sequence[FunctionTool]) -> list[ChatMessage]:
    """Plain system/user/assistant messages carrying the tools, calls and results as text."""
    out: list[ChatMessage] = []
    if tools:
        listing = "\n".join(compact_json(t.to_openai()["function"]) for t in tools)
        preamble = FALLBACK_PREAMBLE.format(tools=listing)
        if messages and messages[0].role == "system":
            out.append(ChatMessage("system", f"{messages[0].content}\n\n{preamble}"))
            messages = messages[1:]
        else:
            out.append(ChatMessage("system", preamble))
    for message in messages:
        if message.role == "tool":
            body = compact_json({"name": message.name or "", "content": message.content})
            text = f"<tool_response>{body}</tool_response>"
            if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
                out[-1] = ChatMessage("user", f"{out[-1].content}\n{text}")  # parallel results: one turn
            else:
                out.append(ChatMessage("user", text))
        elif message.role == "assistant" and message.tool_calls:
            calls = "\n".join(format_call(c) for c in message.tool_calls)
            out.append(ChatMessage("assistant", f"{message.content}\n{calls}" if message.content else calls))
        else:
            out.append(ChatMessage(message.role, message.content))
    return out


def format_call(call: ToolCall) -> str:
    return f'{CALL_OPEN}{{"name":{json.dumps(call.name)},"arguments":{call.arguments}}}{CALL_CLOSE}'


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as a tool-aware Jinja template expects them (HF convention: arguments as objects)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        item: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            item["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _loads(c.arguments)}}
                for c in message.tool_calls
            ]
        if message.role == "tool":
            item["tool_call_id"] = message.tool_call_id
            item["name"] = message.name
        out.append(item)
    return out


# -- forcing ---------------------------------------------------------------------------


def call_grammar(tools: Sequence[FunctionTool], choice: ToolChoice, *, parallel: bool) -> str:
    """GBNF accepting only tool calls (to the named function, when one is named)."""
    chosen = [t for t in tools if choice.mode != "function" or t.name == choice.name]
    if not chosen:
        raise ValueError("no tool to call")
    builder = GrammarBuilder()
    alternatives = []
    for index, tool in enumerate(chosen):
        arguments = builder.add_schema(tool.parameters, f"tools[{index}].function.parameters")
        head = gbnf_literal(CALL_OPEN + '{"name":' + json.dumps(tool.name) + ',"arguments":')
        alternatives.append(f"{head} {arguments} {gbnf_literal('}' + CALL_CLOSE)}")
    call = builder.add_rule("call", " | ".join(alternatives))
    root = f'{call} ("\\n" {call}){{0,{MAX_PARALLEL_CALLS - 1}}}' if parallel else call
    return builder.render(root)


# -- reading -------------------------------------------------------------------------


def parse_tool_calls(text: str, tools: Sequence[FunctionTool]) -> tuple[str, list[ToolCall]]:
    """(the text outside calls, the calls) of a finished output; unknown names stay text."""
    names = {t.name for t in tools}
    calls: list[ToolCall] = []
    if CALL_OPEN in text:
        kept: list[str] = []
        position = 0
        for match in re.finditer(re.escape(CALL_OPEN) + r"(.*?)(?:" + re.escape(CALL_CLOSE) + r"|$)", text, re.S):
            found = _calls_from_json(match.group(1), names)
            if found:
                kept.append(text[position:match.start()])
                calls.extend(found)
                position = match.end()
        if calls:
            kept.append(text[position:])
            return "".join(kept).strip(), calls
    if MISTRAL_OPEN in text:
        before, _, after = text.partition(MISTRAL_OPEN)
        found = _calls_from_json(after, names)
        if found:
            return before.strip(), found
    found = _calls_from_json(_unfenced(text), names)
    if found:
        return "", found
    return text, []


def _unfenced(text: str) -> str:
    match = re.fullmatch(r"\s*```(?:json)?\s*(.*?)\s*```\s*", text, re.S)
    return match.group(1) if match else text


def _calls_from_json(text: str, names: set[str]) -> list[ToolCall]:
    try:
        value = json.loads(text.strip())
    except ValueError:
        return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        call = _call_from_object(item, names)
        if call is None:
            return []
        calls.append(call)
    return calls


def _call_from_object(item: Any, names: set[str]) -> ToolCall | None:
    if not isinstance(item, dict):
        return None
    if isinstance(item.get("function"), dict):  # {"type": "function", "function": {...}}
        item = item["function"]
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(name, str) or name not in names:
        return None
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(id=new_call_id(), name=name, arguments=compact_json(arguments))


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


# -- streaming -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TextDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class ToolArgumentsDelta:
    index: int
    text: str


StreamEvent = TextDelta | ToolCallStart | ToolArgumentsDelta
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*', re.S)


@dataclass(slots=True)
class ToolCallStream:
    """Turns a stream of text deltas into text and tool-call events.

    Text is passed on at once unless it may be the start of a call (a prefix of
    ``<tool_call>``, or an output that opens with ``{``, ``[`` or a code fence, which is held
    until the end). Inside ``<tool_call>`` the arguments stream as they are generated when
    the call starts ``{"name": …, "arguments": ``; otherwise the call is read whole at its end.
    """

    tools: Sequence[FunctionTool]
    calls: list[ToolCall] = field(default_factory=list)
    _pending: str = ""
    _mode: Literal["start", "text", "call", "whole"] = "start"
    _call_text: str = ""
    _streamed: int = -1
    """characters of the current call's arguments already sent; -1 before its head was read."""
    _depth: int = 0
    _in_string: bool = False
    _escape: bool = False
    _arguments_done: bool = False
    _head_end: int = 0
    """where the current call's arguments start in ``_call_text``."""

    @property
    def last_complete(self) -> bool:
        """Whether the last call's arguments are a whole JSON object (not cut by ``max_tokens``)."""
        if not self.calls:
            return False
        try:
            return isinstance(json.loads(self.calls[-1].arguments), dict)
        except ValueError:
            return False

    def feed(self, text: str) -> Iterator[StreamEvent]:
        self._pending += text
        while self._pending:
            before = (self._mode, len(self._pending))
            yield from self._step()
            if (self._mode, len(self._pending)) == before:
                return

    def finish(self) -> Iterator[StreamEvent]:
        """The end of the output: whatever was held back, as calls or as text."""
        if self._mode == "whole" or (self._mode == "start" and self._pending.strip()):
            content, calls = parse_tool_calls(self._pending, self.tools)
            self._pending = ""
            if content:
                yield TextDelta(content)
            for call in calls:
                yield from self._emit_whole(call)
            return
        if self._mode == "call":
            yield from self._close_call(final=True)
        if self._pending:
            yield TextDelta(self._pending)
            self._pending = ""

    # -- states ------------------------------------------------------------------
    def _step(self) -> Iterator[StreamEvent]:
        if self._mode == "start":
            stripped = self._pending.lstrip()
            if not stripped:
                return
            if stripped[0] in "{[`" or stripped.startswith(MISTRAL_OPEN[: len(stripped)]):
                self._mode = "whole"
                return
            self._mode = "text"
        if self._mode == "whole":
            return
        if self._mode == "text":
            yield from self._text()
        elif self._mode == "call":
            yield from self._call()

    def _text(self) -> Iterator[StreamEvent]:
        index = self._pending.find(CALL_OPEN)
        if index >= 0:
            if index:
                yield TextDelta(self._pending[:index])
            self._pending = self._pending[index + len(CALL_OPEN):]
            self._mode, self._call_text, self._streamed = "call", "", -1
            self._depth, self._in_string, self._escape, self._arguments_done = 0, False, False, False
            return
        keep = _partial_suffix(self._pending, CALL_OPEN)
        ready = self._pending[: len(self._pending) - keep]
        if ready:
            yield TextDelta(ready)
            self._pending = self._pending[len(ready):]

    def _call(self) -> Iterator[StreamEvent]:
        self._call_text += self._pending
        self._pending = ""
        end = self._call_text.find(CALL_CLOSE)
        if end >= 0:
            self._pending = self._call_text[end + len(CALL_CLOSE):]
            self._call_text = self._call_text[:end]
            yield from self._close_call(final=False)
            self._mode = "text"
            return
        if self._streamed < 0:
            head = _HEAD.match(self._call_text)
            name = head.group(1) if head else None
            if head is None or name not in {t.name for t in self.tools}:
                return
            self._streamed = 0
            self._head_end = head.end()
            self.calls.append(ToolCall(new_call_id(), name, ""))
            yield ToolCallStart(len(self.calls) - 1, self.calls[-1].id, name)
        yield from self._stream_arguments()

    def _stream_arguments(self) -> Iterator[StreamEvent]:
        if self._streamed == 0:  # whitespace before the arguments' value is not part of it
            while self._head_end < len(self._call_text) and self._call_text[self._head_end].isspace():
                self._head_end += 1
        body = self._call_text[self._head_end:]
        start = self._streamed
        position = start
        while position < len(body) and not self._arguments_done:
            char = body[position]
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif char == "\\":
                    self._escape = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    self._arguments_done = True
            position += 1
        if position > start:
            piece = body[start:position]
            self._streamed = position
            call = self.calls[-1]
            self.calls[-1] = ToolCall(call.id, call.name, call.arguments + piece)
            yield ToolArgumentsDelta(len(self.calls) - 1, piece)

    def _close_call(self, *, final: bool) -> Iterator[StreamEvent]:
        if self._streamed >= 0:
            yield from self._stream_arguments()
            call = self.calls[-1]
            try:
                arguments = json.loads(call.arguments)
            except ValueError:
                arguments = None
            if isinstance(arguments, dict):
                self.calls[-1] = ToolCall(call.id, call.name, compact_json(arguments))
            return
        _, found = parse_tool_calls(CALL_OPEN + self._call_text + CALL_CLOSE, self.tools)
        if not found:
            yield TextDelta(CALL_OPEN + self._call_text + ("" if final else CALL_CLOSE))
        for call in found:
            yield from self._emit_whole(call)

    def _emit_whole(self, call: ToolCall) -> Iterator[StreamEvent]:
        self.calls.append(call)
        index = len(self.calls) - 1
        yield ToolCallStart(index, call.id, call.name)
        yield ToolArgumentsDelta(index, call.arguments)


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
