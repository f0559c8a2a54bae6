"""The capability curve: aggregate decode tok/s at a few concurrency levels, and what a new
request would get from a device already running some sequences (pure functions).

A batching engine decodes one token for every active sequence per step, and on a CPU a
step costs little more for four sequences than for one (the weights are read once), so a
device's *aggregate* rate grows with concurrency while each sequence's share shrinks. A
curve is a tuple of ``(concurrency, aggregate tok/s)`` points, sorted by concurrency,
starting at concurrency 1. A device that measured only one stream (an old store, an old
peer) has a curve of one point.

:func:`marginal_rate` is what the router ranks devices by: the rate a new request would
get if it joined ``running`` sequences, i.e. ``aggregate(running + 1) / (running + 1)``,
interpolating linearly between points and assuming no further gain past the last point
(the aggregate stays flat there, so each request's share keeps dropping; requests beyond
the model's ``parallel`` seats wait, which shares time the same way). With a one-point
curve this is ``rate / (1 + running)``, the previous ranking formula.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from ..constants import (
    CAPABILITY_CURVE_MAX_CONCURRENCY,
    CAPABILITY_CURVE_MAX_POINTS,
    CAPABILITY_MAX_TOK_PER_S,
)

__all__ = [
    "CURVE_LEVELS",
    "Curve",
    "aggregate_at",
    "clean_curve",
    "curve_from_json",
    "curve_levels",
    "curve_to_json",
    "decode_curve_text",
    "encode_curve_text",
    "marginal_rate",
    "refine_curve",
    "scale_curve",
    "single_point",
    "with_point",
]

Curve = tuple[tuple[int, float], ...]
"""``((concurrency, aggregate tok/s), …)``: sorted, distinct levels, the first at 1."""

CURVE_LEVELS = (1, 2, 4)
"""concurrency levels the probe measures (capped at the model's ``parallel``)."""


def curve_levels(parallel: int) -> tuple[int, ...]:
    """The probe's levels for a model with ``parallel`` sequence seats: 1, 2, 4 up to ``parallel``."""
    cap = max(1, parallel)
    return tuple(level for level in CURVE_LEVELS if level <= cap)


def single_point(tok_per_s: float) -> Curve:
    """The curve of a device that measured one stream only."""
    return ((1, tok_per_s),)


def aggregate_at(curve: Curve, concurrency: float) -> float:
    """Aggregate tok/s with ``concurrency`` sequences running (linear between points, flat past
    the last; below the first point, the first point's per-sequence rate times ``concurrency``)."""
    if not curve or concurrency <= 0:
        return 0.0
    first_level, first_rate = curve[0]
    if concurrency <= first_level:
        return first_rate * concurrency / first_level
    for (low, low_rate), (high, high_rate) in zip(curve, curve[1:], strict=False):
        if concurrency <= high:
            return low_rate + (high_rate - low_rate) * (concurrency - low) / (high - low)
    return curve[-1][1]


def marginal_rate(curve: Curve, running: int) -> float:
    """tok/s a new request would get from a device whose curve is ``curve`` while ``running``
    requests are already queued or running there (see the module docs); 0 for an empty curve."""
    sequences = max(0, running) + 1
    return aggregate_at(curve, sequences) / sequences


def scale_curve(curve: Curve, tok_per_s: float) -> Curve:
    """``curve``'s shape anchored at ``tok_per_s`` for one stream.

    How a peer's claimed curve is used: its gains (aggregate at k ÷ aggregate at 1) are
    taken from the claim (already bounded by :func:`clean_curve`), its level from our own
    measurement of the peer (verified or observed)."""
    if not curve or curve[0][1] <= 0:
        return single_point(tok_per_s)
    base = curve[0][1]
    return tuple((level, rate * tok_per_s / base) for level, rate in curve)


def with_point(curve: Curve, level: int, rate: float) -> Curve:
    """``curve`` with the point at ``level`` replaced (or added), sorted."""
    points = dict(curve)
    points[level] = rate
    return tuple(sorted(points.items()))


def refine_curve(curve: Curve, level: int, per_request_rate: float, alpha: float) -> Curve:
    """``curve`` after one served generation decoded at ``per_request_rate`` while ``level``
    sequences ran: the point at ``level`` moves toward ``per_request_rate × level`` by the
    EWMA weight ``alpha`` (a level not in the curve yet starts there), then the curve is
    bounded again by :func:`clean_curve`. Without a point at 1, only a level-1 sample can
    start a curve (``()`` otherwise)."""
    if level < 1 or (level > 1 and not curve):
        return curve
    sample = min(per_request_rate * level, CAPABILITY_MAX_TOK_PER_S)
    previous = dict(curve).get(level)
    updated = sample if previous is None else alpha * sample + (1.0 - alpha) * previous
    return clean_curve(with_point(curve, level, updated)) or curve


def clean_curve(points: Iterable[tuple[object, object]]) -> Curve:
    """A usable curve from untrusted ``(concurrency, tok/s)`` pairs, or ``()``.

    Pairs that are not (an integer from 1 to ``CAPABILITY_CURVE_MAX_CONCURRENCY``, a finite rate in
    (0, ``CAPABILITY_MAX_TOK_PER_S``]) are dropped, as are repeated levels (the first wins)
    and anything past ``CAPABILITY_CURVE_MAX_POINTS``. A curve without a point at concurrency 1 is
    unusable (``()``). Then each point is bounded so a sequence's share never grows with
    concurrency (aggregate at k ≤ aggregate at j × k ÷ j for every j < k): a device cannot
    claim to speed up each stream by running more of them. A dip in the aggregate is kept
    (contention can cause one; it only lowers the device's ranking).
    """
    seen: dict[int, float] = {}
    for count, (level, rate) in enumerate(points):
        if count >= CAPABILITY_CURVE_MAX_POINTS * 4:
            break
        if not isinstance(level, int) or isinstance(level, bool) or not 1 <= level <= CAPABILITY_CURVE_MAX_CONCURRENCY:
            continue
        if not isinstance(rate, (int, float)) or isinstance(rate, bool):
            continue
        value = float(rate)
        if not (math.isfinite(value) and 0 < value <= CAPABILITY_MAX_TOK_PER_S) or level in seen:
            continue
        seen[level] = value
        if len(seen) >= CAPABILITY_CURVE_MAX_POINTS:
            break
    if 1 not in seen:
        return ()
    out: list[tuple[int, float]] = []
    best_share = math.inf  # the lowest per-sequence rate so far
    for level in sorted(seen):
        rate = min(seen[level], best_share * level)
        best_share = min(best_share, rate / level)
        out.append((level, rate))
    return tuple(out)


def encode_curve_text(curve: Curve) -> str:
    """The compact text form used in mDNS TXT records: ``1:33.1/2:45/4:58.2`` (tok/s, 1 decimal)."""
    return "/".join(f"{level}:{_short_number(rate)}" for level, rate in curve)


def decode_curve_text(text: str) -> Curve:
    """Parse :func:`encode_curve_text` output from an untrusted peer; ``()`` when unusable."""
    pairs: list[tuple[object, object]] = []
    for part in text.split("/")[: CAPABILITY_CURVE_MAX_POINTS * 4]:
        level_text, _, rate_text = part.partition(":")
        if not (level_text.isdigit() and len(level_text) <= 4 and 0 < len(rate_text) <= 12):
            continue
        try:
            rate = float(rate_text)
        except ValueError:
            continue
        pairs.append((int(level_text), rate))
    return clean_curve(pairs)


def curve_to_json(curve: Sequence[tuple[int, float]]) -> list[dict[str, float | int]]:
    """``[{"concurrency": k, "tokPerS": r}, …]`` (rates to 3 decimals)."""
    return [{"concurrency": level, "tokPerS": round(rate, 3)} for level, rate in curve]


def curve_from_json(value: object) -> Curve:
    """Parse ``curve_to_json`` output from an untrusted source; ``()`` when absent or unusable."""
    if not isinstance(value, list):
        return ()
    pairs = [(item.get("concurrency"), item.get("tokPerS")) for item in value[: CAPABILITY_CURVE_MAX_POINTS * 4]
             if isinstance(item, dict)]
    return clean_curve(pairs)


def _short_number(rate: float) -> str:
    text = f"{rate:.1f}"
    return text[:-2] if text.endswith(".0") else text
