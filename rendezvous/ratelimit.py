"""Token buckets per client address: a bounded table of the shared bucket (``node/common/tokenbucket.py``)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from node.common.tokenbucket import TokenBucket


@dataclass(frozen=True, slots=True)
class RateRule:
    per_minute: float
    burst: float

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


class ClientRateLimiter:
    """Buckets keyed by (rule name, client address); the least recently used are dropped past ``max_clients``.

    Dropping a bucket forgets a client's debt, so the cap must exceed the number of
    addresses active within one refill period; it bounds the memory a flood of
    spoofed-looking addresses can force.
    """

    def __init__(self, rules: dict[str, RateRule], *, max_clients: int) -> None:
        self._rules = dict(rules)
        self._max = max_clients
        self._buckets: OrderedDict[tuple[str, str], TokenBucket] = OrderedDict()

    def check(self, rule_name: str, client: str, now: float) -> float:
        """0 when allowed (and counted), otherwise the seconds until it would be."""
        rule = self._rules[rule_name]
        key = (rule_name, client)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = TokenBucket.full(rule.rate, rule.burst, now)
            self._buckets[key] = bucket
            while len(self._buckets) > self._max * max(1, len(self._rules)):
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)
