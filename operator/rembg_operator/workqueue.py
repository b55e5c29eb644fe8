"""A work queue of keys with client-go's semantics; no Kubernetes in it.

- A key is queued at most once (the dirty set): adding it again before a worker takes it
  changes nothing, so a burst of events for one object costs one run.
- A key is processed by one worker at a time (the processing set): adding it while it runs
  marks it dirty, and it is queued again when that run ends, so no change is missed and no
  two runs of one key overlap.
- A run that raises is retried after a per-key backoff (rate-limited requeue); a run that
  returns resets the key's backoff.
- `add_after` queues a key later (one timer per key: the earliest wins), and `spread` adds
  every key once per interval, evenly spaced, as a resync.

Read client-go's util/workqueue (queue.go, delaying_queue.go, default_rate_limiters.go) for
the original.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)

DEFAULT_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class WorkQueue(Generic[K]):
    def __init__(self, *, backoff: Sequence[float] = DEFAULT_BACKOFF) -> None:
        if not backoff:
            raise ValueError("backoff needs at least one delay")
        self._backoff = tuple(backoff)
        self._order: deque[K] = deque()
        self._dirty: set[K] = set()
        self._processing: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, tuple[float, asyncio.TimerHandle]] = {}
        self._available = asyncio.Event()

    def __len__(self) -> int:
        """Keys waiting for a worker (not those running or delayed)."""
        return len(self._order)

    @property
    def busy(self) -> bool:
        """Keys are waiting or running (delayed ones do not count)."""
        return bool(self._order or self._processing)

    def add(self, key: K) -> None:
        if key in self._dirty:
            return
        self._dirty.add(key)
        if key in self._processing:
            return  # queued again by done()
        self._order.append(key)
        self._available.set()

    def add_after(self, key: K, delay: float) -> None:
        """Add the key after `delay` seconds; an earlier pending timer for it wins."""
        if delay <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        pending = self._timers.get(key)
        if pending is not None:
            if pending[0] <= due:
                return
            pending[1].cancel()
        self._timers[key] = (due, loop.call_at(due, self._fire, key))

    def add_rate_limited(self, key: K) -> float:
        """Add the key after its next backoff delay; returns that delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = self._backoff[min(failures, len(self._backoff) - 1)]
        self.add_after(key, delay)
        return delay

    def delayed(self, key: K) -> bool:
        """An add_after (or a retry) is pending for the key."""
        return key in self._timers

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def forget(self, key: K) -> None:
        """Reset the key's backoff (its last run succeeded)."""
        self._failures.pop(key, None)

    def discard(self, key: K) -> None:
        """Drop everything queued for a key that no longer exists: timers, backoff, dirt."""
        self.forget(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        if key in self._dirty and key not in self._processing:
            self._order.remove(key)
        self._dirty.discard(key)

    async def get(self) -> K:
        """The next key, now marked processing; call done(key) when its run ends."""
        while not self._order:
            self._available.clear()
            await self._available.wait()
        key = self._order.popleft()
        self._dirty.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._order.append(key)
            self._available.set()

    async def run(self, workers: int, process: Callable[[K], Awaitable[None]]) -> None:
        """Process keys with `workers` concurrent workers until cancelled."""
        async with asyncio.TaskGroup() as group:
            for index in range(workers):
                group.create_task(self._work(process), name=f"worker-{index}")

    async def spread(
        self,
        keys: Callable[[], Iterable[K]],
        interval: float,
        add: Callable[[K], None] | None = None,
    ) -> None:
        """Add every key once per `interval`, evenly spaced, until cancelled (a resync);
        through `add` when given (e.g. to say what kind of run the key needs)."""
        add = add or self.add
        while True:
            batch = list(keys())
            if not batch:
                await asyncio.sleep(interval)
                continue
            gap = interval / len(batch)
            for key in batch:
                await asyncio.sleep(gap)
                add(key)

    async def _work(self, process: Callable[[K], Awaitable[None]]) -> None:
        while True:
            key = await self.get()
            try:
                await process(key)
            except Exception as error:  # every failure is retried, logged
                delay = self.add_rate_limited(key)
                log.warning("processing %s failed (retry in %ss): %s", key, delay, error)
            else:
                self.forget(key)
            finally:
                self.done(key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)
