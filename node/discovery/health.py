"""Active health checks: ``GET <base_url>/dvai/health`` on every known peer, every second.

A round checks every anchor and candidate address in the table plus every static or
custom seed not yet in it, at most ``MAX_CONCURRENT_HEALTH_CHECKS`` at once, each with
a short timeout; then the table's timeouts are applied (``sweep``). A peer silent for
``unreachable_after`` is marked unreachable, and removed after ``remove_after``.

Each request carries a random ``challenge``; a node that answers with an
``identityProof`` (see ``node.identity.make_health_proof``) proves it holds the key its
device id is derived from, which protects the entry against impostors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence

import aiohttp

from ..capability.curve import curve_from_json
from ..common.device_ids import is_valid_device_id
from ..constants import (
    HEALTH_CHECK_TIMEOUT_S,
    HEALTH_POKE_MIN_INTERVAL_S,
    HEALTH_POKE_TRACKED_MAX,
    MAX_CONCURRENT_HEALTH_CHECKS,
    MAX_DEVICE_NAME_CHARS,
    MAX_HEALTH_BODY_BYTES,
    MAX_INSTANCE_ID_CHARS,
    MAX_MODEL_FEATURES,
    MAX_PEER_MODELS,
    MAX_VERSION_CHARS,
)
from ..identity import NodeIdentity, check_health_proof
from .logonce import WarnOnce
from .merge import MergeOutcome
from .model import HealthReport, PeerSeed
from .peers import PeerTable
from .validate import Via, address_of, clean_models, clean_queue_depth_value, clean_text, health_url

_log = logging.getLogger(__name__)
HEALTHY_STATUSES = ("ok", "loading", "degraded")


def parse_health_report(body: object, challenge: str | None = None) -> HealthReport:
    """Validate a health answer (parsed JSON); raises ``ValueError`` when unusable."""
    if not isinstance(body, dict):
        raise ValueError("health answer is not a JSON object")
    status = body.get("status")
    if status not in HEALTHY_STATUSES:
        raise ValueError(f"status is {str(status)[:20]!r}, not one of {HEALTHY_STATUSES}")
    device_id = body.get("deviceId")
    if not is_valid_device_id(device_id):
        raise ValueError(f"deviceId {str(device_id)[:40]!r} is not a device id")
    assert isinstance(device_id, str)
    models = body.get("models", [])
    if not isinstance(models, list):
        raise ValueError("models is not a list")
    entries = [m for m in models[: MAX_PEER_MODELS * 4] if isinstance(m, dict)]
    problems: list[str] = []
    loaded = clean_models((m.get("id") for m in entries if m.get("loaded") is True), problems)
    queue_depth: dict[str, int] = {}
    for model in entries:
        model_id = model.get("id")
        if model_id in loaded and "queueDepth" in model and len(queue_depth) < MAX_PEER_MODELS:
            depth = clean_queue_depth_value(str(model_id), model["queueDepth"], problems)
            if depth is not None:
                queue_depth[str(model_id)] = depth
    features = {str(m["id"]): _features(m.get("features")) for m in entries
                if m.get("id") in loaded and "features" in m}
    curves = {str(m["id"]): curve for m in entries if m.get("id") in loaded and "capabilityCurve" in m
              for curve in (curve_from_json(m["capabilityCurve"]),) if len(curve) > 1}
    instance_id = clean_text(body.get("instanceId"), MAX_INSTANCE_ID_CHARS) or None
    proof = body.get("identityProof")
    proven = challenge is not None and proof is not None and check_health_proof(
        proof, challenge, device_id, instance_id or ""
    )
    return HealthReport(
        device_id=device_id,
        status=str(status),
        device_name=clean_text(body.get("deviceName"), MAX_DEVICE_NAME_CHARS),
        version=clean_text(body.get("version"), MAX_VERSION_CHARS),
        loaded_models=loaded,
        queue_depth=queue_depth,
        instance_id=instance_id,
        proven=proven,
        features=features,
        capability_curve=curves,
    )


_FEATURE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def _features(value: object) -> tuple[str, ...]:
    """A model's feature names from a peer: well-formed names only, at most ``MAX_MODEL_FEATURES``."""
    if not isinstance(value, list):
        return ()
    return tuple(dict.fromkeys(v for v in value[:MAX_MODEL_FEATURES] if isinstance(v, str) and _FEATURE.match(v)))


class HealthChecker:
    """Owns the periodic health round and out-of-round checks ("pokes")."""

    def __init__(
        self,
        *,
        table: PeerTable,
        session: aiohttp.ClientSession,
        identity: NodeIdentity,
        interval: float = 1.0,
        timeout: float = HEALTH_CHECK_TIMEOUT_S,
        max_concurrency: int = MAX_CONCURRENT_HEALTH_CHECKS,
        warn: WarnOnce | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._table = table
        self._session = session
        self._identity = identity
        self._interval = interval
        self._timeout = aiohttp.ClientTimeout(total=min(timeout, max(interval, 0.2)))
        self._semaphore = asyncio.Semaphore(max_concurrency)
        self._warn = warn or WarnOnce(_log)
        self._monotonic = monotonic
        self._seeds: dict[Via, dict[str, PeerSeed]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._pokes: dict[str, asyncio.Task[None]] = {}
        self._last_poke: dict[str, float] = {}

    # -- seeds ---------------------------------------------------------------

    def set_seeds(self, source: Via, seeds: Sequence[PeerSeed]) -> None:
        """Replace the seeds of one source; new ones are checked at once."""
        old = self._seeds.get(source, {})
        self._seeds[source] = {seed.base_url: seed for seed in seeds}
        for url, seed in self._seeds[source].items():
            if seed.device_id is not None:
                self._report(self._table.observe(seed.claim(seed.device_id)), seed.device_id, url)
            if url not in old:
                self.poke(url)

    def seed_urls(self) -> tuple[str, ...]:
        return tuple(url for seeds in self._seeds.values() for url in seeds)

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="dvai-health-checks")

    async def stop(self) -> None:
        tasks = [t for t in (self._loop_task, *self._pokes.values()) if t is not None]
        self._loop_task = None
        self._pokes.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def poke(self, base_url: str) -> None:
        """Check ``base_url`` now, outside the round (at most every 0.2 s per address)."""
        if self._loop_task is None or base_url in self._pokes:
            return
        now = self._monotonic()
        if now - self._last_poke.get(base_url, -1e9) < HEALTH_POKE_MIN_INTERVAL_S:
            return
        if len(self._last_poke) > HEALTH_POKE_TRACKED_MAX:
            self._last_poke = {u: t for u, t in self._last_poke.items() if now - t < 10}
        self._last_poke[base_url] = now
        task = asyncio.create_task(self._check(base_url), name="dvai-health-poke")
        self._pokes[base_url] = task
        task.add_done_callback(lambda _t: self._pokes.pop(base_url, None))

    async def run_round(self) -> None:
        """Check every target once, then apply the table's timeouts."""
        urls = dict.fromkeys(url for _, url in self._table.health_targets())
        for url in self.seed_urls():
            if self._table.owner_of(url) is None:
                urls[url] = None
        await asyncio.gather(*(self._check(url) for url in urls))
        self._table.sweep()

    async def _run(self) -> None:
        while True:
            started = self._monotonic()
            try:
                await self.run_round()
            except Exception:  # noqa: BLE001 - the loop must survive any one bad round
                _log.exception("health round failed")
            await asyncio.sleep(max(0.05, self._interval - (self._monotonic() - started)))

    # -- one check -------------------------------------------------------------

    async def _check(self, base_url: str) -> None:
        result = await self.fetch(base_url)
        try:
            self._apply(base_url, result)
        except Exception:  # noqa: BLE001 - one bad answer must not stop the round
            _log.exception("applying the health answer of %s failed", base_url)

    async def fetch(self, base_url: str) -> HealthReport | str:
        """The validated health answer at ``base_url``, or why there is none."""
        challenge = secrets.token_hex(16)
        try:
            async with self._semaphore, self._session.get(
                health_url(base_url), params={"challenge": challenge},
                timeout=self._timeout, allow_redirects=False,
            ) as response:
                # 503 is how a node says "alive, models still loading/failed": still reachable.
                if response.status not in (200, 503):
                    return f"HTTP {response.status}"
                body = await response.content.read(MAX_HEALTH_BODY_BYTES + 1)
            if len(body) > MAX_HEALTH_BODY_BYTES:
                return f"answer larger than {MAX_HEALTH_BODY_BYTES} bytes"
            return parse_health_report(json.loads(body), challenge)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__} {exc}".strip()
        except (ValueError, RecursionError) as exc:
            return f"bad answer: {exc}"

    def _apply(self, base_url: str, result: HealthReport | str) -> None:
        owner = self._table.owner_of(base_url)
        seed = self._seed(base_url)
        if isinstance(result, str):
            if owner is not None:
                self._table.health_failed(owner, base_url)
            if owner is not None or seed is not None:
                self._warn.warn(("health", base_url), "peer %s: health check failed (%s)",
                                address_of(base_url), result)
            return
        if result.device_id == self._identity.device_id:
            self._on_own_id(base_url, result)
        elif seed is not None and owner in (None, result.device_id):
            if seed.device_id not in (None, result.device_id):
                self._warn.warn(("seed-id", base_url), "%s peer %s answers as device %s, not the "
                                "configured %s: ignored", seed.source, address_of(base_url),
                                result.device_id, seed.device_id)
                return
            outcome = self._table.observe(seed.claim(result.device_id, result))
            self._report(outcome, result.device_id, base_url)
            owner = result.device_id if result.device_id in self._table else None
        if owner is not None:
            self._report(self._table.health_ok(owner, base_url, result), owner, base_url, result)

    def _seed(self, base_url: str) -> PeerSeed | None:
        for seeds in self._seeds.values():
            if base_url in seeds:
                return seeds[base_url]
        return None

    def _on_own_id(self, base_url: str, report: HealthReport) -> None:
        if report.instance_id == self._identity.instance_id:
            _log.debug("%s is this node itself; skipped", base_url)
            return
        self._warn.warn(
            ("clone", base_url, report.instance_id or ""),
            "another running node at %s uses THIS node's device id %s (its instance %s, ours %s): "
            "one state dir was copied. Fix: stop one node, delete identity.key in its state dir, "
            "start it again (it gets a new device id) and re-pair it.",
            address_of(base_url), report.device_id, report.instance_id, self._identity.instance_id,
        )

    def _report(
        self, outcome: MergeOutcome, device_id: str, base_url: str, report: HealthReport | None = None
    ) -> None:
        """Log what a merge outcome means for the operator (each problem once per source)."""
        report_outcome(self._warn, self._table, outcome, device_id, base_url, report)


def report_outcome(
    warn: WarnOnce,
    table: PeerTable,
    outcome: MergeOutcome,
    device_id: str,
    base_url: str,
    report: HealthReport | None = None,
) -> None:
    """Log a merge outcome that an operator should know about (once per source)."""
    entry = table.entry(device_id)
    anchor = address_of(entry.base_url) if entry else "?"
    where = address_of(base_url)
    if outcome is MergeOutcome.DUPLICATE:
        warn.warn(
            ("duplicate", device_id, base_url),
            "two running nodes answer as device id %s: at %s and at %s (instance %s). One was "
            "started from a copied state dir, or impersonates the other; keeping %s. Fix: delete "
            "identity.key in one copy's state dir and restart it.",
            device_id, anchor, where, report.instance_id if report else "?", anchor,
        )
    elif outcome is MergeOutcome.HIJACK_REJECTED:
        warn.warn(("hijack", device_id, base_url),
                  "%s claims device id %s but cannot prove its key (%s did): ignored",
                  where, device_id, anchor)
    elif outcome is MergeOutcome.MISMATCH:
        warn.warn(("mismatch", device_id, base_url),
                  "%s was announced as device %s but its health answer names device %s: ignored",
                  where, device_id, report.device_id if report else "?")
    elif outcome is MergeOutcome.TABLE_FULL:
        warn.warn(("full", base_url), "peer table full; %s (device %s) not listed", where, device_id)
    elif outcome is MergeOutcome.SWITCHED:
        _log.info("peer %s moved to %s", device_id, where)
