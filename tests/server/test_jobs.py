"""The job path in-process: a real app (real u2netp on onnxruntime) and a real redis-server.

Submit, poll, fetch, expire, cancel; batches with broken items; a dead worker's job taken over
after the visibility timeout; transient failures that end after max attempts; the backlog
limit; a Redis outage; webhooks; the sync path keeping its slot.
"""

from __future__ import annotations

import asyncio
import base64
import faulthandler
import hashlib
import hmac
import http.server
import io
import json
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from redis.asyncio import Redis
from rembg_server.jobs.store import GROUP

from tests.server.conftest import make_settings, running_app
from tests.server.processes import RedisServer, free_port
from tests.server.test_lifecycle import gate_model, service_of, wait_until

pytestmark = pytest.mark.anyio
Metric = Callable[..., Awaitable[float]]
PREFIX = "rembg"
TERMINAL = {"done", "failed", "cancelled"}
SECRET = "webhook-secret"


# --- helpers ---------------------------------------------------------------------------------


def job_settings(redis: RedisServer, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "jobs_enabled": True,
        "jobs_redis_address": redis.address,
        "jobs_visibility_timeout_seconds": 1.5,
        "inference_workers": 1,
    }
    values.update(overrides)
    return values


def raw_redis(server: RedisServer) -> Redis:
    return Redis(host="127.0.0.1", port=server.port)


async def submit(client: httpx.AsyncClient, data: bytes, **params: str) -> str:
    response = await client.post("/v1/jobs", content=data, params=params)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


async def status_of(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    response = await client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_for_state(
    client: httpx.AsyncClient, job_id: str, states: set[str] = TERMINAL, attempts: int = 600
) -> dict[str, Any]:
    """Poll the job a bounded number of times until it is in one of `states`."""
    status: dict[str, Any] = {}
    for _ in range(attempts):
        status = await status_of(client, job_id)
        if status["state"] in states:
            return status
        await asyncio.sleep(0.05)
    dump_tasks()
    pytest.fail(f"job {job_id} never reached {states}; last status {status}")


def dump_tasks() -> None:
    """On a timeout, show where every task and thread waits (the captured output)."""
    for task in asyncio.all_tasks():
        task.print_stack(file=sys.stderr)
    faulthandler.dump_traceback(file=sys.stderr)


async def wait_for_metric(
    client: httpx.AsyncClient, metric: Metric, name: str, value: float, **labels: str
) -> None:
    async def reached() -> bool:
        return await metric(client, name, **labels) == value

    await wait_until(reached, attempts=300)


@dataclass
class Hook:
    """A real local HTTP server that records webhook calls."""

    port: int = field(default_factory=free_port)
    calls: list[tuple[dict[str, str], bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def for_job(self, job_id: str) -> list[tuple[dict[str, str], bytes]]:
        return [call for call in self.calls if json.loads(call[1])["id"] == job_id]


@pytest.fixture(scope="module")
def hook() -> Iterator[Hook]:
    recorded = Hook()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            recorded.calls.append(({k.lower(): v for k, v in self.headers.items()}, body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", recorded.port), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield recorded
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def jobs(
    model_dir: Path, shared_redis: RedisServer, hook: Hook
) -> AsyncIterator[httpx.AsyncClient]:
    """One app for the tests that need no special settings (webhooks to the local hook)."""
    settings = make_settings(
        model_dir,
        **job_settings(
            shared_redis,
            jobs_webhook_allowed_hosts=f"127.0.0.1:{hook.port}",
            jobs_webhook_secret=SECRET,
        ),
    )
    async with running_app(settings) as client:
        yield client


@asynccontextmanager
async def jobs_app(
    app_factory: Callable[..., Any], redis: RedisServer, *, prepare: bool = True, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with app_factory(prepare=prepare, **job_settings(redis, **overrides)) as client:
        yield client


# --- submit, poll, fetch ---------------------------------------------------------------------


async def test_a_job_gives_the_same_cutout_as_remove_then_can_be_deleted(
    jobs: httpx.AsyncClient,
    photos: dict[str, bytes],
    shared_redis: RedisServer,
    alpha_diff: Callable[[Image.Image, Image.Image], float],
) -> None:
    response = await jobs.post("/v1/jobs", content=photos["chelsea"], params={"bgcolor": "#00ff00"})
    assert response.status_code == 202, response.text
    accepted = response.json()
    job_id = accepted["id"]
    assert accepted == {
        "id": job_id,
        "state": "queued",
        "status_url": f"/v1/jobs/{job_id}",
        "result_url": f"/v1/jobs/{job_id}/result",
    }
    assert response.headers["location"] == f"/v1/jobs/{job_id}"

    status = await wait_for_state(jobs, job_id)
    assert status["state"] == "done", status
    assert status["model"] == "u2netp"
    assert status["attempts"] == 1
    assert status["media_type"] == "image/png"
    assert status["result_url"] == f"/v1/jobs/{job_id}/result"
    assert status["updated_at"] >= status["created_at"]

    result = await jobs.get(status["result_url"])
    assert result.status_code == 200
    assert result.headers["content-type"] == "image/png"
    sync = await jobs.post("/v1/remove", content=photos["chelsea"], params={"bgcolor": "#00ff00"})
    job_image, sync_image = (Image.open(io.BytesIO(r.content)) for r in (result, sync))
    assert job_image.size == sync_image.size == (451, 300)
    assert alpha_diff(job_image, sync_image) <= 1 / 255

    redis = raw_redis(shared_redis)
    async with redis:
        assert not await redis.exists(f"{PREFIX}:input:{job_id}")  # deleted at the end
        assert 0 < await redis.ttl(f"{PREFIX}:result:{job_id}") <= 86_400
        assert 0 < await redis.ttl(f"{PREFIX}:job:{job_id}") <= 86_400
        assert await redis.xlen(f"{PREFIX}:jobs") == 0  # acked and deleted
        deleted = await jobs.delete(f"/v1/jobs/{job_id}")
        assert deleted.status_code == 204
        assert not await redis.exists(f"{PREFIX}:result:{job_id}", f"{PREFIX}:job:{job_id}")
    assert (await jobs.get(f"/v1/jobs/{job_id}")).status_code == 404
    assert (await jobs.get(f"/v1/jobs/{job_id}/result")).status_code == 404
    assert (await jobs.delete(f"/v1/jobs/{job_id}")).status_code == 404


async def test_multipart_submission_with_options(
    jobs: httpx.AsyncClient, photos: dict[str, bytes]
) -> None:
    response = await jobs.post(
        "/v1/jobs",
        params={"format": "webp", "only_mask": "true"},
        files={"file": ("coffee.jpg", photos["coffee"], "image/jpeg")},
    )
    assert response.status_code == 202, response.text
    status = await wait_for_state(jobs, response.json()["id"])
    assert (status["state"], status["media_type"]) == ("done", "image/webp")
    result = await jobs.get(status["result_url"])
    image = Image.open(io.BytesIO(result.content))
    assert (image.format, image.size) == ("WEBP", (600, 400))


@pytest.mark.parametrize(
    ("request_args", "status", "message"),
    [
        ({"content": b"hello, not an image\n" * 5}, 415, "not a supported image"),
        ({"content": b""}, 400, "empty"),
        ({"params": {"model": "u2net"}}, 400, "not served here"),
        ({"params": {"bgcolor": "red"}}, 422, "bgcolor"),
        ({"params": {"webhook_url": "http://example.com/hook"}}, 400, "not in REMBG_JOBS"),
        ({"params": {"webhook_url": "ftp://127.0.0.1/hook"}}, 400, "http or https"),
    ],
    ids=["not an image", "empty", "unknown model", "bad option", "host not allowed", "scheme"],
)
async def test_bad_submissions_are_refused_like_remove_refuses_them(
    jobs: httpx.AsyncClient,
    photos: dict[str, bytes],
    request_args: dict[str, Any],
    status: int,
    message: str,
) -> None:
    response = await jobs.post("/v1/jobs", **{"content": photos["coffee"], **request_args})
    assert response.status_code == status, response.text
    assert message in response.text


async def test_batch_items_fail_one_by_one_with_reasons_while_the_rest_complete(
    jobs: httpx.AsyncClient, photos: dict[str, bytes]
) -> None:
    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    truncated = photos["chelsea"][: len(photos["chelsea"]) // 2]
    items: list[Any] = [
        {"image_base64": b64(photos["chelsea"]), "ref": "sku-1"},
        {"image_base64": b64(photos["coffee"]), "ref": "sku-2", "format": "webp"},
        {"image_base64": b64(truncated), "ref": "truncated"},
        {"image_base64": "%%% not base64 %%%", "ref": "bad-base64"},
        {"image_base64": b64(photos["coffee"]), "ref": "unknown-model", "model": "isnet-anime"},
        {"image_base64": b64(b"plain text, no image"), "ref": "not-an-image"},
        {"image_base64": b64(photos["coffee"]), "ref": "typo", "colour": "red"},
        "not an object",
    ]
    response = await jobs.post("/v1/jobs", json={"items": items})
    assert response.status_code == 202, response.text
    body = response.json()
    assert len(body["batch"]) == 32
    entries = {entry["ref"]: entry for entry in body["jobs"]}
    assert len(body["jobs"]) == len(items)
    at_submission = {
        "bad-base64": "not valid base64",
        "unknown-model": "'isnet-anime' is not served here",
        "not-an-image": "not a supported image",
        "typo": "colour: Extra inputs are not permitted",
    }
    for ref, reason in at_submission.items():
        assert entries[ref]["state"] == "failed", entries[ref]
        assert reason in entries[ref]["reason"]
    [non_object] = [entry for entry in body["jobs"] if entry["ref"] is None]
    assert non_object["state"] == "failed"
    assert "valid dictionary" in non_object["reason"]

    final = {ref: await wait_for_state(jobs, entries[ref]["id"]) for ref in entries}
    assert final["sku-1"]["state"] == "done"
    assert (final["sku-2"]["state"], final["sku-2"]["media_type"]) == ("done", "image/webp")
    assert final["sku-2"]["batch"] == body["batch"]
    # Corrupt past its header: fails in the worker, at once (no retry), with /v1/remove's reason.
    assert final["truncated"]["state"] == "failed"
    assert final["truncated"]["attempts"] == 1
    assert "truncated" in final["truncated"]["reason"]
    failed_result = await jobs.get(f"/v1/jobs/{entries['truncated']['id']}/result")
    assert failed_result.status_code == 409
    assert failed_result.json()["state"] == "failed"
    assert "truncated" in failed_result.json()["reason"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"{not json", 400, "invalid batch manifest"),
        (b'{"items": []}', 400, "items"),
        (b'{"images": [1]}', 400, "items"),
    ],
)
async def test_a_manifest_that_is_wrong_as_a_whole_is_refused(
    jobs: httpx.AsyncClient, body: bytes, status: int, message: str
) -> None:
    response = await jobs.post(
        "/v1/jobs", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status
    assert message in response.json()["detail"]


async def test_webhook_is_delivered_signed(
    jobs: httpx.AsyncClient, photos: dict[str, bytes], hook: Hook
) -> None:
    job_id = await submit(jobs, photos["chelsea"], webhook_url=hook.url)
    await wait_until(lambda: asyncio.to_thread(lambda: bool(hook.for_job(job_id))), attempts=300)
    [(headers, body)] = hook.for_job(job_id)
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["x-rembg-signature"] == f"sha256={expected}"
    assert headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["state"] == "done"
    assert payload["result_url"] == f"/v1/jobs/{job_id}/result"


async def test_job_routes_are_documented_and_metrics_exported(
    jobs: httpx.AsyncClient, metric: Metric
) -> None:
    paths = (await jobs.get("/openapi.json")).json()["paths"]
    assert {"post"} <= set(paths["/v1/jobs"])
    assert {"get", "delete"} <= set(paths["/v1/jobs/{job_id}"])
    assert "409" in paths["/v1/jobs/{job_id}/result"]["get"]["responses"]
    text = (await jobs.get("/metrics")).text
    samples = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    assert {
        "rembg_jobs_submitted_total",
        "rembg_jobs_finished_total",
        "rembg_jobs_running",
        "rembg_jobs_backlog",
        "rembg_jobs_oldest_age_seconds",
        "rembg_jobs_redis_up",
        "rembg_job_duration_seconds_count",
    } <= samples
    assert await metric(jobs, "rembg_jobs_redis_up") == 1
    assert await metric(jobs, "rembg_jobs_finished_total", model="u2netp", state="done") >= 1


# --- expiry and cancellation -----------------------------------------------------------------


async def test_results_expire_after_the_ttl(
    app_factory: Callable[..., Any], redis_server: RedisServer, photos: dict[str, bytes]
) -> None:
    async with jobs_app(app_factory, redis_server, jobs_result_ttl_seconds=1) as client:
        job_id = await submit(client, photos["chelsea"])
        assert (await wait_for_state(client, job_id))["state"] == "done"

        async def expired() -> bool:
            response = await client.get(f"/v1/jobs/{job_id}/result")
            return bool(response.status_code == 404)

        await wait_until(expired, attempts=100)
        assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404


async def test_cancel_a_queued_job(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
) -> None:
    # Not prepared: the workers wait for readiness, so the job stays queued.
    async with jobs_app(app_factory, redis_server, prepare=False) as client:
        job_id = await submit(client, photos["chelsea"])
        assert (await status_of(client, job_id))["state"] == "queued"
        response = await client.delete(f"/v1/jobs/{job_id}")
        assert response.status_code == 200
        assert response.json()["state"] == "cancelled"
        assert response.json()["reason"] == "cancelled by the client"
        redis = raw_redis(redis_server)
        async with redis:
            assert await redis.xlen(f"{PREFIX}:jobs") == 0
            assert not await redis.exists(f"{PREFIX}:input:{job_id}")
        result = await client.get(f"/v1/jobs/{job_id}/result")
        assert (result.status_code, result.json()["state"]) == (409, "cancelled")
        assert await metric(client, "rembg_jobs_finished_total", state="cancelled") == 1
        await service_of(client).prepare()  # nothing left to run
        assert (await status_of(client, job_id))["state"] == "cancelled"
        assert (await client.delete(f"/v1/jobs/{job_id}")).status_code == 204
        assert (await client.get(f"/v1/jobs/{job_id}")).status_code == 404


async def test_cancel_a_running_job_stops_its_work_and_stores_nothing(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
) -> None:
    async with jobs_app(
        app_factory, redis_server, jobs_visibility_timeout_seconds=0.6, warmup_runs=0
    ) as client:
        gated = gate_model(client)
        job_id = await submit(client, photos["chelsea"])
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        assert (await status_of(client, job_id))["state"] == "running"

        response = await client.delete(f"/v1/jobs/{job_id}")
        assert (response.status_code, response.json()["state"]) == (200, "cancelled")
        # The model call is still blocked, yet the job's pipeline is already abandoned.
        await wait_for_metric(client, metric, "rembg_jobs_running", 0, model="u2netp")
        assert await metric(client, "rembg_pending_requests", model="u2netp") == 0
        gated.gate.set()
        served = service_of(client).registry["u2netp"]
        await wait_until(lambda: asyncio.to_thread(served.idle))
        redis = raw_redis(redis_server)
        async with redis:
            assert not await redis.exists(f"{PREFIX}:result:{job_id}")
            assert await redis.xlen(f"{PREFIX}:jobs") == 0
        assert (await status_of(client, job_id))["state"] == "cancelled"
        assert await metric(client, "rembg_jobs_finished_total", state="done") == 0


# --- at-least-once -----------------------------------------------------------------------------


async def test_a_dead_workers_job_is_taken_over_after_the_visibility_timeout(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
) -> None:
    async with jobs_app(
        app_factory, redis_server, prepare=False, jobs_visibility_timeout_seconds=1.0
    ) as client:
        job_id = await submit(client, photos["chelsea"])
        redis = raw_redis(redis_server)
        async with redis:
            # A worker that claims the job and then dies: it never acknowledges it.
            claimed = await redis.xreadgroup(
                GROUP, "dead", {f"{PREFIX}:jobs": ">"}, count=1, block=1000
            )
            [(_, [(_, fields)])] = claimed
            assert fields[b"id"].decode() == job_id
            await service_of(client).prepare()
            status = await wait_for_state(client, job_id)
            assert status["state"] == "done", status
            assert status["attempts"] == 1
            assert await redis.xlen(f"{PREFIX}:jobs") == 0
            assert (await redis.xpending(f"{PREFIX}:jobs", GROUP))["pending"] == 0
        retries = await metric(
            client, "rembg_jobs_retries_total", model="u2netp", reason="visibility_timeout"
        )
        assert retries == 1
        assert (await client.get(f"/v1/jobs/{job_id}/result")).status_code == 200


async def test_a_job_that_keeps_failing_transiently_fails_after_max_attempts(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
) -> None:
    # A deadline no inference can meet: every attempt ends 503 "deadline passed while queued".
    async with jobs_app(
        app_factory, redis_server, request_timeout_seconds=0.001, jobs_max_attempts=2
    ) as client:
        job_id = await submit(client, photos["chelsea"])
        status = await wait_for_state(client, job_id)
        assert status["state"] == "failed"
        assert status["attempts"] == 2
        assert status["reason"] == "gave up after 2 attempts: request deadline passed while queued"
        assert await metric(client, "rembg_jobs_retries_total", reason="error") == 1
        assert await metric(client, "rembg_jobs_finished_total", state="failed") == 1
        redis = raw_redis(redis_server)
        async with redis:
            assert await redis.xlen(f"{PREFIX}:jobs") == 0
            assert not await redis.exists(f"{PREFIX}:input:{job_id}")


async def test_a_stopping_server_hands_its_unfinished_job_back_at_once(
    app_factory: Callable[..., Any], redis_server: RedisServer, photos: dict[str, bytes]
) -> None:
    async with jobs_app(
        app_factory, redis_server, warmup_runs=0, shutdown_grace_seconds=0.2
    ) as client:
        gated = gate_model(client)
        job_id = await submit(client, photos["chelsea"])
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        workers = client.app.state.jobs.workers  # type: ignore[attr-defined]
        # What the lifespan exit does: the grace passes with the job still in inference.
        await workers.stop(time.monotonic() + 0.2)
        status = await status_of(client, job_id)
        assert (status["state"], status["attempts"]) == ("queued", 0)  # not counted
        redis = raw_redis(redis_server)
        async with redis:
            assert await redis.xlen(f"{PREFIX}:jobs") == 1  # a fresh entry, for anyone
            assert (await redis.xpending(f"{PREFIX}:jobs", GROUP))["pending"] == 0
            assert await redis.exists(f"{PREFIX}:input:{job_id}")
        gated.gate.set()


async def test_a_redis_that_lost_its_data_gets_its_group_back(
    app_factory: Callable[..., Any], redis_server: RedisServer, photos: dict[str, bytes]
) -> None:
    async with jobs_app(app_factory, redis_server) as client:
        assert (await wait_for_state(client, await submit(client, photos["chelsea"])))[
            "state"
        ] == "done"
        redis = raw_redis(redis_server)
        async with redis:
            await redis.flushall()  # what a restart without persistence looks like
            job_id = await submit(client, photos["coffee"])
            assert (await wait_for_state(client, job_id))["state"] == "done"
            groups = await redis.xinfo_groups(f"{PREFIX}:jobs")
            assert [group["name"] for group in groups] == [GROUP.encode()]


# --- one pool for both paths -------------------------------------------------------------------


async def test_a_job_that_loses_the_admission_race_waits_without_losing_an_attempt(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # astronaut is 0.26 MP: one in flight leaves no room for a second in 0.3 MP.
    async with jobs_app(
        app_factory,
        redis_server,
        queue_max_megapixels=0.3,
        max_pixels=300_000,
        warmup_runs=0,
        jobs_visibility_timeout_seconds=0.6,
    ) as client:
        gated = gate_model(client)
        sync = asyncio.create_task(client.post("/v1/remove", content=photos["astronaut"]))
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        job_id = await submit(client, photos["astronaut"])
        with caplog.at_level(logging.DEBUG, logger="rembg_server.jobs"):
            await wait_until(
                lambda: asyncio.to_thread(
                    lambda: any(r.getMessage() == "job waits for room" for r in caplog.records)
                )
            )
        assert (await status_of(client, job_id))["state"] == "running"
        assert service_of(client).budget.pending[0] == 1  # only the synchronous request
        gated.gate.set()
        assert (await sync).status_code == 200
        status = await wait_for_state(client, job_id)
        assert (status["state"], status["attempts"]) == ("done", 1)


async def test_jobs_leave_the_synchronous_path_a_slot(
    app_factory: Callable[..., Any], redis_server: RedisServer, photos: dict[str, bytes]
) -> None:
    async with jobs_app(app_factory, redis_server, queue_max_requests=2, warmup_runs=0) as client:
        service = service_of(client)
        assert service.settings.resolved_jobs_concurrency() == 1  # capped at 2 - 1
        gated = gate_model(client)
        items = [{"image_base64": base64.b64encode(photos["chelsea"]).decode()}] * 3
        response = await client.post("/v1/jobs", json={"items": items})
        ids = [entry["id"] for entry in response.json()["jobs"]]
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        assert service.budget.pending[0] == 1  # one job in work, two still queued
        # The one free slot is the synchronous path's, however many jobs wait.
        sync = asyncio.create_task(client.post("/v1/remove", content=photos["coffee"]))
        await wait_until(lambda: asyncio.to_thread(lambda: service.budget.pending[0] == 2))
        shed = await client.post("/v1/remove", content=photos["coffee"])
        assert shed.status_code == 429
        gated.gate.set()
        assert (await sync).status_code == 200
        assert [(await wait_for_state(client, i))["state"] for i in ids] == ["done"] * 3


# --- limits and outages --------------------------------------------------------------------------


async def test_a_full_backlog_answers_429_and_the_backlog_is_exported(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
) -> None:
    async with jobs_app(app_factory, redis_server, prepare=False, jobs_max_backlog=2) as client:
        for _ in range(2):
            await submit(client, photos["chelsea"])
        refused = await client.post("/v1/jobs", content=photos["chelsea"])
        assert refused.status_code == 429
        assert "backlog full" in refused.json()["detail"]
        assert int(refused.headers["retry-after"]) >= 1
        batch = {"items": [{"image_base64": base64.b64encode(photos["coffee"]).decode()}]}
        assert (await client.post("/v1/jobs", json=batch)).status_code == 429
        # sampled every 5 s
        await wait_for_metric(client, metric, "rembg_jobs_backlog", 2)
        assert await metric(client, "rembg_jobs_oldest_age_seconds") > 0


async def test_redis_outage_keeps_the_sync_path_and_jobs_resume(
    app_factory: Callable[..., Any],
    redis_server: RedisServer,
    photos: dict[str, bytes],
    metric: Metric,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with jobs_app(app_factory, redis_server) as client:
        before = await submit(client, photos["chelsea"])
        assert (await wait_for_state(client, before))["state"] == "done"

        with caplog.at_level(logging.WARNING, logger="rembg_server.jobs"):
            redis_server.kill()
            refused = await client.post("/v1/jobs", content=photos["chelsea"])
            assert refused.status_code == 503
            assert int(refused.headers["retry-after"]) >= 1
            assert "job store unavailable" in refused.json()["detail"]
            assert (await client.get(f"/v1/jobs/{before}")).status_code == 503
            assert (await client.post("/v1/remove", content=photos["coffee"])).status_code == 200
            assert (await client.get("/readyz")).status_code == 200
            await wait_for_metric(client, metric, "rembg_jobs_redis_up", 0)
            for _ in range(3):  # more failing calls, from the API and the workers alike
                assert (await client.post("/v1/jobs", content=photos["coffee"])).status_code == 503
            outage_lines = [r for r in caplog.records if r.getMessage() == "redis unreachable"]
            assert len(outage_lines) == 1

        redis_server.start()  # same data directory: the AOF brings everything back
        after: str | None = None
        for _ in range(100):
            response = await client.post("/v1/jobs", content=photos["coffee"])
            if response.status_code == 202:
                after = response.json()["id"]
                break
            await asyncio.sleep(0.1)
        assert after is not None
        assert (await wait_for_state(client, after))["state"] == "done"
        assert (await status_of(client, before))["state"] == "done"
        assert await metric(client, "rembg_jobs_redis_up") == 1


async def test_routes_answer_404_when_jobs_are_off(app_factory: Callable[..., Any]) -> None:
    async with app_factory(prepare=False) as client:
        job = "0" * 32
        for response in [
            await client.post("/v1/jobs", content=b"x"),
            await client.get(f"/v1/jobs/{job}"),
            await client.get(f"/v1/jobs/{job}/result"),
            await client.delete(f"/v1/jobs/{job}"),
        ]:
            assert response.status_code == 404
            assert "REMBG_JOBS_ENABLED" in response.json()["detail"]
        text = (await client.get("/metrics")).text
        assert "rembg_jobs_backlog" not in text
