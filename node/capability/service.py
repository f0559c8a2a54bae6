"""``CapabilityService``: the node's current score per model, its probes and its subscribers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from ..common.errors import DVAIError
from ..config import NodeConfig
from ..constants import (
    CAPABILITY_OBSERVED_ALPHA,
    OBSERVED_MIN_TOKENS,
    PROBE_RETRY_DELAYS_S,
)
from ..engine.base import GenerationOutcome, ModelInfo
from ..engine.registry import ModelRegistry
from ..engine.simulated import SimulatedEngine
from ..engine.slot import ModelSlot, SlotState
from .curve import Curve, curve_levels, refine_curve
from .probe import check_probe_tokens, probe
from .score import (
    DEFAULT_COPY_BANDWIDTH,
    CapabilityScore,
    changed_enough,
    heuristic_tok_per_s,
    library_version_for,
    measure_copy_bandwidth,
    plausible_rate,
    probe_disturbance,
)
from .store import CapabilityStore

log = logging.getLogger(__name__)

ScoreListener = Callable[[CapabilityScore], None]
"""Called on the event loop with a model's new score when it changed materially."""


class CapabilityService:
    """Scores for every text model of a node: observed, else probed, else heuristic.

    ``start()`` (offload enabled only) loads the stored probes, measures memory bandwidth
    for the heuristic, starts listening to served generations, and, with
    ``offload.probe_on_start``, probes in the background every loaded model that has no
    stored probe. ``stop()`` cancels and awaits every task the service started.
    """

    def __init__(
        self,
        config: NodeConfig,
        registry: ModelRegistry,
        store: CapabilityStore,
        *,
        now: Callable[[], float] = time.time,
        bandwidth: Callable[[], float | None] = measure_copy_bandwidth,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        retry_delays: tuple[float, ...] = PROBE_RETRY_DELAYS_S,
        measure: Callable[..., Awaitable[CapabilityScore]] = probe,
    ) -> None:
        """``now``, ``bandwidth``, ``sleep`` and ``measure`` (the probe) are replaceable for tests."""
        self.config = config
        self.registry = registry
        self.store = store
        self._now = now
        self._measure_bandwidth = bandwidth
        self._sleep = sleep
        self._retry_delays = retry_delays
        self._measure = measure
        self._threads = {m.id: m.threads or os.cpu_count() or 1 for m in config.models}
        self._versions: dict[str, str] = {}
        self._bandwidth: float | None = None
        self._heuristics: dict[str, CapabilityScore] = {}
        self._observed: dict[str, CapabilityScore] = {}
        self._announced: dict[str, Curve] = {}
        self._listeners: list[ScoreListener] = []
        self._inflight: dict[tuple[str, int], asyncio.Task[CapabilityScore]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._save_lock = asyncio.Lock()
        self._prepare_lock = asyncio.Lock()
        self._listening = False

    @property
    def enabled(self) -> bool:
        """Scores are kept only with offload enabled (the reference's no-op otherwise)."""
        return self.config.offload.enabled

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Never waits for a probe; returns at once when offload is disabled."""
        if not self.enabled or self._listening:
            return
        await self._prepare()
        for slot in self.registry.slots():
            slot.add_listener(self._on_outcome)
            score = self._current(slot)
            if score is not None:
                self._announced[slot.info.id] = score.points
        self._listening = True
        if self.config.offload.probe_on_start:
            self._spawn(self._probe_missing(), "capability-probe-on-start")

    async def stop(self) -> None:
        self._listening = False
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- reading -------------------------------------------------------------------
    def get_capability(self, model_id: str | None = None) -> CapabilityScore | None:
        """The current score (observed, else probed, else heuristic); ``None`` when offload is
        disabled or the model serves embeddings. Unknown ids raise ``ModelNotFoundError``."""
        if not self.enabled:
            return None
        return self._current(self.registry.resolve(model_id or self.registry.default_id))

    def scores(self) -> dict[str, CapabilityScore]:
        """Every text model's current score, by model id (empty when offload is disabled)."""
        if not self.enabled:
            return {}
        out = {}
        for slot in self.registry.slots():
            score = self._current(slot)
            if score is not None:
                out[slot.info.id] = score
        return out

    def snapshot(self) -> dict[str, float]:
        """Model id → tok/s, rounded, for mDNS advertising."""
        return {model_id: round(score.tok_per_s, 2) for model_id, score in self.scores().items()}

    def curves(self) -> dict[str, Curve]:
        """Model id → capability curve (one point when only a single stream was measured)."""
        return {model_id: score.points for model_id, score in self.scores().items()}

    def subscribe(self, listener: ScoreListener) -> Callable[[], None]:
        """Call ``listener`` when a score changes materially; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(listener)

        return unsubscribe

    # -- probing -------------------------------------------------------------------
    async def probe_capability(self, model_id: str | None = None, tokens: int | None = None,
                               ) -> CapabilityScore | None:
        """A fresh probe, persisted; ``None`` without running anything when offload is disabled."""
        if not self.enabled:
            return None
        return await self.run_probe(model_id, tokens)

    async def run_probe(
        self,
        model_id: str | None = None,
        tokens: int | None = None,
        *,
        on_token: Callable[[], None] | None = None,
    ) -> CapabilityScore:
        """Probe whether or not offload is enabled (the CLI's explicit request), persist, announce.

        Concurrent calls for the same model and length share one run.
        """
        slot = self.registry.resolve(model_id or self.registry.default_id)
        count = check_probe_tokens(self.config.offload.probe_tokens if tokens is None else tokens)
        key = (slot.info.id, count)
        task = self._inflight.get(key)
        if task is None:
            task = self._spawn(self._probe_and_record(slot, count, on_token), f"capability-probe-{key[0]}")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        return await asyncio.shield(task)

    async def _probe_and_record(self, slot: ModelSlot, tokens: int,
                                on_token: Callable[[], None] | None) -> CapabilityScore:
        await self._prepare()
        score = await probe(
            slot, tokens, library_version=self._versions[slot.info.id],
            time_limit=self.config.generation_timeout, on_token=on_token, now=self._now,
        )
        await self._record(slot, score)
        return score

    async def _record(self, slot: ModelSlot, score: CapabilityScore) -> None:
        self.store.put(score, slot.info.size_bytes)
        self._observed.pop(slot.info.id, None)  # a fresh probe restarts the observed average
        await self._save()
        log.info("capability of %s: %.1f tok/s (probe of %d tokens); aggregate by concurrency: %s",
                 score.model_id, score.tok_per_s, score.samples,
                 ", ".join(f"{level}: {rate:.1f}" for level, rate in score.points))
        self._announce(score, force=True)

    async def _probe_missing(self) -> None:
        with contextlib.suppress(Exception):
            await self.registry.wait_preloaded()
        for slot in self.registry.slots():
            if slot.info.embedding or slot.state is not SlotState.READY or self._stored(slot) is not None:
                continue
            try:
                await self._startup_probe(slot)
            except DVAIError as exc:
                log.warning("capability probe of %s failed: %s", slot.info.id, exc.message)

    async def _startup_probe(self, slot: ModelSlot) -> CapabilityScore:
        """Probe at start; a run that looks disturbed is not kept but measured again later.

        Nodes starting together on one host (or any busy moment) slow each other's probes;
        persisting such a figure would steer routing until the observed average caught up.
        After the last retry the best figure measured is kept.
        """
        await self._prepare()
        tokens = check_probe_tokens(self.config.offload.probe_tokens)
        measured: list[CapabilityScore] = []
        for attempt in range(len(self._retry_delays) + 1):
            times: list[float] = []
            score = await self._measure(slot, tokens, library_version=self._versions[slot.info.id],
                                        time_limit=self.config.generation_timeout, now=self._now,
                                        token_times=times)
            measured.append(score)
            heuristic = self._heuristic(slot)
            previous = self.store.latest(slot.info.id, slot.info.size_bytes)
            reason = probe_disturbance(score.tok_per_s, times,
                                       heuristic=None if heuristic is None else heuristic.tok_per_s,
                                       previous=None if previous is None else previous.tok_per_s)
            if reason is None:
                break
            if attempt == len(self._retry_delays):
                score = max(measured, key=lambda s: s.tok_per_s)
                log.warning("capability probe of %s still looks disturbed (%s); keeping the best of %d "
                            "runs, %.1f tok/s", slot.info.id, reason, len(measured), score.tok_per_s)
                break
            delay = self._retry_delays[attempt]
            log.warning("capability probe of %s looks disturbed (%s): measured %.1f tok/s, not saved; "
                        "measuring again in %g s", slot.info.id, reason, score.tok_per_s, delay)
            await self._sleep(delay)
        await self._record(slot, score)
        return score

    # -- served traffic ------------------------------------------------------------
    def _on_outcome(self, info: ModelInfo, outcome: GenerationOutcome) -> None:
        """Slot listener (event loop): fold a served generation's decode rate into the curve.

        The generation is attributed to the concurrency level equal to the sequences running
        on the model when it finished (its own included): its rate times that count is a
        sample of the aggregate rate there, folded into that point's EWMA (which starts from
        the probe's figure). Levels the probe does not measure (3, or past 4) are not used.
        """
        if not self._listening or outcome.completion_tokens < OBSERVED_MIN_TOKENS:
            return
        rate = outcome.decode_tok_per_s
        if rate is None or not plausible_rate(rate):
            return
        try:
            slot = self.registry.resolve(info.id)
        except DVAIError:
            return
        level = max(1, slot.active_sequences)
        if level not in curve_levels(slot.parallel):
            return
        previous = self._observed.get(info.id)
        base = previous if previous is not None else self.store.get(info.id, self._version(info.id), info.size_bytes)
        updated = refine_curve(base.points if base is not None else (), level, rate, CAPABILITY_OBSERVED_ALPHA)
        if not updated:
            return  # a concurrent sample with no single-stream figure to anchor it to
        score = CapabilityScore(
            model_id=info.id, tok_per_s=updated[0][1],
            prompt_tok_per_s=None if base is None else base.prompt_tok_per_s, measured_at=self._now(),
            library_version=self._version(info.id), source="observed",
            samples=1 if previous is None else previous.samples + 1,
            curve=updated if len(updated) > 1 else (),
        )
        self._observed[info.id] = score
        self._announce(score)

    # -- internals -----------------------------------------------------------------
    def _current(self, slot: ModelSlot) -> CapabilityScore | None:
        if slot.info.embedding:
            return None
        return self._observed.get(slot.info.id) or self._stored(slot) or self._heuristic(slot)

    def _stored(self, slot: ModelSlot) -> CapabilityScore | None:
        return self.store.get(slot.info.id, self._version(slot.info.id), slot.info.size_bytes)

    def _heuristic(self, slot: ModelSlot) -> CapabilityScore | None:
        model_id = slot.info.id
        cached = self._heuristics.get(model_id)
        if cached is not None:
            return cached
        engine = slot.engine
        if isinstance(engine, SimulatedEngine):
            rate: float | None = engine.tok_per_s  # the SIMULATED engine's configured rate
        else:
            bandwidth = self._bandwidth or DEFAULT_COPY_BANDWIDTH
            rate = heuristic_tok_per_s(slot.info.size_bytes, self._threads.get(model_id, 1), bandwidth)
        if rate is None or not plausible_rate(rate):
            return None
        score = CapabilityScore(model_id=model_id, tok_per_s=rate, prompt_tok_per_s=None,
                                measured_at=self._now(), library_version=self._version(model_id),
                                source="heuristic", samples=0)
        if self._bandwidth is not None or isinstance(engine, SimulatedEngine):
            self._heuristics[model_id] = score  # keep it once it rests on a real measurement
        return score

    def _version(self, model_id: str) -> str:
        version = self._versions.get(model_id)
        if version is None:  # only before start()/_prepare(), which look it up off the loop
            version = self._versions[model_id] = library_version_for(self.registry.resolve(model_id).engine)
        return version

    async def _prepare(self) -> None:
        """Load the store, look up library versions and measure bandwidth (once, off the loop)."""
        async with self._prepare_lock:
            if not self.store.loaded:
                await asyncio.to_thread(self.store.load)
            for slot in self.registry.slots():
                if slot.info.id not in self._versions:
                    self._versions[slot.info.id] = await asyncio.to_thread(library_version_for, slot.engine)
            needs_bandwidth = any(not isinstance(s.engine, SimulatedEngine) for s in self.registry.slots())
            if needs_bandwidth and self._bandwidth is None:
                measured: float | None = None
                try:
                    measured = await asyncio.to_thread(self._measure_bandwidth)
                except Exception:  # noqa: BLE001 - the heuristic falls back to a default figure
                    log.warning("memory bandwidth measurement failed", exc_info=True)
                self._bandwidth = measured if measured and measured > 0 else DEFAULT_COPY_BANDWIDTH
                self._heuristics.clear()

    async def _save(self) -> None:
        async with self._save_lock:
            snapshot = self.store.dump()
            try:
                await asyncio.to_thread(self.store.save, snapshot)
            except OSError as exc:
                log.warning("could not save %s: %s", self.store.path, exc)

    def _announce(self, score: CapabilityScore, *, force: bool = False) -> None:
        if not force and not _curve_changed(self._announced.get(score.model_id), score.points):
            return
        self._announced[score.model_id] = score.points
        for listener in list(self._listeners):
            try:
                listener(score)
            except Exception:  # noqa: BLE001 - a subscriber never breaks scoring
                log.exception("capability listener failed")

    def _spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("%s ended with %r", task.get_name(), task.exception())


def _curve_changed(old: Curve | None, new: Curve) -> bool:
    """True when a level appeared or any point moved by more than the announce threshold."""
    if not old:
        return True
    before = dict(old)
    return any(level not in before or changed_enough(before[level], rate) for level, rate in new)
