"""The per-model queue: FIFO order, bounded depth, dropped waiters, timeouts (SIMULATED engine)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any

import pytest

from node.common.errors import (
    GenerationStalledError,
    ModelUnavailableError,
    QueueFullError,
)
from node.engine.base import GenerationOutcome, ModelInfo, SamplingParams
from node.engine.queue import ModelQueue
from node.engine.simulated import SimulatedEngine
from node.engine.slot import GenerationJob, ModelSlot, SlotState, _Handoff


def simulated_slot(tok_per_s: float = 500.0, depth: int = 4) -> ModelSlot:
    info = ModelInfo(id="sim", path="simulated", ctx_size=512, embedding=False)
    return ModelSlot(SimulatedEngine(info, tok_per_s=tok_per_s), queue_depth=depth)


def job(tokens: int) -> GenerationJob:
    return GenerationJob(params=SamplingParams(max_tokens=tokens), prompt="go")


async def run(slot: ModelSlot, tokens: int, log: list[str], name: str, *, timeout: float = 30) -> str:
    async with slot.generate(job(tokens), timeout=timeout, max_blank=5) as generation:
        parts = []
        async for text in generation:
            log.append(name)
            parts.append(text)
    return "".join(parts)


async def test_requests_run_in_arrival_order_one_at_a_time() -> None:
    slot = simulated_slot()
    log: list[str] = []
    tasks = []
    for name in "abc":
        tasks.append(asyncio.create_task(run(slot, 5, log, name)))
        await asyncio.sleep(0)  # arrive in order
    results = await asyncio.gather(*tasks)
    assert log == ["a"] * 5 + ["b"] * 5 + ["c"] * 5
    assert all(r.split() == ["alpha", "bravo", "charlie", "delta", "echo"] for r in results)
    await slot.close()


async def test_queue_depth_is_bounded() -> None:
    slot = simulated_slot(tok_per_s=50, depth=2)
    log: list[str] = []
    running = [asyncio.create_task(run(slot, 50, log, str(i))) for i in range(3)]  # 1 running + 2 waiting
    await asyncio.sleep(0.05)
    assert slot.queue_depth == 3
    with pytest.raises(QueueFullError) as caught:
        await run(slot, 1, log, "x")
    assert caught.value.status == 503 and caught.value.headers["Retry-After"]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    assert slot.queue_depth == 0
    await slot.close()


async def test_a_cancelled_waiter_is_dropped_and_the_queue_moves_on() -> None:
    slot = simulated_slot(tok_per_s=200)
    log: list[str] = []
    first = asyncio.create_task(run(slot, 10, log, "first"))
    await asyncio.sleep(0.01)
    leaver = asyncio.create_task(run(slot, 10, log, "leaver"))
    last = asyncio.create_task(run(slot, 3, log, "last"))
    await asyncio.sleep(0.01)
    leaver.cancel()
    await asyncio.gather(first, last)
    assert "leaver" not in log
    assert log[-3:] == ["last"] * 3
    await slot.close()


async def test_cancelling_a_running_generation_stops_the_engine_within_a_token() -> None:
    slot = simulated_slot(tok_per_s=20)  # 50 ms per token
    log: list[str] = []
    task = asyncio.create_task(run(slot, 1000, log, "long"))
    while not log:
        await asyncio.sleep(0.005)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run(slot, 1, log, "next")
    assert loop.time() - started < 0.2  # one token of the old run at most, plus one of ours
    await slot.close()


async def test_generation_timeout_ends_like_max_tokens() -> None:
    """Past generation_timeout the text so far is kept and finish_reason is "length"."""
    slot = simulated_slot(tok_per_s=20)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with slot.generate(job(1000), timeout=0.3, max_blank=5) as generation:
        text = await generation.collect()
        outcome = generation.outcome
    assert 0.3 <= loop.time() - started < 1.0
    assert outcome is not None and outcome.finish_reason == "length"
    words = text.split()
    assert 3 <= len(words) == outcome.completion_tokens < 1000
    assert words[:3] == ["alpha", "bravo", "charlie"]
    await slot.close()


class BlankEngine(SimulatedEngine):
    """A test double: a model stuck emitting tokens that add no text."""

    def generate(self, prompt, params, sink, cancel):  # type: ignore[no-untyped-def]
        outcome = GenerationOutcome()
        while not cancel.wait(0.001):
            sink("")
        return outcome


async def test_blank_chunks_end_the_generation() -> None:
    info = ModelInfo(id="blank", path="x", ctx_size=64, embedding=False)
    slot = ModelSlot(BlankEngine(info, tok_per_s=1), queue_depth=1)
    with pytest.raises(GenerationStalledError):
        await run(slot, 10, [], "blank")
    # The worker was told to stop and the turn was released: the model is free again.
    assert not slot.busy and slot.queue_depth == 0
    with pytest.raises(GenerationStalledError):
        await asyncio.wait_for(run(slot, 10, [], "again"), 2)
    await slot.close()


async def test_model_queue_admits_in_order_and_refuses_past_its_limit() -> None:
    queue = ModelQueue("m", limit=1)
    order: list[str] = []
    release = asyncio.Event()

    async def hold(name: str) -> None:
        async with queue.turn():
            order.append(name)
            await release.wait()

    first = asyncio.create_task(hold("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(hold("second"))
    await asyncio.sleep(0)
    assert (queue.depth, queue.waiting, queue.busy) == (2, 1, True)
    with pytest.raises(QueueFullError, match="queue_depth 1"):
        async with queue.turn():
            pass
    release.set()
    await asyncio.gather(first, second)
    assert order == ["first", "second"]
    assert (queue.depth, queue.waiting, queue.busy) == (0, 0, False)


class FailingEngine(SimulatedEngine):
    def load(self) -> None:
        raise RuntimeError("no such file")


async def test_slot_state_changes_are_logged_old_to_new(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="node.engine.slot")
    slot = simulated_slot()
    assert slot.state is SlotState.UNLOADED and json.dumps(slot.state) == '"unloaded"'
    await slot.ensure_loaded()
    await slot.unload()
    info = ModelInfo(id="broken", path="simulated", ctx_size=512, embedding=False)
    broken = ModelSlot(FailingEngine(info, tok_per_s=10), queue_depth=1)
    with pytest.raises(ModelUnavailableError):
        await broken.ensure_loaded()
    assert broken.state is SlotState.FAILED and broken.error == "no such file"
    transitions = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert transitions == [
        "model sim: unloaded -> loading",
        "model sim: loading -> ready",
        "model sim: ready -> unloaded",
        "model broken: unloaded -> loading",
        "model broken: loading -> failed (no such file)",
    ]
    await slot.close()
    await broken.close()


async def test_model_queue_seats_run_requests_together_and_keep_arrival_order() -> None:
    queue = ModelQueue("m", limit=4, seats=3)
    order: list[str] = []
    release = {name: asyncio.Event() for name in ("a", "b", "big", "small")}

    async def hold(name: str, seats: int) -> None:
        async with queue.turn(seats):
            order.append(name)
            await release[name].wait()

    tasks = [asyncio.create_task(hold("a", 1)), asyncio.create_task(hold("b", 1))]
    await asyncio.sleep(0)
    assert order == ["a", "b"] and queue.seats_taken == 2  # two run at once
    tasks.append(asyncio.create_task(hold("big", 2)))  # needs 2 of the 1 free seat: waits
    await asyncio.sleep(0)
    tasks.append(asyncio.create_task(hold("small", 1)))  # would fit, but does not overtake "big"
    await asyncio.sleep(0)
    assert order == ["a", "b"] and (queue.waiting, queue.depth) == (2, 4)
    release["a"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "big"]
    release["b"].set()
    release["big"].set()
    await asyncio.sleep(0.01)
    assert order == ["a", "b", "big", "small"]
    release["small"].set()
    await asyncio.gather(*tasks)
    assert (queue.depth, queue.seats_taken, queue.busy) == (0, 0, False)


async def test_the_handoff_wakes_the_loop_once_per_burst_keeps_order_and_survives_a_failing_report(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    handoff = _Handoff(loop)
    wakeups: list[object] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kwargs: Any) -> asyncio.Handle:
        wakeups.append(callback)
        return original(callback, *args, **kwargs)

    received: list[int] = []

    def report(value: int) -> None:
        if value == 3:
            raise RuntimeError("a broken consumer")
        received.append(value)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    try:
        # A step's burst: posted from the worker thread while the loop is busy (blocked here).
        worker = threading.Thread(target=lambda: [handoff.post(report, i) for i in range(8)])
        worker.start()
        worker.join()
        assert len(wakeups) == 1 and received == []
        for _ in range(3):
            await asyncio.sleep(0)
        assert received == [0, 1, 2, 4, 5, 6, 7]
        assert "a worker report failed" in caplog.text
        # The next burst wakes the loop again.
        worker = threading.Thread(target=lambda: handoff.post(report, 8))
        worker.start()
        worker.join()
        for _ in range(3):
            await asyncio.sleep(0)
        assert len(wakeups) == 2 and received[-1] == 8
    finally:
        del loop.call_soon_threadsafe
