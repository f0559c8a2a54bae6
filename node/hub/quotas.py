"""Per-app quotas: requests per minute, tokens per day, concurrent requests.

Rules come from config (``[[hub.quotas]]``): each names an ``app_id`` (``*`` for any app),
optionally a ``device_id`` and a ``model``, and any of the three limits. Every rule that
matches a request applies (the most specific does not hide the others), and the first one
exceeded answers ``429``: ``rate_limit_exceeded`` with ``Retry-After`` for the per-minute and
concurrency limits, ``insufficient_quota`` with the seconds until the next UTC day for the
daily token budget.

Counting: a request is counted against the per-minute window when admitted; its tokens
(prompt + completion) are added to the day's usage once it has been answered
(:class:`node.hub.usage.UsageStore` keeps them, so a restart does not reset a budget); its
concurrency slot is held until the answer is complete.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..common.errors import RateLimitedError
from ..config import QuotaConfig
from ..constants import QUOTA_MAX_TRACKED_SUBJECTS

__all__ = ["QuotaBook", "QuotaLease", "QuotaSubject", "UsageReader", "seconds_until_utc_midnight"]

ANY = "*"
WINDOW_S = 60.0

class InsufficientQuotaError(RateLimitedError):
    code = "insufficient_quota"


@dataclass(frozen=True, slots=True)
class QuotaSubject:
    app_id: str
    device_id: str
    model: str


UsageReader = Callable[[QuotaSubject, bool, bool], int]
"""tokens used today by ``subject`` (per device? per model?) — the usage store's reader."""


class QuotaLease:
    """A concurrency slot held by one admitted request; release it once, when the answer ends."""

    __slots__ = ("_book", "_keys", "_released")

    def __init__(self, book: QuotaBook, keys: list[tuple[int, str, str, str]]) -> None:
        self._book = book
        self._keys = keys
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            for key in self._keys:
                left = self._book._running.get(key, 0) - 1  # noqa: SLF001 - the book's own lease
                if left > 0:
                    self._book._running[key] = left  # noqa: SLF001
                else:
                    self._book._running.pop(key, None)  # noqa: SLF001


class QuotaBook:
    def __init__(self, rules: Iterable[QuotaConfig], *, usage: UsageReader,
                 clock: Callable[[], float] = time.time) -> None:
        self.rules = tuple(rules)
        self._usage = usage
        self._clock = clock
        self._windows: dict[tuple[int, str, str, str], deque[float]] = {}
        self._running: dict[tuple[int, str, str, str], int] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def admit(self, subject: QuotaSubject) -> QuotaLease:
        """Count the request, or raise the 429 of the first limit it would exceed."""
        now = self._clock()
        matched = [(index, rule) for index, rule in enumerate(self.rules) if _matches(rule, subject)]
        keys = [(index, *_scope(rule, subject)) for index, rule in matched]
        for (_, rule), key in zip(matched, keys, strict=True):
            if rule.tokens_per_day is not None:
                used = self._usage(subject, rule.device_id is not None, rule.model is not None)
                if used >= rule.tokens_per_day:
                    raise InsufficientQuotaError(
                        f"app '{subject.app_id}' has used its {rule.tokens_per_day} tokens for today",
                        retry_after=seconds_until_utc_midnight(now))
            if rule.concurrent is not None and self._running.get(key, 0) >= rule.concurrent:
                raise RateLimitedError(f"app '{subject.app_id}' already has {rule.concurrent} requests running",
                                       retry_after=1.0, code="rate_limit_exceeded")
            if rule.requests_per_minute is not None:
                window = self._windows.get(key)
                if window is not None:
                    while window and window[0] <= now - WINDOW_S:
                        window.popleft()
                    if len(window) >= rule.requests_per_minute:
                        raise RateLimitedError(
                            f"app '{subject.app_id}' made {rule.requests_per_minute} requests in the last minute",
                            retry_after=window[0] + WINDOW_S - now, code="rate_limit_exceeded")
        for (_, rule), key in zip(matched, keys, strict=True):
            if rule.requests_per_minute is not None:
                if key not in self._windows and len(self._windows) >= QUOTA_MAX_TRACKED_SUBJECTS:
                    self._windows.pop(next(iter(self._windows)))
                self._windows.setdefault(key, deque()).append(now)
            if rule.concurrent is not None:
                self._running[key] = self._running.get(key, 0) + 1
        return QuotaLease(self, [k for (_, rule), k in zip(matched, keys, strict=True) if rule.concurrent is not None])


def _matches(rule: QuotaConfig, subject: QuotaSubject) -> bool:
    return (rule.app_id in (ANY, subject.app_id)
            and (rule.device_id is None or rule.device_id in (ANY, subject.device_id))
            and (rule.model is None or rule.model in (ANY, subject.model)))


def _scope(rule: QuotaConfig, subject: QuotaSubject) -> tuple[str, str, str]:
    """What one counter of the rule covers: per app, and per device / model when the rule names them."""
    return (subject.app_id, subject.device_id if rule.device_id is not None else ANY,
            subject.model if rule.model is not None else ANY)


def seconds_until_utc_midnight(now: float) -> float:
    return 86400.0 - (now % 86400.0)
