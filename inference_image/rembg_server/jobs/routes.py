"""HTTP routes of the job path (/v1/jobs). Handlers only translate; JobManager does the work."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from rembg_server.api import IMAGE_CONTENT, read_body, read_image
from rembg_server.errors import RequestRejectedError
from rembg_server.jobs.manager import JobManager, JobNotDoneError
from rembg_server.jobs.records import JOB_ID, status_url
from rembg_server.params import BatchItem, BatchManifest, JobParams, describe_errors

router = APIRouter(tags=["jobs"])

_ITEM_SCHEMA = BatchItem.model_json_schema()
_MANIFEST_SCHEMA = {
    "title": "BatchManifest",
    "type": "object",
    "properties": {
        "items": {"type": "array", "minItems": 1, "items": _ITEM_SCHEMA},
        "webhook_url": {"type": "string", "nullable": True},
    },
    "required": ["items"],
    "additionalProperties": False,
}
# /v1/remove's image body, or the batch manifest.
SUBMIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {**IMAGE_CONTENT, "application/json": {"schema": _MANIFEST_SCHEMA}},
    }
}
Responses = dict[int | str, dict[str, Any]]
DISABLED: Responses = {404: {"description": "Unknown or expired job, or the job API is off here"}}
UNAVAILABLE: Responses = {
    503: {"description": "Redis unreachable; retry after the Retry-After header"}
}
SUBMIT_RESPONSES: Responses = {
    202: {
        "description": "Queued: the job (id, status_url, result_url; Location header), or for "
        "a batch manifest its id and one entry per item (failed items with their reason)"
    },
    400: {"description": "Corrupt image, unknown model, bad option or webhook URL, bad manifest"},
    404: {"description": "The job API is off here (REMBG_JOBS_ENABLED)"},
    413: {"description": "Body, decoded pixels or manifest items over the limit"},
    415: {"description": "Not a supported image format"},
    429: {"description": "Job backlog full (REMBG_JOBS_MAX_BACKLOG); retry after Retry-After"},
    **UNAVAILABLE,
}


def get_jobs(request: Request) -> JobManager:
    jobs: JobManager | None = getattr(request.app.state, "jobs", None)
    if jobs is None:
        raise RequestRejectedError(404, "the job API is off here (set REMBG_JOBS_ENABLED=true)")
    return jobs


Jobs = Annotated[JobManager, Depends(get_jobs)]


@router.post(
    "/v1/jobs",
    summary="Submit a job: one image, or a batch manifest",
    description="An image body (raw or multipart `file`, with /v1/remove's query parameters "
    "and an optional `webhook_url`) becomes one job; `Content-Type: application/json` is a "
    "batch manifest whose items carry the image as base64 and their own options.",
    status_code=202,
    openapi_extra=SUBMIT_BODY,
    responses=SUBMIT_RESPONSES,
)
async def submit_job(
    request: Request, params: Annotated[JobParams, Query()], jobs: Jobs
) -> JSONResponse:
    if _media_type(request) == "application/json":
        manifest = await read_manifest(request, jobs.settings.jobs_max_batch_bytes)
        batch, records = await jobs.submit_batch(manifest)
        request.state.log.update(batch=batch, items=len(records))
        body = {"batch": batch, "jobs": [record.summary() for record in records]}
        return JSONResponse(body, status_code=202)
    data, _ = await read_image(request, jobs.settings.max_body_bytes)
    record = await jobs.submit_image(data, params)
    request.state.log.update(job=record.id, model=record.model, bytes_in=len(data))
    headers = {"Location": status_url(record.id)}
    return JSONResponse(record.accepted(), status_code=202, headers=headers)


@router.get(
    "/v1/jobs/{job_id}",
    summary="Job status",
    responses={
        200: {
            "description": "State, model, attempts, times; reason when failed; result_url "
            "and media_type when done"
        },
        **DISABLED,
        **UNAVAILABLE,
    },
)
async def job_status(job_id: str, jobs: Jobs) -> JSONResponse:
    record = await jobs.status(_checked_id(job_id))
    return JSONResponse(record.status())


@router.get(
    "/v1/jobs/{job_id}/result",
    summary="Job result",
    response_class=Response,
    responses={
        200: {"content": {"image/png": {}, "image/webp": {}}, "description": "The cutout"},
        409: {"description": "Not done yet, failed (with the reason) or cancelled"},
        **DISABLED,
        **UNAVAILABLE,
    },
)
async def job_result(job_id: str, jobs: Jobs) -> Response:
    try:
        record, body = await jobs.result(_checked_id(job_id))
    except JobNotDoneError as error:
        return JSONResponse({"detail": error.message, **error.record.status()}, status_code=409)
    return Response(body, media_type=record.media_type, headers={"X-Model": record.model})


@router.delete(
    "/v1/jobs/{job_id}",
    summary="Cancel a queued or running job, or delete an ended one",
    responses={
        200: {"description": "Cancelled (a running job's result is discarded); its status"},
        204: {"description": "The ended job and its result are deleted"},
        **DISABLED,
        **UNAVAILABLE,
    },
)
async def cancel_job(job_id: str, jobs: Jobs) -> Response:
    record = await jobs.cancel(_checked_id(job_id))
    if record is None:
        return Response(status_code=204)
    return JSONResponse(record.status())


async def read_manifest(request: Request, limit: int) -> BatchManifest:
    if request.query_params:
        raise RequestRejectedError(
            400, "a batch manifest takes no query parameters: options go in its items"
        )
    body = await read_body(request, limit)
    try:
        return BatchManifest.model_validate_json(body)
    except ValidationError as error:
        problems = describe_errors(error, "manifest")
        raise RequestRejectedError(400, f"invalid batch manifest: {problems}") from error


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def _checked_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise RequestRejectedError(404, f"no job {job_id!r}: job ids are 32 hex digits")
    return job_id
