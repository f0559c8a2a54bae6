"""The error tree shared by the node and the rendezvous, and the one OpenAI error-body builder.

Every error a client can see knows its HTTP status and its OpenAI error
``type``/``code``/``param``, so handlers never build error bodies by hand and
never leak a stack trace. ``error_body`` is the only place the
``{"error": {message, type, code, param}}`` shape is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def error_body(
    message: str,
    *,
    error_type: str = "server_error",
    code: str | int | None = "internal_error",
    param: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The OpenAI-shaped error body: ``{"error": {message, type, code, param, **extra}}``."""
    error: dict[str, Any] = {"message": message, "type": error_type, "code": code, "param": param}
    if extra:
        error.update(extra)
    return {"error": error}


_HTTP_STATUS_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "payload_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def http_status_error(status: int) -> tuple[str, str]:
    """The OpenAI ``(type, code)`` for a bare HTTP status (an aiohttp ``HTTPException``, a peer's
    status without a body): the table above, else ``http_error`` typed by the status class."""
    default = ("invalid_request_error" if status < 500 else "server_error", "http_error")
    return _HTTP_STATUS_ERRORS.get(status, default)


def http_error_body(status: int, message: str) -> dict[str, Any]:
    """The error body for a bare HTTP status with ``message``."""
    error_type, code = http_status_error(status)
    return error_body(message, error_type=error_type, code=code)


def http_error_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an HTTP error worth passing on to the client (``Allow``, ``Retry-After``);
    the rest describe the framework's own response."""
    return {name: value for name, value in headers.items() if name.lower() in ("allow", "retry-after")}


class DVAIError(Exception):
    """Base of every error the node reports to a client."""

    status: int = 500
    error_type: str = "server_error"
    code: str | int | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})

    def to_body(self) -> dict[str, Any]:
        """The OpenAI-shaped body: ``{"error": {message, type, code, param}}``."""
        return error_body(self.message, error_type=self.error_type, code=self.code, param=self.param,
                          extra=self.extra)


class InvalidRequestError(DVAIError, ValueError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedParameterError(InvalidRequestError):
    code = "unsupported_parameter"


class AuthenticationError(DVAIError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_signature"


class PermissionDeniedError(DVAIError, PermissionError):
    status = 403
    error_type = "permission_error"
    code = "forbidden"


class NotFoundError(DVAIError, LookupError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"

    def __init__(self, model: str, available: list[str] | None = None, *, reason: str | None = None) -> None:
        hint = f"; available: {', '.join(available)}" if available else ""
        why = f" and {reason}" if reason else ""
        super().__init__(f"The model '{model}' does not exist on this node{why}{hint}", param="model",
                         code="model_family_unknown" if reason else None)


class OffloadDisabledError(NotFoundError):
    """A mesh feature asked for on a node with offload off (the reference mounts it only then)."""

    code = "offload_disabled"

    def __init__(self, feature: str, hint: str = "") -> None:
        super().__init__(
            f"{feature} only with offload enabled; set `enabled = true` under [offload] in the node's "
            f"config file (or DVAI_OFFLOAD__ENABLED=true) and restart the node{hint}"
        )


def embeddings_not_enabled(model_id: str, env_name: str) -> InvalidRequestError:
    """The 400 for /v1/embeddings on a model that is not in embedding mode, saying how to enable it."""
    return InvalidRequestError(
        f"model '{model_id}' is not in embedding mode; set `embedding = true` under [models.{model_id}] "
        f"(or DVAI_MODELS__{env_name}__EMBEDDING=true) to serve /v1/embeddings, or use a model listed "
        "with 'embedding' in /v1/models",
        param="model",
        code="embeddings_not_enabled",
    )


class MethodNotAllowedError(DVAIError):
    status = 405
    error_type = "invalid_request_error"
    code = "method_not_allowed"


class ConflictError(DVAIError):
    status = 409
    error_type = "invalid_request_error"
    code = "conflict"


class PayloadTooLargeError(DVAIError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class RateLimitedError(DVAIError):
    status = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float = 1.0, **kwargs: Any) -> None:
        headers = {"Retry-After": str(max(1, int(round(retry_after))))}
        super().__init__(message, headers=headers, **kwargs)
        self.retry_after = retry_after


class ServiceUnavailableError(DVAIError):
    status = 503
    error_type = "server_error"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        headers = kwargs.pop("headers", None) or {}
        if retry_after is not None:
            headers["Retry-After"] = str(max(1, int(round(retry_after))))
        super().__init__(message, headers=headers, **kwargs)
        self.retry_after = retry_after


class QueueFullError(ServiceUnavailableError):
    code = "queue_full"


class ModelUnavailableError(ServiceUnavailableError):
    code = "model_unavailable"


class GenerationTimeoutError(DVAIError, TimeoutError):
    status = 504
    error_type = "server_error"
    code = "generation_timeout"


class GenerationStalledError(DVAIError):
    status = 502
    error_type = "server_error"
    code = "generation_stalled"


class EngineError(DVAIError):
    """The engine failed on a request that was valid; no internals are exposed."""

    status = 500
    error_type = "server_error"
    code = "engine_error"


class UpstreamError(DVAIError):
    """A peer the request was forwarded to failed."""

    status = 502
    error_type = "server_error"
    code = "upstream_error"


class ConfigError(ValueError):
    """Bad configuration: raised at start, names the key and the expected type."""

