"""The exponentially weighted moving average both decode-rate estimates use (local and per peer)."""

from __future__ import annotations

__all__ = ["ewma"]


def ewma(previous: float | None, sample: float, alpha: float) -> float:
    """``alpha`` is the newest sample's weight (0 < alpha ≤ 1); the first sample sets it outright."""
    if previous is None:
        return sample
    return alpha * sample + (1.0 - alpha) * previous
