"""REMBG_PROVIDER=openvino: provider choice, refusals, and masks against the CPU provider."""

from __future__ import annotations

import importlib.util
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rembg_server.engine import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    OPENVINO_PROVIDER,
    ModelLoadError,
    RecipeModel,
    choose_providers,
)
from skimage import data

from tests.server.test_engine import assert_batch_matches_one_by_one, load

CPU_ONLY = [CPU_PROVIDER]
WITH_OPENVINO = [CPU_PROVIDER, OPENVINO_PROVIDER]
WITH_BOTH = [CUDA_PROVIDER, CPU_PROVIDER, OPENVINO_PROVIDER]
PARITY_PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": data.astronaut,
    "chelsea": data.chelsea,
    "coffee": data.coffee,
    "rocket": data.rocket,
}


@pytest.mark.parametrize(
    ("provider", "fallback", "available", "expected"),
    [
        ("openvino", False, WITH_OPENVINO, [OPENVINO_PROVIDER]),
        ("openvino", True, CPU_ONLY, [CPU_PROVIDER]),
        ("auto", False, WITH_OPENVINO, [OPENVINO_PROVIDER]),
        ("auto", False, WITH_BOTH, [CUDA_PROVIDER, CPU_PROVIDER]),
        ("auto", False, CPU_ONLY, [CPU_PROVIDER]),
        ("cpu", False, WITH_BOTH, [CPU_PROVIDER]),
        ("cuda", False, [*WITH_OPENVINO, CUDA_PROVIDER], [CUDA_PROVIDER, CPU_PROVIDER]),
    ],
)
def test_the_provider_choice_follows_the_setting_and_what_is_installed(
    provider: str, fallback: bool, available: list[str], expected: list[str]
) -> None:
    choice = choose_providers(provider, fallback, available)
    assert choice.refusal is None
    assert choice.requested == expected


def test_openvino_without_its_package_is_refused_naming_the_extra_and_the_fallback() -> None:
    choice = choose_providers("openvino", False, CPU_ONLY)
    assert choice.requested == []
    assert choice.refusal == (
        "OpenVINO requested but the openvino package is not installed "
        "(pip install 'rembg-fleet[openvino]'); set REMBG_ALLOW_CPU_FALLBACK=true to serve on CPU"
    )


def test_cuda_without_it_is_still_refused_even_with_openvino_installed() -> None:
    refusal = choose_providers("cuda", False, WITH_OPENVINO).refusal
    assert refusal is not None
    assert refusal.startswith(f"{CUDA_PROVIDER} requested but this onnxruntime build offers")


def test_load_refuses_openvino_when_it_is_missing(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("rembg_server.engine.available_providers", lambda: CPU_ONLY)
    with pytest.raises(ModelLoadError, match=r"^u2netp: OpenVINO requested but the openvino"):
        load(model_dir, provider="openvino")


@pytest.fixture(scope="module")
def openvino_model(model_dir: Path) -> RecipeModel:
    if importlib.util.find_spec("openvino") is None:
        pytest.fail("openvino is not installed: pip install -e '.[dev]' (the openvino extra)")
    return load(model_dir, provider="openvino")


def test_openvino_masks_are_within_one_level_of_the_cpu_providers(
    model_dir: Path, openvino_model: RecipeModel
) -> None:
    assert openvino_model.provider == OPENVINO_PROVIDER
    assert openvino_model.device == "cpu"
    cpu = load(model_dir, provider="cpu")
    assert cpu.provider == CPU_PROVIDER
    for name, photo in PARITY_PHOTOS.items():
        image = Image.fromarray(photo()).convert("RGB")
        ours = np.asarray(openvino_model.predict_mask(image), np.int16)
        theirs = np.asarray(cpu.predict_mask(image), np.int16)
        assert int(np.abs(ours - theirs).max()) <= 1, name


def test_openvino_runs_micro_batches_with_the_same_masks_as_one_by_one(
    model_dir: Path, openvino_model: RecipeModel
) -> None:
    batched = load(model_dir, provider="openvino", batch=4)
    assert batched.batchable
    images = [Image.fromarray(photo()).convert("RGB") for photo in PARITY_PHOTOS.values()]
    assert_batch_matches_one_by_one(batched, openvino_model, images)


@pytest.mark.anyio
async def test_the_server_serves_on_openvino_and_labels_its_model_info_so(
    app_factory: Callable[..., Any],
    metric: Callable[..., Awaitable[float]],
    openvino_model: RecipeModel,
) -> None:
    async with app_factory(provider="openvino") as client:
        assert (await client.get("/readyz")).status_code == 200
        labels = {"model": "u2netp", "device": "cpu", "provider": OPENVINO_PROVIDER}
        assert await metric(client, "rembg_model_info", **labels) == 1
