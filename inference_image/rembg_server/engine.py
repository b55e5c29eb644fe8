"""Model files, onnxruntime sessions and the mask pipeline around them.

Two ways to run a rembg model:

- a *recipe* model (the U2-Net, IS-Net, BiRefNet and BRIA families) follows rembg's
  normalise -> run -> [sigmoid] -> min/max -> resize pipeline; the server runs it itself so
  that several images can share one onnxruntime call (micro-batching) and so that the resizes
  use cheaper filters. tests/server checks the masks stay within 1/255 of rembg.remove();
- any other local rembg model runs through rembg's own session class, one image at a time.
"""

from __future__ import annotations

import importlib.util
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image

from rembg_server.checksums import KNOWN_DIGESTS, Digest, ModelFileError, verify_file
from rembg_server.quality import GATED_SOURCES, gated_digest

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
# Not an onnxruntime execution provider: the OpenVINO runtime's CPU plugin runs the model itself
# (OpenVinoSession). onnxruntime-ep-openvino 1.8.1, the plugin EP for onnxruntime 1.32, offers
# devices only on Intel hardware (vendor 0x8086), so on AMD CPUs it would never be active.
OPENVINO_PROVIDER = "OpenVINO"
WANTED_PROVIDER = {"cuda": CUDA_PROVIDER, "openvino": OPENVINO_PROVIDER}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
UNIT_STD = (1.0, 1.0, 1.0)
BATCH_AXIS = "batch"


@dataclass(frozen=True)
class Recipe:
    """rembg's BaseSession.normalize() arguments plus its output transform, per model."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    size: int
    sigmoid: bool = False


# Copied from rembg 2.0.86's sessions/*.py predict() methods; tests/server/test_recipes.py
# compares each against rembg's own session class on a synthetic model of the same shape.
RECIPES: dict[str, Recipe] = {
    "u2net": Recipe(IMAGENET_MEAN, IMAGENET_STD, 320),
    "u2netp": Recipe(IMAGENET_MEAN, IMAGENET_STD, 320),
    "u2net_human_seg": Recipe(IMAGENET_MEAN, IMAGENET_STD, 320),
    "silueta": Recipe(IMAGENET_MEAN, IMAGENET_STD, 320),
    "isnet-general-use": Recipe((0.5, 0.5, 0.5), UNIT_STD, 1024),
    "isnet-anime": Recipe(IMAGENET_MEAN, UNIT_STD, 1024),
    "bria-rmbg": Recipe(IMAGENET_MEAN, IMAGENET_STD, 1024),
    **{
        name: Recipe(IMAGENET_MEAN, IMAGENET_STD, 1024, sigmoid=True)
        for name in (
            "birefnet-general",
            "birefnet-general-lite",
            "birefnet-portrait",
            "birefnet-dis",
            "birefnet-hrsod",
            "birefnet-cod",
            "birefnet-massive",
        )
    },
}
# A gated model (quality.py) is its source model in reduced precision: the same recipe.
RECIPES.update({gated: RECIPES[source] for gated, source in GATED_SOURCES.items()})


class ModelLoadError(Exception):
    """A model cannot be served; the message names the model, the file and the reason."""


# Local rembg models whose session reads exactly <name>.onnx and whose digest rembg pins.
# Excluded: remote backends, models needing credentials or a user-supplied path (*_custom),
# SAM (two files and prompts; it does not fit a remove endpoint) and birefnet-general-fp16
# (rembg converts it on first use, so no published digest exists).
# tests/server/test_engine.py checks every name against rembg's own session registry.
# Beside them, the gated models built from them (quality.py), served only with a passing gate.
SERVABLE_MODELS = frozenset(KNOWN_DIGESTS) | frozenset(GATED_SOURCES)


def servable_model_names() -> frozenset[str]:
    return SERVABLE_MODELS


def model_path(model_dir: Path, name: str) -> Path:
    """Where rembg looks for <name>.onnx: <home>/models/<name>/ first, then <home>/ (legacy)."""
    nested = model_dir / "models" / name / f"{name}.onnx"
    return nested if nested.is_file() else model_dir / f"{name}.onnx"


def expected_digest(name: str, overrides: dict[str, str], model_dir: Path) -> Digest:
    """The digest <name>.onnx must have: an override, rembg's pin, or a gated model's record
    of its passing quality gate (GateError, a ModelFileError, when there is none)."""
    if name in GATED_SOURCES:
        return gated_digest(model_dir, name)
    text = overrides.get(name) or KNOWN_DIGESTS.get(name)
    if text is None:
        raise ModelLoadError(
            f'{name}: no known checksum (set REMBG_MODEL_CHECKSUMS=\'{{"{name}": "sha256:..."}}\')'
        )
    return Digest.parse(text)


def build_session_options(threads: int, cpu_arena: bool = True) -> ort.SessionOptions:
    """onnxruntime options with bounded memory and CPU.

    The CPU arena never shrinks: it keeps the peak of all runs in flight on a session at
    once, which is how rembg's server (one session run from up to 40 threads) reached 5.9 GB
    at 16 concurrent requests. Here each session is run by exactly one thread, one batch at a
    time, so the arena holds one batch's peak (~470 MB for u2netp at batch 1) and buys
    25-40% faster inference (no page faults on fresh buffers every run).

    Spinning is off: an idle intra-op thread that spins keeps its core from the decode/encode
    threads, which run at a lower priority (see pipeline.py) and only get the CPU when
    inference leaves it.
    """
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = cpu_arena
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return options


def with_dynamic_batch(model_bytes: bytes) -> bytes:
    """The same model with a symbolic batch axis on its first input and every output.

    rembg's exports pin the batch dimension to 1; the convolutions themselves do not care.
    Stale intermediate shapes are dropped so onnxruntime re-infers them.
    """
    model = onnx.load_from_string(model_bytes)
    for value in [model.graph.input[0], *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].ClearField("dim_value")
            dims[0].dim_param = BATCH_AXIS
    del model.graph.value_info[:]
    serialized: bytes = model.SerializeToString()
    return serialized


@dataclass(frozen=True)
class ProviderChoice:
    requested: list[str]
    refusal: str | None = None  # set when the requested provider cannot be used at all


def available_providers() -> list[str]:
    """onnxruntime's providers, plus OpenVINO when its runtime (the openvino extra) is there."""
    openvino = [OPENVINO_PROVIDER] if importlib.util.find_spec("openvino") else []
    return [*ort.get_available_providers(), *openvino]


def choose_providers(
    provider: str, allow_cpu_fallback: bool, available: Sequence[str] | None = None
) -> ProviderChoice:
    """cpu: CPU. cuda/openvino: that one, else a refusal (or CPU with the fallback allowed).
    auto: CUDA, else OpenVINO, else CPU, never refused."""
    available = available_providers() if available is None else list(available)
    if provider == "cpu":
        return ProviderChoice([CPU_PROVIDER])
    wanted = WANTED_PROVIDER.get(provider)
    if wanted is None:  # auto
        wanted = next((p for p in (CUDA_PROVIDER, OPENVINO_PROVIDER) if p in available), None)
    if wanted in available:
        return ProviderChoice([wanted, CPU_PROVIDER] if wanted == CUDA_PROVIDER else [wanted])
    if wanted is None or allow_cpu_fallback:
        return ProviderChoice([CPU_PROVIDER])
    missing = (
        "the openvino package is not installed (pip install 'rembg-fleet[openvino]')"
        if wanted == OPENVINO_PROVIDER
        else f"this onnxruntime build offers only {available}"
    )
    fallback = "set REMBG_ALLOW_CPU_FALLBACK=true to serve on CPU"
    return ProviderChoice([], refusal=f"{wanted} requested but {missing}; {fallback}")


class MaskModel(Protocol):
    """What the service needs from a loaded model."""

    name: str
    provider: str
    device: str
    batchable: bool
    takes_tensors: bool

    def preprocess(self, image: Image.Image) -> np.ndarray: ...
    def infer(self, batch: np.ndarray) -> np.ndarray: ...
    def postprocess(self, prediction: np.ndarray, size: tuple[int, int]) -> Image.Image: ...
    def predict_mask(self, image: Image.Image) -> Image.Image: ...


def device_of(provider: str) -> str:
    return "cuda" if provider == CUDA_PROVIDER else "cpu"


@dataclass(frozen=True)
class _Input:
    name: str
    shape: list[int | str]


class OpenVinoSession:
    """A model compiled by the OpenVINO runtime for its CPU plugin, behind the three
    InferenceSession methods RecipeModel calls (get_inputs, get_providers, run).

    FP32 is forced: on CPUs with AVX512-BF16 or AMX the plugin's default is bf16, which moves
    u2netp's masks by up to 164/255. `infer` copies the outputs (share_outputs=False), so a
    prediction stays valid while the next batch runs.
    """

    def __init__(self, model_bytes: bytes, threads: int) -> None:
        # Imported only here: the openvino extra is optional.
        import openvino  # noqa: PLC0415

        config = {
            "INFERENCE_NUM_THREADS": threads,
            "INFERENCE_PRECISION_HINT": "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        core = openvino.Core()
        self._compiled = core.compile_model(core.read_model(model_bytes), "CPU", config)
        self._request = self._compiled.create_infer_request()
        port = self._compiled.inputs[0]
        shape = [d.get_length() if d.is_static else BATCH_AXIS for d in port.partial_shape]
        self._inputs = [_Input(port.get_any_name(), shape)]

    def get_inputs(self) -> list[_Input]:
        return self._inputs

    def get_providers(self) -> list[str]:
        return [OPENVINO_PROVIDER]

    def run(self, _output_names: None, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        results = self._request.infer(feeds, share_outputs=False)
        return [results[port] for port in self._compiled.outputs]


@dataclass
class RecipeModel:
    """A rembg mask model run directly on onnxruntime, batch axis made dynamic."""

    name: str
    recipe: Recipe
    session: ort.InferenceSession | OpenVinoSession
    batchable: bool
    takes_tensors: bool = True
    input_name: str = field(init=False)
    provider: str = field(init=False)
    device: str = field(init=False)

    def __post_init__(self) -> None:
        self.input_name = self.session.get_inputs()[0].name
        self.provider = self.session.get_providers()[0]
        self.device = device_of(self.provider)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """rembg's normalize(): resize, divide by the image maximum, standardise, CHW float32.

        The resize is rembg's exact plain LANCZOS from full size. A cheaper box-reduce first
        (Pillow's reducing_gap) saves ~13-25 ms on 1920x1080, but u2netp is sensitive enough
        to the input that masks then differ from rembg's by up to 9/255 on some photos.
        """
        side = self.recipe.size
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        small = rgb.resize((side, side), Image.Resampling.LANCZOS)
        pixels = np.asarray(small, dtype=np.float32)
        pixels /= max(float(pixels.max()), 1e-6)
        pixels -= np.asarray(self.recipe.mean, dtype=np.float32)
        pixels /= np.asarray(self.recipe.std, dtype=np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 -> (N, S, S) raw predictions from the first output."""
        outputs = self.session.run(None, {self.input_name: batch})
        prediction: np.ndarray = outputs[0][:, 0, :, :]
        if self.recipe.sigmoid:
            prediction = 1.0 / (1.0 + np.exp(-prediction))
        return prediction

    def postprocess(self, prediction: np.ndarray, size: tuple[int, int]) -> Image.Image:
        """rembg's min/max scaling and truncation to uint8, then the resize to the input size."""
        low, high = float(prediction.min()), float(prediction.max())
        scaled = (prediction - low) / max(high - low, 1e-12)
        mask = Image.fromarray((scaled * 255).astype(np.uint8), mode="L")
        return mask.resize(size, Image.Resampling.BILINEAR)

    def predict_mask(self, image: Image.Image) -> Image.Image:
        prediction = self.infer(self.preprocess(image)[np.newaxis])
        return self.postprocess(prediction[0], image.size)


@dataclass
class RembgSessionModel:
    """Any other local rembg model, through rembg's own session class (no batching)."""

    name: str
    session: Any  # rembg.sessions.base.BaseSession
    batchable: bool = False
    takes_tensors: bool = False
    provider: str = field(init=False)
    device: str = field(init=False)

    def __post_init__(self) -> None:
        self.provider = self.session.inner_session.get_providers()[0]
        self.device = device_of(self.provider)

    def preprocess(self, image: Image.Image) -> np.ndarray:
        raise NotImplementedError(f"{self.name} runs through rembg's session, unbatched")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise NotImplementedError(f"{self.name} runs through rembg's session, unbatched")

    def postprocess(self, prediction: np.ndarray, size: tuple[int, int]) -> Image.Image:
        raise NotImplementedError(f"{self.name} runs through rembg's session, unbatched")

    def predict_mask(self, image: Image.Image) -> Image.Image:
        masks = self.session.predict(image)
        # Multi-mask models (cloth segmentation) return one mask per class; rembg stacks the
        # cutouts vertically. The server serves the union so the output keeps the input size.
        combined: Image.Image = masks[0]
        for extra in masks[1:]:
            combined = Image.fromarray(np.maximum(np.asarray(combined), np.asarray(extra)))
        return combined


@dataclass(frozen=True)
class LoadRequest:
    name: str
    model_dir: Path
    checksums: dict[str, str]
    provider: str
    allow_cpu_fallback: bool
    threads: int
    batch_max_size: int
    sessions: int = 1
    cpu_arena: bool = False


def load_model(request: LoadRequest) -> list[MaskModel]:
    """Verify the file once, open `sessions` sessions, check the provider.

    ModelLoadError says which model and file failed, and why.
    """
    name = request.name
    path = model_path(request.model_dir, name)
    try:
        verify_file(path, expected_digest(name, request.checksums, request.model_dir))
    except ModelFileError as error:
        raise ModelLoadError(f"{name}: {error}") from error
    choice = choose_providers(request.provider, request.allow_cpu_fallback)
    if choice.refusal:
        raise ModelLoadError(f"{name}: {choice.refusal}")
    options = build_session_options(request.threads, request.cpu_arena)
    runtime = "OpenVINO" if OPENVINO_PROVIDER in choice.requested else "onnxruntime"
    models = []
    for _ in range(request.sessions):
        try:
            model = _open(name, path, options, choice.requested, request.batch_max_size)
        except Exception as error:  # onnxruntime raises bare RuntimeError/Fail subclasses
            raise ModelLoadError(f"{name}: {path}: {runtime} cannot load it ({error})") from error
        _check_provider(name, request, model.provider)
        models.append(model)
    return models


def _open(
    name: str, path: Path, options: ort.SessionOptions, providers: list[str], batch: int
) -> MaskModel:
    recipe = RECIPES.get(name)
    if recipe is None:
        # Imported only here: rembg pulls in numba, scipy and scikit-image (~160 MB of RSS)
        # that the recipe models never need.
        from rembg.sessions import sessions  # noqa: PLC0415

        # The file is verified and in place, so rembg's download_models() finds it and
        # never touches the network. OpenVINO runs only the recipe models: these get CPU.
        ort_providers = [p for p in providers if p != OPENVINO_PROVIDER] or [CPU_PROVIDER]
        return RembgSessionModel(name, sessions[name](name, options, providers=ort_providers))
    model_bytes = path.read_bytes()
    if batch > 1:
        model_bytes = with_dynamic_batch(model_bytes)
    session: ort.InferenceSession | OpenVinoSession
    if providers == [OPENVINO_PROVIDER]:
        session = OpenVinoSession(model_bytes, options.intra_op_num_threads)
    else:
        session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
    return RecipeModel(name, recipe, session, batchable=batch > 1)


def _check_provider(name: str, request: LoadRequest, active: str) -> None:
    wanted = WANTED_PROVIDER.get(request.provider)
    if wanted is None or active == wanted or request.allow_cpu_fallback:
        return
    reason = (
        "CUDA/cuDNN libraries missing?"
        if wanted == CUDA_PROVIDER
        else "OpenVINO runs only the U2-Net, IS-Net, BiRefNet and BRIA models"
    )
    raise ModelLoadError(
        f"{name}: {wanted} requested but the session runs on {active} ({reason}); "
        "set REMBG_ALLOW_CPU_FALLBACK=true to serve on CPU"
    )


def synthetic_warmup_image(width: int = 640, height: int = 480) -> Image.Image:
    """A deterministic photo-like image: a lit disc on a gradient, no file needed."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    background = np.stack([x / width, y / height, (x + y) / (width + height)], axis=-1) * 180
    disc = ((x - width / 2) ** 2 + (y - height / 2) ** 2) < (min(width, height) / 3) ** 2
    background[disc] = (230.0, 190.0, 160.0)
    return Image.fromarray(background.astype(np.uint8), mode="RGB")


class Heartbeat:
    """Tracks the inference thread: a call running longer than `stall_seconds` means wedged."""

    def __init__(self, stall_seconds: float, clock: Any = time.monotonic) -> None:
        self._stall_seconds = stall_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._busy_since: float | None = None

    def enter(self) -> None:
        with self._lock:
            self._busy_since = self._clock()

    def leave(self) -> None:
        with self._lock:
            self._busy_since = None

    def stalled_for(self) -> float:
        with self._lock:
            since = self._busy_since
        return 0.0 if since is None else self._clock() - since

    def wedged(self) -> bool:
        return self.stalled_for() > self._stall_seconds
