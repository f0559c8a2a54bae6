"""The RAM prompt cache's bookkeeping (node/engine/prompt_cache.py), with plain data.

The engine side (saving a finished sequence's KV state, restoring it into a seat) is tested on
the real engine in tests/test_engine_batch.py.
"""

from __future__ import annotations

from node.engine.prompt_cache import PromptCache, common_prefix


def test_common_prefix() -> None:
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([5], [1]) == 0


def test_a_zero_budget_keeps_nothing() -> None:
    cache = PromptCache(0)
    assert not cache.enabled
    assert cache.put([1, 2, 3], b"abc", 3) is None
    assert cache.entries == [] and cache.bytes == 0
    assert cache.match([1, 2, 3]) == (None, 0)


def test_the_longest_shared_prefix_wins() -> None:
    cache = PromptCache(1000)
    short = cache.put([1, 2, 9], "a", 10)
    long = cache.put([1, 2, 3, 4, 8], "b", 10)
    other = cache.put([7, 7], "c", 10)
    assert short is not None and long is not None and other is not None
    assert cache.match([1, 2, 3, 4, 5]) == (long, 4)
    assert cache.match([1, 2, 9, 9]) == (short, 3)
    assert cache.match([6]) == (None, 0)


def test_a_new_entry_replaces_the_ones_it_extends_and_is_skipped_when_already_held() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2, 3], "turn 1", 30)
    cache.put([1, 2, 4], "a sibling", 30)
    turn2 = cache.put([1, 2, 3, 4, 5], "turn 2", 50)
    assert [e.data for e in cache.entries] == ["a sibling", "turn 2"]
    assert cache.bytes == 80 and cache.tokens == 8
    assert cache.put([1, 2, 3, 4], "contained", 40) is None  # turn 2 already holds all of it
    assert cache.entries[-1] is turn2  # ... and counts as used
    assert cache.bytes == 80


def test_the_least_recently_used_entry_goes_first() -> None:
    cache = PromptCache(100)
    cache.put([1], "one", 40)
    cache.put([2], "two", 40)
    cache.match([1, 5])  # "one" is used: "two" is now the oldest
    cache.put([3], "three", 40)
    assert [e.data for e in cache.entries] == ["one", "three"]
    assert cache.bytes == 80 <= cache.budget
    cache.put([4], "four", 90)  # needs room for 90 of the 100 bytes: both go
    assert [e.data for e in cache.entries] == ["four"] and cache.bytes == 90


def test_an_entry_larger_than_the_budget_is_not_kept() -> None:
    cache = PromptCache(100)
    cache.put([1], "one", 40)
    assert cache.put([2], "huge", 101) is None
    assert [e.data for e in cache.entries] == ["one"]
    assert cache.put([], "empty", 10) is None
    cache.clear()
    assert cache.entries == [] and cache.bytes == 0
