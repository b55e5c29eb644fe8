"""The inference canary: the server checks, in the background, that its models still cut out.

`/livez` and `/readyz` say the process answers and the models loaded; this says inference
works. Right after the start-up warmup, then every REMBG_CANARY_INTERVAL_SECONDS, each loaded
model cuts out a photo shipped with the package through the serving path itself
(`DataPlane.probe_removal`: the same decode, sessions, queue, compose and PNG encoder as a
request), and the output is judged: it decodes, it has an alpha channel, and its mask (alpha
thresholded at 0.5) overlaps the known mask with an IoU of at least REMBG_CANARY_MIN_IOU.
Runs are sequential (one model after the other, never two runs at once), each model's bounded
by REMBG_CANARY_TIMEOUT_SECONDS; they take no admission ticket (never a 429 for anyone) and
count in no request metric. A failure is logged once when it starts (or its reason changes),
the recovery once; with REMBG_CANARY_UNREADY_AFTER_FAILURES=N > 0, N failures in a row turn
`/readyz` to 503 until the next pass, and readiness waits for the first verdict.

The pure parts (`iou`, `judge`, `CanaryTrack`) need no model; `Canary` wires them to a service.

The shipped photo and mask (canary_images/): scikit-image 0.26's `data.coffee()` (CC0 by the
photographer, Rachel Michetti; courtesy of Pikolo Espresso Bar), 600x400 thumbnailed to 320x213
with LANCZOS, JPEG quality 90 (24 KB): one clear subject, cup and saucer, on about half of the
frame. The mask is the consensus of the fp32 models available where it was made; only u2netp
was (models are never downloaded), so it is u2netp's soft masks on four views of the photo (the
JPEG, the lossless thumbnail, the 600x400 original, the mirror image, mirrored back) averaged
and thresholded at 0.5, stored as a 1-bit PNG. tests/server/canary_reference.py regenerates
both. Measured IoUs against it: u2netp fp32 0.998-0.999 on every view, thread count and batch
layout (fp16-rounded weights too); an all-foreground mask 0.48, an empty or inverted one 0,
int8-quantised u2netp 0.48, u2netp fed BGR 0.48, the mask upside down 0.84, 5% noise on every
weight 0.81. Hence the default threshold 0.9. Other models were not measured here: one that
draws the subject differently may need a lower REMBG_CANARY_MIN_IOU.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Literal

import numpy as np
from PIL import Image

from rembg_server.dataplane import DataPlane
from rembg_server.metrics import CanaryMetrics

log = logging.getLogger("rembg_server.canary")

IMAGE_NAME = "coffee.jpg"
MASK_NAME = "coffee_mask.png"
ALPHA_THRESHOLD = 128  # alpha >= 0.5
Reason = Literal["iou", "decode", "no_alpha", "timeout", "error"]
REASONS: tuple[Reason, ...] = ("iou", "decode", "no_alpha", "timeout", "error")
Transition = Literal["passing", "failing", "recovered"]


@dataclass(frozen=True)
class Reference:
    """The image the canary sends (encoded bytes) and its known mask (bool, height x width)."""

    image: bytes
    mask: np.ndarray


def load_reference() -> Reference:
    folder = resources.files("rembg_server") / "canary_images"
    with Image.open(io.BytesIO((folder / MASK_NAME).read_bytes())) as mask:
        known = np.asarray(mask.convert("L")) >= ALPHA_THRESHOLD
    return Reference((folder / IMAGE_NAME).read_bytes(), known)


def iou(produced: np.ndarray, expected: np.ndarray) -> float:
    """Intersection over union of two boolean masks of one shape; 1.0 when both are empty."""
    union = int(np.logical_or(produced, expected).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(produced, expected).sum()) / union


@dataclass(frozen=True)
class Verdict:
    """One model's canary result: passed when `reason` is None."""

    reason: Reason | None = None
    iou: float | None = None
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.reason is None


def judge(body: bytes, expected: np.ndarray, min_iou: float) -> Verdict:
    """The served PNG against the known mask: decodes, has alpha, IoU >= min_iou."""
    try:
        with Image.open(io.BytesIO(body), formats=("PNG",)) as opened:
            opened.load()
            mode = opened.mode
            alpha = np.asarray(opened.getchannel("A")) if "A" in opened.getbands() else None
    except (OSError, ValueError, SyntaxError) as error:  # UnidentifiedImageError is an OSError
        return Verdict("decode", detail=f"the output does not decode as PNG: {error}")
    if alpha is None:
        return Verdict("no_alpha", detail=f"the output has no alpha channel (mode {mode})")
    if alpha.shape != expected.shape:
        height, width = alpha.shape
        return Verdict("decode", detail=f"the output is {width}x{height}, not the input's size")
    score = iou(alpha >= ALPHA_THRESHOLD, expected)
    if score < min_iou:
        return Verdict("iou", score, f"mask IoU {score:.3f} below {min_iou}")
    return Verdict(None, score)


@dataclass
class CanaryTrack:
    """One model's verdicts so far: the consecutive failures and what is worth a log line."""

    failures: int = 0
    last: Verdict | None = None

    def record(self, verdict: Verdict) -> Transition | None:
        """Count `verdict`; the transition it makes (logged once), None when nothing changed.

        A failure whose reason differs from the previous failure's is a new transition."""
        previous, self.last = self.last, verdict
        self.failures = 0 if verdict.passed else self.failures + 1
        if verdict.passed:
            if previous is None:
                return "passing"
            return None if previous.passed else "recovered"
        if previous is None or previous.passed or previous.reason != verdict.reason:
            return "failing"
        return None

    def unready(self, after_failures: int) -> bool:
        return after_failures > 0 and self.failures >= after_failures


def health_check(model: str) -> str:
    """The name under which the canary withholds a model's readiness."""
    return f"canary:{model}"


class Canary:
    """Runs the checks in the background on the service's own path; see the module doc."""

    def __init__(
        self,
        service: DataPlane,
        metrics: CanaryMetrics,
        reference: Reference | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.settings = service.settings
        self.metrics = metrics
        self.reference = reference if reference is not None else load_reference()
        self.tracks = {name: CanaryTrack() for name in self.settings.models}
        self._clock = clock
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        for name in self.settings.models:
            metrics.declare(name)

    def start(self) -> None:
        """Start the loop; call it before the service turns ready, so that a readiness that
        depends on the canary waits for the first verdict instead of flashing ready."""
        if self.settings.canary_unready_after_failures:
            for name in self.settings.models:
                waiting = f"{name}: waiting for the first inference canary run"
                self.service.set_health(health_check(name), waiting)
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="canary")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        await self.service.wait_prepared()
        for name in self.settings.models:
            if name not in self.service.registry:  # not servable: readiness already says why
                self.service.set_health(health_check(name), None)
        while True:
            await self.run_once()
            await asyncio.sleep(self.settings.canary_interval_seconds)

    async def run_once(self) -> dict[str, Verdict]:
        """Check every loaded model, one after the other; a second caller waits its turn."""
        async with self._lock:
            verdicts = {}
            for name in self.service.registry.names():
                started = time.monotonic()
                verdict = await self._verdict(name)
                self._publish(name, verdict, time.monotonic() - started)
                verdicts[name] = verdict
            return verdicts

    async def _verdict(self, name: str) -> Verdict:
        timeout = self.settings.canary_timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                body = await self.service.probe_removal(name, self.reference.image)
        except TimeoutError:
            return Verdict("timeout", detail=f"no cutout within {timeout} s")
        except Exception as error:  # whatever the model or pipeline raised is the finding
            return Verdict("error", detail=f"{type(error).__name__}: {error}")
        return judge(body, self.reference.mask, self.settings.canary_min_iou)

    def _publish(self, name: str, verdict: Verdict, seconds: float) -> None:
        metrics = self.metrics
        metrics.duration.labels(name).observe(seconds)
        metrics.success.labels(name).set(int(verdict.passed))
        metrics.iou.labels(name).set(verdict.iou or 0.0)
        if verdict.reason is None:
            metrics.last_success.labels(name).set(self._clock())
        else:
            metrics.failures.labels(name, verdict.reason).inc()
        track = self.tracks[name]
        failed_runs = track.failures
        transition = track.record(verdict)
        self._log(name, verdict, transition, failed_runs)
        after = self.settings.canary_unready_after_failures
        if after:
            problem = None
            if track.unready(after):
                problem = (
                    f"{name}: inference canary failed {track.failures} runs in a row "
                    f"({verdict.reason}: {verdict.detail})"
                )
            self.service.set_health(health_check(name), problem)

    @staticmethod
    def _log(name: str, verdict: Verdict, transition: Transition | None, failed: int) -> None:
        iou_value = None if verdict.iou is None else round(verdict.iou, 4)
        fields: dict[str, object] = {"model": name, "iou": iou_value}
        if transition == "failing":
            fields.update(reason=verdict.reason, detail=verdict.detail)
            log.warning("inference canary failing", extra={"fields": fields})
        elif transition == "recovered":
            fields.update(failed_runs=failed)
            log.info("inference canary recovered", extra={"fields": fields})
        elif transition == "passing":
            log.info("inference canary passed", extra={"fields": fields})
