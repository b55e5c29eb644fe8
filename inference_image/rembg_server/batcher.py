"""One inference worker per model session: a queue, micro-batches, a dedicated thread.

The queue itself is unbounded in type but never in practice: admission (admission.py) caps
how many requests and megapixels exist in the whole process before anything is queued.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rembg_server.engine import Heartbeat, MaskModel


@dataclass
class Job:
    """One image waiting for the model: a preprocessed tensor, or the image itself for models
    that run through rembg's session (those are never batched)."""

    payload: Any
    future: asyncio.Future[Any]
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    observed: bool = True  # False for the canary's probes: kept out of the batch metrics

    @property
    def abandoned(self) -> bool:
        """The caller gave up (disconnect or deadline): running it would waste a slot."""
        return self.future.done()


BatchObserver = Callable[[int, float, list[float]], None]  # size, inference s, queue waits s


class BatchWorker:
    """Collects up to `max_size` jobs (waiting at most `max_wait` for more) per model call.

    Several workers (each with its own onnxruntime session and thread) may share one queue
    (REMBG_INFERENCE_WORKERS); by default one session uses every CPU thread, and the
    decode/encode threads yield to it (see pipeline.py).
    """

    def __init__(
        self,
        model: MaskModel,
        queue: asyncio.Queue[Job],
        *,
        max_size: int,
        max_wait_seconds: float,
        heartbeat: Heartbeat,
        observe: BatchObserver,
    ) -> None:
        self.model = model
        self.heartbeat = heartbeat
        self._max_size = max_size if model.batchable else 1
        self._max_wait = max_wait_seconds
        self._heartbeat = heartbeat
        self._observe = observe
        self._queue = queue
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"infer-{model.name}")
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"batch-{self.model.name}"
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._executor.shutdown(wait=True, cancel_futures=True)

    def alive(self) -> bool:
        """False when the worker task died or an inference call is stuck past the limit."""
        return self._task is not None and not self._task.done() and not self._heartbeat.wedged()

    def busy(self) -> bool:
        return self._heartbeat.stalled_for() > 0.0

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            if batch:
                await self._execute(batch)

    async def _collect(self) -> list[Job]:
        first = await self._queue.get()
        batch = [first] if not first.abandoned else []
        deadline = time.monotonic() + self._max_wait
        while len(batch) < self._max_size:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not batch:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            if not job.abandoned:
                batch.append(job)
        return batch

    def _call_model(self, batch: list[Job]) -> list[Any]:
        """Runs on the inference thread: one onnxruntime call for the whole batch."""
        if not self.model.takes_tensors:
            return [self.model.predict_mask(batch[0].payload)]
        if len(batch) == 1:
            return list(self.model.infer(batch[0].payload[np.newaxis]))
        return list(self.model.infer(np.stack([job.payload for job in batch])))

    async def _execute(self, batch: list[Job]) -> None:
        # Check again right before the call: a client may have left while we waited for more.
        batch = [job for job in batch if not job.abandoned]
        if not batch:
            return
        started = time.monotonic()
        for job in batch:
            job.started_at = started
        loop = asyncio.get_running_loop()
        self._heartbeat.enter()
        try:
            predictions = await loop.run_in_executor(self._executor, self._call_model, batch)
        except Exception as error:  # the model failed: every caller gets the error
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        finally:
            self._heartbeat.leave()
        elapsed = time.monotonic() - started
        waits = [started - job.enqueued_at for job in batch if job.observed]
        if waits:
            self._observe(len(batch), elapsed, waits)
        for job, prediction in zip(batch, predictions, strict=True):
            if not job.future.done():
                job.future.set_result(prediction)
