"""Readiness, liveness, model verification, provider checks, overload and deadlines."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from rembg_server.admission import AdmissionBudget
from rembg_server.cache import ResultCache
from rembg_server.dataplane import DataPlane
from rembg_server.engine import Heartbeat

pytestmark = pytest.mark.anyio
Metric = Callable[..., Awaitable[float]]


async def test_not_ready_before_warmup_then_ready_then_draining_but_still_serving(
    app_factory: Callable[..., Any], metric: Metric, photos: dict[str, bytes]
) -> None:
    async with app_factory(prepare=False) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["loading models"]
        assert (await client.get("/livez")).status_code == 200
        assert await metric(client, "rembg_ready", model="u2netp") == 0

        await service_of(client).prepare()
        assert (await client.get("/readyz")).status_code == 200
        assert await metric(client, "rembg_ready", model="u2netp", device="cpu") == 1
        assert await metric(client, "rembg_warmup_seconds", model="u2netp") > 0

        service_of(client).begin_drain()
        response = await client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["reasons"] == ["draining: shutting down"]
        assert await metric(client, "rembg_ready", model="u2netp") == 0
        # Requests routed here before the endpoint removal propagated are still served.
        assert (await client.post("/v1/remove", content=photos["coffee"])).status_code == 200


async def test_removal_before_ready_is_503_with_retry_after(
    app_factory: Callable[..., Any], photos: dict[str, bytes]
) -> None:
    async with app_factory(prepare=False) as client:
        response = await client.post("/v1/remove", content=photos["coffee"])
        assert response.status_code == 503
        assert response.headers["retry-after"] == "5"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda path: path.unlink(), "missing"),
        (lambda path: path.write_bytes(path.read_bytes()[:-1000]), "corrupt or wrong file"),
    ],
    ids=["missing", "truncated"],
)
async def test_missing_or_corrupt_model_file_keeps_the_server_unready(
    app_factory: Callable[..., Any],
    model_dir: Path,
    tmp_path: Path,
    photos: dict[str, bytes],
    damage: Callable[[Path], Any],
    reason: str,
) -> None:
    copy = tmp_path / "u2netp.onnx"
    shutil.copy(model_dir / "u2netp.onnx", copy)
    damage(copy)
    async with app_factory(model_dir=tmp_path) as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        [message] = response.json()["reasons"]
        assert str(copy) in message
        assert reason in message
        assert (await client.post("/v1/remove", content=photos["coffee"])).status_code == 503
        assert (await client.get("/livez")).status_code == 200


async def test_cuda_requested_on_a_cpu_build_is_refused_not_silently_cpu(
    app_factory: Callable[..., Any], metric: Metric
) -> None:
    async with app_factory(provider="cuda") as client:
        response = await client.get("/readyz")
        assert response.status_code == 503
        [message] = response.json()["reasons"]
        assert "CUDAExecutionProvider requested" in message
        assert "REMBG_ALLOW_CPU_FALLBACK" in message
        assert await metric(client, "rembg_ready", model="u2netp", device="cuda") == 0
        assert await metric(client, "rembg_model_info", model="u2netp") == 0


async def test_cuda_with_cpu_fallback_allowed_serves_and_says_so(
    app_factory: Callable[..., Any], metric: Metric
) -> None:
    async with app_factory(provider="cuda", allow_cpu_fallback=True, warmup_runs=0) as client:
        assert (await client.get("/readyz")).status_code == 200
        info = await metric(
            client,
            "rembg_model_info",
            model="u2netp",
            device="cpu",
            provider="CPUExecutionProvider",
        )
        assert info == 1


class GatedModel:
    """Wraps the real model; infer() blocks until the test opens the gate (a wedged worker)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.gate = threading.Event()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.gate.wait(timeout=30)
        result: np.ndarray = self._model.infer(batch)
        return result


def service_of(client: httpx.AsyncClient) -> DataPlane:
    service: DataPlane = client.app.state.service  # type: ignore[attr-defined]
    return service


def gate_model(client: httpx.AsyncClient) -> GatedModel:
    """Gate the (single) inference worker of u2netp; the tests run with one worker."""
    [worker] = service_of(client).registry["u2netp"].workers
    gated = GatedModel(worker.model)
    worker.model = gated
    return gated


async def wait_until(predicate: Callable[[], Awaitable[bool]], attempts: int = 200) -> None:
    """Poll a condition a bounded number of times (not a timing assertion)."""
    for _ in range(attempts):
        if await predicate():
            return
        await asyncio.sleep(0.05)
    pytest.fail("condition never became true")


async def test_wedged_inference_worker_fails_livez(
    app_factory: Callable[..., Any], photos: dict[str, bytes]
) -> None:
    async with app_factory(
        liveness_stall_seconds=0.2, warmup_runs=0, inference_workers=1
    ) as client:
        gated = gate_model(client)
        request = asyncio.create_task(client.post("/v1/remove", content=photos["coffee"]))

        async def livez_fails() -> bool:
            response = await client.get("/livez")
            return bool(response.status_code == 503)

        await wait_until(livez_fails)
        assert (
            "inference worker 0 dead or stuck" in (await client.get("/livez")).json()["reasons"][0]
        )
        gated.gate.set()
        assert (await request).status_code == 200
        assert (await client.get("/livez")).status_code == 200


async def test_burst_over_the_queue_is_shed_with_429_and_retry_after(
    app_factory: Callable[..., Any], photos: dict[str, bytes], metric: Metric
) -> None:
    async with app_factory(queue_max_requests=3, warmup_runs=0, inference_workers=1) as client:
        gated = gate_model(client)
        first = [
            asyncio.create_task(client.post("/v1/remove", content=photos["chelsea"]))
            for _ in range(3)
        ]
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        burst = await asyncio.gather(
            *(client.post("/v1/remove", content=photos["chelsea"]) for _ in range(8))
        )
        assert [r.status_code for r in burst] == [429] * 8
        assert all(int(r.headers["retry-after"]) >= 1 for r in burst)
        assert await metric(client, "rembg_pending_requests", model="u2netp") == 3
        gated.gate.set()
        assert [(await task).status_code for task in first] == [200] * 3
        assert await metric(client, "rembg_pending_requests", model="u2netp") == 0
        assert await metric(client, "rembg_requests_total", code="429") == 8
        assert (await client.post("/v1/remove", content=photos["chelsea"])).status_code == 200


async def test_megapixel_budget_sheds_big_images_first(
    app_factory: Callable[..., Any], photos: dict[str, bytes]
) -> None:
    # astronaut is 0.26 MP: two fit in 0.6 MP of queue, a third does not.
    async with app_factory(
        queue_max_megapixels=0.6, max_pixels=300_000, warmup_runs=0, inference_workers=1
    ) as client:
        gated = gate_model(client)
        first = [
            asyncio.create_task(client.post("/v1/remove", content=photos["astronaut"]))
            for _ in range(2)
        ]
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        await wait_until(
            lambda: asyncio.to_thread(
                lambda: service_of(client).budget.pending[0] == 2  # both admitted
            )
        )
        third = await client.post("/v1/remove", content=photos["astronaut"])
        assert third.status_code == 429
        assert "megapixels pending" in third.json()["detail"]
        gated.gate.set()
        assert [(await task).status_code for task in first] == [200, 200]


async def test_deadline_passed_while_queued_is_503_and_during_inference_504(
    app_factory: Callable[..., Any], photos: dict[str, bytes], metric: Metric
) -> None:
    async with app_factory(
        request_timeout_seconds=0.5, warmup_runs=0, inference_workers=1
    ) as client:
        gated = gate_model(client)
        running, queued = await asyncio.gather(
            client.post("/v1/remove", content=photos["coffee"]),
            client.post("/v1/remove", content=photos["chelsea"]),
        )
        statuses = sorted([running.status_code, queued.status_code])
        assert statuses == [503, 504]
        shed = running if running.status_code == 503 else queued
        assert "while queued" in shed.json()["detail"]
        assert int(shed.headers["retry-after"]) >= 1
        batches_before = await metric(client, "rembg_batch_size_count", model="u2netp")
        gated.gate.set()
        served = service_of(client).registry["u2netp"]
        await wait_until(lambda: asyncio.to_thread(served.idle))
        # Only the stuck call ran; the job abandoned in the queue was skipped.
        assert await metric(client, "rembg_batch_size_count", model="u2netp") == batches_before + 1


async def test_result_cache_serves_repeats_without_inference(
    app_factory: Callable[..., Any], photos: dict[str, bytes], metric: Metric
) -> None:
    async with app_factory(cache_max_bytes=10_000_000, warmup_runs=0) as client:
        first = await client.post("/v1/remove", content=photos["coffee"])
        batches = await metric(client, "rembg_batch_size_count", model="u2netp")
        second = await client.post("/v1/remove", content=photos["coffee"])
        other_options = await client.post(
            "/v1/remove", content=photos["coffee"], params={"only_mask": "1"}
        )
        assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
        assert second.content == first.content
        assert other_options.headers["x-cache"] == "miss"
        assert await metric(client, "rembg_batch_size_count", model="u2netp") == batches + 1


# --- pure parts --------------------------------------------------------------------------------


def test_result_cache_stays_within_its_byte_budget() -> None:
    cache = ResultCache(max_bytes=100)
    for index in range(10):
        cache.put(f"k{index}", bytes(30))
    assert cache.size_bytes <= 100
    assert cache.get("k9") is not None
    assert cache.get("k0") is None
    cache.put("huge", bytes(101))
    assert cache.get("huge") is None


def test_admission_budget_counts_requests_and_megapixels() -> None:
    budget = AdmissionBudget(max_requests=3, max_megapixels=5.0)
    first = budget.try_acquire(4.0)
    assert first is not None
    assert budget.try_acquire(2.0) is None  # would exceed 5 MP
    small = budget.try_acquire(1.0)
    assert small is not None
    assert budget.try_acquire(0.0) is not None
    assert budget.try_acquire(0.0) is None  # 3 requests
    budget.release(first, seconds=2.0)
    assert budget.pending == (2, 1.0)
    assert budget.retry_after_seconds() >= 1


def test_an_image_bigger_than_the_whole_budget_is_admitted_alone() -> None:
    budget = AdmissionBudget(max_requests=3, max_megapixels=1.0)
    ticket = budget.try_acquire(1.5)
    assert ticket is not None
    assert budget.try_acquire(0.1) is None


def test_heartbeat_reports_a_call_stuck_past_the_limit() -> None:
    now = [100.0]
    heartbeat = Heartbeat(stall_seconds=5, clock=lambda: now[0])
    assert not heartbeat.wedged()
    heartbeat.enter()
    now[0] += 4
    assert not heartbeat.wedged()
    now[0] += 2
    assert heartbeat.wedged()
    heartbeat.leave()
    assert not heartbeat.wedged()


async def test_warmup_uses_the_user_images_and_skips_unreadable_ones(
    app_factory: Callable[..., Any], photos: dict[str, bytes], tmp_path: Path, metric: Metric
) -> None:
    (tmp_path / "cat.jpg").write_bytes(photos["chelsea"])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    async with app_factory(warmup_dir=tmp_path, warmup_runs=1) as client:
        assert (await client.get("/readyz")).status_code == 200
        # one synthetic image and the cat, once each
        assert await metric(client, "rembg_batch_size_count", model="u2netp") == 2
