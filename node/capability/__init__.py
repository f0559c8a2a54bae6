"""How fast this device runs each of its models: probe, heuristic, observed refinement, cache.

A *capability score* is a model's decode speed in tokens per second, labelled with its
source:

- ``probe``: a cold run of N decode tokens (end of sequence suppressed, so the count is
  always reached) timed as (n − 1) ÷ (last token time − first token time). Persisted in
  ``capability.json`` in the state dir per (model id, library version), with the model
  file's size: a model whose file changed size is probed again (``store.py``).
- ``heuristic``: before any probe exists, an estimate from the model file size, the
  thread count and a quick memory-bandwidth measurement (``score.py``).
- ``observed``: served generations of at least ``OBSERVED_MIN_TOKENS`` tokens feed an
  exponentially weighted moving average that starts from the probe figure, so the score
  follows thermal throttling and other load (``service.py``).

A score also carries a *curve* (``curve.py``): the aggregate tok/s at concurrency 1, 2 and
4 (capped at the model's ``parallel``), measured by the probe on a batching engine and
refined per level by observed generations. ``marginal_rate(curve, running)`` is the rate a
new request would get next to ``running`` others: what the offload router ranks by.

Integration: the node builds one :class:`CapabilityService`, awaits ``start()`` after the
model registry has started (it never waits for a probe) and ``stop()`` before the
registry stops. With ``offload.enabled = false`` the service keeps no scores (the
reference's no-op): ``get_capability`` and ``probe_capability`` return ``None``; only the
explicit ``run_probe`` (``dvai-node probe``) measures.
"""

from __future__ import annotations

from .curve import Curve, clean_curve, marginal_rate, scale_curve
from .probe import PROBE_PROMPT, check_probe_tokens, probe, score_from_outcome
from .score import (
    CapabilityDisabledError,
    CapabilityScore,
    ScoreSource,
    changed_enough,
    heuristic_tok_per_s,
    library_version_for,
    measure_copy_bandwidth,
    probe_disturbance,
    prompt_rate,
)
from .service import CapabilityService, ScoreListener
from .store import CAPABILITY_FILE, CapabilityStore

__all__ = [
    "CAPABILITY_FILE",
    "PROBE_PROMPT",
    "CapabilityDisabledError",
    "CapabilityScore",
    "CapabilityService",
    "CapabilityStore",
    "Curve",
    "ScoreListener",
    "ScoreSource",
    "changed_enough",
    "check_probe_tokens",
    "clean_curve",
    "heuristic_tok_per_s",
    "library_version_for",
    "marginal_rate",
    "measure_copy_bandwidth",
    "probe",
    "probe_disturbance",
    "scale_curve",
    "prompt_rate",
    "score_from_outcome",
]
