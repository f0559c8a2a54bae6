"""Parsing n, logprobs and top_logprobs into typed requests (pure functions, no engine)."""

from __future__ import annotations

import pytest

from node.api.schemas import parse_chat_request, parse_completion_request
from node.common.errors import InvalidRequestError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_chat_n_and_logprobs_reach_the_request() -> None:
    request = parse_chat_request({**CHAT, "n": 3, "logprobs": True, "top_logprobs": 4})
    assert request.n == 3 and request.logprobs and request.params.logprobs == 4
    plain = parse_chat_request(CHAT)
    assert plain.n == 1 and not plain.logprobs and plain.params.logprobs is None
    chosen_only = parse_chat_request({**CHAT, "logprobs": True})
    assert chosen_only.params.logprobs == 0


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 17}, "n"),
        ({"n": True}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
    ],
)
def test_bad_chat_choices_are_400s_naming_the_field(extra: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_chat_request({**CHAT, **extra})
    assert caught.value.status == 400 and caught.value.param == param


def test_completion_logprobs_is_a_count_of_alternatives() -> None:
    request = parse_completion_request({"model": "m", "prompt": "x", "logprobs": 2, "n": 2})
    assert request.params.logprobs == 2 and request.n == 2
    assert parse_completion_request({"model": "m", "prompt": "x"}).params.logprobs is None
    assert parse_completion_request({"model": "m", "prompt": "x", "logprobs": False}).params.logprobs is None
    for bad in (6, -1, True):
        with pytest.raises(InvalidRequestError) as caught:
            parse_completion_request({"model": "m", "prompt": "x", "logprobs": bad})
        assert caught.value.param == "logprobs"
