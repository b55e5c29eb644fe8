"""The image pipeline: decode -> preprocess -> the model's queue -> postprocess -> compose ->
encode, with each stage timed under its own name.

The CPU stages run on one niced thread pool, apart from the inference threads; each is timed
in wall time (the Server-Timing header) and in the CPU time of the thread that ran it (the
`rembg_stage_cpu_seconds_total` counter), so a benchmark can say where a request's CPU goes.
"""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from PIL import Image

from rembg_server.batcher import Job
from rembg_server.errors import RequestRejectedError
from rembg_server.imaging import Composition, ImageRejectedError, compose, decode, encode
from rembg_server.registry import ModelRegistry
from rembg_server.settings import Settings

T = TypeVar("T")
CpuStage = Literal["decode", "preprocess", "postprocess", "compose", "encode"]
CPU_STAGES: tuple[CpuStage, ...] = ("decode", "preprocess", "postprocess", "compose", "encode")


@dataclass
class Timings:
    """Wall seconds per stage of one request, and CPU seconds of its CPU stages."""

    decode: float = 0.0
    preprocess: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    postprocess: float = 0.0
    compose: float = 0.0
    encode: float = 0.0
    cpu: dict[CpuStage, float] = field(default_factory=dict)

    def wall(self) -> dict[str, float]:
        return {name: value for name, value in vars(self).items() if name != "cpu"}

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={value * 1000:.1f}" for name, value in self.wall().items())


class ImagePipeline:
    """Runs one image through its model. Raises RequestRejectedError (undecodable image,
    deadline passed)."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, retry_after: Callable[[], int]
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._retry_after = retry_after  # seconds a request refused while queued should wait
        # Decode/resize/encode threads yield to inference: a parallel onnxruntime section
        # stalls as a whole when one of its threads is preempted, so these run niced and
        # fill the gaps inference leaves.
        self._cpu = ThreadPoolExecutor(
            max_workers=settings.resolved_cpu_workers(),
            thread_name_prefix="cpu",
            initializer=lower_thread_priority,
            initargs=(settings.cpu_workers_nice,),
        )

    def close(self) -> None:
        self._cpu.shutdown(wait=True, cancel_futures=True)

    async def decode(self, data: bytes, timings: Timings) -> Image.Image:
        max_pixels = self.settings.max_pixels
        return await self._stage(timings, "decode", lambda: _decode_or_reject(data, max_pixels))

    async def cutout(
        self,
        name: str,
        image: Image.Image,
        composition: Composition,
        timings: Timings,
        deadline: float | None,
        *,
        observed: bool = True,
    ) -> Image.Image:
        mask = await self.mask(name, image, timings, deadline, observed=observed)
        return await self._stage(timings, "compose", lambda: compose(image, mask, composition))

    async def encode(
        self, image: Image.Image, output: Literal["png", "webp"], timings: Timings
    ) -> bytes:
        level, quality = self.settings.png_compress_level, self.settings.webp_quality
        return await self._stage(timings, "encode", lambda: encode(image, output, level, quality))

    async def mask(
        self,
        name: str,
        image: Image.Image,
        timings: Timings,
        deadline: float | None,
        *,
        observed: bool = True,
    ) -> Image.Image:
        model = self.registry[name].model
        if not model.takes_tensors:  # rembg's own session: pre/postprocessing inside
            mask: Image.Image = await self._infer(name, image, timings, deadline, observed)
            return mask
        tensor = await self._stage(timings, "preprocess", lambda: model.preprocess(image))
        prediction = await self._infer(name, tensor, timings, deadline, observed)
        return await self._stage(
            timings, "postprocess", lambda: model.postprocess(prediction, image.size)
        )

    async def _infer(
        self, name: str, payload: Any, timings: Timings, deadline: float | None, observed: bool
    ) -> Any:
        job = self.registry[name].submit(payload, observed=observed)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            raise self._deadline_passed(job) from None
        finally:
            if not job.future.done():
                job.future.cancel()  # the worker skips jobs whose caller has gone
        if job.started_at is not None:
            timings.queue += job.started_at - job.enqueued_at
            timings.inference += time.monotonic() - job.started_at
        return result

    def _deadline_passed(self, job: Job) -> RequestRejectedError:
        if job.started_at is not None:
            return RequestRejectedError(504, "request deadline passed during inference")
        retry = {"Retry-After": str(self._retry_after())}
        return RequestRejectedError(503, "request deadline passed while queued", retry)

    async def _stage(self, timings: Timings, stage: CpuStage, function: Callable[[], T]) -> T:
        def timed() -> tuple[T, float]:
            started = time.thread_time()
            result = function()
            return result, time.thread_time() - started

        started = time.monotonic()
        try:
            result, cpu = await asyncio.get_running_loop().run_in_executor(self._cpu, timed)
        finally:
            setattr(timings, stage, getattr(timings, stage) + time.monotonic() - started)
        timings.cpu[stage] = timings.cpu.get(stage, 0.0) + cpu
        return result


def _decode_or_reject(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return decode(data, max_pixels)
    except ImageRejectedError as error:
        raise RequestRejectedError(error.status, error.message) from error


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the calling thread's niceness (Linux schedules threads individually).

    Raising niceness needs no privilege. Threads inherit it, so this must never run on a
    thread that creates onnxruntime sessions (they are created on the default executor).
    """
    if nice and sys.platform == "linux":
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))
