"""Who decides whether a device may pair: policy, operator prompt, or the embedding app's hook.

Policies (``SecurityConfig.pairing_policy``):

- ``deny`` (default): every handshake is refused.
- ``allowlist``: approved when the device id is in ``pairing_allowlist`` *and* the caller proved
  it holds that id's Ed25519 key (the handshake's ``proof``); an unproven id is refused.
- ``prompt``: the request waits (up to ``PAIRING_PROMPT_TIMEOUT_S``) until the operator runs
  ``dvai-node pairing approve|deny <device-id> [--app APP]``; silence means deny.

Each (device, app) pair is decided on its own: an app's pairing is a separate request with its
own key. Per-app rules (``SecurityConfig.app_pairing``, ``[[security.app_pairing]]``) decide the
apps they name (``*``: every app without its own rule) before the device policy:

- ``allow``: approved for any device (that proves its id, unless ``require_proof = false``);
- ``prompt``: the operator decides, whatever the device policy;
- ``deny``: refused (``403 app_pairing_denied``).

A library hook (``on_pairing_request``), when set, replaces the policy, like the reference's
``onPairingRequest``: it returns ``True``/``False``, ``{"approved": True, "pairing_key": str}``
(use the host app's own key) or ``{"approved": False}``; sync or async. A failing hook denies.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..common.errors import ConflictError, NotFoundError, RateLimitedError
from ..common.tokenbucket import TokenBucket
from ..config import AppPairingRule, SecurityConfig
from ..constants import (
    HANDSHAKE_BURST,
    HANDSHAKE_PROOFS_REMEMBERED,
    HANDSHAKE_TRACKED_MAX,
    PAIRING_PENDING_MAX,
    PAIRING_PROMPT_TIMEOUT_S,
)
from ..security.signing import NonceCache
from .store import decode_key

logger = logging.getLogger(__name__)

Policy = Literal["deny", "allowlist", "prompt"]
ANY_APP = "*"


@dataclass(frozen=True, slots=True)
class PairingRequest:
    """A validated handshake, as the hook and ``dvai-node pairing pending`` see it."""

    peer_device_id: str
    peer_device_name: str
    app_id: str
    via: str
    remote: str
    received_at: int
    """unix ms."""
    proven: bool = False
    """True when the handshake carried a valid proof that the caller holds ``peer_device_id``'s key."""

    @property
    def id(self) -> str:
        """Pending requests are named by device id (and app id when the device has several)."""
        return self.peer_device_id

    @property
    def key(self) -> tuple[str, str]:
        """At most one request per (device, app) is pending."""
        return (self.peer_device_id, self.app_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peerDeviceId": self.peer_device_id,
            "peerDeviceName": self.peer_device_name,
            "appId": self.app_id,
            "via": self.via,
            "remote": self.remote,
            "receivedAt": self.received_at,
            "proven": self.proven,
        }


@dataclass(frozen=True, slots=True)
class PairingDecision:
    approved: bool
    reason: str
    """a code: approved_by_*, pairing_denied, not_in_allowlist, denied_by_operator, …"""
    pairing_key: bytes | None = None
    """set when the hook supplied the host app's own key."""


HookResult = bool | Mapping[str, Any]
PairingHook = Callable[[PairingRequest], HookResult | Awaitable[HookResult]]


class TokenBuckets:
    """Per-key token buckets with a cap on how many keys are tracked (pure; time passed in).

    When the table is full, buckets that have refilled are forgotten (they behave exactly like
    untracked keys); if none has, newcomers are refused too, so a flood of spoofed ids cannot
    grow memory or evict a busy key's debt.
    """

    def __init__(self, *, capacity: int, per_second: float, max_keys: int) -> None:
        if capacity < 1 or per_second <= 0 or max_keys < 1:
            raise ValueError("capacity, per_second and max_keys must be positive")
        self.capacity = capacity
        self.per_second = per_second
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> float:
        """Spend one token: 0.0 when allowed, else the seconds until one is available."""
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._prune(now)
                if len(self._buckets) >= self.max_keys:
                    return 1.0 / self.per_second  # every tracked key is busy: refuse newcomers too
            bucket = TokenBucket.full(self.per_second, float(self.capacity), now)
            self._buckets[key] = bucket
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)

    def _prune(self, now: float) -> None:
        for key in [key for key, bucket in self._buckets.items() if bucket.is_full(now)]:
            del self._buckets[key]


@dataclass(slots=True)
class _Pending:
    request: PairingRequest
    future: asyncio.Future[bool] | None
    deadline: float


class PairingApprover:
    """Applies the pairing policy or hook; holds prompt requests; rate-limits handshakes."""

    def __init__(
        self,
        *,
        policy: Policy = "deny",
        allowlist: Collection[str] = (),
        app_rules: Collection[AppPairingRule] = (),
        hook: PairingHook | None = None,
        prompt_timeout_s: float = PAIRING_PROMPT_TIMEOUT_S,
        rate_per_minute: int = 10,
        burst: int = HANDSHAKE_BURST,
        max_pending: int = PAIRING_PENDING_MAX,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if policy not in ("deny", "allowlist", "prompt"):
            raise ValueError(f"unknown pairing policy {policy!r}")
        if rate_per_minute < 1:
            raise ValueError("handshake_rate_per_minute must be at least 1")
        self.policy: Policy = policy
        self.allowlist = frozenset(allowlist)
        self.app_rules: dict[str, AppPairingRule] = {rule.app_id: rule for rule in app_rules}
        self.hook = hook
        self.prompt_timeout_s = prompt_timeout_s
        self.max_pending = max_pending
        self._clock = clock
        self._rates = TokenBuckets(capacity=burst, per_second=rate_per_minute / 60.0,
                                   max_keys=HANDSHAKE_TRACKED_MAX)
        self._pending: dict[tuple[str, str], _Pending] = {}
        self.seen_proofs = NonceCache(max_entries=HANDSHAKE_PROOFS_REMEMBERED)
        """device proofs accepted in the last ±300 s: a captured proof cannot be replayed."""

    @classmethod
    def from_config(cls, security: SecurityConfig, *, hook: PairingHook | None = None) -> PairingApprover:
        return cls(policy=security.pairing_policy, allowlist=security.pairing_allowlist,
                   app_rules=security.app_pairing, hook=hook, rate_per_minute=security.handshake_rate_per_minute)

    def rule_for(self, app_id: str) -> AppPairingRule | None:
        """The ``[[security.app_pairing]]`` rule that decides ``app_id``: its own, else ``*``'s."""
        return self.app_rules.get(app_id) or self.app_rules.get(ANY_APP)

    def check_rate(self, key: str) -> None:
        """Spend a handshake token for ``key`` (an address or a device id); 429 when out."""
        wait = self._rates.take(key, self._clock())
        if wait > 0:
            raise RateLimitedError("too many pairing handshakes; slow down", retry_after=wait,
                                   code="handshake_rate_limited")

    async def decide(self, request: PairingRequest) -> PairingDecision:
        """Approve or deny; waits for the operator or the hook when they decide."""
        rule = self.rule_for(request.app_id) if self.hook is None else None
        if rule is not None and rule.policy == "deny":
            return PairingDecision(False, "app_pairing_denied")
        if rule is not None and rule.policy == "allow":
            if rule.require_proof and not request.proven:
                return PairingDecision(False, "device_proof_required")
            return PairingDecision(True, "approved_by_app_rule")
        prompt = rule is not None  # the remaining rule policy
        if self.hook is None and not prompt and self.policy == "deny":
            return PairingDecision(False, "pairing_denied")
        if self.hook is None and not prompt and self.policy == "allowlist":
            if not request.proven:  # checked first: an unproven caller learns nothing about the list
                return PairingDecision(False, "device_proof_required")
            if request.peer_device_id in self.allowlist:
                return PairingDecision(True, "approved_by_allowlist")
            return PairingDecision(False, "not_in_allowlist")
        self._reserve(request)
        try:
            if self.hook is not None:
                self._pending[request.key] = _Pending(request, None, self._clock() + self.prompt_timeout_s)
                return await self._ask_hook(request)
            return await self._ask_operator(request)
        finally:
            current = self._pending.get(request.key)
            if current is not None and current.request is request:  # not a request that replaced it
                del self._pending[request.key]

    def pending(self) -> list[PairingRequest]:
        """Requests waiting for ``approve``/``deny`` (prompt policy), oldest first."""
        waiting = [p.request for p in self._pending.values() if p.future is not None]
        return sorted(waiting, key=lambda r: r.received_at)

    def approve(self, request_id: str, app_id: str | None = None) -> PairingRequest:
        """Approve the device's pending request (for ``app_id``; None: its only one)."""
        return self._settle(request_id, app_id, True)

    def deny(self, request_id: str, app_id: str | None = None) -> PairingRequest:
        return self._settle(request_id, app_id, False)

    def close(self) -> None:
        """Deny everything still waiting (shutdown)."""
        for entry in list(self._pending.values()):
            if entry.future is not None and not entry.future.done():
                entry.future.set_result(False)

    def _reserve(self, request: PairingRequest) -> None:
        existing = self._pending.get(request.key)
        if existing is not None and request.proven and not existing.request.proven:
            # An unproven caller cannot hold a device's slot against the device itself: the
            # request that proves the id replaces the bare claim (which is denied).
            logger.warning("pairing request claiming %s without proof replaced by one that proves it",
                           request.peer_device_id)
            self._pending.pop(request.key, None)
            if existing.future is not None and not existing.future.done():
                existing.future.set_result(False)
            existing = None
        if existing is not None:
            retry = max(1.0, existing.deadline - self._clock())
            raise RateLimitedError("a pairing request from this device and app is already pending",
                                   retry_after=retry, code="pairing_already_pending")
        if len(self._pending) >= self.max_pending:
            raise RateLimitedError("too many pairing requests are waiting for approval",
                                   retry_after=self.prompt_timeout_s, code="too_many_pending_pairings")

    async def _ask_operator(self, request: PairingRequest) -> PairingDecision:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending[request.key] = _Pending(request, future, self._clock() + self.prompt_timeout_s)
        logger.warning("pairing request from %s (%s, app %s, device id %s) at %s: approve with "
                       "`dvai-node pairing approve %s --app %s`", request.peer_device_id, request.peer_device_name,
                       request.app_id, "proven" if request.proven else "NOT proven", request.remote,
                       request.peer_device_id, request.app_id)
        try:
            approved = await asyncio.wait_for(future, self.prompt_timeout_s)
        except TimeoutError:
            return PairingDecision(False, "pairing_timed_out")
        return PairingDecision(True, "approved_by_operator") if approved else \
            PairingDecision(False, "denied_by_operator")

    async def _ask_hook(self, request: PairingRequest) -> PairingDecision:
        assert self.hook is not None
        try:
            if inspect.iscoroutinefunction(self.hook):
                result = await asyncio.wait_for(_as_coroutine(self.hook(request)), self.prompt_timeout_s)
            else:
                # A plain function may block (a dialog, a lookup): keep it off the event loop.
                hook: Callable[[PairingRequest], Any] = self.hook
                result = await asyncio.wait_for(asyncio.to_thread(hook, request), self.prompt_timeout_s)
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(_as_coroutine(result), self.prompt_timeout_s)
        except TimeoutError:
            return PairingDecision(False, "pairing_timed_out")
        except Exception:  # noqa: BLE001 - a broken hook must deny, not crash the handler
            logger.exception("on_pairing_request hook failed; denying %s", request.peer_device_id)
            return PairingDecision(False, "pairing_hook_failed")
        return hook_result_to_decision(result)

    def _settle(self, request_id: str, app_id: str | None, approved: bool) -> PairingRequest:
        waiting = [entry for (device, app), entry in self._pending.items()
                   if device == request_id and (app_id is None or app == app_id)
                   and entry.future is not None and not entry.future.done()]
        if not waiting:
            named = f" for app '{app_id}'" if app_id is not None else ""
            raise NotFoundError(f"no pending pairing request '{request_id}'{named}")
        if len(waiting) > 1:
            apps = ", ".join(sorted(entry.request.app_id for entry in waiting))
            raise ConflictError(f"device '{request_id}' has pairing requests pending for several apps ({apps}); "
                                "name one (appId / --app)", code="app_id_required")
        entry = waiting[0]
        assert entry.future is not None
        entry.future.set_result(approved)
        return entry.request


def hook_result_to_decision(result: object) -> PairingDecision:
    """Interpret a hook's answer: bool, or the tagged union ``{approved, pairing_key?}``."""
    if isinstance(result, bool):
        return PairingDecision(result, "approved_by_hook" if result else "denied_by_hook")
    if isinstance(result, Mapping) and isinstance(result.get("approved"), bool):
        if not result["approved"]:
            return PairingDecision(False, "denied_by_hook")
        key_text = result.get("pairing_key", result.get("pairingKey"))
        if key_text is None:
            return PairingDecision(True, "approved_by_hook")
        try:
            return PairingDecision(True, "approved_by_hook", pairing_key=decode_key(key_text))
        except ValueError as exc:
            logger.error("on_pairing_request returned an unusable pairing_key (%s); denying", exc)
            return PairingDecision(False, "pairing_hook_failed")
    logger.error("on_pairing_request returned %r; expected bool or {'approved': ...}; denying",
                 type(result).__name__)
    return PairingDecision(False, "pairing_hook_failed")


async def _as_coroutine(awaitable: Awaitable[HookResult]) -> HookResult:
    return await awaitable
