"""The capability score value and the pure calculations behind it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Literal

from ..common.errors import OffloadDisabledError
from ..constants import (
    CAPABILITY_MAX_TOK_PER_S,
    CAPABILITY_MODEL_ID_MAX_CHARS,
    CAPABILITY_NOTIFY_MIN_CHANGE,
    CAPABILITY_VERSION_MAX_CHARS,
    PROBE_BELOW_HEURISTIC_RATIO,
    PROBE_BELOW_PREVIOUS_RATIO,
    PROBE_UNEVEN_RATIO,
)
from ..engine.base import Engine
from .curve import Curve, curve_from_json, curve_to_json, single_point

ScoreSource = Literal["probe", "heuristic", "observed"]

# --- heuristic -----------------------------------------------------------------------
# Decoding one token streams (almost) every weight once, so on a CPU decode speed is
# bounded by memory bandwidth ÷ model bytes. We measure one thread's copy bandwidth
# (bytes read + written per second). More threads pull more from DRAM, but sub-linearly:
# on common laptops and desktops one core reaches roughly half of what all cores can,
# so the gain grows as √threads and is capped at ×2 (4 threads). llama.cpp turns a
# fraction of that into useful weight bytes per second (dequantisation, activations, the
# KV cache and sampling a large vocabulary cost the rest): HEURISTIC_EFFICIENCY, checked
# against real probes on the development machine (2 vCPU, ~22 GB/s copy, Gemma 3 270M
# Q4_K_M, 253 MB; figures in docs/capability.md). GPU offload is not modelled: this is a
# deliberately rough first guess that the first probe replaces.
HEURISTIC_EFFICIENCY = 0.5
HEURISTIC_THREAD_GAIN_CAP = 4
"""threads beyond which the bandwidth gain stops growing (√4 = ×2)."""
DEFAULT_COPY_BANDWIDTH = 10e9
"""bytes/s assumed when the bandwidth cannot be measured (a modest laptop)."""
BANDWIDTH_ARRAY_BYTES = 32 << 20
"""bytes per array copied: larger than most last-level caches, small enough for < 50 ms."""
BANDWIDTH_BUDGET_S = 0.04
"""seconds of timed copying at most (the whole measurement, allocation included, ~20 ms)."""


class CapabilityDisabledError(OffloadDisabledError):
    """The capability endpoints exist only with offload enabled (as in the reference)."""

    def __init__(self) -> None:
        super().__init__("capability scores are kept",
                         ", or run `dvai-node probe` for a one-off measurement")


@dataclass(frozen=True, slots=True)
class CapabilityScore:
    """One model's decode speed on this device, and where the figure came from."""

    model_id: str
    tok_per_s: float
    prompt_tok_per_s: float | None
    measured_at: float
    """unix seconds."""
    library_version: str
    """``llama_cpp.__version__``, or ``"simulated"`` for the SIMULATED engine."""
    source: ScoreSource
    samples: int = 0
    """tokens timed (probe), generations averaged (observed), 0 for a heuristic."""
    curve: Curve = ()
    """aggregate tok/s at concurrency 1, 2, 4 (capped at the model's ``parallel``); empty when
    only one stream was measured (an older store or peer): see :attr:`points`."""

    @property
    def points(self) -> Curve:
        """The curve, or one point at concurrency 1 (``tok_per_s``) when none was measured."""
        return self.curve or single_point(self.tok_per_s)

    def to_json(self) -> dict[str, Any]:
        prompt = self.prompt_tok_per_s
        return {
            "modelId": self.model_id,
            "tokPerS": round(self.tok_per_s, 3),
            "promptTokPerS": None if prompt is None else round(prompt, 3),
            "measuredAt": round(self.measured_at, 3),
            "libraryVersion": self.library_version,
            "source": self.source,
            "samples": self.samples,
            "curve": curve_to_json(self.points),
        }

    @classmethod
    def from_json(cls, data: Any) -> CapabilityScore:
        """Parse ``to_json`` output; raises ``ValueError`` on anything else."""
        if not isinstance(data, dict):
            raise ValueError("a score must be an object")
        model_id, version, source = data.get("modelId"), data.get("libraryVersion"), data.get("source")
        if not isinstance(model_id, str) or not 0 < len(model_id) <= CAPABILITY_MODEL_ID_MAX_CHARS:
            raise ValueError("modelId must be a non-empty string")
        if not isinstance(version, str) or len(version) > CAPABILITY_VERSION_MAX_CHARS:
            raise ValueError("libraryVersion must be a short string")
        if source not in ("probe", "heuristic", "observed"):
            raise ValueError("source must be probe, heuristic or observed")
        samples = data.get("samples", 0)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 0:
            raise ValueError("samples must be a non-negative integer")
        prompt = data.get("promptTokPerS")
        curve = curve_from_json(data.get("curve"))  # absent (an older store or peer): one point
        return cls(
            model_id=model_id,
            tok_per_s=_rate(data.get("tokPerS"), "tokPerS"),
            prompt_tok_per_s=None if prompt is None else _rate(prompt, "promptTokPerS"),
            measured_at=_number(data.get("measuredAt"), "measuredAt"),
            library_version=version,
            source=source,
            samples=samples,
            curve=curve if len(curve) > 1 else (),
        )


def prompt_rate(prompt_tokens: int, started: float, first_token_at: float | None) -> float | None:
    """Prompt tokens ÷ prompt evaluation time (engine start → first generated token)."""
    if first_token_at is None or prompt_tokens < 1 or first_token_at <= started:
        return None
    return min(prompt_tokens / (first_token_at - started), CAPABILITY_MAX_TOK_PER_S)


def heuristic_tok_per_s(size_bytes: int, threads: int, copy_bandwidth: float) -> float | None:
    """Estimated decode tok/s for a model file of ``size_bytes`` (see the comment above)."""
    if size_bytes <= 0 or copy_bandwidth <= 0:
        return None
    gain = math.sqrt(min(max(threads, 1), HEURISTIC_THREAD_GAIN_CAP))
    return min(HEURISTIC_EFFICIENCY * copy_bandwidth * gain / size_bytes, CAPABILITY_MAX_TOK_PER_S)


def probe_disturbance(
    rate: float,
    token_times: list[float],
    *,
    heuristic: float | None = None,
    previous: float | None = None,
) -> str | None:
    """Why a probe's ``rate`` looks disturbed (a busy machine, not the device's speed), or None.

    ``token_times``: when each timed token was produced (seconds, any origin). Three signs:
    uneven token gaps (the median gap implies a much higher rate than the mean), a rate far
    below the bandwidth heuristic, or far below the previous stored probe of the same model.
    """
    gaps = sorted(b - a for a, b in zip(token_times, token_times[1:], strict=False) if b >= a)
    if len(gaps) >= 4:
        median = gaps[len(gaps) // 2]
        if median > 0 and (1.0 / median) > PROBE_UNEVEN_RATIO * rate:
            return (f"uneven token times: the median gap implies {1.0 / median:.1f} tok/s, "
                    f"the whole run {rate:.1f} tok/s")
    if heuristic is not None and rate < PROBE_BELOW_HEURISTIC_RATIO * heuristic:
        return f"{rate:.1f} tok/s is far below the estimate from memory bandwidth ({heuristic:.1f} tok/s)"
    if previous is not None and rate < PROBE_BELOW_PREVIOUS_RATIO * previous:
        return f"{rate:.1f} tok/s is far below the previous probe ({previous:.1f} tok/s)"
    return None


def changed_enough(old: float | None, new: float, threshold: float = CAPABILITY_NOTIFY_MIN_CHANGE) -> bool:
    """True when ``new`` differs from the last announced figure by more than ``threshold`` (relative)."""
    return old is None or old <= 0 or abs(new - old) / old > threshold


def plausible_rate(rate: float | None) -> bool:
    return rate is not None and math.isfinite(rate) and 0 < rate <= CAPABILITY_MAX_TOK_PER_S


def measure_copy_bandwidth(array_bytes: int = BANDWIDTH_ARRAY_BYTES,
                           budget_s: float = BANDWIDTH_BUDGET_S) -> float | None:
    """Bytes/s one thread moves in a large numpy copy (read + write); ``None`` without numpy.

    Blocking (~20 ms): call it off the event loop.
    """
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with llama-cpp-python
        return None
    source = np.ones(array_bytes // 8)
    target = np.empty_like(source)
    np.copyto(target, source)  # first touch: page faults, not bandwidth
    best, spent = math.inf, 0.0
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(target, source)
        elapsed = time.perf_counter() - started
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s / 2:
            break
    return 2 * array_bytes / best if 0 < best < math.inf else None


def library_version_for(engine: Engine) -> str:
    """The inference library's version: the second half of a stored score's key.

    May import llama_cpp (slow the first time): call it off the event loop.
    """
    from ..engine.simulated import SimulatedEngine

    if isinstance(engine, SimulatedEngine):
        return "simulated"
    try:
        import llama_cpp
    except ImportError:
        return "unknown"
    return str(getattr(llama_cpp, "__version__", "unknown"))


def _number(value: object, name: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def _rate(value: object, name: str) -> float:
    rate = _number(value, name)
    if not 0 < rate <= CAPABILITY_MAX_TOK_PER_S:
        raise ValueError(f"{name} must be in (0, {CAPABILITY_MAX_TOK_PER_S:g}]")
    return rate
