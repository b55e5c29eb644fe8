"""The quality gate a reduced-precision model passes before the server may serve it.

A gated model (``u2netp-int8``) is compared with its fp32 source (``u2netp``) on golden
photos (rembg_server.quality_data): the full-size uint8 masks of both, as the server makes
them, are compared per image by

- IoU of the masks thresholded at 128 (both empty counts as 1.0), and
- mean |delta alpha|, the mean absolute difference of the masks, as a fraction of 255.

The gate passes when the mean IoU is at least 0.98, the worst image's IoU at least 0.95 and
the mean |delta alpha| at most 3/255. quantize.py records the numbers in a sidecar,
``<name>.gate.json``; `gated_digest` reads it back for the server and returns the digest the
gated file must have, so a model that never passed, or passed against another source, is
never loaded.

Pure apart from reading the sidecar in the directory it is given.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from rembg_server.checksums import KNOWN_DIGESTS, Digest, ModelFileError

MASK_THRESHOLD = 128
SIDECAR_SUFFIX = ".gate.json"
# gated model -> the fp32 model its masks are compared with
GATED_SOURCES: dict[str, str] = {"u2netp-int8": "u2netp"}


class GateError(ModelFileError):
    """A gated model has no passing gate record for the known source model."""


@dataclass(frozen=True)
class GateThresholds:
    min_mean_iou: float = 0.98
    min_worst_iou: float = 0.95
    max_mean_abs_diff: float = 3 / 255


@dataclass(frozen=True)
class ImageScore:
    name: str
    iou: float
    mean_abs_diff: float  # fraction of 255


@dataclass(frozen=True)
class GateResult:
    images: tuple[ImageScore, ...]
    thresholds: GateThresholds

    @property
    def mean_iou(self) -> float:
        return float(np.mean([score.iou for score in self.images]))

    @property
    def mean_abs_diff(self) -> float:
        return float(np.mean([score.mean_abs_diff for score in self.images]))

    @property
    def worst(self) -> ImageScore:
        return min(self.images, key=lambda score: score.iou)

    @property
    def failures(self) -> list[str]:
        """One sentence per threshold missed; empty when the gate passes."""
        limits = self.thresholds
        missed = []
        if self.mean_iou < limits.min_mean_iou:
            missed.append(f"mean IoU {self.mean_iou:.4f} < {limits.min_mean_iou}")
        if self.worst.iou < limits.min_worst_iou:
            missed.append(
                f"worst IoU {self.worst.iou:.4f} ({self.worst.name}) < {limits.min_worst_iou}"
            )
        if self.mean_abs_diff > limits.max_mean_abs_diff:
            missed.append(
                f"mean |delta alpha| {self.mean_abs_diff * 255:.2f}/255 > "
                f"{limits.max_mean_abs_diff * 255:.2f}/255"
            )
        return missed

    @property
    def passed(self) -> bool:
        return not self.failures


def mask_iou(reference: np.ndarray, candidate: np.ndarray) -> float:
    """IoU of two uint8 masks thresholded at 128; two empty masks agree perfectly."""
    a, b = reference >= MASK_THRESHOLD, candidate >= MASK_THRESHOLD
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(a, b).sum()) / union


def mean_abs_diff(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Mean |delta alpha| of two uint8 masks, as a fraction of 255."""
    delta = np.abs(reference.astype(np.int16) - candidate.astype(np.int16))
    return float(delta.mean()) / 255


def score_image(name: str, reference: np.ndarray, candidate: np.ndarray) -> ImageScore:
    if reference.shape != candidate.shape:
        raise ValueError(f"{name}: mask shapes differ: {reference.shape} vs {candidate.shape}")
    return ImageScore(name, mask_iou(reference, candidate), mean_abs_diff(reference, candidate))


def evaluate(
    reference: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    thresholds: GateThresholds | None = None,
) -> GateResult:
    """Score the candidate's masks against the reference's, image by image (same names)."""
    if set(reference) != set(candidate):
        raise ValueError(f"image names differ: {sorted(set(reference) ^ set(candidate))}")
    if not reference:
        raise ValueError("no images to evaluate")
    scores = tuple(score_image(name, reference[name], candidate[name]) for name in reference)
    return GateResult(scores, thresholds or GateThresholds())


def format_table(result: GateResult) -> str:
    """The per-image numbers and the aggregate, one line each."""
    lines = [f"{'image':<20} {'IoU':>7} {'|da|*255':>9}"]
    lines += [f"{s.name:<20} {s.iou:>7.4f} {s.mean_abs_diff * 255:>9.2f}" for s in result.images]
    limits = result.thresholds
    worst = result.worst
    max_diff = limits.max_mean_abs_diff * 255
    lines += [
        f"{'mean':<20} {result.mean_iou:>7.4f} {result.mean_abs_diff * 255:>9.2f}"
        f"   (gate: IoU >= {limits.min_mean_iou}, |da|*255 <= {max_diff:.2f})",
        f"{'worst':<20} {worst.iou:>7.4f} {'':>9}"
        f"   ({worst.name}; gate: >= {limits.min_worst_iou})",
        f"gate: {'PASS' if result.passed else 'FAIL: ' + '; '.join(result.failures)}",
    ]
    return "\n".join(lines)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FileRecord(_Record):
    model: str
    file: str
    digest: str


class ScoreRecord(_Record):
    name: str
    iou: float
    mean_abs_diff: float


class GateNumbers(_Record):
    thresholds: dict[str, float]
    mean_iou: float
    mean_abs_diff: float
    worst_iou: float
    worst_image: str
    images: list[ScoreRecord]


class GateRecord(_Record):
    """The sidecar `<name>.gate.json` quantize.py writes once a gated model passed."""

    schema_version: int = 1
    gated: FileRecord
    source: FileRecord
    method: dict[str, object]
    onnxruntime: str
    gate: GateNumbers
    passed: bool


def build_record(
    gated: FileRecord,
    source: FileRecord,
    method: Mapping[str, object],
    onnxruntime_version: str,
    result: GateResult,
) -> GateRecord:
    limits = result.thresholds
    numbers = GateNumbers(
        thresholds={
            "min_mean_iou": limits.min_mean_iou,
            "min_worst_iou": limits.min_worst_iou,
            "max_mean_abs_diff": limits.max_mean_abs_diff,
        },
        mean_iou=result.mean_iou,
        mean_abs_diff=result.mean_abs_diff,
        worst_iou=result.worst.iou,
        worst_image=result.worst.name,
        images=[
            ScoreRecord(name=s.name, iou=s.iou, mean_abs_diff=s.mean_abs_diff)
            for s in result.images
        ],
    )
    return GateRecord(
        gated=gated,
        source=source,
        method=dict(method),
        onnxruntime=onnxruntime_version,
        gate=numbers,
        passed=result.passed,
    )


def sidecar_path(model_dir: Path, name: str) -> Path:
    return model_dir / f"{name}{SIDECAR_SUFFIX}"


def read_record(path: Path) -> GateRecord:
    """The sidecar at `path`, parsed; GateError if it is missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as error:
        raise GateError(f"{path}: missing (the model never passed its quality gate)") from error
    except OSError as error:
        raise GateError(f"{path}: unreadable ({error.strerror})") from error
    try:
        return GateRecord.model_validate_json(text)
    except ValidationError as error:
        raise GateError(f"{path}: not a gate record ({error.error_count()} errors)") from error


def check_record(record: GateRecord, name: str, where: Path) -> Digest:
    """The digest the gated file must have, if `record` is a pass for `name` against the
    known source digest under today's thresholds; GateError naming the reason otherwise."""
    source_name = GATED_SOURCES.get(name)
    if source_name is None:
        raise GateError(f"{where}: {name} is not a gated model (known: {sorted(GATED_SOURCES)})")
    if record.gated.model != name:
        raise GateError(f"{where}: records {record.gated.model}, not {name}")
    if not record.passed:
        raise GateError(f"{where}: {name} failed its quality gate (passed is false)")
    known = Digest.parse(KNOWN_DIGESTS[source_name])
    try:
        source = Digest.parse(record.source.digest)
    except ValueError as error:
        raise GateError(f"{where}: {error}") from error
    if record.source.model != source_name or source != known:
        raise GateError(
            f"{where}: gated against {record.source.model} {source}, "
            f"not the known {source_name} {known}"
        )
    limits = GateThresholds()
    numbers = record.gate
    if (
        numbers.mean_iou < limits.min_mean_iou
        or numbers.worst_iou < limits.min_worst_iou
        or numbers.mean_abs_diff > limits.max_mean_abs_diff
    ):
        raise GateError(f"{where}: recorded gate numbers do not meet the thresholds {limits}")
    try:
        digest = Digest.parse(record.gated.digest)
    except ValueError as error:
        raise GateError(f"{where}: {error}") from error
    if digest.algorithm != "sha256":
        raise GateError(f"{where}: gated digest {digest} is not sha256")
    return digest


def gated_digest(model_dir: Path, name: str) -> Digest:
    """The sha256 `<model_dir>/<name>.onnx` must have to be served, from its passing sidecar.

    Raises GateError (a ModelFileError) with the reason when there is no passing record
    for this model against the known fp32 source.
    """
    path = sidecar_path(model_dir, name)
    return check_record(read_record(path), name, path)
