"""SIMULATED mesh: the offload ranking against round-robin and least-used baselines.

Everything here is simulated: no engine, no network, a virtual clock.  Devices
decode at fixed rates (10, 20 and 40 tok/s by default), serve one request at a
time in arrival order (as a llama.cpp model slot does), and requests of a fixed
length arrive at one or more entry devices (slow phones below the offload
threshold), whose router picks the device that serves each request.

Routers compared in the same harness:
  dvai             the real ``node.offload.policy.decide`` fed with the simulated
                   state: verified rates (probe with ±5 % noise), observed rates and
                   in-flight counts from a real ``PeerHealthBook``, and peer queue
                   depths from health reports that are ``--report-interval`` s stale
  round-robin      next device in turn
  least-used       the device this router has sent the fewest requests to
  least-in-flight  the device with the fewest of this router's requests in flight
                   (ties in turn)

Printed per router: throughput ÷ ideal (ideal = sum of capacities, measured on
tokens decoded after a warm-up), p50/p95 latency (arrival → last token; requests
still unfinished at the end count with their age so far), and each device's share.

    .venv/bin/python bench/mesh_sim.py [--seed 7] [--duration 3600]
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import math
import random
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from node.offload.breaker import BreakerSettings, PeerAttempt, PeerHealthBook, apply_health  # noqa: E402
from node.offload.policy import (  # noqa: E402
    LocalState,
    OffloadAction,
    OffloadMode,
    PeerCandidate,
    PolicySettings,
    decide,
)

MODEL = "sim-model"
ROUTERS = ("dvai", "round-robin", "least-used", "least-in-flight")


# --- virtual clock -------------------------------------------------------------------------------


class Clock:
    """A discrete-event loop: callbacks run in time order; ``now`` only moves forward."""

    def __init__(self) -> None:
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def at(self, when: float, callback: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, next(self._seq), callback))

    def run_until(self, end: float) -> None:
        while self._events and self._events[0][0] <= end:
            when, _, callback = heapq.heappop(self._events)
            self.now = when
            callback()
        self.now = end


# --- devices and requests ------------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    tokens: int
    arrival: float
    on_done: Callable[[Job], None]
    device: str = ""
    end: float | None = None


class Device:
    """One model slot: FIFO, one request at a time at ``rate`` tok/s."""

    def __init__(self, name: str, rate: float, clock: Clock, window_start: float) -> None:
        self.name, self.rate, self._clock = name, rate, clock
        self._queue: deque[Job] = deque()
        self._busy: Job | None = None
        self._busy_start = 0.0
        self._window_start = window_start
        self.tokens_in_window = 0.0
        self.served = 0

    @property
    def outstanding(self) -> int:
        return len(self._queue) + (self._busy is not None)

    def submit(self, job: Job) -> None:
        job.device = self.name
        self._queue.append(job)
        if self._busy is None:
            self._start_next()

    def _start_next(self) -> None:
        if not self._queue:
            self._busy = None
            return
        job = self._busy = self._queue.popleft()
        start = self._busy_start = self._clock.now
        end = start + job.tokens / self.rate
        self._clock.at(end, lambda: self._finish(job, start, end))

    def _finish(self, job: Job, start: float, end: float) -> None:
        self.tokens_in_window += self._decoded_in_window(start, end)
        self.served += 1
        job.end = end
        self._start_next()
        job.on_done(job)

    def tokens_decoded(self, now: float) -> float:
        """Tokens decoded after the warm-up, including the running request's part so far."""
        running = self._decoded_in_window(self._busy_start, now) if self._busy is not None else 0.0
        return self.tokens_in_window + running

    def _decoded_in_window(self, start: float, end: float) -> float:
        return max(0.0, end - max(start, self._window_start)) * self.rate


# --- routers -------------------------------------------------------------------------------------


class Router:
    """Picks a device for a request arriving at one entry device."""

    def __init__(self, devices: Sequence[Device]) -> None:
        self.devices = list(devices)

    def pick(self, now: float) -> Device:
        raise NotImplementedError

    def done(self, job: Job, now: float) -> None:
        pass

    def report(self, now: float) -> None:
        pass


class RoundRobin(Router):
    def __init__(self, devices: Sequence[Device]) -> None:
        super().__init__(devices)
        self._turn = itertools.cycle(range(len(devices)))

    def pick(self, now: float) -> Device:
        return self.devices[next(self._turn)]


class LeastUsed(Router):
    def __init__(self, devices: Sequence[Device]) -> None:
        super().__init__(devices)
        self._sent = [0] * len(devices)

    def pick(self, now: float) -> Device:
        i = min(range(len(self.devices)), key=lambda k: (self._sent[k], k))
        self._sent[i] += 1
        return self.devices[i]


class LeastInFlight(Router):
    def __init__(self, devices: Sequence[Device]) -> None:
        super().__init__(devices)
        self._in_flight = {d.name: 0 for d in devices}
        self._turn = 0

    def pick(self, now: float) -> Device:
        n = len(self.devices)
        low = min(self._in_flight.values())
        order = [self.devices[(self._turn + k) % n] for k in range(n)]
        device = next(d for d in order if self._in_flight[d.name] == low)
        self._turn = (self.devices.index(device) + 1) % n
        self._in_flight[device.name] += 1
        return device

    def done(self, job: Job, now: float) -> None:
        self._in_flight[job.device] -= 1


class DvaiRouter(Router):
    """The real policy: ``decide()`` over candidates built from a real ``PeerHealthBook``."""

    def __init__(self, devices: Sequence[Device], rng: random.Random, *, local_rate: float,
                 threshold: float, probe_noise: float) -> None:
        super().__init__(devices)
        self._by_name = {d.name: d for d in devices}
        self._book = PeerHealthBook(BreakerSettings())
        self._settings = PolicySettings(min_local_capability=threshold, verify_max_age=math.inf)
        self._local = LocalState(device_id="entry", model_id=MODEL, capability=local_rate,
                                 capability_source="probe")
        self._attempts: dict[int, PeerAttempt] = {}
        self._pending: PeerAttempt | None = None
        self._base = [
            PeerCandidate(
                device_id=d.name, device_name=d.name, paired=True, reachable=True, models=frozenset({MODEL}),
                claimed_tok_per_s=d.rate, verified_tok_per_s=d.rate * (1 + rng.uniform(-probe_noise, probe_noise)),
                verified_at=0.0, observed_tok_per_s=None, queue_depth=0, in_flight=0, circuit_open_until=None,
                via="static",
            )
            for d in devices
        ]

    def pick(self, now: float) -> Device:
        candidates = [apply_health(c, self._book.snapshot(c.device_id, now)) for c in self._base]
        decision = decide(OffloadMode.PREFER, self._local, candidates, MODEL, self._settings, now)
        if decision.action is not OffloadAction.FORWARD:
            raise RuntimeError(f"SIMULATED mesh expected a forward, got {decision.action}: {decision.why}")
        for peer in decision.peers:  # the forwarder's loop: the breaker may refuse a peer
            attempt = self._book.begin(peer.device_id, now)
            if attempt is not None:
                self._pending = attempt
                return self._by_name[peer.device_id]
        raise RuntimeError("SIMULATED mesh: every peer refused")

    def bind(self, job: Job) -> None:
        """Tie the attempt opened by the last ``pick`` to its job."""
        assert self._pending is not None
        self._attempts[id(job)] = self._pending
        self._pending = None

    def done(self, job: Job, now: float) -> None:
        attempt = self._attempts.pop(id(job))
        decode = job.tokens / self._by_name[job.device].rate
        attempt.succeeded(now, tokens=job.tokens, decode_seconds=decode)

    def report(self, now: float) -> None:
        for d in self.devices:  # what GET /v1/dvai/health would say: queued + running, everyone's
            self._book.record_report(d.name, now, d.outstanding)


# --- the harness ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    rates: tuple[float, ...] = (10.0, 20.0, 40.0)
    entries: int = 1
    clients_per_entry: int = 0
    """closed loop: clients that send the next request as soon as the last one ends."""
    load: float = 0.0
    """open loop: Poisson arrivals at this fraction of the ideal capacity (all entries together)."""
    tokens: int = 128
    token_spread: float = 0.0
    """0: every request has ``tokens``; s > 0: uniform in tokens × [1 - s, 1 + s]."""


@dataclass(slots=True)
class Result:
    scenario: str
    router: str
    throughput_ratio: float
    offered_ratio: float
    """tokens that arrived after the warm-up ÷ window ÷ ideal (closed loops: as many as were served)."""
    p50: float
    p95: float
    shares: dict[str, float]
    completed: int
    latencies: list[float] = field(repr=False, default_factory=list)


def simulate(scenario: Scenario, router_name: str, *, seed: int, duration: float,
             report_interval: float = 1.0, warmup_fraction: float = 0.1) -> Result:
    rng = random.Random(f"{seed}/{scenario.name}")  # same arrivals for every router
    router_rng = random.Random(f"{seed}/{scenario.name}/probe")
    clock = Clock()
    warmup = duration * warmup_fraction
    devices = [Device(f"dev-{r:g}", r, clock, warmup) for r in scenario.rates]
    routers = [_make_router(router_name, devices, router_rng) for _ in range(scenario.entries)]
    jobs: list[Job] = []

    def send(entry: int) -> None:
        router = routers[entry]
        device = router.pick(clock.now)
        job = Job(tokens=_job_tokens(scenario, rng), arrival=clock.now, on_done=lambda j: finished(entry, j))
        if isinstance(router, DvaiRouter):
            router.bind(job)
        jobs.append(job)
        device.submit(job)

    def finished(entry: int, job: Job) -> None:
        routers[entry].done(job, clock.now)
        if scenario.clients_per_entry:
            send(entry)

    def report() -> None:
        for r in routers:
            r.report(clock.now)
        clock.at(clock.now + report_interval, report)

    clock.at(0.0, report)
    ideal = sum(scenario.rates)
    for entry in range(scenario.entries):
        for k in range(scenario.clients_per_entry):
            clock.at(0.001 * (entry * scenario.clients_per_entry + k), functools.partial(send, entry))
        if scenario.load:
            rate = scenario.load * ideal / scenario.tokens / scenario.entries  # requests/s per entry
            _schedule_poisson(clock, rng, rate, duration, functools.partial(send, entry))
    clock.run_until(duration)
    return _summarise(scenario, router_name, devices, jobs, warmup, duration, ideal)


def _make_router(name: str, devices: Sequence[Device], rng: random.Random) -> Router:
    if name == "dvai":
        return DvaiRouter(devices, rng, local_rate=3.0, threshold=5.0, probe_noise=0.05)
    if name == "round-robin":
        return RoundRobin(devices)
    if name == "least-used":
        return LeastUsed(devices)
    if name == "least-in-flight":
        return LeastInFlight(devices)
    raise ValueError(f"unknown router {name!r}; expected one of {', '.join(ROUTERS)}")


def _job_tokens(scenario: Scenario, rng: random.Random) -> int:
    if not scenario.token_spread:
        return scenario.tokens
    spread = scenario.token_spread
    return max(1, round(scenario.tokens * rng.uniform(1 - spread, 1 + spread)))


def _schedule_poisson(clock: Clock, rng: random.Random, rate: float, end: float, send: Callable[[], None]) -> None:
    t = rng.expovariate(rate)
    while t < end:
        clock.at(t, send)
        t += rng.expovariate(rate)


def _summarise(scenario: Scenario, router: str, devices: Sequence[Device], jobs: Sequence[Job],
               warmup: float, duration: float, ideal: float) -> Result:
    tokens = sum(d.tokens_decoded(duration) for d in devices)
    window = duration - warmup
    latencies = sorted(
        (job.end if job.end is not None else duration) - job.arrival for job in jobs if job.arrival >= warmup
    )
    offered = sum(job.tokens for job in jobs if job.arrival >= warmup) / window / ideal
    served = sum(d.served for d in devices) or 1
    shares = {d.name: d.served / served for d in devices}
    return Result(
        scenario=scenario.name, router=router, throughput_ratio=tokens / window / ideal,
        offered_ratio=offered,
        p50=_percentile(latencies, 0.50), p95=_percentile(latencies, 0.95), shares=shares,
        completed=sum(j.end is not None for j in jobs), latencies=latencies,
    )


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


SCENARIOS = (
    Scenario("closed loop, 1 entry, 16 clients, 128 tok", entries=1, clients_per_entry=16),
    Scenario("closed loop, 3 entries x 6 clients, 128 tok", entries=3, clients_per_entry=6),
    Scenario("Poisson 80% of ideal, 3 entries, 128 tok", entries=3, load=0.8),
    Scenario("Poisson 90% of ideal, 3 entries, 32-224 tok", entries=3, load=0.9, token_spread=0.75),
)


def run_benchmark(*, seed: int = 7, duration: float = 3600.0,
                  scenarios: Sequence[Scenario] = SCENARIOS) -> list[Result]:
    return [simulate(s, r, seed=seed, duration=duration) for s in scenarios for r in ROUTERS]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=3600.0, help="virtual seconds per run")
    args = parser.parse_args(argv)
    print(f"SIMULATED mesh (virtual clock, seed {args.seed}, {args.duration:g} virtual s per run; "
          f"devices 10/20/40 tok/s, ideal = 70 tok/s)")
    results = run_benchmark(seed=args.seed, duration=args.duration)
    current = None
    for r in results:
        if r.scenario != current:
            current = r.scenario
            print(f"\n{current}")
            print(f"  {'router':<16} {'thru/ideal':>10} {'offered':>8} {'p50 s':>8} {'p95 s':>8}"
                  "  served shares (10/20/40 tok/s)")
        shares = "/".join(f"{v:.2f}" for v in r.shares.values())
        offered = f"{r.offered_ratio:.3f}" if r.scenario.startswith("Poisson") else "-"
        print(f"  {r.router:<16} {r.throughput_ratio:>10.3f} {offered:>8} {r.p50:>8.1f} {r.p95:>8.1f}  {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
