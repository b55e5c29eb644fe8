"""The job path across real processes: two `python -m rembg_server` sharing one real Redis.

What a fleet does to a job queue: many replicas taking from one stream, a replica killed with
SIGKILL while it holds jobs, Redis itself restarted. Every job acknowledged with 202 must end
`done`, exactly once where nothing failed.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from PIL import Image

from tests.server.processes import RedisServer, ServerProcess, start_server, wait_for

pytestmark = pytest.mark.slow

PREFIX = "rembg:test"
STREAM = f"{PREFIX}:jobs"
GROUP = "workers"
VISIBILITY_TIMEOUT = "3"
TERMINAL = ("done", "failed", "cancelled")


def tiny_photos(count: int) -> list[bytes]:
    """Distinct small PNGs (a disc on a gradient, varying by index): cheap to decode, and
    u2netp's cost is per image anyway (it always runs at 320x320)."""
    images = []
    ys, xs = np.mgrid[0:96, 0:128]
    for index in range(count):
        radius = 20 + index % 20
        disc = (xs - 64 - index % 30) ** 2 + (ys - 48) ** 2 < radius**2
        pixels = np.zeros((96, 128, 3), np.uint8)
        pixels[..., 0] = (xs * 2 + index) % 256
        pixels[..., 1] = ys * 2
        pixels[disc] = (240, 200 - index % 100, 40)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def job_env(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "REMBG_JOBS_ENABLED": "true",
        "REMBG_JOBS_REDIS_ADDRESS": redis_server.address,
        "REMBG_JOBS_KEY_PREFIX": PREFIX,
        "REMBG_JOBS_VISIBILITY_TIMEOUT_SECONDS": VISIBILITY_TIMEOUT,
        **extra,
    }


def submit_batch(server: ServerProcess, images: list[bytes]) -> list[str]:
    items = [
        {"image_base64": base64.b64encode(image).decode(), "ref": f"item-{index}"}
        for index, image in enumerate(images)
    ]
    response = httpx.post(f"{server.url}/v1/jobs", json={"items": items}, timeout=120)
    assert response.status_code == 202, response.text
    jobs = response.json()["jobs"]
    assert [job["ref"] for job in jobs] == [f"item-{i}" for i in range(len(images))]
    assert {job["state"] for job in jobs} == {"queued"}
    return [job["id"] for job in jobs]


def statuses(servers: list[ServerProcess], ids: list[str]) -> dict[str, dict[str, Any]] | None:
    """Every job's status, asked round-robin of the servers: any replica answers for any job.

    None while a replica answers 503 (its Redis connection is coming back)."""
    found = {}
    with httpx.Client(timeout=30) as client:
        for index, job_id in enumerate(ids):
            server = servers[index % len(servers)]
            response = client.get(f"{server.url}/v1/jobs/{job_id}")
            if response.status_code == 503:
                return None
            assert response.status_code == 200, response.text
            found[job_id] = response.json()
    return found


def wait_all_done(
    servers: list[ServerProcess], ids: list[str], attempts: int = 3000
) -> dict[str, dict[str, Any]]:
    latest: dict[str, dict[str, Any]] = {}

    def finished() -> bool:
        nonlocal latest
        found = statuses(servers, ids)
        if found is None:
            return False
        latest = found
        return all(status["state"] in TERMINAL for status in latest.values())

    wait_for(finished, attempts=attempts, what=f"{len(ids)} jobs finishing")
    failed = {job_id: s for job_id, s in latest.items() if s["state"] != "done"}
    assert not failed, f"jobs that did not end done: {failed}"
    return latest


def fetch_result(server: ServerProcess, job_id: str) -> Image.Image:
    response = httpx.get(f"{server.url}/v1/jobs/{job_id}/result", timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(response.content))
    image.load()
    return image


def consumers(client: redis.Redis) -> set[str]:
    return {entry["name"].decode() for entry in client.xinfo_consumers(STREAM, GROUP)}


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    host, port = redis_server.address.split(":")
    client = redis.Redis(host=host, port=int(port))
    yield client
    client.close()


@pytest.fixture
def servers(
    model_dir: Path, tmp_path: Path, redis_server: RedisServer
) -> Iterator[list[ServerProcess]]:
    """Two replicas, one CPU each (this machine has two), sharing one Redis."""
    env = job_env(redis_server, REMBG_INFERENCE_WORKERS="1", REMBG_THREADS="1")
    running = [start_server(model_dir, tmp_path, **env) for _ in range(2)]
    yield running
    for server in running:
        server.stop()


def test_a_200_image_batch_over_two_replicas_is_processed_exactly_once(
    servers: list[ServerProcess], redis_client: redis.Redis
) -> None:
    images = tiny_photos(200)
    ids = submit_batch(servers[0], images)
    assert len(set(ids)) == 200

    final = wait_all_done(servers, ids)

    assert {status["attempts"] for status in final.values()} == {1}
    done_by = [s.metric("rembg_jobs_finished_total", state="done") for s in servers]
    assert sum(done_by) == 200, f"done per replica {done_by}: a job ran twice or not at all"
    assert min(done_by) > 0, f"done per replica {done_by}: one replica took every job"
    for index in (0, 57, 199):  # results are real cutouts of their own input
        cutout = fetch_result(servers[index % 2], ids[index])
        assert cutout.size == (128, 96)
        assert cutout.mode == "RGBA"
    assert redis_client.xlen(STREAM) == 0  # nothing left behind in the stream
    wait_for(lambda: all(s.metric("rembg_jobs_backlog") == 0 for s in servers), what="backlog 0")


def test_a_replica_killed_mid_job_loses_nothing(
    servers: list[ServerProcess], redis_client: redis.Redis
) -> None:
    survivor, victim = servers
    ids = submit_batch(victim, tiny_photos(30))
    # Consumer names carry the process id: "<host>-<pid>-<nonce>-<worker>".
    victim_mark = f"-{victim.process.pid}-"

    def victims_claims() -> list[bytes]:
        pending = redis_client.xpending_range(STREAM, GROUP, "-", "+", 100)
        return [e["message_id"] for e in pending if victim_mark in e["consumer"].decode()]

    wait_for(lambda: bool(victims_claims()), what="the victim claiming a job")
    victim.kill()
    orphaned = {
        fields[b"id"].decode()
        for message_id in victims_claims()
        for _, fields in redis_client.xrange(STREAM, message_id, message_id)
    }
    assert orphaned, "the victim finished its jobs before it was killed"

    final = wait_all_done([survivor], ids)

    # Each orphan was taken over by the survivor once its claim went silent. Its attempt count
    # is 2, or 1 when the victim died between reading the entry and starting the job.
    for job_id in orphaned:
        assert final[job_id]["attempts"] in (1, 2), final[job_id]
    retries = survivor.metric("rembg_jobs_retries_total", reason="visibility_timeout")
    assert retries >= len(orphaned)
    assert redis_client.xlen(STREAM) == 0


def test_redis_restarted_mid_run_loses_no_acknowledged_job(
    servers: list[ServerProcess], redis_server: RedisServer
) -> None:
    ids = submit_batch(servers[0], tiny_photos(40))

    def one_done() -> bool:
        found = statuses(servers, ids)
        return found is not None and any(s["state"] == "done" for s in found.values())

    wait_for(one_done, what="the first job finishing")

    redis_server.kill()  # SIGKILL: only what the append-only file holds survives
    refused = httpx.post(f"{servers[1].url}/v1/jobs", content=tiny_photos(1)[0], timeout=30)
    assert refused.status_code == 503, refused.text
    assert "retry-after" in refused.headers
    wait_for(
        lambda: all(s.metric("rembg_jobs_redis_up") == 0 for s in servers),
        what="both replicas noticing Redis is down",
    )
    sync = httpx.post(f"{servers[1].url}/v1/remove", content=tiny_photos(1)[0], timeout=60)
    assert sync.status_code == 200  # the synchronous path does not depend on Redis
    redis_server.start()

    wait_all_done(servers, ids)
    for index in (0, 39):
        assert fetch_result(servers[1], ids[index]).size == (128, 96)
    wait_for(lambda: all(s.metric("rembg_jobs_redis_up") == 1 for s in servers), what="redis up")
