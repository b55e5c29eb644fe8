"""Benchmark: the job path (/v1/jobs, through Redis) vs the synchronous path, in one run.

    .venv/bin/python bench/bench_jobs.py            # what `make bench-jobs` runs

One server process (default settings, u2netp, jobs enabled) and one real redis-server (AOF with
`appendfsync always`, the durability the job path documents) run on this machine. The same
1920x1080 JPEGs go through both paths, alternating sync, jobs, sync, jobs so both see the same
background load:
- sync: CONCURRENCY closed-loop clients POST /api/remove until every image is done (429s wait
  Retry-After, as in bench_server.py);
- jobs: the images are submitted as one batch manifest (POST /v1/jobs, answered 202), then the
  stream is watched until the backlog is 0 and every job is `done`; throughput counts from the
  first byte of the submission to the last job done. The backlog (XLEN of the stream, what
  rembg_jobs_backlog exports and KEDA reads) is sampled every 0.2 s; its drain rate is the
  slope of a least-squares line through the samples taken while it falls.
Target: the job path within 10% of the sync path's throughput.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
import numpy as np
import redis
from bench_server import MODEL, Server, benchmark_images, drive, free_port, running, warm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.server.processes import RedisServer  # noqa: E402 - the repository root, just above

CONCURRENCY = 8
IMAGES = 48
ROUNDS = 2
PREFIX = "rembg:bench"


@dataclass
class PathResult:
    path: str
    round: int
    images: int
    done: int
    seconds: float
    throughput: float
    drain_rate: float | None = None


def run_sync(server: Server, images: list[bytes], round_index: int) -> PathResult:
    level = asyncio.run(drive(server, images, CONCURRENCY, IMAGES))
    return PathResult("sync", round_index, IMAGES, level.ok, level.seconds, level.throughput)


def run_jobs(
    server: Server, images: list[bytes], client: redis.Redis, round_index: int
) -> PathResult:
    items = [
        {"image_base64": base64.b64encode(images[i % len(images)]).decode(), "ref": str(i)}
        for i in range(IMAGES)
    ]
    body = json.dumps({"items": items}).encode()
    began = time.perf_counter()
    response = httpx.post(
        f"{server.url}/v1/jobs",
        content=body,
        headers={"content-type": "application/json"},
        timeout=300,
    )
    if response.status_code != 202:
        raise SystemExit(f"submission refused: {response.status_code} {response.text[:300]}")
    ids = [job["id"] for job in response.json()["jobs"]]
    samples: list[tuple[float, int]] = []
    while True:
        backlog = int(client.xlen(f"{PREFIX}:jobs"))
        samples.append((time.perf_counter() - began, backlog))
        if backlog == 0:
            break
        time.sleep(0.2)
    elapsed = time.perf_counter() - began
    done = count_done(server, ids)
    return PathResult(
        "jobs",
        round_index,
        IMAGES,
        done,
        round(elapsed, 2),
        round(done / elapsed, 2),
        drain_rate(samples),
    )


def count_done(server: Server, ids: list[str]) -> int:
    with httpx.Client(timeout=30) as client:
        states = [client.get(f"{server.url}/v1/jobs/{job_id}").json()["state"] for job_id in ids]
    return states.count("done")


def drain_rate(samples: list[tuple[float, int]]) -> float | None:
    """Jobs per second the backlog falls by, fitted over the samples from its peak down."""
    peak = max(range(len(samples)), key=lambda i: samples[i][1])
    falling = samples[peak:]
    if len(falling) < 3:
        return None
    times = np.array([t for t, _ in falling])
    sizes = np.array([b for _, b in falling], dtype=float)
    slope = float(np.polyfit(times, sizes, 1)[0])
    return round(-slope, 2)


def markdown(results: list[PathResult]) -> str:
    lines = [
        "| path | round | images | done | seconds | img/s | backlog drain img/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        drain = "-" if r.drain_rate is None else f"{r.drain_rate:.2f}"
        lines.append(
            f"| {r.path} | {r.round} | {r.images} | {r.done} | {r.seconds} "
            f"| {r.throughput:.2f} | {drain} |"
        )
    return "\n".join(lines)


def verdict(results: list[PathResult]) -> str:
    sync = statistics.mean(r.throughput for r in results if r.path == "sync")
    jobs = statistics.mean(r.throughput for r in results if r.path == "jobs")
    drains = [r.drain_rate for r in results if r.path == "jobs" and r.drain_rate is not None]
    drain = f", backlog drained at {statistics.mean(drains):.2f} img/s" if drains else ""
    return (
        f"job path {jobs:.2f} img/s = {jobs / sync:.0%} of sync {sync:.2f} img/s "
        f"(target >= 90%){drain}"
    )


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers: server and Redis stop


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    model_dir = Path(os.environ.get("U2NET_HOME", "~/.u2net")).expanduser()
    if not (model_dir / f"{MODEL}.onnx").is_file():
        raise SystemExit(f"{model_dir}/{MODEL}.onnx missing: run `make model`")
    images = benchmark_images()
    cpus = len(os.sched_getaffinity(0))
    print(f"{IMAGES} images of 1920x1080 per run, {cpus} CPUs, sync concurrency {CONCURRENCY}")
    with contextlib.ExitStack() as stack:
        store = RedisServer(Path(tempfile.mkdtemp(prefix="rembg-bench-redis-")))
        store.start()
        stack.callback(store.stop)
        host, port_text = store.address.split(":")
        client = stack.enter_context(
            contextlib.closing(redis.Redis(host=host, port=int(port_text)))
        )
        port = free_port()
        env = {
            **os.environ,
            "U2NET_HOME": str(model_dir),
            "PYTHONUNBUFFERED": "1",
            "REMBG_HOST": "127.0.0.1",
            "REMBG_PORT": str(port),
            "REMBG_MODELS": MODEL,
            "REMBG_LOG_LEVEL": "warning",
            "REMBG_JOBS_ENABLED": "true",
            "REMBG_JOBS_REDIS_ADDRESS": store.address,
            "REMBG_JOBS_KEY_PREFIX": PREFIX,
            "REMBG_JOBS_MAX_BATCH_BYTES": str(256 * 2**20),
        }
        command = [sys.executable, "-m", "rembg_server"]
        server = stack.enter_context(running("ours", command, env, port, "/readyz"))
        warm(server, images)
        results = []
        for round_index in range(1, ROUNDS + 1):
            for result in (
                run_sync(server, images, round_index),
                run_jobs(server, images, client, round_index),
            ):
                print(json.dumps(asdict(result)), flush=True)
                results.append(result)
    print()
    print(markdown(results))
    print()
    print(verdict(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
