"""Job workers: in-process consumers of the job stream, on the same pool as /v1/remove.

Each worker holds at most one job. It claims one only when the server is ready and the
admission budget has a free request slot, then runs it through DataPlane.remove (the
very pipeline of a synchronous request: ticket, probe, decode, inference queue, compose,
encode). Losing the admission race to a synchronous request (429) means waiting for the next
released slot, with the job still held and no attempt counted.

At-least-once: a claimed job stays in its worker's pending list until a terminal state or a
re-queue acknowledges it; the worker refreshes its claim every third of the visibility timeout,
and any worker takes over an entry idle longer than that (its worker died).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from redis.backoff import ExponentialBackoff

from rembg_server.dataplane import DataPlane, RemovalResult
from rembg_server.errors import RequestRejectedError
from rembg_server.jobs.records import Claim, JobRecord
from rembg_server.jobs.store import GaveUp, JobStore, JobStoreUnavailableError
from rembg_server.metrics import JobMetrics

log = logging.getLogger("rembg_server.jobs")

CLAIM_BLOCK_SECONDS = 0.5  # how long an idle worker's read waits for a new job (and a stop)
SAMPLE_SECONDS = 5.0
READINESS_POLL_SECONDS = 0.25  # only while models load or the server drains
HANDBACK_SECONDS = 5.0
VISIBILITY_REASON = "its worker stopped heart-beating (visibility timeout)"


@dataclass(frozen=True)
class Completed:
    result: RemovalResult


@dataclass(frozen=True)
class Rejected:
    """Permanent: the input or options are refused, as /v1/remove would refuse them (4xx)."""

    reason: str


@dataclass(frozen=True)
class Transient:
    """Worth another attempt: a deadline passed, or an unexpected error."""

    reason: str


@dataclass(frozen=True)
class Interrupted:
    """The worker stopped: the job was cancelled, taken over by another worker, or is being
    handed back because this process shuts down."""

    why: str  # 'cancelled' | 'lost' | 'handback'


Outcome = Completed | Rejected | Transient | Interrupted


# Delays between tries while Redis is away: redis-py's own capped exponential backoff.
OUTAGE_BACKOFF = ExponentialBackoff(cap=5.0, base=0.2)
# Past the cap the count no longer matters; unbounded, base * 2**failures overflows a float
# after ~1024 failures in a row (an outage of ~85 minutes) and would end the worker.
MAX_COUNTED_FAILURES = 32


async def wait_any(*events: asyncio.Event, seconds: float | None = None) -> None:
    """Until one of the events is set, or `seconds` pass."""
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class ClaimKeeper:
    """Refreshes one claim while its job runs, and says when and why to stop.

    It is ended by `finished`, never by cancelling its task: redis-py may swallow a
    cancellation that lands inside a command (measured: about a third of the time), and a
    keeper that missed it would hold its claim forever.
    """

    def __init__(self) -> None:
        self.stop = asyncio.Event()  # the job must stop (cancelled, lost, handed back)
        self.finished = asyncio.Event()  # the job's attempt is over: stop refreshing
        self.why = "lost"

    def interrupt(self, why: str) -> None:
        self.why = why
        self.stop.set()


class JobWorkers:
    def __init__(
        self,
        service: DataPlane,
        store: JobStore,
        metrics: JobMetrics,
        on_terminal: Callable[[JobRecord], None],
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.store = store
        self.metrics = metrics
        self._on_terminal = on_terminal
        self._stopping = asyncio.Event()  # stop claiming
        self._abort = asyncio.Event()  # hand back whatever still runs
        self._tasks: list[asyncio.Task[None]] = []
        self._sampler: asyncio.Task[None] | None = None
        process = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        count = self.settings.resolved_jobs_concurrency()
        self.consumers = [f"{process}-{index}" for index in range(count)]

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._consume(consumer), name=f"job-worker-{index}")
            for index, consumer in enumerate(self.consumers)
        ]
        self._sampler = loop.create_task(self._sample(), name="job-backlog-sampler")

    async def stop(self, deadline: float) -> None:
        """Stop claiming; jobs still running at `deadline` (monotonic) are handed back.

        Every loop here ends on its own once told to (after at most one Redis call), so
        nothing is cancelled but what overruns the handback: see ClaimKeeper on why.
        """
        self._stopping.set()
        running = {task for task in self._tasks if not task.done()}
        if running:
            _, running = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
        if running:
            self._abort.set()
            _, running = await asyncio.wait(running, timeout=HANDBACK_SECONDS)
        if self._sampler is not None:
            _, sampling = await asyncio.wait({self._sampler}, timeout=HANDBACK_SECONDS)
            running |= sampling
        for task in running:
            log.warning("job task did not stop", extra={"fields": {"task": task.get_name()}})
            task.cancel()

    # --- the consumer loop ----------------------------------------------------------------------

    async def _consume(self, consumer: str) -> None:
        failures = 0
        while not self._stopping.is_set():
            if not await self._may_take_a_job():
                continue
            try:
                claimed = await self._claim(consumer)
            except JobStoreUnavailableError:
                await wait_any(self._stopping, seconds=OUTAGE_BACKOFF.compute(failures))
                failures = min(failures + 1, MAX_COUNTED_FAILURES)
                continue
            except Exception:  # a bug must not silently end the worker
                log.exception("job worker error", extra={"fields": {"consumer": consumer}})
                await wait_any(self._stopping, seconds=OUTAGE_BACKOFF.compute(failures))
                failures = min(failures + 1, MAX_COUNTED_FAILURES)
                continue
            failures = 0
            if isinstance(claimed, GaveUp):
                self._on_terminal(claimed.record)
            elif claimed is not None:
                try:
                    await self._execute(claimed)
                except Exception:  # the claim lapses and another attempt runs it
                    log.exception("job worker error", extra={"fields": {"consumer": consumer}})

    async def _may_take_a_job(self) -> bool:
        """Wait while the server is not ready or has no free request slot; True once it has
        (re-checked by the caller's loop otherwise)."""
        if not self.service.readiness()[0]:
            await wait_any(self._stopping, seconds=READINESS_POLL_SECONDS)
            return False
        if self.service.budget.full():
            await wait_any(self._stopping, self.service.vacancy())
            return False
        return True

    async def _claim(self, consumer: str) -> Claim | GaveUp | None:
        reclaimed = await self.store.reclaim_idle(consumer, VISIBILITY_REASON)
        if reclaimed is not None:
            return reclaimed
        return await self.store.claim_new(consumer, CLAIM_BLOCK_SECONDS)

    # --- one job ------------------------------------------------------------------------------

    async def _execute(self, claim: Claim) -> None:
        model = claim.record.model
        if claim.reclaimed:
            self.metrics.retries.labels(model, "visibility_timeout").inc()
        fields = {"job": claim.record.id, "attempt": claim.record.attempts, "model": model}
        log.info("job started", extra={"fields": fields})
        self.metrics.running.labels(model).inc()
        keeper = ClaimKeeper()
        refreshing = asyncio.create_task(self._keep_claim(claim, keeper))
        try:
            outcome = await self._attempt(claim, keeper)
        finally:
            keeper.finished.set()
            await refreshing  # returns within one Redis call
            self.metrics.running.labels(model).dec()
        await self._settle(claim, outcome)

    async def _keep_claim(self, claim: Claim, keeper: ClaimKeeper) -> None:
        interval = self.settings.jobs_visibility_timeout_seconds / 3
        while True:
            await wait_any(self._abort, keeper.finished, seconds=interval)
            if keeper.finished.is_set():
                return
            if self._abort.is_set():
                keeper.interrupt("handback")
                return
            try:
                state = await self.store.refresh(claim)
            except JobStoreUnavailableError:
                continue  # keep working: the result is stored once Redis is back
            except Exception:  # keep the job; at worst its claim lapses and it runs again
                log.exception("claim refresh failed", extra={"fields": {"job": claim.record.id}})
                continue
            if state != "running":
                keeper.interrupt("cancelled" if state == "cancelled" else "lost")
                return

    async def _attempt(self, claim: Claim, keeper: ClaimKeeper) -> Outcome:
        if not claim.data:
            return Rejected("the job's input is gone (expired or deleted)")
        try:
            request = self.service.request_for(claim.data, claim.record.params())
        except RequestRejectedError as error:
            return Rejected(error.message)
        while True:
            vacancy = self.service.vacancy()  # taken before trying, so no release is missed
            deadline = time.monotonic() + self.settings.request_timeout_seconds
            try:
                result = await self.service.remove(request, deadline, keeper.stop.wait)
            except RequestRejectedError as error:
                if error.status == 429:  # a synchronous request took the slot first
                    log.debug("job waits for room", extra={"fields": {"job": claim.record.id}})
                    await wait_any(vacancy, keeper.stop)
                    if keeper.stop.is_set():
                        return Interrupted(keeper.why)
                    continue
                return self._classify(error, keeper)
            except Exception as error:  # a model or library failure: retried, within limits
                log.exception("job attempt failed", extra={"fields": {"job": claim.record.id}})
                return Transient(f"internal error: {type(error).__name__}: {error}")
            return Completed(result)

    def _classify(self, error: RequestRejectedError, keeper: ClaimKeeper) -> Outcome:
        if error.status == 499:  # our stop event, through remove()'s disconnect path
            return Interrupted(keeper.why)
        if not self.service.readiness()[0]:  # draining: someone else runs it
            return Interrupted("handback")
        if error.status < 500:
            return Rejected(error.message)
        return Transient(error.message)

    async def _settle(self, claim: Claim, outcome: Outcome) -> None:
        fields = {"job": claim.record.id, "outcome": type(outcome).__name__.lower()}
        record: JobRecord | None = None
        match outcome:
            case Completed(result):
                record = await self._persist(
                    lambda: self.store.finish_done(claim, result.body, result.media_type)
                )
            case Rejected(reason):
                record = await self._persist(lambda: self.store.fail(claim, reason))
            case Transient(reason):
                record = await self._persist(
                    lambda: self.store.requeue(claim, reason, counted=True)
                )
                if record is not None and record.state == "queued":
                    self.metrics.retries.labels(claim.record.model, "error").inc()
                fields["reason"] = reason
            case Interrupted("handback"):
                await self._persist(lambda: self.store.requeue(claim, "", counted=False))
            case Interrupted(why):
                fields["why"] = why
        log.info("job settled", extra={"fields": fields})
        if record is not None and record.terminal:
            self._on_terminal(record)

    async def _persist(
        self, operation: Callable[[], Awaitable[JobRecord | None]]
    ) -> JobRecord | None:
        """Write a job's outcome, waiting out a Redis outage; a process that stops first
        leaves the job to the visibility timeout (another worker runs it again)."""
        failures = 0
        while True:
            try:
                return await operation()
            except JobStoreUnavailableError:
                if self._abort.is_set():
                    return None
                await wait_any(self._abort, seconds=OUTAGE_BACKOFF.compute(failures))
                failures = min(failures + 1, MAX_COUNTED_FAILURES)

    # --- backlog metrics ------------------------------------------------------------------------

    async def _sample(self) -> None:
        """One task per process: the fleet-wide backlog every SAMPLE_SECONDS."""
        group_ready = False
        while not self._stopping.is_set():
            try:
                if not group_ready:
                    await self.store.ensure_group()
                    group_ready = True
                sample = await self.store.sample()
                self.metrics.backlog.set(sample.backlog)
                self.metrics.oldest_age.set(sample.oldest_age_seconds)
            except JobStoreUnavailableError:
                pass  # redis_up says so; the store logged it once
            except Exception:
                log.exception("job backlog sample failed", extra={"fields": {}})
            await wait_any(self._stopping, seconds=SAMPLE_SECONDS)
