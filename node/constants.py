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
