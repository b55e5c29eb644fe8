"""The FastAPI application: lifespan (models load in the background), routes, middleware."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rembg_server import __version__
from rembg_server.api import router
from rembg_server.canary import REASONS, Canary
from rembg_server.dataplane import DataPlane
from rembg_server.errors import RequestRejectedError
from rembg_server.imaging import disable_pillow_pixel_guard
from rembg_server.jobs.manager import JobManager
from rembg_server.jobs.routes import router as jobs_router
from rembg_server.metrics import CanaryMetrics, JobMetrics, ServerMetrics
from rembg_server.settings import Settings

log = logging.getLogger("rembg_server")
access_log = logging.getLogger("rembg_server.access")
REMOVAL_PATHS = frozenset({"/v1/remove", "/api/remove"})
QUIET_PATHS = frozenset({"/livez", "/readyz", "/metrics"})


def create_app(
    settings: Settings, registry: CollectorRegistry | None = None, *, autostart: bool = True
) -> FastAPI:
    """Build the app. With autostart=False the caller runs `app.state.service.prepare()`."""
    disable_pillow_pixel_guard()
    metrics = ServerMetrics(registry if registry is not None else CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # A dataplane per lifespan: close() ends its thread pool and workers for good.
        service = DataPlane(settings, metrics)
        app.state.service = service
        if service.faults.enabled:
            log.warning(
                "TEST-ONLY fault injection is on: REMBG_FAULT_ERROR_RATIO of the removal "
                "requests are answered 500 on purpose; never set it in production",
                extra={"fields": {"ratio": settings.fault_error_ratio}},
            )
        jobs = JobManager(service, JobMetrics(metrics.registry)) if settings.jobs_enabled else None
        app.state.jobs = jobs
        canary = None
        if settings.canary_interval_seconds > 0:
            canary = Canary(service, CanaryMetrics(metrics.registry, REASONS))
            canary.start()  # before prepare(): its first run follows the warmup
        app.state.canary = canary
        preparing = asyncio.create_task(service.prepare()) if autostart else None
        app.state.preparing = preparing
        if jobs is not None:
            jobs.start()  # its workers wait for readiness; Redis may come later
        try:
            yield
        finally:
            if jobs is not None:
                await jobs.close()
            if canary is not None:
                await canary.close()
            if preparing is not None and not preparing.done():
                preparing.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await preparing
            await service.close()

    app = FastAPI(
        title="rembg-fleet inference server",
        version=__version__,
        description="Background removal on onnxruntime, with admission control and metrics.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics  # for the connection layer (connections.py)
    app.include_router(router)
    app.include_router(jobs_router)
    app.add_exception_handler(RequestRejectedError, _rejected)
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_middleware(BodyDeadlineMiddleware, seconds=settings.body_timeout_seconds)

    def record_request(model: str | None, status: int, seconds: float) -> None:
        service: DataPlane | None = getattr(app.state, "service", None)
        if service is not None:  # None only for a request outside the lifespan
            service.record_request(model, status, seconds)

    app.add_middleware(RequestLogMiddleware, record=record_request)
    return app


async def _rejected(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, RequestRejectedError)
    request.state.log["detail"] = error.message  # the access line says why, as the client hears
    return JSONResponse({"detail": error.message}, status_code=error.status, headers=error.headers)


async def _client_disconnected(request: Request, _error: Exception) -> JSONResponse:
    """Starlette raises ClientDisconnect when the client hangs up before its body is complete.
    That is the client's doing, not a server error: answered (to no one) like a hang-up while
    queued, 499, so the access line and rembg_requests_total say so and no 500 is counted."""
    return await _rejected(request, RequestRejectedError(499, "client disconnected during upload"))


RequestRecorder = Callable[[str | None, int, float], None]  # model named, status, seconds


class RequestLogMiddleware:
    """X-Request-ID and one log line per request; each removal request's model (as its route
    named it in the log fields, if it got that far), status and duration go to `record`."""

    def __init__(self, app: ASGIApp, record: RequestRecorder) -> None:
        self.app = app
        self.record = record

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        fields: dict[str, Any] = {"request_id": request_id, "method": scope["method"]}
        fields["path"] = scope["path"]
        scope.setdefault("state", {})["log"] = fields
        status = {"code": 500}

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            fields.update(status=status["code"], duration_s=round(time.monotonic() - started, 4))
            self._record(scope, fields)

    def _record(self, scope: Scope, fields: dict[str, Any]) -> None:
        path = fields["path"]
        if path in REMOVAL_PATHS:
            self.record(fields.get("model"), fields["status"], fields["duration_s"])
        level = logging.DEBUG if path in QUIET_PATHS else logging.INFO
        access_log.log(level, "request", extra={"fields": fields})


class BodyDeadlineMiddleware:
    """The whole body must arrive within `seconds` of the headers. Past that, receive() raises
    a 408 RequestRejectedError, which the route's body read passes up to the handler of those,
    and the connection closes: an upload trickling a byte at a time would otherwise hold its
    connection, and what it buffered, for as long as it liked."""

    def __init__(self, app: ASGIApp, seconds: float) -> None:
        self.app = app
        self.seconds = seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        deadline = asyncio.get_running_loop().time() + self.seconds
        body_complete = False

        async def receive_by_deadline() -> Message:
            nonlocal body_complete
            if body_complete:  # later calls only wait for a disconnect
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise RequestRejectedError(
                    408,
                    f"request body not received within {self.seconds:g} s "
                    "(REMBG_BODY_TIMEOUT_SECONDS)",
                    {"Connection": "close"},
                ) from None
            body_complete = not message.get("more_body", False)
            return message

        await self.app(scope, receive_by_deadline, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            text: str = value.decode("latin-1")[:128]
            return text
    return None
