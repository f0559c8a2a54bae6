"""The one record of a request: what it asked for, what served it, what it cost.

The HTTP edge creates one per request; whoever serves the request (the engine service
here, or the offload router for a peer) fills in the serving side; the audit log, the
metrics and the request log read it once the answer is complete. A plain value with no
I/O, so every layer may hold it.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SERVED_LOCAL", "RequestRecord"]

SERVED_LOCAL = "local"
"""``served_by`` of a request this node answered itself (otherwise the peer's device id)."""


@dataclass(slots=True)
class RequestRecord:
    request_id: str = ""
    method: str = ""
    endpoint: str = ""
    """the request's path (``/v1/chat/completions``)."""
    route: str = ""
    """the matched route pattern (``/v1/dvai/pairings/{device_id}``), for metric labels."""
    arrived_ms: int = 0
    """unix milliseconds when the request arrived."""
    app_id: str = ""
    """the caller's app id (``anonymous`` when unsigned)."""
    peer_device_id: str = ""
    """the device that signed the request, ``self`` (loopback) or ``anonymous``."""
    model_requested: str | None = None
    model_served: str | None = None
    served_by: str | None = None
    """``local``, a peer's device id, or None while nothing served it."""
    via: str | None = None
    """how a forwarded request reached its peer (``lan``, ``rendezvous``)."""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_s: float | None = None
    """seconds from the start of serving to the first generated token."""
    decode_tok_per_s: float | None = None
    error_code: str | None = None
    """why it failed: the error's code, also for an error sent inside a stream that answered 200."""
    status: int = 0
    latency_ms: float = 0.0

    def requested(self, model: str) -> None:
        self.model_requested = model

    def served(self, served_by: str, *, model: str, prompt_tokens: int, completion_tokens: int,
               first_token_s: float | None = None, decode_tok_per_s: float | None = None,
               via: str | None = None) -> None:
        """Fill the serving side (called by whoever served the request)."""
        self.served_by = served_by
        self.model_served = model
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self.first_token_s = first_token_s
        self.decode_tok_per_s = decode_tok_per_s
        self.via = via

    def failed(self, code: str) -> None:
        """Record an error that could not change the answer's status (it had started)."""
        self.error_code = code
