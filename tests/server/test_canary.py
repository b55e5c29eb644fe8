"""The inference canary: the shipped reference, the pure checks, then a real app."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from pydantic import ValidationError
from rembg_server import canary
from rembg_server.canary import Canary, CanaryTrack, Verdict, iou, judge, load_reference
from rembg_server.engine import LoadRequest, load_model
from rembg_server.imaging import encode_png
from rembg_server.settings import Settings, describe_error

from tests.server import canary_reference
from tests.server.conftest import BROKEN_MODEL_SCRIPT, BrokenModel
from tests.server.test_lifecycle import gate_model, service_of, wait_until

pytestmark = pytest.mark.anyio
Metric = Callable[..., Awaitable[float]]
REFERENCE = load_reference()
CANARY_ON = {"canary_interval_seconds": 3600}  # the first run only, right after the warmup


# --- the shipped reference -------------------------------------------------------------------


def test_the_shipped_photo_is_small_and_its_mask_covers_the_subject() -> None:
    with Image.open(io.BytesIO(REFERENCE.image)) as image:
        assert image.format == "JPEG"
        assert max(image.size) <= 320
        assert REFERENCE.mask.shape == (image.height, image.width)
    assert len(REFERENCE.image) < 50_000
    assert 0.3 < REFERENCE.mask.mean() < 0.7  # an empty or a full mask scores far below


def test_the_shipped_mask_is_the_consensus_its_recipe_describes(model_dir: Path) -> None:
    models = [canary_reference.load(model_dir)]
    consensus = canary_reference.consensus_mask(models, REFERENCE.image)
    assert iou(consensus, REFERENCE.mask) >= 0.99
    assert canary_reference.shipped_jpeg() == REFERENCE.image


def test_the_default_threshold_leaves_a_margin_on_both_sides(model_dir: Path) -> None:
    [model] = load_model(LoadRequest("u2netp", model_dir, {}, "cpu", False, 1, 1))
    image = Image.open(io.BytesIO(REFERENCE.image)).convert("RGB")
    reached = iou(np.asarray(model.predict_mask(image)) >= 128, REFERENCE.mask)
    threshold = Settings().canary_min_iou
    assert reached >= threshold + 0.05
    assert iou(np.ones_like(REFERENCE.mask), REFERENCE.mask) <= threshold - 0.3


# --- pure checks -----------------------------------------------------------------------------


def test_iou_of_boolean_masks() -> None:
    left = np.zeros((4, 4), bool)
    left[:, :2] = True
    assert iou(left, left) == 1.0
    assert iou(left, ~left) == 0.0
    assert iou(left, np.ones((4, 4), bool)) == 0.5
    assert iou(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0


def cutout_png(alpha: np.ndarray, mode: str = "RGBA") -> bytes:
    height, width = alpha.shape
    rgba = np.zeros((height, width, 4), np.uint8)
    rgba[..., 3] = alpha
    return encode_png(Image.fromarray(rgba, "RGBA").convert(mode), 1)


def test_judge_passes_the_known_mask_and_names_each_failure() -> None:
    known = REFERENCE.mask
    alpha = np.where(known, 255, 0).astype(np.uint8)
    assert judge(cutout_png(alpha), known, 0.9) == Verdict(None, 1.0)
    # alpha is thresholded at 0.5: 128 counts as foreground, 127 does not
    assert judge(cutout_png(np.where(known, 128, 127).astype(np.uint8)), known, 0.9).passed
    empty = judge(cutout_png(np.zeros_like(alpha)), known, 0.9)
    assert (empty.reason, empty.iou) == ("iou", 0.0)
    assert "IoU 0.000 below 0.9" in empty.detail
    assert judge(cutout_png(alpha, mode="RGB"), known, 0.9).reason == "no_alpha"
    assert judge(b"not a png", known, 0.9).reason == "decode"
    assert judge(cutout_png(alpha)[:200], known, 0.9).reason == "decode"
    assert judge(cutout_png(alpha[:100]), known, 0.9).reason == "decode"


def test_a_track_reports_each_transition_once() -> None:
    track = CanaryTrack()
    passed, low, slow = Verdict(None, 0.99), Verdict("iou", 0.1), Verdict("timeout")
    assert [track.record(v) for v in (passed, passed)] == ["passing", None]
    assert [track.record(v) for v in (low, low, low)] == ["failing", None, None]
    assert track.failures == 3
    assert track.unready(3)
    assert not track.unready(4)
    assert not track.unready(0)  # 0: readiness never depends on the canary
    assert track.record(slow) == "failing"  # a new reason is a new finding
    assert track.failures == 4
    assert [track.record(v) for v in (passed, passed)] == ["recovered", None]
    assert track.failures == 0
    assert CanaryTrack().record(low) == "failing"


# --- settings --------------------------------------------------------------------------------


def test_canary_settings_defaults() -> None:
    settings = Settings()
    assert settings.canary_interval_seconds == 60
    assert settings.canary_min_iou == 0.9
    assert settings.canary_timeout_seconds == 30
    assert settings.canary_unready_after_failures == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REMBG_CANARY_INTERVAL_SECONDS", "-1"),
        ("REMBG_CANARY_MIN_IOU", "0"),
        ("REMBG_CANARY_MIN_IOU", "1.01"),
        ("REMBG_CANARY_TIMEOUT_SECONDS", "0"),
        ("REMBG_CANARY_UNREADY_AFTER_FAILURES", "-1"),
        ("REMBG_CANARY_UNREADY_AFTER_FAILURES", "1.5"),
    ],
)
def test_out_of_range_canary_settings_are_refused_by_name(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert describe_error(raised.value).startswith(f"invalid configuration: {variable}:")


def test_the_settings_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable, value in {
        "REMBG_CANARY_INTERVAL_SECONDS": "0",
        "REMBG_CANARY_MIN_IOU": "1",
        "REMBG_CANARY_TIMEOUT_SECONDS": "2.5",
        "REMBG_CANARY_UNREADY_AFTER_FAILURES": "3",
    }.items():
        monkeypatch.setenv(variable, value)
    settings = Settings()
    assert settings.canary_interval_seconds == 0
    assert settings.canary_min_iou == 1
    assert settings.canary_timeout_seconds == 2.5
    assert settings.canary_unready_after_failures == 3


# --- the broken-model fixture ----------------------------------------------------------------


def signature(session: ort.InferenceSession) -> list[tuple[str, str, list[Any]]]:
    values = [*session.get_inputs(), *session.get_outputs()]
    return [(value.name, value.type, list(value.shape)) for value in values]


def test_the_broken_model_has_u2netps_exact_interface(
    model_dir: Path, broken_model: BrokenModel
) -> None:
    path = broken_model.model_dir / "u2netp.onnx"
    assert broken_model.digest == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    real = ort.InferenceSession(str(model_dir / "u2netp.onnx"))
    broken = ort.InferenceSession(str(path))
    assert signature(broken) == signature(real)
    outputs = broken.run(None, {"input.1": np.ones((1, 3, 320, 320), np.float32)})
    assert len(outputs) == 7
    assert all(output.max() == 1 and output.sum() == 1 for output in outputs)  # one pixel


def test_the_broken_model_module_imports_and_writes_the_same_bytes(
    broken_model: BrokenModel, tmp_path: Path
) -> None:
    spec = importlib.util.spec_from_file_location("broken_model", BROKEN_MODEL_SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.write(tmp_path) == broken_model.digest  # deterministic
    assert module.main([]) == 2  # usage


# --- the canary in a real app ----------------------------------------------------------------


def canary_of(client: httpx.AsyncClient) -> Canary:
    found: Canary = client.app.state.canary  # type: ignore[attr-defined]
    return found


async def first_verdict(client: httpx.AsyncClient, model: str = "u2netp") -> Verdict:
    track = canary_of(client).tracks[model]
    await wait_until(lambda: asyncio.sleep(0, track.last is not None), attempts=600)
    assert track.last is not None
    return track.last


def canary_logs(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "rembg_server.canary" and r.levelno == level]


async def test_the_canary_passes_on_u2netp_right_after_warmup_outside_the_request_metrics(
    app_factory: Callable[..., Any], metric: Metric, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rembg_server.canary")
    started = time.time()
    async with app_factory(**CANARY_ON, canary_unready_after_failures=1) as client:
        verdict = await first_verdict(client)
        assert verdict.passed
        assert verdict.iou is not None
        assert verdict.iou >= 0.99
        assert await metric(client, "rembg_canary_success", model="u2netp") == 1
        assert await metric(client, "rembg_canary_iou", model="u2netp") == verdict.iou
        stamp = await metric(client, "rembg_canary_last_success_timestamp_seconds")
        assert started <= stamp <= time.time()
        assert await metric(client, "rembg_canary_duration_seconds_count", model="u2netp") == 1
        for reason in canary.REASONS:  # declared at zero, so increase() sees the first one
            labels = {"model": "u2netp", "reason": reason}
            assert await metric(client, "rembg_canary_failures_total", **labels) == 0
        assert (await client.get("/readyz")).status_code == 200
        # the same sessions, but no request, no admission, no batch observed
        assert await metric(client, "rembg_requests_total") == 0
        assert await metric(client, "rembg_request_duration_seconds_count") == 0
        assert await metric(client, "rembg_batch_size_count", model="u2netp") == 1  # warmup
        assert service_of(client).budget.pending == (0, 0.0)
    [passed] = canary_logs(caplog, logging.INFO)
    assert passed.getMessage() == "inference canary passed"


async def test_readiness_that_depends_on_the_canary_waits_for_its_first_verdict(
    app_factory: Callable[..., Any],
) -> None:
    async with app_factory(prepare=False, **CANARY_ON, canary_unready_after_failures=2) as client:
        response = await client.get("/readyz")
        assert response.json()["reasons"] == [
            "loading models",
            "u2netp: waiting for the first inference canary run",
        ]
        await service_of(client).prepare()
        assert (await first_verdict(client)).passed
        assert (await client.get("/readyz")).json() == {"ready": True, "reasons": []}


async def test_the_broken_model_is_refused_without_the_checksum_override(
    app_factory: Callable[..., Any], broken_model: BrokenModel
) -> None:
    async with app_factory(model_dir=broken_model.model_dir, **CANARY_ON) as client:
        [reason] = (await client.get("/readyz")).json()["reasons"]
        assert "md5 is" in reason
        assert "expected 8e83ca70" in reason
        assert canary_of(client).tracks["u2netp"].last is None  # nothing loaded, nothing run


async def test_a_broken_model_fails_the_canary_on_iou_turns_unready_and_recovers(
    app_factory: Callable[..., Any],
    metric: Metric,
    model_dir: Path,
    broken_model: BrokenModel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="rembg_server.canary")
    async with app_factory(
        model_dir=broken_model.model_dir,
        model_checksums={"u2netp": broken_model.digest},
        canary_unready_after_failures=1,
        **CANARY_ON,
    ) as client:
        verdict = await first_verdict(client)
        assert verdict.reason == "iou"
        assert verdict.iou is not None
        assert verdict.iou < 0.01
        assert await metric(client, "rembg_canary_success", model="u2netp") == 0
        assert await metric(client, "rembg_canary_iou", model="u2netp") < 0.01
        assert await metric(client, "rembg_canary_last_success_timestamp_seconds") == 0
        assert await metric(client, "rembg_canary_failures_total", reason="iou") == 1
        assert await metric(client, "rembg_canary_failures_total") == 1
        response = await client.get("/readyz")
        assert response.status_code == 503
        [reason] = response.json()["reasons"]
        assert reason.startswith("u2netp: inference canary failed 1 runs in a row (iou: mask IoU")
        assert await metric(client, "rembg_ready", model="u2netp") == 0

        await canary_of(client).run_once()
        await canary_of(client).run_once()
        assert await metric(client, "rembg_canary_failures_total", reason="iou") == 3
        assert "failed 3 runs in a row" in (await client.get("/readyz")).json()["reasons"][0]
        [warning] = canary_logs(caplog, logging.WARNING)  # once, not once per run
        assert warning.getMessage() == "inference canary failing"
        assert warning.fields["reason"] == "iou"  # type: ignore[attr-defined]
        assert warning.fields["iou"] < 0.01  # type: ignore[attr-defined]

        # The real weights in the same worker: one pass makes the server ready again.
        [worker] = service_of(client).registry["u2netp"].workers
        [worker.model] = load_model(LoadRequest("u2netp", model_dir, {}, "cpu", False, 1, 1))
        assert (await canary_of(client).run_once())["u2netp"].passed
        assert (await client.get("/readyz")).status_code == 200
        assert await metric(client, "rembg_canary_success", model="u2netp") == 1
        assert await metric(client, "rembg_ready", model="u2netp") == 1
    [recovered] = [r for r in canary_logs(caplog, logging.INFO) if "recovered" in r.getMessage()]
    fields = recovered.fields  # type: ignore[attr-defined]
    assert fields == {"model": "u2netp", "iou": pytest.approx(1, abs=0.01), "failed_runs": 3}


async def test_a_stuck_model_fails_the_canary_on_its_timeout(
    app_factory: Callable[..., Any], metric: Metric
) -> None:
    async with app_factory(
        prepare=False, **CANARY_ON, canary_timeout_seconds=3, inference_workers=1
    ) as client:
        await service_of(client).prepare()
        gated = gate_model(client)  # before the first run, which follows prepare()
        verdict = await first_verdict(client)
        assert verdict.reason == "timeout"
        assert verdict.detail == "no cutout within 3.0 s"
        assert await metric(client, "rembg_canary_failures_total", reason="timeout") == 1
        assert await metric(client, "rembg_canary_success", model="u2netp") == 0
        gated.gate.set()
        assert (await canary_of(client).run_once())["u2netp"].passed


async def test_a_canary_run_takes_no_admission_slot_and_never_overlaps_another(
    app_factory: Callable[..., Any], metric: Metric, photos: dict[str, bytes]
) -> None:
    async with app_factory(
        **CANARY_ON, queue_max_requests=1, warmup_runs=0, inference_workers=1
    ) as client:
        assert (await first_verdict(client)).passed
        gated = gate_model(client)
        served = service_of(client).registry["u2netp"]
        first = asyncio.create_task(canary_of(client).run_once())
        await wait_until(lambda: asyncio.to_thread(gated.entered.is_set))
        second = asyncio.create_task(canary_of(client).run_once())
        # The only admission slot is still free for a request while the canary infers.
        request = asyncio.create_task(client.post("/v1/remove", content=photos["coffee"]))
        await wait_until(lambda: asyncio.sleep(0, served.queue.qsize() == 1))
        await asyncio.sleep(0.3)  # ample for the second run to queue, were it running
        assert served.queue.qsize() == 1  # the request's job; the second run waits its turn
        assert service_of(client).budget.pending[0] == 1
        gated.gate.set()
        assert (await request).status_code == 200
        assert (await first)["u2netp"].passed
        assert (await second)["u2netp"].passed
        assert await metric(client, "rembg_requests_total") == 1
        assert await metric(client, "rembg_canary_duration_seconds_count") == 3
