"""Benchmark: our inference server (exact and fast model) vs `rembg s` vs the model-only
ceilings, in one run.

    .venv/bin/python bench/bench_server.py            # what `make bench-server` runs

Each server runs alone on this machine, on 127.0.0.1, one after the other: ours serving
u2netp (the exact path) and u2netp-int8 (the quality-gated fast model), then `rembg s` with
u2netp. Each is driven through the same endpoint (`POST /api/remove`, multipart) with the
same photos, of varied subjects and sizes (0.9 to 3.8 megapixels; not the photos the
server's tests or earlier tuning used), at concurrency 1, 4, 16 and 64: that many
closed-loop clients, until a bounded number of images is done. A client that gets 429 waits
Retry-After and tries again, as a well-behaved client would; 429s are counted, and latency
percentiles are over admitted (200) responses only. Peak RSS is sampled for each server's
process tree, and our server's CPU per image is split by stage (its
rembg_stage_cpu_seconds_total counters; inference from the ceiling run).
`rembg s` comes from PyPI (rembg[cli,cpu]==2.0.86) in a separate virtualenv, .bench-venv,
because its FastAPI pin conflicts with ours; it is created on first use.

The model-only ceilings are the model alone, same threads, on the same images already
preprocessed (no HTTP, no decode, no resize, no encode), for every runtime this machine
has: onnxruntime's CPU provider in three layouts and the OpenVINO runtime when installed.
The best fp32 one is what a server could at most do on the exact path.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image
from rembg_server.engine import (
    CPU_PROVIDER,
    OPENVINO_PROVIDER,
    RECIPES,
    OpenVinoSession,
    RecipeModel,
    available_providers,
    build_session_options,
)
from rembg_server.pipeline import CPU_STAGES
from rembg_server.quantize import METHOD, prepare, quantize
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".bench-venv"
REMBG_REQUIREMENT = "rembg[cli,cpu]==2.0.86"
MODEL = "u2netp"
FAST_MODEL = "u2netp-int8"
LEVELS = {1: 6, 4: 16, 16: 32, 64: 64}  # concurrency -> images to complete at that level
MAX_ATTEMPTS_PER_IMAGE = 200
# Real photos from scikit-image's wheel at the sizes uploads come in: landscape, portrait,
# square, 4:3 and 3:2, 0.9-3.8 megapixels.
PHOTOS = {
    "rocket": (1080, 1620),
    "retina": (1600, 1600),
    "camera": (1280, 720),
    "coins": (2048, 1536),
    "clock": (1920, 1080),
    "hubble_deep_field": (2400, 1600),
}
TARGET_EXACT = 1.9  # x rembg s at c=4 and c=16
TARGET_FAST = 3.5  # x rembg s at c=4
TARGET_CEILING = 0.85  # of the best fp32 model-only ceiling


def benchmark_images() -> list[bytes]:
    """The photos at their upload sizes, JPEG quality 90."""
    images = []
    for name, size in PHOTOS.items():
        pixels = getattr(data, name)()
        photo = Image.fromarray(pixels).convert("RGB").resize(size, Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        photo.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensure_rembg_venv() -> Path:
    rembg = BENCH_VENV / "bin" / "rembg"
    if not rembg.exists():
        print(f"creating {BENCH_VENV} with {REMBG_REQUIREMENT} (once)", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True)
        pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, REMBG_REQUIREMENT], check=True)
    return rembg


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    ready_path: str

    def rss_bytes(self) -> int:
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def cpu_seconds(self) -> float:
        root = psutil.Process(self.process.pid)
        times = [p.cpu_times() for p in [root, *root.children(recursive=True)]]
        return sum(t.user + t.system for t in times)

    def stage_cpu(self) -> dict[str, float]:
        """rembg_stage_cpu_seconds_total by stage (ours only; {} for rembg s)."""
        try:
            text = httpx.get(self.url + "/metrics", timeout=10).text
        except httpx.HTTPError:
            return {}
        stages: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("rembg_stage_cpu_seconds_total{"):
                stage = line.split('stage="', 1)[1].split('"', 1)[0]
                stages[stage] = stages.get(stage, 0.0) + float(line.rsplit(" ", 1)[1])
        return stages


@contextmanager
def running(
    name: str, command: list[str], env: dict[str, str], port: int, ready_path: str
) -> Iterator[Server]:
    log_path = Path(tempfile.gettempdir()) / f"rembg-bench-{name.replace(' ', '-')}.log"
    log = log_path.open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=ROOT)
    server = Server(name, process, f"http://127.0.0.1:{port}", ready_path)
    try:
        wait_until_serving(server)
        yield server
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until_serving(server: Server) -> None:
    for _ in range(1200):
        if server.process.poll() is not None:
            raise SystemExit(
                f"{server.name} exited early; see {tempfile.gettempdir()}/rembg-bench-*.log"
            )
        try:
            if httpx.get(server.url + server.ready_path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{server.name} did not start")


@dataclass
class LevelResult:
    server: str
    model: str
    concurrency: int
    images: int
    ok: int
    shed_429: int
    errors: int
    seconds: float
    throughput: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mb: float
    error_kinds: dict[str, int]
    cpu_ms_per_image: float
    stage_cpu_ms: dict[str, float]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


async def drive(
    server: Server, model: str, images: list[bytes], concurrency: int, total: int
) -> LevelResult:
    latencies: list[float] = []
    counts = {"ok": 0, "429": 0, "errors": 0}
    kinds: dict[str, int] = {}
    next_index = iter(range(total))
    peak = [server.rss_bytes()]
    stop = threading.Event()

    def sample_rss() -> None:
        while not stop.wait(0.1):
            peak[0] = max(peak[0], server.rss_bytes())

    sampler = threading.Thread(target=sample_rss, daemon=True)
    stages_before, cpu_before = server.stage_cpu(), server.cpu_seconds()
    sampler.start()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:

        async def one_image(image: bytes) -> None:
            for _ in range(MAX_ATTEMPTS_PER_IMAGE):
                started = time.perf_counter()
                try:
                    response = await client.post(
                        f"{server.url}/api/remove",
                        files={"file": ("photo.jpg", image, "image/jpeg")},
                        data={"model": model},
                    )
                except httpx.HTTPError as error:
                    counts["errors"] += 1
                    kinds[type(error).__name__] = kinds.get(type(error).__name__, 0) + 1
                    return
                if response.status_code != 429:
                    break
                counts["429"] += 1
                await asyncio.sleep(float(response.headers.get("retry-after", 1)))
            else:
                counts["errors"] += 1
                kinds["gave up after 429s"] = kinds.get("gave up after 429s", 0) + 1
                return
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
                counts["ok"] += 1
            else:
                counts["errors"] += 1
                key = f"HTTP {response.status_code}"
                kinds[key] = kinds.get(key, 0) + 1

        async def worker() -> None:
            for index in next_index:
                await one_image(images[index % len(images)])

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    stop.set()
    sampler.join()
    done = max(counts["ok"], 1)
    cpu = (server.cpu_seconds() - cpu_before) / done
    stages = {
        stage: round((seconds - stages_before.get(stage, 0.0)) / done * 1000, 1)
        for stage, seconds in server.stage_cpu().items()
    }
    return LevelResult(
        server=server.name,
        model=model,
        concurrency=concurrency,
        images=total,
        ok=counts["ok"],
        shed_429=counts["429"],
        errors=counts["errors"],
        seconds=round(elapsed, 2),
        throughput=round(counts["ok"] / elapsed, 2),
        p50_ms=round(percentile(latencies, 50) * 1000),
        p95_ms=round(percentile(latencies, 95) * 1000),
        p99_ms=round(percentile(latencies, 99) * 1000),
        peak_rss_mb=round(peak[0] / 2**20),
        error_kinds=kinds,
        cpu_ms_per_image=round(cpu * 1000, 1),
        stage_cpu_ms=stages,
    )


def warm(server: Server, model: str, images: list[bytes]) -> None:
    """The same few requests for every server and model before measuring (rembg loads
    lazily)."""
    for image in images[:3]:
        httpx.post(
            f"{server.url}/api/remove",
            files={"file": ("photo.jpg", image, "image/jpeg")},
            data={"model": model},
            timeout=300,
        ).raise_for_status()


def bench_alone(server: Server, models: list[str], images: list[bytes]) -> list[LevelResult]:
    """Every level for each model, on this server alone."""
    results = []
    for model in models:
        warm(server, model, images)
        for concurrency, total in LEVELS.items():
            result = asyncio.run(drive(server, model, images, concurrency, total))
            print(json.dumps(asdict(result)), flush=True)
            results.append(result)
    return results


@dataclass(frozen=True)
class Ceiling:
    label: str
    model: str
    fp32: bool
    rate: float  # img/s
    cpu_ms: float  # process CPU per image


def ceilings(model_dir: Path, images: list[bytes], threads: int) -> list[Ceiling]:
    """img/s of the model alone on the preprocessed inputs, for every runtime and layout:
    onnxruntime's CPU provider with one session of `threads` threads (our options, then
    onnxruntime's defaults) and `threads` single-threaded sessions side by side
    (REMBG_INFERENCE_WORKERS=<CPUs>); the OpenVINO runtime when installed; the int8 model."""
    fp32 = (model_dir / f"{MODEL}.onnx").read_bytes()
    default = ort.SessionOptions()
    default.intra_op_num_threads = threads

    def onnxruntime(model: bytes, options: ort.SessionOptions) -> ort.InferenceSession:
        return ort.InferenceSession(model, sess_options=options, providers=[CPU_PROVIDER])

    layouts: dict[str, tuple[str, Callable[[], list[Any]]]] = {
        f"onnxruntime CPU, 1 session x {threads} threads, our options": (
            MODEL,
            lambda: [onnxruntime(fp32, build_session_options(threads))],
        ),
        f"onnxruntime CPU, 1 session x {threads} threads, default options": (
            MODEL,
            lambda: [onnxruntime(fp32, default)],
        ),
        f"onnxruntime CPU, {threads} sessions x 1 thread": (
            MODEL,
            lambda: [onnxruntime(fp32, build_session_options(1)) for _ in range(threads)],
        ),
    }
    if OPENVINO_PROVIDER in available_providers():
        layouts[f"OpenVINO CPU, 1 model x {threads} threads"] = (
            MODEL,
            lambda: [OpenVinoSession(fp32, threads)],
        )
    int8_path = model_dir / f"{FAST_MODEL}.onnx"
    gated = int8_path.is_file()
    int8 = int8_path.read_bytes() if gated else ungated_int8_candidate(model_dir)
    label = FAST_MODEL if gated else f"{FAST_MODEL} (ungated candidate, not served)"
    layouts[f"{label}: onnxruntime CPU, 1 session x {threads} threads"] = (
        FAST_MODEL,
        lambda: [onnxruntime(int8, build_session_options(threads))],
    )
    found = []
    for label, (model, open_sessions) in layouts.items():
        models = [RecipeModel(model, RECIPES[model], s, batchable=False) for s in open_sessions()]
        tensors = [models[0].preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
        rate, cpu = _inference_rate(models, tensors, runs_per_model=24 // len(models))
        print(f"model-only ({label}): {rate:.2f} img/s, {cpu * 1000:.0f} ms CPU/img", flush=True)
        found.append(Ceiling(label, model, model == MODEL, round(rate, 2), round(cpu * 1000, 1)))
    return found


def ungated_int8_candidate(model_dir: Path) -> bytes:
    """What `make model` quantises (rembg_server.quantize.METHOD) before its quality gate: the
    speed the gate refuses while no method passes it."""
    with tempfile.TemporaryDirectory(prefix="bench-int8-") as scratch_name:
        scratch = Path(scratch_name)
        output = scratch / f"{FAST_MODEL}.onnx"
        quantize(prepare(model_dir / f"{MODEL}.onnx", scratch), output, METHOD)
        return output.read_bytes()


def _inference_rate(
    models: list[RecipeModel], tensors: list[np.ndarray], runs_per_model: int
) -> tuple[float, float]:
    """(images per second, process CPU seconds per image)."""
    for model in models:  # warm-up
        model.infer(tensors[0][np.newaxis])

    def run(model: RecipeModel) -> None:
        for index in range(runs_per_model):
            model.infer(tensors[index % len(tensors)][np.newaxis])

    runs = runs_per_model * len(models)
    started, cpu_started = time.perf_counter(), time.process_time()
    threads = [threading.Thread(target=run, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return runs / elapsed, cpu / runs


def markdown(results: list[LevelResult], found: list[Ceiling]) -> str:
    lines = [
        "| server | model | concurrency | images | ok | 429 | errors | img/s | p50 ms | p95 ms "
        "| p99 ms | peak RSS MB | CPU ms/img |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.model} | {r.concurrency} | {r.images} | {r.ok} | {r.shed_429} "
            f"| {r.errors} | {r.throughput:.2f} | {r.p50_ms} | {r.p95_ms} | {r.p99_ms} "
            f"| {r.peak_rss_mb} | {r.cpu_ms_per_image:.0f} |"
        )
    for c in found:
        lines.append(
            f"| model-only: {c.label} | {c.model} | - | - | - | - | - | {c.rate:.2f} "
            f"| | | | | {c.cpu_ms:.0f} |"
        )
    return "\n".join(lines)


def stage_table(results: list[LevelResult], found: list[Ceiling]) -> str:
    """Our CPU per image by stage at each level; inference is the best fp32 ceiling's CPU per
    image (int8's for the fast model), the rest (HTTP, event loop, logs, metrics) what is
    left of the process CPU."""
    lines = [
        "| model | concurrency | decode | preprocess | postprocess | compose | encode "
        "| inference (model-only) | HTTP and the rest | total CPU ms/img |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.stage_cpu_ms:
            continue
        model_cpu = min(c.cpu_ms for c in found if c.model == r.model)
        stages = [r.stage_cpu_ms.get(stage, 0.0) for stage in CPU_STAGES]
        rest = r.cpu_ms_per_image - sum(stages) - model_cpu
        cells = " | ".join(f"{v:.0f}" for v in stages)
        lines.append(
            f"| {r.model} | {r.concurrency} | {cells} | {model_cpu:.0f} | {rest:.0f} "
            f"| {r.cpu_ms_per_image:.0f} |"
        )
    return "\n".join(lines)


def ratios(results: list[LevelResult], found: list[Ceiling]) -> list[str]:
    def rate(server: str, model: str, c: int) -> float:
        [r] = [r for r in results if (r.server, r.model, r.concurrency) == (server, model, c)]
        return r.throughput

    best = max((c for c in found if c.fp32), key=lambda c: c.rate)
    lines = [f"best fp32 model-only ceiling: {best.rate:.2f} img/s ({best.label})"]
    for c in (4, 16):
        theirs = max(rate("rembg s", MODEL, c), 1e-9)
        exact = rate("ours", MODEL, c)
        lines.append(
            f"c={c}: exact path {exact / theirs:.2f}x rembg s (target >= {TARGET_EXACT}), "
            f"{exact / best.rate:.0%} of the best fp32 ceiling (target >= {TARGET_CEILING:.0%})"
        )
    if any(r.model == FAST_MODEL for r in results):
        fast = rate("ours", FAST_MODEL, 4) / max(rate("rembg s", MODEL, 4), 1e-9)
        lines.append(f"c=4: fast model {fast:.2f}x rembg s (target >= {TARGET_FAST})")
    ours = {r.concurrency: r for r in results if (r.server, r.model) == ("ours", MODEL)}
    p99_ratio = ours[64].p99_ms / max(ours[4].p99_ms, 1e-9)
    lines.append(
        f"c=64: admitted p99 = {p99_ratio:.2f}x our c=4 p99 (target <= 2), "
        f"peak RSS {ours[64].peak_rss_mb} MB (target <= 1024)"
    )
    return lines


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: both servers get stopped


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--skip-rembg", action="store_true", help="only our server")
    args = parser.parse_args()
    model_dir = Path(os.environ.get("U2NET_HOME", "~/.u2net")).expanduser()
    if not (model_dir / f"{MODEL}.onnx").is_file():
        raise SystemExit(f"{model_dir / MODEL}.onnx missing: run `make model`")
    models = [MODEL]
    if (model_dir / f"{FAST_MODEL}.onnx").is_file():
        models.append(FAST_MODEL)
    else:
        print(f"{FAST_MODEL} not built (make model): the fast model is not measured", flush=True)
    threads = len(os.sched_getaffinity(0))
    images = benchmark_images()
    sizes = ", ".join(f"{w}x{h}" for w, h in PHOTOS.values())
    print(f"{len(images)} photos ({sizes}), {threads} CPUs, levels {LEVELS}", flush=True)

    base_env = {**os.environ, "U2NET_HOME": str(model_dir), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    ours_env = {
        **base_env,
        "REMBG_HOST": "127.0.0.1",
        "REMBG_PORT": str(port),
        "REMBG_MODELS": ",".join(models),
        "REMBG_PROVIDER": "auto",  # the best runtime installed: OpenVINO with the extra
        "REMBG_LOG_LEVEL": "warning",
    }
    command = [sys.executable, "-m", "rembg_server"]
    with running("ours", command, ours_env, port, "/readyz") as server:
        results = bench_alone(server, models, images)
    if not args.skip_rembg:
        rembg = ensure_rembg_venv()
        port = free_port()
        command = [str(rembg), "s", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
        with running("rembg s", command, base_env, port, "/openapi.json") as server:
            results += bench_alone(server, [MODEL], images)
    found = ceilings(model_dir, images, threads)
    print()
    print(markdown(results, found))
    print()
    print(stage_table(results, found))
    print()
    if not args.skip_rembg:
        for line in ratios(results, found):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
