"""Fixtures for the inference server tests: real u2netp weights, real photos, a real app."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from rembg_server.app import create_app
from rembg_server.settings import Settings
from skimage import data

from tests.server.processes import RedisServer

MODEL_DIR = Path(os.environ.get("U2NET_HOME", "~/.u2net")).expanduser()
BROKEN_MODEL_SCRIPT = Path(__file__).parents[2] / "e2e" / "images" / "broken_model.py"
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "coffee": data.coffee,
    "chelsea": data.chelsea,
    "immunohistochemistry": data.immunohistochemistry,
}


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert("RGB").save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "u2netp.onnx").is_file():
        pytest.fail(f"{MODEL_DIR}/u2netp.onnx is missing: run `make model` first")
    return MODEL_DIR


@dataclass(frozen=True)
class BrokenModel:
    """e2e/images/broken_model.py's u2netp.onnx, written by its CLI, and the digest it printed."""

    model_dir: Path
    digest: str


@pytest.fixture
def broken_model(tmp_path: Path) -> BrokenModel:
    directory = tmp_path / "broken-model"
    result = subprocess.run(
        [sys.executable, str(BROKEN_MODEL_SCRIPT), str(directory)],
        capture_output=True,
        text=True,
        check=True,
    )
    return BrokenModel(directory, result.stdout.strip())


@pytest.fixture(scope="session")
def photos() -> dict[str, bytes]:
    """Real photos from scikit-image's wheel, as JPEG bytes."""
    return {name: jpeg(load()) for name, load in PHOTOS.items()}


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    """Test settings; the canary is off unless a test turns it on (its background runs would
    race the tests that gate the model or count its calls)."""
    values: dict[str, Any] = {
        "model_dir": model_dir,
        "warmup_runs": 1,
        "log_format": "text",
        "canary_interval_seconds": 0,
    }
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def running_app(
    settings: Settings, *, prepare: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """A real app inside its lifespan; with `prepare`, models loaded and warmed up first.

    The client's `.app` attribute is the FastAPI app, for tests that reach the service.
    """
    app = create_app(settings, CollectorRegistry(), autostart=False)
    async with app.router.lifespan_context(app):
        if prepare:
            await app.state.service.prepare()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://server") as client:
            client.app = app  # type: ignore[attr-defined]
            yield client


@pytest.fixture(scope="module")
async def client(model_dir: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(make_settings(model_dir)) as test_client:
        yield test_client


@pytest.fixture
def app_factory(model_dir: Path) -> Callable[..., Any]:
    def factory(prepare: bool = True, **overrides: Any) -> Any:
        directory = overrides.pop("model_dir", model_dir)
        return running_app(make_settings(directory, **overrides), prepare=prepare)

    return factory


@pytest.fixture
def metric() -> Callable[..., Awaitable[float]]:
    return metric_value


async def metric_value(client: httpx.AsyncClient, name: str, **labels: str) -> float:
    """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
    text = (await client.get("/metrics")).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def decode_png(body: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(body))
    image.load()
    return image


def mean_abs_diff(a: Image.Image, b: Image.Image) -> float:
    return float(np.mean(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) / 255


@pytest.fixture
def png() -> Callable[[bytes], Image.Image]:
    return decode_png


@pytest.fixture
def alpha_diff() -> Callable[[Image.Image, Image.Image], float]:
    return mean_abs_diff


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh, durable redis-server per test (AOF, fsync on every write)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()
