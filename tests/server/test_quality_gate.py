"""The int8 quality gate: its metrics, the sidecar the server trusts, and the built model."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from rembg_server.checksums import KNOWN_DIGESTS, Digest, ModelFileError, verify_file
from rembg_server.quality import (
    FileRecord,
    GateError,
    GateThresholds,
    build_record,
    evaluate,
    format_table,
    gated_digest,
    mask_iou,
    mean_abs_diff,
)
from rembg_server.quantize import GATED_FILE
from rembg_server.quantize import main as quantize_main

GATED = "u2netp-int8"


def square(size: int = 100, box: tuple[int, int, int, int] = (20, 20, 80, 80)) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    top, left, bottom, right = box
    mask[top:bottom, left:right] = 255
    return mask


def test_two_empty_masks_have_iou_one() -> None:
    empty = np.zeros((10, 10), np.uint8)
    assert mask_iou(empty, empty) == 1.0


def test_iou_thresholds_at_128() -> None:
    reference = np.full((4, 4), 128, np.uint8)
    assert mask_iou(reference, np.full((4, 4), 127, np.uint8)) == 0.0
    assert mask_iou(reference, np.full((4, 4), 200, np.uint8)) == 1.0


def test_iou_of_half_overlapping_masks() -> None:
    a = square(box=(0, 0, 100, 50))
    b = square(box=(0, 25, 100, 75))
    assert mask_iou(a, b) == pytest.approx(1 / 3)


def test_mean_abs_diff_is_a_fraction_of_255() -> None:
    a = np.zeros((2, 2), np.uint8)
    b = np.array([[255, 0], [0, 0]], np.uint8)
    assert mean_abs_diff(a, b) == pytest.approx(0.25)
    assert mean_abs_diff(b, a) == pytest.approx(0.25)


def test_thresholds_are_the_agreed_ones() -> None:
    limits = GateThresholds()
    assert (limits.min_mean_iou, limits.min_worst_iou) == (0.98, 0.95)
    assert limits.max_mean_abs_diff == pytest.approx(3 / 255)


def test_identical_masks_pass() -> None:
    masks = {f"image{i}": square(box=(i, i, 60 + i, 60 + i)) for i in range(5)}
    result = evaluate(masks, masks)
    assert result.passed
    assert result.mean_iou == 1.0
    assert result.mean_abs_diff == 0.0
    assert "PASS" in format_table(result)


def test_one_bad_image_fails_on_worst_iou_alone() -> None:
    reference = {f"image{i}": square() for i in range(40)}
    candidate = dict(reference)
    candidate["image7"] = square(box=(20, 20, 80, 60))  # IoU 2/3
    result = evaluate(reference, candidate)
    assert result.mean_iou >= 0.98
    assert result.mean_abs_diff <= 3 / 255
    assert not result.passed
    assert result.worst.name == "image7"
    assert result.failures == ["worst IoU 0.6667 (image7) < 0.95"]


def test_small_alpha_drift_everywhere_fails_on_mean_abs_diff() -> None:
    reference = {"a": np.full((10, 10), 60, np.uint8), "b": np.full((10, 10), 200, np.uint8)}
    drifted = {name: mask + 4 for name, mask in reference.items()}
    result = evaluate(reference, drifted)
    assert result.mean_iou == 1.0
    assert not result.passed
    assert len(result.failures) == 1
    assert "|delta alpha|" in result.failures[0]


def test_evaluate_refuses_mismatched_sets() -> None:
    with pytest.raises(ValueError, match="image names differ"):
        evaluate({"a": square()}, {"b": square()})
    with pytest.raises(ValueError, match="shapes differ"):
        evaluate({"a": square(100)}, {"a": square(50)})


def write_sidecar(
    model_dir: Path,
    *,
    int8: bytes = b"pretend int8 model",
    source_digest: str = KNOWN_DIGESTS["u2netp"],
    passed: bool = True,
) -> Digest:
    """An int8 file and its sidecar as quantize.py writes them; returns the int8 digest."""
    (model_dir / f"{GATED}.onnx").write_bytes(int8)
    digest = Digest("sha256", hashlib.sha256(int8).hexdigest())
    masks = {"a": square(), "b": square()}
    record = build_record(
        gated=FileRecord(model=GATED, file=f"{GATED}.onnx", digest=str(digest)),
        source=FileRecord(model="u2netp", file="u2netp.onnx", digest=source_digest),
        method={"quant_format": "QDQ"},
        onnxruntime_version="1.32.0",
        result=evaluate(masks, masks),
    )
    text = record.model_copy(update={"passed": passed}).model_dump_json()
    (model_dir / f"{GATED}.gate.json").write_text(text)
    return digest


def test_gated_digest_returns_the_int8_sha256(tmp_path: Path) -> None:
    digest = write_sidecar(tmp_path)
    assert gated_digest(tmp_path, GATED) == digest
    verify_file(tmp_path / f"{GATED}.onnx", gated_digest(tmp_path, GATED))


def test_gated_digest_refuses_a_missing_sidecar(tmp_path: Path) -> None:
    with pytest.raises(GateError, match="missing"):
        gated_digest(tmp_path, GATED)


def test_gate_error_is_a_model_file_error() -> None:
    assert issubclass(GateError, ModelFileError)


def test_gated_digest_refuses_a_failed_gate(tmp_path: Path) -> None:
    write_sidecar(tmp_path, passed=False)
    with pytest.raises(GateError, match="failed its quality gate"):
        gated_digest(tmp_path, GATED)


def test_gated_digest_refuses_another_source_model(tmp_path: Path) -> None:
    write_sidecar(tmp_path, source_digest="md5:" + "0" * 32)
    with pytest.raises(GateError, match="not the known u2netp md5:8e83ca70"):
        gated_digest(tmp_path, GATED)


def test_gated_digest_refuses_numbers_under_the_thresholds(tmp_path: Path) -> None:
    write_sidecar(tmp_path)
    path = tmp_path / f"{GATED}.gate.json"
    record = json.loads(path.read_text())
    record["gate"]["worst_iou"] = 0.9
    path.write_text(json.dumps(record))
    with pytest.raises(GateError, match="do not meet the thresholds"):
        gated_digest(tmp_path, GATED)


def test_gated_digest_refuses_a_malformed_sidecar(tmp_path: Path) -> None:
    (tmp_path / f"{GATED}.gate.json").write_text('{"passed": true}')
    with pytest.raises(GateError, match="not a gate record"):
        gated_digest(tmp_path, GATED)


def test_gated_digest_refuses_an_ungated_model_name(tmp_path: Path) -> None:
    write_sidecar(tmp_path)
    (tmp_path / "u2netp.gate.json").write_text((tmp_path / f"{GATED}.gate.json").read_text())
    with pytest.raises(GateError, match="not a gated model"):
        gated_digest(tmp_path, "u2netp")


def test_a_tampered_int8_file_fails_verification(tmp_path: Path) -> None:
    write_sidecar(tmp_path)
    (tmp_path / f"{GATED}.onnx").write_bytes(b"pretend int8 model, edited")
    with pytest.raises(ModelFileError, match="corrupt or wrong file"):
        verify_file(tmp_path / f"{GATED}.onnx", gated_digest(tmp_path, GATED))


@pytest.mark.slow
def test_todays_int8_model_is_built_gated_and_refused_leaving_nothing_servable(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole build for real: quantise the verified u2netp with METHOD, gate it on the
    golden photos, and (no method has passed yet, see the README) refuse it: the CLI prints
    the numbers, exits 1, and leaves no int8 file and no sidecar, so the server cannot load
    it. When a method passes, this test fails and becomes a test that the gate passes."""
    shutil.copy(model_dir / "u2netp.onnx", tmp_path / "u2netp.onnx")
    (tmp_path / GATED_FILE).write_bytes(b"a stale int8 file from an earlier build")
    assert quantize_main(["--model-dir", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    print(out)
    assert "mean IoU" in out, out
    assert f"{GATED} failed the quality gate" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u2netp.onnx"]
    with pytest.raises(GateError, match="never passed its quality gate"):
        gated_digest(tmp_path, GATED)
