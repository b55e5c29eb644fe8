"""Benchmark: our inference server vs `rembg s` vs the model-only ceiling, in one run.

    .venv/bin/python bench/bench_server.py            # what `make bench-server` runs

Both servers run on this machine, on 127.0.0.1 (started together; each level drives ours, then
rembg s, so both see the same background load), with the same model (u2netp from U2NET_HOME)
and are driven through the same endpoint (`POST /api/remove`, multipart, model=u2netp) with
the same 1920x1080 JPEGs at concurrency 1, 4, 16 and 64: that many closed-loop clients, until a
bounded number of images is done. A client that gets 429 waits Retry-After and tries again, as
a well-behaved client would; 429s are counted, and latency percentiles are over admitted (200)
responses only.
Peak RSS is sampled for each server's process tree. `rembg s` comes from PyPI
(rembg[cli,cpu]==2.0.86) in a separate virtualenv, .bench-venv, because its FastAPI pin
conflicts with ours; it is created on first use.

The model-only ceiling is onnxruntime alone, same threads, on the same images already
preprocessed: no HTTP, no decode, no resize, no encode. It is the best a server could do.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import psutil
from PIL import Image
from rembg_server.engine import RECIPES, RecipeModel, build_session_options
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
BENCH_VENV = ROOT / ".bench-venv"
REMBG_REQUIREMENT = "rembg[cli,cpu]==2.0.86"
MODEL = "u2netp"
LEVELS = {1: 6, 4: 16, 16: 32, 64: 64}  # concurrency -> images to complete at that level
MAX_ATTEMPTS_PER_IMAGE = 200
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "cat")


def benchmark_images() -> list[bytes]:
    """Real photos from scikit-image, resized to 1920x1080, JPEG quality 90."""
    images = []
    for name in PHOTOS:
        pixels = getattr(data, name)()
        photo = (
            Image.fromarray(pixels).convert("RGB").resize((1920, 1080), Image.Resampling.BICUBIC)
        )
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


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return float(np.percentile(values, q))


async def drive(server: Server, images: list[bytes], concurrency: int, total: int) -> LevelResult:
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
                        data={"model": MODEL},
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
    return LevelResult(
        server=server.name,
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
    )


def warm(server: Server, images: list[bytes]) -> None:
    """The same few requests for both servers before measuring (rembg loads lazily)."""
    for image in images[:3]:
        httpx.post(
            f"{server.url}/api/remove",
            files={"file": ("photo.jpg", image, "image/jpeg")},
            data={"model": MODEL},
            timeout=300,
        ).raise_for_status()


def bench_servers(servers: list[Server], images: list[bytes]) -> list[LevelResult]:
    """Level by level, each server in turn: both see the machine in the same minute, which
    matters on a shared host where background load comes and goes."""
    for server in servers:
        warm(server, images)
    results = []
    for concurrency, total in LEVELS.items():
        for server in servers:
            result = asyncio.run(drive(server, images, concurrency, total))
            print(json.dumps(asdict(result)), flush=True)
            results.append(result)
    return results


def model_only_ceiling(model_path: Path, images: list[bytes], threads: int) -> float:
    """img/s of onnxruntime alone on the preprocessed inputs, the best of three layouts:
    one session with `threads` threads (our options, then onnxruntime's defaults), and
    `threads` single-threaded sessions side by side (REMBG_INFERENCE_WORKERS=<CPUs>)."""
    default = ort.SessionOptions()
    default.intra_op_num_threads = threads
    layouts = {
        f"1 session x {threads} threads, our options": [build_session_options(threads)],
        f"1 session x {threads} threads, default options": [default],
        f"{threads} sessions x 1 thread": [build_session_options(1) for _ in range(threads)],
    }
    best = 0.0
    for label, options in layouts.items():
        sessions = [
            ort.InferenceSession(
                str(model_path), sess_options=o, providers=["CPUExecutionProvider"]
            )
            for o in options
        ]
        models = [RecipeModel(MODEL, RECIPES[MODEL], s, batchable=False) for s in sessions]
        tensors = [models[0].preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]
        rate = _inference_rate(models, tensors, runs_per_model=24 // len(models))
        print(f"model-only ({label}): {rate:.2f} img/s", flush=True)
        best = max(best, rate)
    return best


def _inference_rate(
    models: list[RecipeModel], tensors: list[np.ndarray], runs_per_model: int
) -> float:
    for model in models:  # warm-up
        model.infer(tensors[0][np.newaxis])

    def run(model: RecipeModel) -> None:
        for index in range(runs_per_model):
            model.infer(tensors[index % len(tensors)][np.newaxis])

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(model,)) for model in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return runs_per_model * len(models) / (time.perf_counter() - started)


def markdown(results: list[LevelResult], ceiling: float) -> str:
    lines = [
        "| server | concurrency | images | ok | 429 | errors | img/s | p50 ms | p95 ms | p99 ms "
        "| peak RSS MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.concurrency} | {r.images} | {r.ok} | {r.shed_429} | {r.errors} "
            f"| {r.throughput:.2f} | {r.p50_ms} | {r.p95_ms} | {r.p99_ms} | {r.peak_rss_mb} |"
        )
    lines.append(f"| model-only ceiling | - | - | - | - | - | {ceiling:.2f} | | | | |")
    return "\n".join(lines)


def ratios(ours: list[LevelResult], theirs: list[LevelResult], ceiling: float) -> list[str]:
    by_c = {r.concurrency: r for r in ours}
    their_c = {r.concurrency: r for r in theirs}
    lines = []
    for c in (4, 16):
        vs_rembg = by_c[c].throughput / max(their_c[c].throughput, 1e-9)
        vs_ceiling = by_c[c].throughput / ceiling
        lines.append(
            f"c={c}: {vs_rembg:.2f}x rembg s (target >= 2.2), "
            f"{vs_ceiling:.0%} of model-only ceiling (target >= 90%)"
        )
    p99_ratio = by_c[64].p99_ms / max(by_c[4].p99_ms, 1e-9)
    lines.append(
        f"c=64: admitted p99 = {p99_ratio:.2f}x our c=4 p99 (target <= 2), "
        f"peak RSS {by_c[64].peak_rss_mb} MB (target <= 1024)"
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
    model_path = model_dir / f"{MODEL}.onnx"
    if not model_path.is_file():
        raise SystemExit(f"{model_path} missing: run `make model`")
    threads = len(os.sched_getaffinity(0))
    images = benchmark_images()
    print(f"{len(images)} images of 1920x1080, {threads} CPUs, levels {LEVELS}", flush=True)

    base_env = {**os.environ, "U2NET_HOME": str(model_dir), "PYTHONUNBUFFERED": "1"}
    port = free_port()
    ours_env = {
        **base_env,
        "REMBG_HOST": "127.0.0.1",
        "REMBG_PORT": str(port),
        "REMBG_MODELS": MODEL,
        "REMBG_LOG_LEVEL": "warning",
    }
    with contextlib.ExitStack() as stack:
        command = [sys.executable, "-m", "rembg_server"]
        servers = [stack.enter_context(running("ours", command, ours_env, port, "/readyz"))]
        if not args.skip_rembg:
            rembg = ensure_rembg_venv()
            port = free_port()
            command = [str(rembg), "s", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
            servers.append(
                stack.enter_context(running("rembg s", command, base_env, port, "/openapi.json"))
            )
        results = bench_servers(servers, images)
    ours = [r for r in results if r.server == "ours"]
    theirs = [r for r in results if r.server != "ours"]
    ceiling = model_only_ceiling(model_path, images, threads)
    print()
    print(markdown(sorted(results, key=lambda r: r.server == "rembg s"), ceiling))
    print()
    if theirs:
        for line in ratios(ours, theirs, ceiling):
            print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
