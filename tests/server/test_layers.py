"""The server's layers, each driven alone, without HTTP: the model registry, the image
pipeline over a registry, and the dataplane over both."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from rembg_server.app import create_app
from rembg_server.dataplane import DataPlane
from rembg_server.errors import RequestRejectedError
from rembg_server.imaging import Composition, decode, disable_pillow_pixel_guard
from rembg_server.metrics import ServerMetrics
from rembg_server.params import RemoveParams
from rembg_server.pipeline import CPU_STAGES, ImagePipeline, Timings
from rembg_server.registry import ModelRegistry

from tests.server.conftest import make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
async def registry(model_dir: Path) -> AsyncIterator[ModelRegistry]:
    models = ModelRegistry(make_settings(model_dir), ServerMetrics(CollectorRegistry()))
    await models.load_all()
    yield models
    await models.stop()


async def test_the_registry_records_a_model_it_cannot_load_and_serves_the_others(
    tmp_path: Path, model_dir: Path
) -> None:
    (tmp_path / "u2netp.onnx").write_bytes((model_dir / "u2netp.onnx").read_bytes())
    (tmp_path / "u2netp-int8.onnx").write_bytes(b"never gated")
    settings = make_settings(tmp_path, models=["u2netp", "u2net", "u2netp-int8"])
    models = ModelRegistry(settings, ServerMetrics(CollectorRegistry()))
    await models.load_all()
    try:
        assert models.names() == ["u2netp"]
        assert "u2net" not in models
        missing, ungated = models.not_servable()
        assert missing.startswith("u2net: not servable: u2net:"), missing
        assert "u2netp-int8.gate.json: missing (the model never passed its quality gate)" in (
            ungated
        ), ungated
        assert models.liveness() == (True, [])
        assert models.device_of("u2netp") == "cpu"
    finally:
        await models.stop()


async def test_the_pipeline_cuts_out_a_photo_and_times_every_stage(
    registry: ModelRegistry, photos: dict[str, bytes]
) -> None:
    pipeline = ImagePipeline(registry.settings, registry, lambda: 3)
    try:
        timings = Timings()
        image = await pipeline.decode(photos["coffee"], timings)
        cutout = await pipeline.cutout("u2netp", image, Composition(), timings, deadline=None)
        body = await pipeline.encode(cutout, "png", timings)
    finally:
        pipeline.close()
    decoded = Image.open(io.BytesIO(body))
    assert (decoded.mode, decoded.size) == ("RGBA", image.size)
    assert set(timings.cpu) == set(CPU_STAGES)
    assert timings.inference > 0
    assert all(seconds > 0 for seconds in timings.wall().values() if seconds != timings.queue)


async def test_the_pipeline_refuses_a_corrupt_body_and_a_passed_deadline(
    registry: ModelRegistry, photos: dict[str, bytes]
) -> None:
    pipeline = ImagePipeline(registry.settings, registry, lambda: 7)
    try:
        with pytest.raises(RequestRejectedError) as corrupt:
            await pipeline.decode(photos["coffee"][:2000], Timings())
        assert corrupt.value.status == 400
        image = decode(photos["coffee"], 10**8)
        # Two images ahead of it keep the one worker busy, so the late one is still queued.
        ahead = [
            asyncio.ensure_future(pipeline.mask("u2netp", image, Timings(), None)) for _ in range(2)
        ]
        await asyncio.sleep(0.05)
        with pytest.raises(RequestRejectedError) as late:
            await pipeline.mask("u2netp", image, Timings(), deadline=time.monotonic() - 1)
        await asyncio.gather(*ahead)
    finally:
        pipeline.close()
    assert (late.value.status, late.value.headers) == (503, {"Retry-After": "7"})


async def test_the_dataplane_gates_admits_and_serves_without_http(
    model_dir: Path, photos: dict[str, bytes]
) -> None:
    disable_pillow_pixel_guard()
    plane = DataPlane(
        make_settings(model_dir, queue_max_requests=1), ServerMetrics(CollectorRegistry())
    )
    request = plane.request_for(photos["chelsea"], RemoveParams())
    try:
        assert plane.readiness() == (False, ["loading models"])
        with pytest.raises(RequestRejectedError) as early:
            await plane.remove(request, time.monotonic() + 30)
        assert early.value.status == 503
        await plane.prepare()
        assert plane.readiness() == (True, [])
        first = asyncio.ensure_future(plane.remove(request, time.monotonic() + 30))
        await asyncio.sleep(0.05)  # admitted: the one slot is taken
        with pytest.raises(RequestRejectedError) as full:
            await plane.remove(request, time.monotonic() + 30)
        assert full.value.status == 429
        result = await first
        assert result.media_type == "image/png"
        alpha = np.asarray(Image.open(io.BytesIO(result.body)))[:, :, 3]
        assert alpha.min() == 0
        assert alpha.max() == 255
    finally:
        await plane.close()
    assert plane.readiness()[1] == ["draining: shutting down"]


async def test_an_app_serves_again_after_its_lifespan_ends_and_restarts(
    model_dir: Path, photos: dict[str, bytes], tmp_path: Path
) -> None:
    """Each lifespan gets its own dataplane (the last one's pool and workers are closed);
    an unreadable warmup folder is skipped with a warning, not a stuck prepare()."""
    settings = make_settings(model_dir, warmup_dir=tmp_path / "absent")
    app = create_app(settings, CollectorRegistry(), autostart=False)
    for _ in range(2):
        async with app.router.lifespan_context(app):
            await app.state.service.prepare()
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://s") as client:
                assert (await client.get("/readyz")).status_code == 200
                response = await client.post("/v1/remove", content=photos["coffee"])
                assert response.status_code == 200, response.text
