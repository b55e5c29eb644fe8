"""The work queue alone: client-go's semantics, with no Kubernetes in sight."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import pytest
from rembg_operator.workqueue import WorkQueue

from tests.operator.controller_support import until

pytestmark = pytest.mark.anyio


@asynccontextmanager
async def working(
    queue: WorkQueue[str], process: Callable[[str], Awaitable[None]], workers: int = 4
) -> AsyncIterator[None]:
    task = asyncio.create_task(queue.run(workers, process))
    try:
        yield
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def test_a_key_added_many_times_before_a_worker_takes_it_runs_once() -> None:
    queue: WorkQueue[str] = WorkQueue()
    for _ in range(5):
        queue.add("a")
    queue.add("b")
    assert len(queue) == 2
    assert [await queue.get(), await queue.get()] == ["a", "b"]


async def test_a_key_runs_on_one_worker_at_a_time_and_once_more_if_added_meanwhile() -> None:
    queue: WorkQueue[str] = WorkQueue()
    runs: list[str] = []
    concurrent = 0
    most = 0
    release = asyncio.Event()

    async def process(key: str) -> None:
        nonlocal concurrent, most
        concurrent += 1
        most = max(most, concurrent)
        runs.append(key)
        await release.wait()
        concurrent -= 1

    async with working(queue, process, workers=8):
        queue.add("a")
        await until(lambda: runs == ["a"])
        for _ in range(3):
            queue.add("a")  # while it runs: one more run afterwards, not three, not now
        assert not len(queue)
        release.set()
        await until(lambda: not queue.busy)
    assert runs == ["a", "a"]
    assert most == 1


async def test_different_keys_run_side_by_side_up_to_the_worker_count() -> None:
    queue: WorkQueue[str] = WorkQueue()
    concurrent = 0
    most = 0
    release = asyncio.Event()

    async def process(key: str) -> None:
        nonlocal concurrent, most
        concurrent += 1
        most = max(most, concurrent)
        await release.wait()
        concurrent -= 1

    async with working(queue, process, workers=3):
        for key in "abcdef":
            queue.add(key)
        await until(lambda: concurrent == 3)
        assert len(queue) == 3
        release.set()
        await until(lambda: not queue.busy)
    assert most == 3


async def test_a_failing_key_is_retried_with_growing_backoff_and_reset_on_success() -> None:
    queue: WorkQueue[str] = WorkQueue(backoff=(0.01, 0.05))
    attempts: list[float] = []
    loop = asyncio.get_running_loop()

    async def process(key: str) -> None:
        attempts.append(loop.time())
        if len(attempts) < 4:
            raise RuntimeError("not yet")

    async with working(queue, process):
        queue.add("a")
        await until(lambda: len(attempts) == 4 and not queue.busy)
        assert queue.failures("a") == 0
    gaps = [later - earlier for earlier, later in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.01
    assert gaps[1] >= 0.05  # capped at the last delay
    assert gaps[2] >= 0.05


async def test_add_after_keeps_the_earliest_timer_and_discard_cancels_it() -> None:
    queue: WorkQueue[str] = WorkQueue()
    queue.add_after("a", 0.05)
    queue.add_after("a", 60)  # later: the earlier one stays
    assert queue.delayed("a")
    await until(lambda: len(queue) == 1)
    assert not queue.delayed("a")
    assert await queue.get() == "a"
    queue.done("a")
    queue.add_after("b", 0.02)
    queue.add("c")
    queue.discard("b")
    queue.discard("c")
    await asyncio.sleep(0.05)
    assert not len(queue)
    assert not queue.delayed("b")


async def test_spread_adds_every_key_once_per_interval_evenly() -> None:
    queue: WorkQueue[str] = WorkQueue()
    seen: list[tuple[str, float]] = []
    loop = asyncio.get_running_loop()

    async def process(key: str) -> None:
        seen.append((key, loop.time()))

    async with working(queue, process):
        spreading = asyncio.create_task(queue.spread(lambda: ["a", "b", "c", "d"], 0.2))
        await until(lambda: len(seen) >= 4)
        spreading.cancel()
        with suppress(asyncio.CancelledError):
            await spreading
    keys = [key for key, _ in seen[:4]]
    assert keys == ["a", "b", "c", "d"]
    times = [at for _, at in seen[:4]]
    assert min(b - a for a, b in itertools.pairwise(times)) >= 0.04


def test_a_queue_needs_a_backoff() -> None:
    with pytest.raises(ValueError, match="backoff"):
        WorkQueue[str](backoff=())


async def test_a_key_discarded_while_it_runs_is_not_run_again() -> None:
    queue: WorkQueue[str] = WorkQueue(backoff=(0.01,))
    runs: list[str] = []
    release = asyncio.Event()

    async def process(key: str) -> None:
        runs.append(key)
        await release.wait()

    async with working(queue, process):
        queue.add("a")
        await until(lambda: runs == ["a"])
        queue.add("a")  # dirty: would run once more
        queue.discard("a")
        release.set()
        await until(lambda: not queue.busy)
        await asyncio.sleep(0.05)
    assert runs == ["a"]


async def test_backoff_starts_over_after_a_success() -> None:
    queue: WorkQueue[str] = WorkQueue(backoff=(0.01, 10.0))
    assert queue.add_rate_limited("a") == 0.01
    queue.forget("a")
    assert queue.add_rate_limited("a") == 0.01
    assert queue.add_rate_limited("a") == 10.0
    queue.discard("a")
