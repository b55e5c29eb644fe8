"""The removal service: model lifecycle, readiness, admission and the per-request pipeline.

HTTP-free on purpose: api.py turns requests into `RemovalRequest`s and maps
`RequestRejectedError` to responses; tests and the warmup drive the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, TypeVar

from PIL import Image

from rembg_server.admission import AdmissionBudget, Ticket
from rembg_server.batcher import BatchWorker, Job
from rembg_server.cache import ResultCache, cache_key
from rembg_server.engine import (
    Heartbeat,
    LoadRequest,
    MaskModel,
    ModelLoadError,
    load_model,
    synthetic_warmup_image,
)
from rembg_server.faults import FAULT_MESSAGE, FAULT_STATUS, FaultSchedule
from rembg_server.imaging import (
    MEDIA_TYPES,
    Composition,
    ImageHeader,
    ImageRejectedError,
    compose,
    decode,
    encode,
    probe,
)
from rembg_server.metrics import ServerMetrics
from rembg_server.params import RemoveParams
from rembg_server.settings import Settings

log = logging.getLogger("rembg_server")
T = TypeVar("T")
WARMUP_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class RequestRejectedError(Exception):
    """The request is answered with `status` and `message`; nothing went wrong server-side."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True)
class RemovalRequest:
    data: bytes
    model: str
    output: Literal["png", "webp"] = "png"
    composition: Composition = field(default_factory=Composition)


@dataclass
class Timings:
    decode: float = 0.0
    queue: float = 0.0
    inference: float = 0.0
    encode: float = 0.0

    def server_timing(self) -> str:
        return ", ".join(f"{name};dur={value * 1000:.1f}" for name, value in asdict(self).items())


@dataclass(frozen=True)
class RemovalResult:
    body: bytes
    media_type: str
    model: str
    header: ImageHeader | None
    timings: Timings
    cached: bool = False


@dataclass
class ServedModel:
    """One model name: its sessions (one per worker) and the queue they share."""

    model: MaskModel
    queue: asyncio.Queue[Job]
    workers: list[BatchWorker]

    def submit(self, payload: Any, *, observed: bool = True) -> Job:
        job = Job(payload, asyncio.get_running_loop().create_future(), observed=observed)
        self.queue.put_nowait(job)
        return job

    def idle(self) -> bool:
        """Nothing queued and no model call in flight."""
        return self.queue.empty() and not any(worker.busy() for worker in self.workers)


class RemovalService:
    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = {}
        self.budget = AdmissionBudget(
            settings.resolved_queue_max_requests(), settings.queue_max_megapixels
        )
        metrics.queue_limit_requests.set(settings.resolved_queue_max_requests())
        self.cache = ResultCache(settings.cache_max_bytes)
        self.faults = FaultSchedule(settings.fault_error_ratio)
        # Decode/resize/encode threads yield to inference: a parallel onnxruntime section
        # stalls as a whole when one of its threads is preempted, so these run niced and
        # fill the gaps inference leaves (measured: +18-32% throughput at 4-16 clients,
        # half the latency of a lone request, against two single-threaded sessions).
        self._cpu = ThreadPoolExecutor(
            max_workers=settings.resolved_cpu_workers(),
            thread_name_prefix="cpu",
            initializer=lower_thread_priority,
            initargs=(settings.cpu_workers_nice,),
        )
        self._prepared = False
        self._prepared_event = asyncio.Event()
        self._warming: str | None = None
        # Failing health checks that withhold readiness (the canary's), by check name.
        self._health_problems: dict[str, str] = {}
        self._draining = False
        self.drain_started_at: float | None = None  # time.monotonic() of begin_drain
        # Replaced on every release: whoever waits on the current one wakes at the next free
        # slot (a broadcast; the job workers use it to compete for room with new requests).
        self._vacancy = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------

    def device_of(self, name: str) -> str:
        served = self.models.get(name)
        if served is not None:
            return served.model.device
        return "cuda" if self.settings.provider == "cuda" else "cpu"

    async def prepare(self) -> None:
        """Load and verify every model, start its worker, warm it up, then turn ready."""
        self._publish_readiness()
        for name in self.settings.models:
            try:
                sessions = await asyncio.to_thread(load_model, self._load_request(name))
            except ModelLoadError as error:
                self.failures[name] = str(error)
                reason = {"reason": str(error)}
                log.error("model not servable", extra={"fields": reason})  # noqa: TRY400
                continue
            self._start(sessions)
        for name in list(self.models):
            await self._warm_up(name)
        self._prepared = True
        self._prepared_event.set()
        self._publish_readiness()
        ready, reasons = self.readiness()
        log.info("prepared", extra={"fields": {"ready": ready, "reasons": reasons}})

    def _load_request(self, name: str) -> LoadRequest:
        return LoadRequest(
            name=name,
            model_dir=self.settings.model_dir,
            checksums=self.settings.model_checksums,
            provider=self.settings.provider,
            allow_cpu_fallback=self.settings.allow_cpu_fallback,
            threads=self.settings.resolved_threads(),
            batch_max_size=self.settings.batch_max_size,
            sessions=self.settings.resolved_inference_workers(),
            cpu_arena=self.settings.cpu_mem_arena,
        )

    def _start(self, sessions: list[MaskModel]) -> None:
        model = sessions[0]
        labels = (model.name, model.device)

        def observe(size: int, seconds: float, waits: list[float]) -> None:
            self.metrics.batch_size.labels(*labels).observe(size)
            self.metrics.inference_duration.labels(*labels).observe(seconds)
            for wait in waits:
                self.metrics.queue_duration.labels(*labels).observe(wait)

        queue: asyncio.Queue[Job] = asyncio.Queue()
        workers = [
            BatchWorker(
                session,
                queue,
                max_size=self.settings.batch_max_size,
                max_wait_seconds=self.settings.batch_max_wait_ms / 1000,
                heartbeat=Heartbeat(self.settings.liveness_stall_seconds),
                observe=observe,
            )
            for session in sessions
        ]
        for worker in workers:
            worker.start()
        self.models[model.name] = ServedModel(model, queue, workers)
        self.metrics.model_info.labels(*labels, model.provider).set(1)
        self.metrics.declare(*labels)
        loaded = {"model": model.name, "provider": model.provider, "sessions": len(sessions)}
        log.info("model loaded", extra={"fields": loaded})

    async def _warm_up(self, name: str) -> None:
        self._warming = name
        started = time.monotonic()
        images = [synthetic_warmup_image(), *self._warmup_images()]
        composition = Composition()
        for _ in range(self.settings.warmup_runs):
            for image in images:
                await self._process_image(name, image, composition, Timings(), deadline=None)
        batch = self.settings.batch_max_size
        if self.models[name].model.batchable and batch > 1 and self.settings.warmup_runs:
            # One full batch, so the first real burst does not pay for new tensor shapes.
            await asyncio.gather(
                *(self._mask(name, images[0], Timings(), None) for _ in range(batch))
            )
        seconds = time.monotonic() - started
        self.metrics.warmup_seconds.labels(name, self.device_of(name)).set(seconds)
        self._warming = None

    def _warmup_images(self) -> list[Image.Image]:
        folder = self.settings.warmup_dir
        if folder is None:
            return []
        images = []
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() not in WARMUP_SUFFIXES:
                continue
            try:
                data = path.read_bytes()
                probe(data, self.settings.max_pixels)
                images.append(decode(data, self.settings.max_pixels))
            except (OSError, ImageRejectedError) as error:
                log.warning(
                    "warmup image skipped",
                    extra={"fields": {"path": str(path), "reason": str(error)}},
                )
        return images

    async def wait_prepared(self) -> None:
        """Returns once prepare() has finished (whether every model loaded or not)."""
        await self._prepared_event.wait()

    def set_health(self, check: str, problem: str | None) -> None:
        """A health check (canary.py) withholds readiness with `problem`, or stops (None)."""
        if problem is None:
            self._health_problems.pop(check, None)
        else:
            self._health_problems[check] = problem
        self._publish_readiness()

    def begin_drain(self) -> None:
        if self.drain_started_at is None:
            self.drain_started_at = time.monotonic()
        self._draining = True
        self._publish_readiness()

    async def close(self) -> None:
        self.begin_drain()
        for served in self.models.values():
            for worker in served.workers:
                await worker.stop()
        self._cpu.shutdown(wait=True, cancel_futures=True)

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether new traffic should be routed here (/readyz): servable and not draining."""
        _, reasons = self.serving()
        if self._draining:
            reasons.append("draining: shutting down")
        return not reasons and self._prepared, reasons

    def serving(self) -> tuple[bool, list[str]]:
        """Whether removal requests are served. Draining does not stop that: the drain delay
        exists so that requests routed here before the endpoint removal propagates succeed."""
        reasons = [f"{name}: not servable: {reason}" for name, reason in self.failures.items()]
        if self._warming is not None:
            reasons.append(f"warming up {self._warming}")
        elif not self._prepared and not reasons:
            reasons.append("loading models")
        reasons.extend(self._health_problems.values())
        return not reasons and self._prepared, reasons

    def liveness(self) -> tuple[bool, list[str]]:
        reasons = []
        for name, served in self.models.items():
            for index, worker in enumerate(served.workers):
                if not worker.alive():
                    stalled = worker.heartbeat.stalled_for()
                    reasons.append(
                        f"{name}: inference worker {index} dead or stuck for {stalled:.0f}s"
                    )
        return not reasons, reasons

    def _publish_readiness(self) -> None:
        ready, _ = self.readiness()
        for name in self.settings.models:
            servable = name in self.models
            self.metrics.ready.labels(name, self.device_of(name)).set(int(ready and servable))

    # --- requests --------------------------------------------------------------------------

    def request_for(self, data: bytes, params: RemoveParams) -> RemovalRequest:
        """The removal the parameters ask for; 400 when this server cannot do it."""
        model = params.model or self.settings.default_model
        if model not in self.settings.models:
            raise RequestRejectedError(400, self._unknown_model_message(model))
        if params.alpha_matting and not self.settings.alpha_matting_enabled:
            raise RequestRejectedError(
                400, "alpha matting is disabled here (REMBG_ALPHA_MATTING_ENABLED)"
            )
        return RemovalRequest(data, model, params.format, params.composition())

    async def remove(
        self,
        request: RemovalRequest,
        deadline: float,
        disconnected: Callable[[], Awaitable[Any]] | None = None,
        *,
        inject_faults: bool = False,
    ) -> RemovalResult:
        """Admission, then decode -> infer -> compose -> encode. Raises RequestRejectedError.

        With `inject_faults` (the HTTP endpoints), REMBG_FAULT_ERROR_RATIO of the admitted
        requests get a 500 instead (test only; see faults.py).
        """
        if request.model not in self.settings.models:
            raise RequestRejectedError(400, self._unknown_model_message(request.model))
        serving, reasons = self.serving()
        if not serving:
            raise RequestRejectedError(
                503, "not ready: " + "; ".join(reasons), {"Retry-After": "5"}
            )
        key = ""
        if self.cache.enabled:
            key = cache_key(request.model, _options_key(request), request.data)
            hit = self.cache.get(key)
            if hit is not None:
                media = MEDIA_TYPES[request.output]
                return RemovalResult(hit, media, request.model, None, Timings(), cached=True)
        header = self.probe_image(request.data)
        ticket = self._admit(request.model, header)
        started = time.monotonic()
        try:
            if inject_faults and self.faults.fires():
                raise RequestRejectedError(FAULT_STATUS, FAULT_MESSAGE)
            result = await self._run_with_disconnect(
                self._pipeline(request, header, deadline), disconnected
            )
        finally:
            self._release(request.model, ticket, time.monotonic() - started)
        if key:
            self.cache.put(key, result.body)
        return result

    async def probe_removal(self, name: str, data: bytes) -> bytes:
        """One internal check of the serving path (canary.py): probe, decode, the model's own
        queue and sessions, compose and PNG encode, as a request gets them; but no admission
        ticket (never a 429 for anyone), no readiness gate, no request metrics, and its model
        call is kept out of the batch metrics. The caller bounds it in time."""
        self.probe_image(data)
        image = await self._cpu_call(lambda: self._decode(data))
        cutout = await self._process_image(
            name, image, Composition(), Timings(), deadline=None, observed=False
        )
        settings = self.settings
        return await self._cpu_call(
            lambda: encode(cutout, "png", settings.png_compress_level, settings.webp_quality)
        )

    def _unknown_model_message(self, name: str) -> str:
        return f"model {name!r} is not served here; served: {list(self.settings.models)}"

    def probe_image(self, data: bytes) -> ImageHeader:
        """The header, or the 4xx /v1/remove answers for this body (without decoding it)."""
        try:
            return probe(data, self.settings.max_pixels)
        except ImageRejectedError as error:
            raise RequestRejectedError(error.status, error.message) from error

    def vacancy(self) -> asyncio.Event:
        """Set at the next release of an admission ticket. Take it *before* trying to be
        admitted, so a release between a 429 and the wait is not missed."""
        return self._vacancy

    def shed_if_full(self) -> None:
        """Refuse early, before the body is parsed, when no request could be admitted now."""
        if self.budget.full():
            raise self._overloaded()

    def _overloaded(self) -> RequestRejectedError:
        pending, megapixels = self.budget.pending
        return RequestRejectedError(
            429,
            f"overloaded: {pending} requests / {megapixels:.1f} megapixels pending",
            {"Retry-After": str(self.budget.retry_after_seconds())},
        )

    def _admit(self, model: str, header: ImageHeader) -> Ticket:
        ticket = self.budget.try_acquire(header.megapixels)
        if ticket is None:
            raise self._overloaded()
        labels = (model, self.device_of(model))
        self.metrics.pending_requests.labels(*labels).inc()
        self.metrics.pending_megapixels.labels(*labels).inc(header.megapixels)
        return ticket

    def _release(self, model: str, ticket: Ticket, seconds: float) -> None:
        self.budget.release(ticket, seconds)
        self._vacancy.set()
        self._vacancy = asyncio.Event()
        labels = (model, self.device_of(model))
        self.metrics.pending_requests.labels(*labels).dec()
        self.metrics.pending_megapixels.labels(*labels).dec(ticket.megapixels)

    async def _run_with_disconnect(
        self, work: Awaitable[RemovalResult], disconnected: Callable[[], Awaitable[Any]] | None
    ) -> RemovalResult:
        """Run `work`, but cancel it as soon as the client goes away (queued jobs then skip)."""
        task = asyncio.ensure_future(work)
        if disconnected is None:
            return await task
        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, RequestRejectedError):
            await task
        raise RequestRejectedError(499, "client disconnected")

    async def _pipeline(
        self, request: RemovalRequest, header: ImageHeader, deadline: float
    ) -> RemovalResult:
        timings = Timings()
        image = await self._timed(timings, "decode", lambda: self._decode(request.data))
        cutout = await self._process_image(
            request.model, image, request.composition, timings, deadline
        )
        body = await self._timed(
            timings,
            "encode",
            lambda: encode(
                cutout,
                request.output,
                self.settings.png_compress_level,
                self.settings.webp_quality,
            ),
        )
        return RemovalResult(body, MEDIA_TYPES[request.output], request.model, header, timings)

    def _decode(self, data: bytes) -> Image.Image:
        try:
            return decode(data, self.settings.max_pixels)
        except ImageRejectedError as error:
            raise RequestRejectedError(error.status, error.message) from error

    async def _process_image(
        self,
        name: str,
        image: Image.Image,
        composition: Composition,
        timings: Timings,
        deadline: float | None,
        *,
        observed: bool = True,
    ) -> Image.Image:
        mask = await self._mask(name, image, timings, deadline, observed=observed)
        started = time.monotonic()
        result = await self._cpu_call(lambda: compose(image, mask, composition))
        timings.encode += time.monotonic() - started
        return result

    async def _mask(
        self,
        name: str,
        image: Image.Image,
        timings: Timings,
        deadline: float | None,
        *,
        observed: bool = True,
    ) -> Image.Image:
        model = self.models[name].model
        if not model.takes_tensors:
            prediction = await self._infer(name, image, timings, deadline, observed=observed)
            mask: Image.Image = prediction
            return mask
        tensor = await self._timed(timings, "decode", lambda: model.preprocess(image))
        prediction = await self._infer(name, tensor, timings, deadline, observed=observed)
        return await self._cpu_call(lambda: model.postprocess(prediction, image.size))

    async def _infer(
        self,
        name: str,
        payload: Any,
        timings: Timings,
        deadline: float | None,
        *,
        observed: bool = True,
    ) -> Any:
        job = self.models[name].submit(payload, observed=observed)
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            result = await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError:
            return self._deadline_passed(job)
        finally:
            if not job.future.done():
                job.future.cancel()  # the worker skips jobs whose caller has gone
        if job.started_at is not None:
            timings.queue += job.started_at - job.enqueued_at
            timings.inference += time.monotonic() - job.started_at
        return result

    def _deadline_passed(self, job: Job) -> Any:
        if job.started_at is not None:
            raise RequestRejectedError(504, "request deadline passed during inference")
        retry = str(self.budget.retry_after_seconds())
        raise RequestRejectedError(
            503, "request deadline passed while queued", {"Retry-After": retry}
        )

    async def _timed(self, timings: Timings, stage: str, function: Callable[[], T]) -> T:
        started = time.monotonic()
        try:
            return await self._cpu_call(function)
        finally:
            setattr(timings, stage, getattr(timings, stage) + time.monotonic() - started)

    async def _cpu_call(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, function)


def lower_thread_priority(nice: int) -> None:
    """Add `nice` to the calling thread's niceness (Linux schedules threads individually).

    Raising niceness needs no privilege. Threads inherit it, so this must never run on a
    thread that creates onnxruntime sessions (they are created on the default executor).
    """
    if nice and sys.platform == "linux":
        thread = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, thread)
        os.setpriority(os.PRIO_PROCESS, thread, min(19, current + nice))


def _options_key(request: RemovalRequest) -> str:
    return json.dumps({"output": request.output, **asdict(request.composition)}, sort_keys=True)
