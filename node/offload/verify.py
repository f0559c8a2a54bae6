"""Verification: measure what a peer really delivers with a signed probe through the network.

A peer's own tok/s figure (from mDNS, custom discovery, …) is a claim. Before a peer
may serve a request, this node sends it a short signed streaming ``/v1/completions``
request (a neutral prompt, ``max_tokens`` = 32, ``X-DVAI-Offload: never`` plus the hop
marker, so the peer runs it itself) and times the arrival of the generated tokens at
*this* end: ``(n - 1) / (t_last - t_first)``. Prompt processing and the peer's queue are
left out on purpose (the ranking accounts for queues separately); what remains is the
decode rate as seen through the network, which is what a forwarded stream will get.
(A batching peer decodes the probe together with the requests it runs: the router divides
the rate by the probe's decode share from the peer's capability curve, so the figure
kept is the single-stream rate the curve is anchored at.)

Results are cached per (peer, model) with their time; the policy treats them as stale
after ``verify_max_age``. Probes are single-flight per (peer, model), at most
``MAX_CONCURRENT_VERIFICATIONS`` run at once, each bounded by ``verify_timeout``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Coroutine
from dataclasses import dataclass
from typing import Any

from node.capability.probe import PROBE_PROMPT
from node.common.sse import EventSplitter, OversizeEventError
from node.constants import (
    FORWARD_MAX_EVENT_BYTES,
    HOP_HEADER,
    MAX_CONCURRENT_VERIFICATIONS,
    MAX_VERIFICATIONS,
    OFFLOAD_HEADER,
    VERIFY_MIN_TOKENS,
    VERIFY_PROBE_TOKENS,
    VERIFY_RETRY_AFTER_S,
)
from node.engine.base import GenerationOutcome
from node.pairing.store import Pairing
from node.security.signing import sign_with_pairing
from node.transport.link import LinkRequest, LinkResponse, PeerLink, PeerLinkError

__all__ = ["PeerVerifier", "ProbeTarget", "Verification", "VerificationFailed", "measure_decode_rate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Verification:
    """One probe's result: ``tok_per_s`` is None when it told us nothing usable."""

    device_id: str
    model: str
    tok_per_s: float | None
    tokens: int
    at: float
    """unix seconds (the router's clock)."""
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        rate = None if self.tok_per_s is None else round(self.tok_per_s, 2)
        return {"model": self.model, "tokPerS": rate, "tokens": self.tokens, "at": round(self.at, 3),
                "error": self.error}


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """Where and how to send a probe: the link to the peer and our pairing with it."""

    device_id: str
    link: PeerLink
    pairing: Pairing
    model: str
    """the model name as the peer knows it."""


class VerificationFailed(Exception):
    """The peer did not answer the probe at all (refused, timed out, HTTP error)."""


async def measure_decode_rate(
    target: ProbeTarget,
    *,
    self_device_id: str,
    time_limit: float,
    connect_timeout: float,
    give_up_below: float | None = None,
    tokens: int = VERIFY_PROBE_TOKENS,
    monotonic: Callable[[], float] = time.perf_counter,
) -> tuple[float | None, int]:
    """(decode tok/s measured at this end or None if inconclusive, tokens received).

    Raises ``VerificationFailed`` when the peer cannot be reached, answers with an error
    status or sends no token in time. The probe stops at ``time_limit``, and, with
    ``give_up_below``, as soon as the peer can no longer reach that rate (the time since
    its first token exceeds what ``tokens`` tokens take at that rate): the rate then counts
    the time since the first token up to the stop, so a slow or stalling peer is measured
    at what it delivered, without waiting for the rest.
    """
    path = "/v1/completions"
    body = json.dumps({
        "model": target.model,
        "prompt": PROBE_PROMPT.format(salt=random.randrange(10**6)),
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
    }).encode()
    headers = sign_with_pairing(target.pairing, self_device_id, "POST", path, body)
    headers.update({"Content-Type": "application/json", OFFLOAD_HEADER: "never", HOP_HEADER: self_device_id})
    timing = _ProbeTiming(monotonic)
    response: LinkResponse | None = None
    try:
        async with asyncio.timeout(time_limit) as deadline:
            response = await target.link.open(LinkRequest("POST", path, headers, body), connect_timeout=connect_timeout)
            if response.status != 200:
                raise VerificationFailed(f"HTTP {response.status}")
            await _read_probe(response, timing, deadline, give_up_below, tokens)
    except TimeoutError:
        timing.cut = True
        timing.stopped_at = monotonic()
        if timing.count == 0:
            raise VerificationFailed(f"no token within {time_limit:g} s") from None
    except PeerLinkError as exc:
        raise VerificationFailed(str(exc)) from None
    except OversizeEventError:
        timing.broken = True
    finally:
        if response is not None:
            response.cancel()
    return timing.result(), timing.count


class _ProbeTiming:
    __slots__ = ("_monotonic", "count", "first", "last", "cut", "stopped_at", "broken")

    def __init__(self, monotonic: Callable[[], float]) -> None:
        self._monotonic = monotonic
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.cut = False
        self.stopped_at: float | None = None
        self.broken = False

    def token(self, arrived: float) -> None:
        self.count += 1
        self.first = arrived if self.first is None else self.first
        self.last = arrived

    def result(self) -> float | None:
        if self.broken or self.first is None:
            return None
        if not self.cut and self.count < VERIFY_MIN_TOKENS:
            return None
        # Cut short: the rate counts the time since the first token up to the stop (one token
        # in all that time is a rate of zero, not an inconclusive probe).
        last = self.stopped_at if self.cut else self.last
        if self.cut and self.count == 1 and last is not None and last > self.first:
            return 0.0
        return GenerationOutcome(completion_tokens=self.count, first_token_at=self.first,
                                 last_token_at=last).decode_tok_per_s


async def _read_probe(response: LinkResponse, timing: _ProbeTiming, deadline: asyncio.Timeout,
                      give_up_below: float | None, tokens: int) -> None:
    splitter = EventSplitter(max_event_bytes=FORWARD_MAX_EVENT_BYTES)
    loop = asyncio.get_running_loop()
    while chunk := await response.read_chunk():
        arrived = timing._monotonic()  # noqa: SLF001 - the timing's own clock
        for event in splitter.feed(chunk):
            if event.error is not None:
                timing.broken = True
                return
            if event.has_text:
                if timing.count == 0 and give_up_below:
                    # 10 % grace, so a peer right at the threshold is not cut short by jitter
                    hopeless_at = loop.time() + 1.1 * (tokens - 1) / give_up_below
                    current = deadline.when()
                    deadline.reschedule(hopeless_at if current is None else min(current, hopeless_at))
                timing.token(arrived)
            if event.done:
                return


Measure = Callable[[ProbeTarget], Coroutine[Any, Any, tuple[float | None, int]]]


class PeerVerifier:
    """Probes peers on demand and remembers what it measured."""

    def __init__(
        self,
        measure: Measure,
        *,
        on_unreachable: Callable[[str], None] = lambda _device_id: None,
        clock: Callable[[], float] = time.time,
        max_concurrent: int = MAX_CONCURRENT_VERIFICATIONS,
        max_entries: int = MAX_VERIFICATIONS,
        retry_after: float = VERIFY_RETRY_AFTER_S,
    ) -> None:
        self._measure = measure
        self._on_unreachable = on_unreachable
        self._clock = clock
        self._semaphore = asyncio.Semaphore(max(1, max_concurrent))
        self._max_entries = max(1, max_entries)
        self._retry_after = retry_after
        self._results: OrderedDict[tuple[str, str], Verification] = OrderedDict()
        """the last usable measurement per (peer, model)."""
        self._failures: OrderedDict[tuple[str, str], Verification] = OrderedDict()
        """the last inconclusive or failed probe, for the retry back-off."""
        self._running: dict[tuple[str, str], asyncio.Task[Verification]] = {}

    # -- reading ---------------------------------------------------------------------
    def get(self, device_id: str, model: str) -> Verification | None:
        return self._results.get((device_id, model))

    def results(self) -> list[Verification]:
        return list(self._results.values())

    def last_failure(self, device_id: str, model: str) -> Verification | None:
        return self._failures.get((device_id, model))

    def may_probe(self, device_id: str, model: str, now: float) -> bool:
        """False while a probe runs or within the back-off after an inconclusive one."""
        key = (device_id, model)
        if key in self._running:
            return True  # joining a running probe costs nothing
        failure = self._failures.get(key)
        return failure is None or now - failure.at >= self._retry_after

    # -- probing ---------------------------------------------------------------------
    def start(self, target: ProbeTarget) -> asyncio.Task[Verification]:
        """The running probe of (peer, model), or a new one."""
        key = (target.device_id, target.model)
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._probe(target), name=f"verify-{key[0][:12]}")
            self._running[key] = task
            task.add_done_callback(functools.partial(self._finished, key))
        return task

    def _finished(self, key: tuple[str, str], _task: asyncio.Task[Verification]) -> None:
        self._running.pop(key, None)

    async def verify(self, targets: Collection[ProbeTarget], *, wait: float,
                     enough: Callable[[], bool] | None = None) -> None:
        """Start (or join) probes of ``targets``; return when all ended, when ``enough()`` holds
        after one ended, or after ``wait`` seconds.

        Probes still running at that point carry on in the background, so a later request
        benefits from them. (A faster peer finishes its probe sooner, so stopping at the first
        result that suffices rarely misses a better peer.)
        """
        pending = {asyncio.shield(self.start(target)) for target in targets}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            _done, pending = await asyncio.wait(pending, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            if enough is not None and enough():
                break
        for waiter in pending:
            waiter.cancel()  # cancels the shield only: the probe itself carries on

    def forget(self, device_id: str) -> None:
        for store in (self._results, self._failures):
            for key in [k for k in store if k[0] == device_id]:
                del store[key]

    async def close(self) -> None:
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def _probe(self, target: ProbeTarget) -> Verification:
        async with self._semaphore:
            try:
                rate, tokens = await self._measure(target)
                error = None if rate is not None else f"inconclusive ({tokens} tokens)"
            except VerificationFailed as exc:
                rate, tokens, error = None, 0, str(exc)
                self._on_unreachable(target.device_id)
        result = Verification(target.device_id, target.model, rate, tokens, self._clock(), error)
        key = (target.device_id, target.model)
        if rate is not None:
            _put(self._results, key, result, self._max_entries)
            self._failures.pop(key, None)
            log.info("verified peer %s (%s): %.1f tok/s measured over %d tokens", target.device_id[:16],
                     target.model, rate, tokens)
        else:
            _put(self._failures, key, result, self._max_entries)
            log.warning("verification of peer %s (%s) failed: %s", target.device_id[:16], target.model, error)
        return result


def _put(store: OrderedDict[tuple[str, str], Verification], key: tuple[str, str], value: Verification,
         limit: int) -> None:
    store[key] = value
    store.move_to_end(key)
    while len(store) > limit:
        store.popitem(last=False)
