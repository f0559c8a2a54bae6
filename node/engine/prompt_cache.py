"""The RAM prompt cache: finished sequences' KV state, kept in host memory within a byte budget.

When a sequence ends, the step loop copies its KV cells out of the llama.cpp context
(``llama_state_seq_get_data``) together with the tokens they hold, and removes them from the
context, so an idle seat holds no cells for the running sequences to attend over. A new
request whose prompt shares a prefix with an entry restores it into its seat
(``llama_state_seq_set_data``) and evaluates only the rest. This module is the bookkeeping
alone (plain data, no llama.cpp): which entry a prompt matches, which entries a new one makes
obsolete, and least-recently-used eviction within the budget. It follows llama-server's
prompt cache (``--cache-ram``, ``server_prompt_cache``), except that a restored entry stays
cached (two requests with the same long system prompt can both restore it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


@dataclass(eq=False, slots=True)
class CacheEntry:
    """One saved sequence: the tokens its KV holds and the state bytes (``size`` of them)."""

    tokens: list[int]
    data: Any
    """the serialised sequence state (a ctypes byte array for the engine; anything in tests)."""
    size: int


class PromptCache:
    """Saved sequences, least recently used first, within ``budget`` bytes (0: nothing is kept)."""

    def __init__(self, budget: int) -> None:
        self.budget = max(0, budget)
        self.entries: list[CacheEntry] = []
        """least recently used first."""
        self.bytes = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def tokens(self) -> int:
        return sum(len(entry.tokens) for entry in list(self.entries))  # a snapshot: read off-thread too

    def wants(self, tokens: list[int], size: int) -> bool:
        """Whether a sequence holding ``tokens`` (``size`` bytes of state) is worth saving: it fits
        the budget and no entry already holds all of its tokens (that entry is touched instead)."""
        if not tokens or size <= 0 or size > self.budget:
            return False
        for entry in self.entries:
            if len(entry.tokens) >= len(tokens) and common_prefix(entry.tokens, tokens) == len(tokens):
                self._touch(entry)
                return False
        return True

    def put(self, tokens: list[int], data: Any, size: int) -> CacheEntry | None:
        """Keep a sequence's state; entries it extends are dropped, then the least recently used
        ones until it fits. None when it is not worth keeping (:meth:`wants`)."""
        if not self.wants(tokens, size):
            return None
        kept = [e for e in self.entries if common_prefix(e.tokens, tokens) < len(e.tokens)]
        self.entries = kept
        self.bytes = sum(e.size for e in kept)
        while self.entries and self.bytes + size > self.budget:
            self.bytes -= self.entries.pop(0).size
        entry = CacheEntry(list(tokens), data, size)
        self.entries.append(entry)
        self.bytes += size
        return entry

    def match(self, prompt: list[int]) -> tuple[CacheEntry | None, int]:
        """The entry sharing the longest prefix with ``prompt`` (the most recently used on a tie)
        and that length; (None, 0) when none shares a token. A match counts as a use."""
        best: CacheEntry | None = None
        best_len = 0
        for entry in self.entries:
            length = common_prefix(entry.tokens, prompt)
            if length > 0 and length >= best_len:
                best, best_len = entry, length
        if best is not None:
            self._touch(best)
        return best, best_len

    def clear(self) -> None:
        self.entries = []
        self.bytes = 0

    def _touch(self, entry: CacheEntry) -> None:
        self.entries.remove(entry)
        self.entries.append(entry)
