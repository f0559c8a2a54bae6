"""Every chat format ends the answer on its own turn markers."""

from __future__ import annotations

import pytest

from node.engine.base import ChatMessage
from node.engine.chat_format import render_gemma, render_named_format, turn_stops

CHAT = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hello!")]


def test_gemma_stops_on_both_of_its_markers() -> None:
    prompt, stops = render_gemma(CHAT)
    assert prompt.endswith("<start_of_turn>model\n")
    assert set(stops) == {"<end_of_turn>", "<start_of_turn>"}


@pytest.mark.parametrize("name,markers", [
    ("chatml", {"<|im_start|>", "<|im_end|>"}),
    ("llama3", {"<|start_header_id|>", "<|eot_id|>"}),
    ("gemma", {"<start_of_turn>", "<end_of_turn>"}),
])
def test_named_formats_stop_on_their_turn_markers(name: str, markers: set[str]) -> None:
    prompt, stops = render_named_format(name, CHAT)
    assert markers <= set(stops), (name, stops)
    assert markers <= set(turn_stops(prompt))


def test_turn_stops_names_only_markers_the_prompt_uses() -> None:
    assert turn_stops("plain text, no turns") == ()
    assert turn_stops("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") == ("<|im_start|>", "<|im_end|>")
