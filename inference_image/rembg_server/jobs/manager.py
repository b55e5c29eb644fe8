"""The job path's front: submission checks, status, results, cancellation; owns the workers.

HTTP-free like the dataplane: routes.py turns requests into calls here and maps
RequestRejectedError to responses.
"""

from __future__ import annotations

import base64
import binascii
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import ValidationError

from rembg_server.dataplane import DataPlane
from rembg_server.errors import RequestRejectedError
from rembg_server.jobs.records import JobRecord, NewJob
from rembg_server.jobs.store import JobStore, JobStoreUnavailableError
from rembg_server.jobs.webhook import WebhookRefusedError, WebhookSender, check_webhook_url
from rembg_server.jobs.workers import JobWorkers
from rembg_server.metrics import JobMetrics
from rembg_server.params import (
    BatchItem,
    BatchManifest,
    JobParams,
    RemoveParams,
    describe_errors,
)

log = logging.getLogger("rembg_server.jobs")
T = TypeVar("T")
UNAVAILABLE_RETRY_AFTER = "5"
WEBHOOK_DRAIN_SECONDS = 5.0


class JobManager:
    def __init__(self, service: DataPlane, metrics: JobMetrics) -> None:
        self.service = service
        self.settings = settings = service.settings
        self.metrics = metrics
        self.store = JobStore(settings, on_health=lambda up: metrics.redis_up.set(int(up)))
        self.webhooks = WebhookSender(
            settings.jobs_webhook_allowed_hosts,
            settings.jobs_webhook_secret.get_secret_value(),
        )
        self.workers = JobWorkers(service, self.store, metrics, self.ended)
        for model in settings.models:
            metrics.declare(model)

    def start(self) -> None:
        self.workers.start()

    async def close(self) -> None:
        """Stop claiming; running jobs get the shutdown grace (counted from the start of the
        drain, when there was one), then whatever still runs is handed back to the queue."""
        grace = self.settings.shutdown_grace_seconds
        deadline = (self.service.drain_started_at or time.monotonic()) + grace
        await self.workers.stop(deadline)
        await self.webhooks.close(WEBHOOK_DRAIN_SECONDS)
        await self.store.close()

    # --- submission ---------------------------------------------------------------------------

    async def submit_image(self, data: bytes, params: JobParams) -> JobRecord:
        """One image: checked like /v1/remove checks it (400/413/415), then queued."""
        webhook_url = self._checked_webhook(params.webhook_url)
        options = params.options()
        request = self.service.request_for(data, options)
        self.service.probe_image(data)
        record = self._new_record(request.model, options, webhook_url)
        await self._add([NewJob(record, data)])
        return record

    async def submit_batch(self, manifest: BatchManifest) -> tuple[str, list[JobRecord]]:
        """Every item becomes a job: queued, or failed at once with the reason."""
        if len(manifest.items) > self.settings.jobs_max_batch_items:
            raise RequestRejectedError(
                413,
                f"{len(manifest.items)} items exceed REMBG_JOBS_MAX_BATCH_ITEMS "
                f"({self.settings.jobs_max_batch_items})",
            )
        webhook_url = self._checked_webhook(manifest.webhook_url)
        batch = uuid.uuid4().hex
        jobs = [self._batch_job(raw, batch, webhook_url) for raw in manifest.items]
        await self._add(jobs)
        return batch, [job.record for job in jobs]

    def _batch_job(self, raw: Any, batch: str, webhook_url: str) -> NewJob:
        ref = raw.get("ref") if isinstance(raw, dict) else None
        ref = ref[:256] if isinstance(ref, str) else ""
        try:
            item = BatchItem.model_validate(raw)
        except ValidationError as error:
            reason = "invalid item: " + describe_errors(error, "item")
            failed = self._new_record(self.settings.default_model, RemoveParams(), webhook_url)
            return NewJob(replace(failed, ref=ref, batch=batch).with_state("failed", reason))
        options = item.options()
        model = options.model or self.settings.default_model
        record = replace(self._new_record(model, options, webhook_url), ref=ref, batch=batch)
        try:
            data = self._checked_item_image(item.image_base64, options)
        except RequestRejectedError as error:
            return NewJob(record.with_state("failed", error.message))
        return NewJob(record, data)

    def _checked_item_image(self, text: str, options: RemoveParams) -> bytes:
        data = _decode_base64(text)
        if len(data) > self.settings.max_body_bytes:
            raise RequestRejectedError(
                413, f"image of {len(data)} bytes exceeds {self.settings.max_body_bytes} bytes"
            )
        self.service.request_for(data, options)
        self.service.probe_image(data)
        return data

    def _new_record(self, model: str, options: RemoveParams, webhook: str) -> JobRecord:
        now = time.time()
        return JobRecord(
            id=uuid.uuid4().hex,
            state="queued",
            model=model,
            options=options.model_dump_json(),
            created_at=now,
            updated_at=now,
            webhook=webhook,
        )

    def _checked_webhook(self, url: str | None) -> str:
        if not url:
            return ""
        try:
            return check_webhook_url(url, self.settings.jobs_webhook_allowed_hosts)
        except WebhookRefusedError as error:
            raise RequestRejectedError(400, str(error)) from error

    async def _add(self, jobs: list[NewJob]) -> None:
        queued = sum(1 for job in jobs if job.data is not None)
        backlog = await self._store(self.store.backlog())
        limit = self.settings.jobs_max_backlog
        if queued and backlog + queued > limit:
            raise RequestRejectedError(
                429,
                f"job backlog full: {backlog} unfinished jobs, limit {limit} "
                "(REMBG_JOBS_MAX_BACKLOG)",
                {"Retry-After": "30"},
            )
        await self._store(self.store.add(jobs))
        for job in jobs:
            model = self._model_label(job.record.model)
            self.metrics.submitted.labels(model).inc()
            if job.record.terminal:
                self.metrics.finished.labels(model, job.record.state).inc()
            else:
                log.info("job queued", extra={"fields": {"job": job.record.id, "model": model}})

    # --- reads and cancellation ---------------------------------------------------------------

    async def status(self, job_id: str) -> JobRecord:
        record = await self._store(self.store.get(job_id))
        if record is None:
            raise _not_found(job_id)
        return record

    async def result(self, job_id: str) -> tuple[JobRecord, bytes]:
        """The result of a done job; 409 (with the state) before, 404 when unknown or expired."""
        found = await self._store(self.store.get_with_result(job_id))
        if found is None:
            raise _not_found(job_id)
        record, body = found
        if record.state != "done":
            raise JobNotDoneError(record)
        if body is None:
            raise RequestRejectedError(404, f"the result of job {job_id} has expired")
        return record, body

    async def cancel(self, job_id: str) -> JobRecord | None:
        """The cancelled job, or None when it had ended and is now deleted."""
        cancellation = await self._store(self.store.cancel(job_id))
        if cancellation.outcome == "gone":
            raise _not_found(job_id)
        if cancellation.record is not None:
            log.info("job cancelled", extra={"fields": {"job": job_id}})
            self.ended(cancellation.record)
        return cancellation.record

    # --- shared -------------------------------------------------------------------------------

    def ended(self, record: JobRecord) -> None:
        """A job reached a terminal state in this process: metrics, and its webhook."""
        model = self._model_label(record.model)
        self.metrics.finished.labels(model, record.state).inc()
        self.metrics.duration.labels(model).observe(max(0.0, time.time() - record.created_at))
        if record.webhook and record.state != "cancelled":
            self.webhooks.send(record.webhook, record.status())

    def _model_label(self, model: str) -> str:
        return model if model in self.settings.models else "unknown"  # bounded cardinality

    async def _store(self, operation: Awaitable[T]) -> T:
        try:
            return await operation
        except JobStoreUnavailableError as error:
            raise RequestRejectedError(
                503, f"job store unavailable: {error}", {"Retry-After": UNAVAILABLE_RETRY_AFTER}
            ) from error


class JobNotDoneError(RequestRejectedError):
    def __init__(self, record: JobRecord) -> None:
        message = f"job {record.id} is {record.state}"
        if record.reason:
            message += f": {record.reason}"
        super().__init__(409, message)
        self.record = record


def _not_found(job_id: str) -> RequestRejectedError:
    return RequestRejectedError(404, f"no job {job_id} (unknown, deleted or expired)")


def _decode_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestRejectedError(400, f"image_base64 is not valid base64: {error}") from error
