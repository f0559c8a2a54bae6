"""Limits and fixed numbers, each with its unit and the reason it exists.

Caps against hostile peers live here so a reader can audit them in one place.
"""

from __future__ import annotations

# --- HTTP surface -----------------------------------------------------------
DEFAULT_HTTP_PORT = 38883
"""First port tried by the HTTP transport (the reference's ``httpBasePort``)."""

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
"""bytes; requests larger than this get 413 before they are parsed."""

API_PATH = "/v1"
MESH_PATH = "/v1/dvai"

# --- Engine -----------------------------------------------------------------
DEFAULT_CTX_SIZE = 4096
"""tokens; 1024 (a common default elsewhere) is too small for agent prompts."""

DEFAULT_QUEUE_DEPTH = 16
"""requests waiting per model before new ones get 503 + Retry-After."""

DEFAULT_GENERATION_TIMEOUT = 60.0
"""seconds a single generation may run before it is ended with an error."""

DEFAULT_MAX_BLANK_CHUNKS = 20
"""consecutive tokens that add no visible text before a generation is ended."""

QUEUE_RETRY_AFTER = 2
"""seconds suggested to a client refused because a model queue is full."""

MAX_TOKENS_CAP = 1 << 20
"""tokens; an upper bound on max_tokens values we accept at all."""

# --- Offload ----------------------------------------------------------------
OFFLOAD_HEADER = "X-DVAI-Offload"
SERVED_BY_HEADER = "X-DVAI-Served-By"
HOP_HEADER = "X-DVAI-Hop"
REQUEST_ID_HEADER = "X-Request-Id"
NO_CAPABLE_DEVICE_RETRY_AFTER = 30
"""seconds, fixed by the reference's no_capable_device contract."""

# --- Signing ----------------------------------------------------------------
SIGNATURE_WINDOW_S = 300
"""seconds a signed request's nonce timestamp may differ from our clock."""

NONCE_CACHE_MAX = 100_000
"""nonces remembered for replay detection; bounds memory a flood can force."""

# --- Offload policy and peer health -------------------------------------------
OFFLOAD_OBSERVED_MAX_AGE_S = 120.0
"""seconds an observed (measured on real forwarded requests) peer rate outranks the
verified probe figure; older than this, the verified figure is used again."""

OFFLOAD_MAX_FORWARD_ATTEMPTS = 3
"""peers tried for one request before the first byte (best + 2 fallbacks); bounds the
time a client waits when several peers fail in a row."""

CIRCUIT_BREAK_MAX_S = 600.0
"""seconds; cap on the exponential back-off of a repeatedly failing peer's circuit."""

CIRCUIT_BREAK_MULTIPLIER = 2.0
"""each consecutive failure multiplies the open period by this (30 s, 60 s, 120 s, …)."""

CIRCUIT_TRIAL_TIMEOUT_S = 90.0
"""seconds a half-open trial request may stay unreported before another trial is let
through (a leaked attempt must not block a peer forever); above the generation timeout."""

OBSERVED_RATE_ALPHA = 0.3
"""EWMA weight of the newest observed tok/s sample (see node/offload/health.py)."""

OBSERVED_MIN_TOKENS = 8
"""tokens; shorter responses are too noisy to update a peer's observed tok/s."""

MAX_TRACKED_PEERS = 1024
"""peers whose health counters are kept; bounds memory a flood of device ids can force."""
