"""Fair scheduling across apps: the rule (``FairOrder``, plain data) and the model queue using it."""

from __future__ import annotations

import asyncio

import pytest

from node.common.errors import QueueFullError
from node.engine.fairness import FairOrder
from node.engine.queue import ModelQueue


def drain(order: FairOrder[str], free: int = 1) -> list[str]:
    served = []
    while (admitted := order.pop_next(free)) is not None:
        served.append(admitted[0])
    return served


def test_an_app_with_nothing_waiting_goes_before_another_apps_backlog() -> None:
    order: FairOrder[str] = FairOrder()
    order.charge("flood", 1)  # running
    for i in range(4):
        order.push("flood", 1, f"f{i}")
    order.push("calm", 1, "c0")
    assert drain(order) == ["c0", "f0", "f1", "f2", "f3"]


def test_two_busy_apps_alternate_and_each_keeps_its_own_arrival_order() -> None:
    order: FairOrder[str] = FairOrder()
    for i in range(3):
        order.push("a", 1, f"a{i}")
    for i in range(3):
        order.push("b", 1, f"b{i}")
    assert drain(order) == ["a0", "b0", "a1", "b1", "a2", "b2"]
    assert len(order) == 0 and order.waiting_of("a") == 0


def test_a_request_costs_its_seats() -> None:
    order: FairOrder[str] = FairOrder()
    order.push("wide", 2, "w0")
    order.push("wide", 2, "w1")
    for i in range(3):
        order.push("thin", 1, f"t{i}")
    assert drain(order, free=2) == ["w0", "t0", "t1", "w1", "t2"]


def test_the_next_request_is_reserved_until_its_seats_are_free() -> None:
    order: FairOrder[str] = FairOrder()
    order.push("wide", 3, "w0")
    assert order.pop_next(2) is None  # does not fit: reserved
    order.push("thin", 1, "t0")  # smaller tag or not, it does not overtake the reserved one
    order.push("new", 1, "n0")
    assert order.pop_next(2) is None
    assert order.pop_next(3) == ("w0", 3)
    assert drain(order) == ["t0", "n0"]


def test_a_reserved_request_that_leaves_frees_the_way() -> None:
    order: FairOrder[str] = FairOrder()
    order.push("wide", 3, "w0")
    order.push("thin", 1, "t0")
    assert order.pop_next(1) is None
    assert order.remove("wide", "w0") and not order.remove("wide", "w0")
    assert order.pop_next(1) == ("t0", 1)


def test_push_out_shares_the_waiting_places_and_never_evicts_below_an_even_share() -> None:
    order: FairOrder[str] = FairOrder()
    for i in range(4):
        order.push("flood", 1, f"f{i}")
    assert order.victim("flood") is None  # one app alone may use every place
    assert order.victim("calm") == "f3"  # its newest place
    order.push("calm", 1, "c0")
    assert order.victim("calm") == "f2"  # flood 3 vs calm 1
    order.push("calm", 1, "c1")
    assert order.victim("calm") is None  # 2 and 2: refuse the arrival instead
    assert order.victim("third") == "c1"  # 2 and 2 vs none: the newest place of the fullest
    assert drain(order) == ["f0", "c0", "f1"]


def test_push_out_takes_from_the_fullest_app_and_spares_unevictable_waiters() -> None:
    order: FairOrder[str] = FairOrder()
    order.push("a", 1, "a0")
    order.push("a", 1, "a1")
    order.push("b", 1, "b0")
    order.push("b", 1, "b1")
    order.push("b", 1, "b2")
    assert order.victim("c") == "b2"
    assert order.victim("c") in ("a1", "b1")  # both hold 2: the newest arrival goes
    keep: FairOrder[str] = FairOrder()
    keep.push("x", 1, "x0", evictable=False)
    keep.push("x", 1, "x1", evictable=False)
    assert keep.victim("y") is None


def test_forgotten_apps_start_at_the_virtual_time() -> None:
    order: FairOrder[str] = FairOrder()
    for i in range(200):  # many one-off apps: the idle ones are forgotten past a bound
        order.push(f"app{i}", 1, f"r{i}")
        assert order.pop_next(1) == (f"r{i}", 1)
    assert len(order._finish) <= 65
    order.push("busy", 1, "b0")
    order.push("busy", 1, "b1")
    order.push("app3", 1, "late")
    assert drain(order) == ["b0", "late", "b1"]


# -- the queue -------------------------------------------------------------------


async def test_the_queue_admits_a_calm_app_before_a_flood_and_pushes_the_flood_out() -> None:
    queue = ModelQueue("m", limit=3, seats=1)
    order: list[str] = []
    release = asyncio.Event()

    async def request(app: str, name: str) -> None:
        async with queue.turn(app=app):
            order.append(name)
            await release.wait()

    running = asyncio.create_task(request("flood", "f-run"))
    await asyncio.sleep(0)
    flood = [asyncio.create_task(request("flood", f"f{i}")) for i in range(3)]
    await asyncio.sleep(0)
    assert queue.waiting == 3
    with pytest.raises(QueueFullError) as refused:  # the flood is refused past the limit
        async with queue.turn(app="flood"):
            pass
    assert refused.value.headers["Retry-After"]
    calm = asyncio.create_task(request("calm", "c0"))  # takes the flood's newest place
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert flood[2].done() and isinstance(flood[2].exception(), QueueFullError)
    assert queue.waiting == 3
    release.set()
    await asyncio.gather(running, calm, *flood[:2])
    assert order == ["f-run", "c0", "f0", "f1"]
    assert (queue.depth, queue.seats_taken, queue.busy) == (0, 0, False)


async def test_a_pushed_out_waiter_that_is_also_cancelled_takes_no_seat() -> None:
    queue = ModelQueue("m", limit=2, seats=1)
    hold = asyncio.Event()

    async def request(app: str) -> None:
        async with queue.turn(app=app):
            await hold.wait()

    running = asyncio.create_task(request("a"))
    await asyncio.sleep(0)
    waiters = [asyncio.create_task(request("a")) for _ in range(2)]
    await asyncio.sleep(0)
    calm = asyncio.create_task(request("b"))
    await asyncio.sleep(0)
    waiters[1].cancel()  # pushed out and cancelled before it ran
    await asyncio.sleep(0)
    hold.set()
    await asyncio.gather(running, calm, waiters[0])
    assert waiters[1].cancelled() or isinstance(waiters[1].exception(), QueueFullError)
    assert (queue.depth, queue.seats_taken) == (0, 0)


async def test_exclusive_still_waits_for_running_requests_and_is_never_pushed_out() -> None:
    queue = ModelQueue("m", limit=1, seats=2)
    hold = asyncio.Event()
    events: list[str] = []

    async def request(app: str) -> None:
        async with queue.turn(app=app):
            await hold.wait()

    async def unload() -> None:
        async with queue.exclusive():
            events.append("exclusive")

    running = [asyncio.create_task(request("a")), asyncio.create_task(request("a"))]
    await asyncio.sleep(0)
    unloading = asyncio.create_task(unload())
    await asyncio.sleep(0)
    with pytest.raises(QueueFullError):  # the exclusive turn counts as waiting but is never pushed out
        async with queue.turn(app="b"):
            pass
    assert queue.waiting == 1 and not unloading.done()
    hold.set()
    await asyncio.gather(*running, unloading)
    assert events == ["exclusive"] and not queue.busy
