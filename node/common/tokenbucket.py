"""The token bucket both services rate-limit with (handshakes, rendezvous clients, relayed messages).

Pure: the caller passes ``now`` (seconds on any monotonic-enough clock), so tests control time.
The tables that hold many buckets (their key caps and what happens when full) stay with their
owners, because the policies differ on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TokenBucket"]


@dataclass(slots=True)
class TokenBucket:
    """``rate`` tokens per second up to ``burst``; ``take`` answers 0 (allowed) or seconds to wait."""

    rate: float
    burst: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, burst: float, now: float) -> TokenBucket:
        return cls(rate=rate, burst=burst, tokens=burst, updated=now)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens: 0.0 when allowed, else the seconds until they would be there."""
        self._refill(now)
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        """True when the bucket would be full at ``now``: it behaves like a fresh one."""
        return self.tokens + max(0.0, now - self.updated) * self.rate >= self.burst

    def _refill(self, now: float) -> None:
        elapsed = max(0.0, now - self.updated)
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
