"""HTTP routes. Handlers only translate: body and params in, service call, response out."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from rembg_server.dataplane import DataPlane, RemovalResult
from rembg_server.errors import RequestRejectedError
from rembg_server.params import RembgFormParams, RemoveParams

router = APIRouter()

# OpenAPI: an image as the raw body or as multipart `file` (the job API adds a JSON manifest).
IMAGE_CONTENT: dict[str, Any] = {
    "image/*": {"schema": {"type": "string", "format": "binary"}},
    "multipart/form-data": {
        "schema": {
            "type": "object",
            "properties": {"file": {"type": "string", "format": "binary"}},
            "required": ["file"],
        }
    },
}
IMAGE_BODY = {"requestBody": {"required": True, "content": IMAGE_CONTENT}}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {}, "image/webp": {}}, "description": "The cutout"},
    400: {"description": "Corrupt image, empty body or unknown model"},
    413: {"description": "Body or decoded pixels over the limit"},
    415: {"description": "Not a supported image format"},
    429: {"description": "Queue full; retry after the Retry-After header"},
    503: {"description": "Not ready, or the deadline passed while queued"},
    504: {"description": "The deadline passed during inference"},
}


def get_service(request: Request) -> DataPlane:
    service: DataPlane = request.app.state.service
    return service


Service = Annotated[DataPlane, Depends(get_service)]


@router.post(
    "/v1/remove",
    summary="Remove the background",
    openapi_extra=IMAGE_BODY,
    responses=RESPONSES,
    response_class=Response,
)
async def remove_v1(
    request: Request, params: Annotated[RemoveParams, Query()], service: Service
) -> Response:
    await shed_early(request, service)
    data, _ = await read_image(request, service.settings.max_body_bytes)
    return await run_removal(request, service, data, params)


@router.post(
    "/api/remove",
    summary="Remove the background (rembg server compatible)",
    description="Same multipart field (`file`) and parameters as `rembg s`.",
    openapi_extra=IMAGE_BODY,
    responses=RESPONSES,
    response_class=Response,
)
async def remove_rembg_compatible(request: Request, service: Service) -> Response:
    await shed_early(request, service)
    data, fields = await read_image(request, service.settings.max_body_bytes)
    # rembg reads bgc from the query string even on POST; accept it in the form too.
    merged = {**fields, **{k: v for k, v in request.query_params.items() if k not in fields}}
    try:
        form = RembgFormParams.model_validate(merged)
    except ValidationError as error:
        raise RequestValidationError(error.errors()) from error
    if form.unsupported():
        raise RequestRejectedError(400, f"not supported here: {', '.join(form.unsupported())}")
    return await run_removal(request, service, data, form.as_remove_params())


@router.get("/livez", summary="Process and inference workers alive")
async def livez(service: Service) -> JSONResponse:
    alive, reasons = service.liveness()
    return JSONResponse({"alive": alive, "reasons": reasons}, status_code=200 if alive else 503)


@router.get("/readyz", summary="Models verified, warmed up, not draining")
async def readyz(service: Service) -> JSONResponse:
    ready, reasons = service.readiness()
    return JSONResponse({"ready": ready, "reasons": reasons}, status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(service: Service) -> Response:
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def run_removal(
    request: Request, service: Service, data: bytes, params: RemoveParams
) -> Response:
    request.state.log.update(
        model=params.model or service.settings.default_model, bytes_in=len(data)
    )
    removal = service.request_for(data, params)
    deadline = time.monotonic() + service.settings.request_timeout_seconds
    result = await service.remove(
        removal, deadline, lambda: wait_for_disconnect(request), inject_faults=True
    )
    return image_response(request, result)


def image_response(request: Request, result: RemovalResult) -> Response:
    headers = {
        "X-Model": result.model,
        "Server-Timing": result.timings.server_timing(),
        "X-Cache": "hit" if result.cached else "miss",
    }
    fields: dict[str, Any] = {"bytes_out": len(result.body), "cache": headers["X-Cache"]}
    if result.header is not None:
        fields.update(width=result.header.width, height=result.header.height)
    fields.update({f"{k}_s": round(v, 4) for k, v in result.timings.wall().items()})
    fields["cpu_s"] = round(sum(result.timings.cpu.values()), 4)
    request.state.log.update(fields)
    return Response(result.body, media_type=result.media_type, headers=headers)


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes the connection (the body is already consumed)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# --- body ------------------------------------------------------------------------------------


async def shed_early(request: Request, service: DataPlane) -> None:
    """A full queue answers 429 without parsing or probing: under a flood, rejections must be
    cheap or they eat the CPU the admitted requests need. The body is still drained, because
    closing a socket with unread data makes the kernel reset it and the client would see a
    connection error instead of the 429."""
    try:
        service.shed_if_full()
    except RequestRejectedError as error:
        drained = 0
        async for chunk in request.stream():
            drained += len(chunk)
            if drained > service.settings.max_body_bytes:
                error.headers["Connection"] = "close"
                break
        raise


async def read_image(request: Request, limit: int) -> tuple[bytes, dict[str, str]]:
    """The image bytes (raw body or multipart `file`) and any other form fields."""
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        return body, {}
    return await parse_multipart(request, body)


async def read_body(request: Request, limit: int) -> bytes:
    """Read at most `limit` bytes: refuse on Content-Length, or as soon as the stream exceeds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise body_too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def body_too_large(size: int, limit: int) -> RequestRejectedError:
    # Connection: close, because the rest of the body is never read.
    return RequestRejectedError(
        413, f"body of {size}+ bytes exceeds {limit} bytes", {"Connection": "close"}
    )


async def parse_multipart(request: Request, body: bytes) -> tuple[bytes, dict[str, str]]:
    async def replay() -> AsyncGenerator[bytes, None]:
        yield body

    parser = MultiPartParser(request.headers, replay(), max_files=1, max_fields=32)
    try:
        form = await parser.parse()
    except MultiPartException as error:
        raise RequestRejectedError(400, f"malformed multipart body: {error.message}") from error
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise RequestRejectedError(400, "multipart body has no file field named 'file'")
        data = await upload.read()
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
    finally:
        await form.close()
    return data, fields
