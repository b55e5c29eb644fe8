"""The dataplane: readiness, admission, the result cache and the request path, without HTTP.

Layered the way KServe's server is: the model registry (registry.py) owns the models and
their workers; this module decides whether and when a request runs, and the image pipeline
(pipeline.py) runs it. api.py turns HTTP requests into `RemovalRequest`s and maps
`RequestRejectedError` to responses; the job workers and the canary drive the same code
(the warmup drives the pipeline directly).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from rembg_server.admission import AdmissionBudget, Ticket
from rembg_server.cache import ResultCache, cache_key
from rembg_server.errors import RequestRejectedError
from rembg_server.faults import FAULT_MESSAGE, FAULT_STATUS, FaultSchedule
from rembg_server.imaging import (
    MEDIA_TYPES,
    Composition,
    ImageHeader,
    ImageRejectedError,
    probe,
)
from rembg_server.metrics import ServerMetrics
from rembg_server.params import RemoveParams
from rembg_server.pipeline import ImagePipeline, Timings
from rembg_server.registry import ModelRegistry
from rembg_server.settings import Settings
from rembg_server.warmup import warm_up, warmup_images

log = logging.getLogger("rembg_server")
UNKNOWN_MODEL = "unknown"  # the metrics label of requests naming a model not served here


@dataclass(frozen=True)
class RemovalRequest:
    data: bytes
    model: str
    output: Literal["png", "webp"] = "png"
    composition: Composition = field(default_factory=Composition)


@dataclass(frozen=True)
class RemovalResult:
    body: bytes
    media_type: str
    model: str
    header: ImageHeader | None
    timings: Timings
    cached: bool = False


class DataPlane:
    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = ModelRegistry(settings, metrics)
        self.budget = AdmissionBudget(
            settings.resolved_queue_max_requests(), settings.queue_max_megapixels
        )
        metrics.queue_limit_requests.set(settings.resolved_queue_max_requests())
        self.pipeline = ImagePipeline(settings, self.registry, self.budget.retry_after_seconds)
        self.cache = ResultCache(settings.cache_max_bytes)
        self.faults = FaultSchedule(settings.fault_error_ratio)
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

    # --- lifecycle and health --------------------------------------------------------------

    def device_of(self, name: str) -> str:
        return self.registry.device_of(name)

    async def prepare(self) -> None:
        """Load and verify every model, start its workers, warm it up, then turn ready."""
        self._publish_readiness()
        await self.registry.load_all()
        settings = self.settings
        images = warmup_images(settings.warmup_dir, settings.max_pixels)
        for name in self.registry.names():
            self._warming = name
            started = time.monotonic()
            await warm_up(
                self.pipeline, name, images, settings.warmup_runs, settings.batch_max_size
            )
            seconds = time.monotonic() - started
            self.metrics.warmup_seconds.labels(name, self.device_of(name)).set(seconds)
        self._warming = None
        self._prepared = True
        self._prepared_event.set()
        self._publish_readiness()
        ready, reasons = self.readiness()
        log.info("prepared", extra={"fields": {"ready": ready, "reasons": reasons}})

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
        await self.registry.stop()
        self.pipeline.close()

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether new traffic should be routed here (/readyz): servable and not draining."""
        _, reasons = self.serving()
        if self._draining:
            reasons.append("draining: shutting down")
        return not reasons and self._prepared, reasons

    def serving(self) -> tuple[bool, list[str]]:
        """Whether removal requests are served. Draining does not stop that: the drain delay
        exists so that requests routed here before the endpoint removal propagates succeed."""
        reasons = self.registry.not_servable()
        if self._warming is not None:
            reasons.append(f"warming up {self._warming}")
        elif not self._prepared and not reasons:
            reasons.append("loading models")
        reasons.extend(self._health_problems.values())
        return not reasons and self._prepared, reasons

    def liveness(self) -> tuple[bool, list[str]]:
        return self.registry.liveness()

    def _publish_readiness(self) -> None:
        ready, _ = self.readiness()
        for name in self.settings.models:
            servable = name in self.registry
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
            result = await _cancel_on_disconnect(self._run(request, header, deadline), disconnected)
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
        timings = Timings()
        image = await self.pipeline.decode(data, timings)
        cutout = await self.pipeline.cutout(
            name, image, Composition(), timings, deadline=None, observed=False
        )
        return await self.pipeline.encode(cutout, "png", timings)

    def record_request(self, model: str | None, status: int, seconds: float) -> None:
        """rembg_requests_total and the request duration, for one answered removal request
        (the access-log middleware calls it with the model the route named, if any)."""
        model = model or self.settings.default_model
        if model not in self.settings.models:
            model = UNKNOWN_MODEL  # keep label cardinality bounded
        labels = (model, self.device_of(model))
        self.metrics.requests.labels(*labels, str(status)).inc()
        self.metrics.request_duration.labels(*labels).observe(seconds)

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

    async def _run(
        self, request: RemovalRequest, header: ImageHeader, deadline: float
    ) -> RemovalResult:
        timings = Timings()
        pipeline = self.pipeline
        image = await pipeline.decode(request.data, timings)
        cutout = await pipeline.cutout(request.model, image, request.composition, timings, deadline)
        body = await pipeline.encode(cutout, request.output, timings)
        labels = (request.model, self.device_of(request.model))
        for stage, seconds in timings.cpu.items():
            self.metrics.stage_cpu.labels(*labels, stage).inc(seconds)
        return RemovalResult(body, MEDIA_TYPES[request.output], request.model, header, timings)


async def _cancel_on_disconnect(
    work: Awaitable[RemovalResult], disconnected: Callable[[], Awaitable[Any]] | None
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


def _options_key(request: RemovalRequest) -> str:
    return json.dumps({"output": request.output, **asdict(request.composition)}, sort_keys=True)
