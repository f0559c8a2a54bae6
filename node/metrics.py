"""Prometheus metrics of one node, on its own registry (several nodes may share a process).

Integration surface:

- ``NodeMetrics(...)``, built by the runtime once the context exists (``node/runtime.py``), stored
  as ``context.metrics``; ``render()`` is the ``GET /metrics`` body (``node/api/metrics.py``).
- ``observe_request(record)`` is a reader of the per-request record (``node/api/record.py``):
  one observation per request to ``/v1/*`` (status, route, where served, tokens, time to first
  token, decode rate, error code).
- The offload router calls ``offload_started(peer_id)`` when it sends a request to a peer and
  ``offload_finished(peer_id, ok=..., tokens=...)`` once that attempt is over.

Label values are bounded: routes by their pattern (``unmatched`` otherwise), models by the
registry (``other`` otherwise), peers and error codes by first-come caps from
``node/constants.py`` (``other`` beyond them). See docs/metrics.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .common.errors import http_error_body
from .constants import (
    API_PATH,
    MAX_METRIC_ERROR_CODES,
    MAX_METRIC_LABEL_CHARS,
    MAX_METRIC_PEER_LABELS,
    MAX_METRIC_REMOTE_MODELS,
)
from .discovery.model import Peer, PeerState
from .engine.record import RequestRecord
from .version import __version__

if TYPE_CHECKING:
    from .engine.registry import ModelRegistry

__all__ = [
    "DECODE_RATE_BUCKETS",
    "OTHER",
    "TTFT_BUCKETS",
    "BoundedLabels",
    "NodeMetrics",
]

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""seconds from the request reaching the engine's queue to the first token."""
DECODE_RATE_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 200.0, 300.0, 500.0)
"""tokens per second after the first token."""

OTHER = "other"
"""label value shared by everything past a cap (peers, error codes, unknown models)."""
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SERVED_LOCAL, SERVED_PEER = "local", "peer"

PeerSource = Callable[[], "Iterable[Peer] | None"]
CountSource = Callable[[], "int | None"]
AuditHealthSource = Callable[[], "Mapping[str, Any]"]


class BoundedLabels:
    """The first ``limit`` distinct values keep their own label value; later ones share ``other``.

    Prometheus keeps every label value ever seen for the life of the process, so a value
    chosen by the network (a peer id, an error code) needs a cap.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        value = value[:MAX_METRIC_LABEL_CHARS]
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class NodeMetrics:
    """Every instrument of one node, registered on a private ``CollectorRegistry``."""

    def __init__(
        self,
        *,
        device_id: str,
        device_name: str = "",
        version: str = __version__,
        models: ModelRegistry | None = None,
        peers: PeerSource | None = None,
        paired_devices: CountSource | None = None,
        started_at: float | None = None,
        max_peer_labels: int = MAX_METRIC_PEER_LABELS,
        audit_health: AuditHealthSource | None = None,
    ) -> None:
        """``peers`` returns the peer table's snapshot, or ``None`` while discovery is off
        (then no ``dvai_peers`` samples); ``paired_devices`` the number of pairings."""
        self.device_id = device_id
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._models = models
        self._peer_label = BoundedLabels(max_peer_labels)
        self._code_label = BoundedLabels(MAX_METRIC_ERROR_CODES)
        self._remote_model_label = BoundedLabels(MAX_METRIC_REMOTE_MODELS)
        self._in_flight: dict[str, int] = {}

        self.requests = Counter(
            "dvai_http_requests", "HTTP requests to /v1/* by route pattern, method, status and where served",
            ["endpoint", "method", "status", "served_by"], registry=registry)
        self.errors = Counter(
            "dvai_http_errors", "requests that failed (status >= 400, or an error event inside a stream "
            "that answered 200), by route pattern and error code", ["endpoint", "code"], registry=registry)
        self.prompt_tokens = Counter(
            "dvai_prompt_tokens", "prompt tokens of served requests", ["model", "served_by"], registry=registry)
        self.completion_tokens = Counter(
            "dvai_completion_tokens", "completion tokens of served requests", ["model", "served_by"],
            registry=registry)
        self.time_to_first_token = Histogram(
            "dvai_time_to_first_token_seconds", "seconds from queueing to the first token",
            ["model", "served_by"], buckets=TTFT_BUCKETS, registry=registry)
        self.decode_rate = Histogram(
            "dvai_decode_rate_tokens_per_second", "decode speed after the first token (tok/s)",
            ["model", "served_by"], buckets=DECODE_RATE_BUCKETS, registry=registry)
        self.offloads = Counter(
            "dvai_offload_requests", "requests this node sent to a peer", ["peer"], registry=registry)
        self.offload_failures = Counter(
            "dvai_offload_failures", "requests to a peer that failed", ["peer"], registry=registry)
        self.offload_tokens = Counter(
            "dvai_offload_tokens", "completion tokens peers generated for this node", ["peer"],
            registry=registry)
        self.offloads_in_flight = Gauge(
            "dvai_offload_in_flight", "requests to a peer not yet finished", ["peer"], registry=registry)
        info = Gauge("dvai_node_info", "this node: version and device id (always 1)",
                     ["version", "device_id", "device_name"], registry=registry)
        info.labels(version, device_id, device_name[:MAX_METRIC_LABEL_CHARS]).set(1)
        start = Gauge("dvai_node_start_time_seconds", "unix time the node started", registry=registry)
        start.set(time.time() if started_at is None else started_at)
        if models is not None:
            registry.register(_ModelCollector(models))
        if peers is not None or paired_devices is not None:
            registry.register(_PeerCollector(peers, paired_devices))
        if audit_health is not None:
            registry.register(_AuditCollector(audit_health))

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    # -- offload hooks (called by the router) ---------------------------------------
    def offload_started(self, peer_id: str) -> None:
        """A request is being sent to ``peer_id``."""
        label = self._peer_label(peer_id)
        self.offloads.labels(label).inc()
        self._in_flight[label] = self._in_flight.get(label, 0) + 1
        self.offloads_in_flight.labels(label).set(self._in_flight[label])

    def offload_finished(self, peer_id: str, ok: bool, tokens: int) -> None:
        """The attempt started with ``offload_started(peer_id)`` ended; ``tokens`` it produced."""
        label = self._peer_label(peer_id)
        if not ok:
            self.offload_failures.labels(label).inc()
        counted = _count(tokens)
        if counted:
            self.offload_tokens.labels(label).inc(counted)
        self._in_flight[label] = max(0, self._in_flight.get(label, 0) - 1)
        self.offloads_in_flight.labels(label).set(self._in_flight[label])

    # -- requests (a reader of the per-request record) ------------------------------
    def observe_request(self, record: RequestRecord) -> None:
        """Count one answered request to ``/v1/*`` (others are not observed)."""
        if not record.endpoint.startswith(API_PATH + "/"):
            return
        served_by = self._served_by(record.served_by)
        method = record.method if record.method in KNOWN_METHODS else OTHER
        self.requests.labels(record.route, method, str(record.status), served_by).inc()
        code = _text(record.error_code)
        if record.status >= 400:
            code = code or http_error_body(record.status, "")["error"]["code"]
        if code:
            self.errors.labels(record.route, self._code_label(code)).inc()
        model = self._model_label(record.model_served, served_by)
        if model is None:
            return
        prompt, completion = _count(record.prompt_tokens), _count(record.completion_tokens)
        if prompt:
            self.prompt_tokens.labels(model, served_by).inc(prompt)
        if completion:
            self.completion_tokens.labels(model, served_by).inc(completion)
        first_token = _positive(record.first_token_s, allow_zero=True)
        if first_token is not None:
            self.time_to_first_token.labels(model, served_by).observe(first_token)
        rate = _positive(record.decode_tok_per_s)
        if rate is not None:
            self.decode_rate.labels(model, served_by).observe(rate)

    def _served_by(self, value: object) -> str:
        if isinstance(value, str) and value and value not in (SERVED_LOCAL, self.device_id):
            return SERVED_PEER
        return SERVED_LOCAL

    def _model_label(self, model: object, served_by: str) -> str | None:
        """The served model's id when this node knows it; peer-served others are capped."""
        if not isinstance(model, str) or not model:
            return None
        models = self._models
        if models is not None and models.serves(model):
            return models.resolve(model).info.id
        return self._remote_model_label(model) if served_by == SERVED_PEER else OTHER


# --------------------------------------------------------------------------
# Scrape-time collectors


class _ModelCollector(Collector):
    """Queue depth, queue limit and load state per model, read from the slots at scrape time."""

    _STATES = ("unloaded", "loading", "ready", "failed")

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def describe(self) -> Iterable[Metric]:
        return list(self._families())

    def collect(self) -> Iterable[Metric]:
        families = self._families()
        depth, limit, state, active, seats = families[:5]
        engine_totals = dict(zip(_ENGINE_COUNTERS, families[5:], strict=True))
        for slot in self._models.slots():
            model = slot.info.id
            depth.add_metric([model], slot.queue_depth)
            limit.add_metric([model], slot.queue_depth_limit)
            for name in self._STATES:
                state.add_metric([model, name], 1.0 if slot.state == name else 0.0)
            active.add_metric([model], slot.active_sequences)
            seats.add_metric([model], slot.parallel)
            stats = slot.engine_stats()
            for key, family in engine_totals.items():
                family.add_metric([model], float(stats.get(key, 0.0)))
        return list(families)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily | CounterMetricFamily, ...]:
        return (
            GaugeMetricFamily("dvai_queue_depth", "requests waiting for a model plus those running",
                              labels=["model"]),
            GaugeMetricFamily("dvai_queue_limit", "requests that may wait per model (queue_depth setting)",
                              labels=["model"]),
            GaugeMetricFamily("dvai_model_state", "1 for the model's current load state, 0 for the others",
                              labels=["model", "state"]),
            GaugeMetricFamily("dvai_active_sequences", "sequences the model is generating now",
                              labels=["model"]),
            GaugeMetricFamily("dvai_parallel_slots", "sequences the model can generate at once (parallel)",
                              labels=["model"]),
            *(CounterMetricFamily(name, text, labels=["model"]) for name, text in _ENGINE_COUNTERS.values()),
        )


_ENGINE_COUNTERS = {
    "prefill_seconds": ("dvai_engine_prefill_seconds", "engine time spent evaluating prompts"),
    "decode_seconds": ("dvai_engine_decode_seconds", "engine time spent decoding generated tokens"),
    "prefill_tokens": ("dvai_engine_prefill_tokens", "prompt tokens evaluated"),
    "decode_tokens": ("dvai_engine_decode_tokens", "generated tokens evaluated"),
    "prompt_cache_hit_tokens": ("dvai_prompt_cache_hit_tokens", "prompt tokens reused from the KV cache"),
    "embedding_decodes": ("dvai_engine_embedding_decodes", "llama_decode calls of an embedding model (one per batch)"),
    "embedding_inputs": ("dvai_engine_embedding_inputs", "inputs embedded (several per batch when batched)"),
}


class _PeerCollector(Collector):
    """Peers by state (from the peer table's snapshot) and the number of paired devices."""

    def __init__(self, peers: PeerSource | None, paired: CountSource | None) -> None:
        self._peers = peers
        self._paired = paired

    def describe(self) -> Iterable[Metric]:
        return [self._peers_family(), self._paired_family()]

    def collect(self) -> Iterator[Metric]:
        snapshot = self._peers() if self._peers is not None else None
        if snapshot is not None:
            counts = dict.fromkeys(PeerState, 0)
            for peer in snapshot:
                counts[peer.state] = counts.get(peer.state, 0) + 1
            family = self._peers_family()
            for state, count in counts.items():
                family.add_metric([state.value], count)
            yield family
        paired = self._paired() if self._paired is not None else None
        if paired is not None:
            family = self._paired_family()
            family.add_metric([], paired)
            yield family

    @staticmethod
    def _peers_family() -> GaugeMetricFamily:
        return GaugeMetricFamily("dvai_peers", "known peers by state (present while discovery runs)",
                                 labels=["state"])

    @staticmethod
    def _paired_family() -> GaugeMetricFamily:
        return GaugeMetricFamily("dvai_paired_devices", "devices paired with this node")


class _AuditCollector(Collector):
    """The audit log's health: whether it writes, and the rows it lost."""

    def __init__(self, health: AuditHealthSource) -> None:
        self._health = health

    def describe(self) -> Iterable[Metric]:
        return list(self._families({"state": "ok", "writeErrors": 0, "droppedRows": 0}))

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._health())

    @staticmethod
    def _families(health: Mapping[str, Any]) -> Iterator[Metric]:
        up = GaugeMetricFamily("dvai_audit_log_up", "1 while the audit log writes its rows, 0 when its last "
                               "write failed or its writer stopped")
        up.add_metric([], 1 if health.get("state") == "ok" else 0)
        yield up
        errors = CounterMetricFamily("dvai_audit_write_errors", "audit rows that could not be written")
        errors.add_metric([], int(health.get("writeErrors") or 0))
        yield errors
        dropped = CounterMetricFamily("dvai_audit_dropped_rows", "audit rows dropped (queue full or writer "
                                      "stopped)")
        dropped.add_metric([], int(health.get("droppedRows") or 0))
        yield dropped


# --------------------------------------------------------------------------
# Helpers


def _count(value: object) -> int | None:
    """A positive token count, else None (bools, negatives and non-integers are junk)."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _positive(value: object, *, allow_zero: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        return None
    return number
