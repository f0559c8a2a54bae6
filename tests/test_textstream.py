"""Stop strings and reasoning blocks matched on a stream, whatever the chunking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.engine.textstream import ReasoningBudget, StopMatcher, ThinkFilter


def run(filter_: StopMatcher | ThinkFilter, pieces: list[str]) -> str:
    return "".join(filter_.feed(p) for p in pieces) + filter_.flush()


def test_stop_cuts_before_the_stop_string() -> None:
    matcher = StopMatcher(["<end>"])
    assert run(matcher, ["Hello <e", "nd> world"]) == "Hello "
    assert matcher.stopped


def test_partial_stop_is_released_when_it_does_not_complete() -> None:
    assert run(StopMatcher(["<end>"]), ["a <e", "x b"]) == "a <ex b"


def test_earliest_of_several_stops_wins() -> None:
    assert run(StopMatcher(["STOP", "\n\n"]), ["one\n", "\ntwo STOP"]) == "one"


def test_think_blocks_are_removed() -> None:
    assert run(ThinkFilter(), ["<thi", "nk>secret", " plans</th", "ink>\nAnswer: 4"]) == "Answer: 4"
    assert run(ThinkFilter(), ["a <b> c"]) == "a <b> c"


def test_unclosed_think_block_is_hidden() -> None:
    assert run(ThinkFilter(), ["ok <think>never closed"]) == "ok "


def splits(text: str) -> st.SearchStrategy[list[str]]:
    return st.lists(st.integers(0, len(text)), max_size=8).map(
        lambda cuts: [text[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(text)], strict=True)]
    )


@given(st.text(alphabet="ab<>/", max_size=30).flatmap(lambda t: st.tuples(st.just(t), splits(t))))
def test_stop_matching_ignores_chunk_boundaries(case: tuple[str, list[str]]) -> None:
    text, pieces = case
    expected = text.split("<a>")[0]
    assert run(StopMatcher(["<a>"]), pieces) == expected


@given(st.text(alphabet="xy", max_size=10), st.text(alphabet="xy", max_size=10), st.data())
def test_think_filter_ignores_chunk_boundaries(before: str, after: str, data: st.DataObject) -> None:
    text = f"{before}<think>hidden</think>{after}"
    pieces = data.draw(splits(text))
    assert run(ThinkFilter(), pieces) == before + after


def test_reasoning_budget_zero_closes_as_soon_as_thinking_starts() -> None:
    budget = ReasoningBudget(0)
    assert budget.feed("Sure. ") == "Sure. " and not budget.should_close()
    assert budget.feed("<think>") == ""
    assert budget.should_close()
    assert budget.force_close() == ""
    assert not budget.should_close()
    assert budget.feed("The answer is 4.") + budget.flush() == "The answer is 4."


def test_reasoning_budget_allows_n_tokens_of_thought_then_closes() -> None:
    budget = ReasoningBudget(3)
    seen = [budget.feed(t) for t in ["<think>", "a", "b"]]
    assert seen == ["", "", ""] and budget.should_close()  # 3 tokens inside: the budget is spent
    budget.force_close()
    assert budget.feed("done") == "done"


def test_reasoning_budget_closed_by_the_model_itself() -> None:
    budget = ReasoningBudget(100)
    text = "".join(budget.feed(t) for t in ["<think>", "hmm", "</think>", "\n", "Yes"]) + budget.flush()
    assert text == "Yes" and not budget.should_close()
