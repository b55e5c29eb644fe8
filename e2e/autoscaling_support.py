"""Real inference servers and bounded load for the autoscaling e2e tests.

The servers are real `python -m rembg_server` processes (u2netp from ~/.u2net, one inference
thread each) on free loopback ports; rembg_devcluster.metrics_stack maps the pool's KWOK pods
onto them. The load generator plays the pool's Service: it spreads requests over the servers
behind the pool's current pods, so adding pods divides the load as it would in a cluster.
`submit_jobs` and `job_states` drive the asynchronous job API (/v1/jobs) the same way.
"""

from __future__ import annotations

import functools
import io
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from PIL import Image
from rembg_devcluster import DevCluster
from rembg_devcluster.metrics_stack import keda_crds_dir

from e2e.operator_support import eventually, free_port, install_crd

SERVER_ENV = {
    "REMBG_HOST": "127.0.0.1",
    "REMBG_MODELS": "u2netp",
    "REMBG_PROVIDER": "cpu",
    "REMBG_THREADS": "1",
    "REMBG_INFERENCE_WORKERS": "1",
    "REMBG_CPU_WORKERS": "1",
    "REMBG_WARMUP_RUNS": "1",
    # Far above the test's concurrency: the queue signal must show, never a 429.
    "REMBG_QUEUE_MAX_REQUESTS": "64",
    "REMBG_LOG_FORMAT": "json",
    "REMBG_LOG_LEVEL": "warning",
}


def autoscaling_cluster(
    cluster_factory: Callable[..., DevCluster], hpa_sync_period: str
) -> Iterator[DevCluster]:
    """A CPU-only cluster whose HPA controller syncs every `hpa_sync_period`, with our CRD and
    KEDA's; stopped with everything on it when the module using it is done, so the rest of the
    session does not share the CPU with it (the factory's own stop is then a no-op)."""
    started = cluster_factory(
        gpu_nodes=0,
        controller_manager_args=(
            f"--horizontal-pod-autoscaler-sync-period={hpa_sync_period}",
            # KWOK posts node status only every ~20-60 s (no leases); past the default 50 s
            # grace the node controller marks every pod NotReady for good, and the HPA and the
            # status would watch unready pods. Seen on a loaded 2-core machine.
            "--node-monitor-grace-period=10m",
        ),
    )
    try:
        install_crd(started)
        started.install_crds(sorted(keda_crds_dir().glob("*.yaml")))
        yield started
    finally:
        started.stop()


def start_servers(
    cluster: Any, prefix: str, count: int, extra_env: dict[str, str] | None = None
) -> list[str]:
    """Spawns `count` servers through the cluster's process host; returns their host:port."""
    addresses = []
    for index in range(count):
        port = free_port()
        env = {**cluster.env, **SERVER_ENV, **(extra_env or {}), "REMBG_PORT": str(port)}
        cluster.spawn(f"{prefix}-{index}", [sys.executable, "-m", "rembg_server"], env=env)
        addresses.append(f"127.0.0.1:{port}")
    for address in addresses:
        eventually(
            functools.partial(_ready, address), what=f"rembg_server {address} /readyz", timeout=180
        )
    return addresses


def _ready(address: str) -> bool:
    try:
        return httpx.get(f"http://{address}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def small_png(size: int = 64) -> bytes:
    """A small test image: the model still runs at its full input size (320x320)."""
    image = Image.new("RGB", (size, size))
    for x in range(size):
        for y in range(size):
            image.putpixel((x, y), ((x * 4) % 256, (y * 4) % 256, 128 if x > y else 32))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class LoadGenerator:
    """`concurrency` closed-loop clients over the servers `targets()` names, until stop() or
    `max_requests` requests in all (whichever comes first)."""

    targets: Callable[[], Sequence[str]]
    concurrency: int
    max_requests: int
    body: bytes = field(default_factory=small_png)
    sent: int = 0
    answered: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.concurrency):
            thread = threading.Thread(target=self._client, args=(index,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _take_ticket(self) -> bool:
        with self._lock:
            if self.sent >= self.max_requests:
                return False
            self.sent += 1
            return True

    def _client(self, index: int) -> None:
        turn = index
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                servers = list(self.targets())
                if not servers:
                    time.sleep(0.2)
                    continue
                if not self._take_ticket():
                    return
                server = servers[turn % len(servers)]
                turn += 1
                self._send(client, server)

    def _send(self, client: httpx.Client, server: str) -> None:
        try:
            response = client.post(
                f"http://{server}/v1/remove",
                content=self.body,
                headers={"Content-Type": "image/png"},
            )
        except httpx.HTTPError:
            with self._lock:
                self.errors += 1
            time.sleep(0.2)
            return
        with self._lock:
            self.answered[response.status_code] = self.answered.get(response.status_code, 0) + 1
        if response.status_code == 429:
            time.sleep(0.2)

    def summary(self) -> str:
        return f"sent {self.sent}, answered {self.answered}, transport errors {self.errors}"


def submit_jobs(server: str, count: int, body: bytes) -> list[str]:
    """POSTs `count` single-image jobs (each must be accepted with 202); returns their ids."""
    ids = []
    with httpx.Client(timeout=30) as client:
        for _ in range(count):
            response = client.post(
                f"http://{server}/v1/jobs", content=body, headers={"Content-Type": "image/png"}
            )
            assert response.status_code == 202, (response.status_code, response.text)
            ids.append(str(response.json()["id"]))
    return ids


def job_states(server: str, ids: Sequence[str]) -> dict[str, int]:
    """How many of the jobs are in each state (GET /v1/jobs/{id}; any replica answers)."""
    counts: dict[str, int] = {}
    with httpx.Client(timeout=30) as client:
        for job_id in ids:
            response = client.get(f"http://{server}/v1/jobs/{job_id}")
            state = str(response.json()["state"]) if response.status_code == 200 else "missing"
            counts[state] = counts.get(state, 0) + 1
    return counts
