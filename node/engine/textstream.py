"""Streaming text helpers: stop strings and reasoning blocks, one delta at a time.

Both filters hold back only the few characters that could still turn into a
match, so text reaches the client as soon as it can no longer change.
"""

from __future__ import annotations

from collections.abc import Iterable


class StopMatcher:
    """Cuts the stream at the first stop string, never emitting any part of it."""

    def __init__(self, stops: Iterable[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add ``text``; return what may be emitted now."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        cut = _first_match(buffer, self._stops)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return buffer[:cut]
        keep = _longest_partial_suffix(buffer, self._stops)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a stop."""
        held, self._held = self._held, ""
        return "" if self.stopped else held


class ThinkFilter:
    """Drops ``<think>…</think>`` blocks from a stream (``reasoning_budget = 0``)."""

    OPEN = "<think>"
    CLOSE = "</think>"

    def __init__(self) -> None:
        self._held = ""
        self._inside = False
        self._after_close = False

    def feed(self, text: str) -> str:
        buffer = self._held + text
        if self._after_close and not self._inside:
            buffer = buffer.lstrip("\n")  # the blank line a model puts after its reasoning
            self._after_close = not buffer
        out: list[str] = []
        while buffer:
            tag = self.CLOSE if self._inside else self.OPEN
            index = buffer.find(tag)
            if index >= 0:
                if not self._inside:
                    out.append(buffer[:index])
                buffer = buffer[index + len(tag):]
                self._inside = not self._inside
                if not self._inside:
                    buffer = buffer.lstrip("\n")
                    self._after_close = not buffer
                continue
            keep = _longest_partial_suffix(buffer, (tag,))
            if not self._inside:
                out.append(buffer[: len(buffer) - keep])
            buffer = buffer[len(buffer) - keep:] if keep else ""
            break
        self._held = buffer
        return "".join(out)

    @property
    def inside(self) -> bool:
        """True while the stream is inside a reasoning block."""
        return self._inside

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self._inside else held


class ReasoningBudget:
    """Hides reasoning blocks and ends them after ``budget`` tokens (0: as soon as one opens).

    The engine asks :meth:`should_close` after each token; when it says so, the
    engine feeds :attr:`CLOSE_TEXT` to the model as if generated (so the model
    moves on to its answer) and calls :meth:`force_close`.
    """

    CLOSE_TEXT = "</think>\n\n"

    def __init__(self, budget: int) -> None:
        if budget < 0:
            raise ValueError("a reasoning budget is a number of tokens, 0 or more")
        self.budget = budget
        self.think_tokens = 0
        self._filter = ThinkFilter()

    def feed(self, text: str) -> str:
        """One token's text in; the visible part out."""
        visible = self._filter.feed(text)
        if self._filter.inside:
            self.think_tokens += 1
        return visible

    def should_close(self) -> bool:
        return self._filter.inside and self.think_tokens >= self.budget

    def force_close(self) -> str:
        return self._filter.feed(self.CLOSE_TEXT)

    def flush(self) -> str:
        return self._filter.flush()


def _first_match(buffer: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (buffer.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _longest_partial_suffix(buffer: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of ``buffer`` that is a proper prefix of a stop."""
    best = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(buffer)), best, -1):
            if buffer.endswith(stop[:length]):
                best = length
                break
    return best
