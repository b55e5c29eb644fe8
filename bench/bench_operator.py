"""Operator benchmark: 1, 100 and 500 RembgServices on the local control plane.

    python bench/bench_operator.py [--sizes 1,100,500] [--cpu-nodes 6] [--kubeconfig PATH]
                                   [--controller-manager-qps N]

Starts its own control plane (etcd, kube-apiserver, controller-manager, scheduler, KWOK),
or uses the one behind --kubeconfig (adding KWOK CPU nodes so the pods fit), and
`python -m rembg_operator` as a real process watching the bench namespaces, then per size,
in a fresh namespace: creates N RembgServices (one CPU pool each, tiny requests so N pods
fit on KWOK nodes) concurrently through the API, watches the children and the
RembgServices, and prints

- apply -> all children: p50/p99 over services (creation answered -> last of its six
  children seen: Deployment, Service, HPA, PDB, ServiceMonitor, PrometheusRule), and in
  the JSON line the p99 per kind (which child comes last),
- time until all Ready (first create sent -> last Ready=True seen), which includes the
  scheduler, KWOK and the controller-manager, not only the operator: the controller-manager's
  own client limit (20 requests/s, --controller-manager-qps raises it) paces every
  Deployment's ReplicaSet and Pod,
- operator peak RSS (sampled every 100 ms),
- API requests per service and per full reconcile (the operator's own counters).

Targets on 2 cores: p99 <= 1 s, 500 Ready <= 60 s, RSS <= 250 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from kubernetes_asyncio.client.exceptions import ApiException
from rembg_devcluster import ClusterConfig, DevCluster
from rembg_devcluster.errors import KubectlError
from rembg_devcluster.external import ExternalCluster
from rembg_devcluster.nodes import build_kwok_node
from rembg_operator.kube import KubeClient

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "rembg.io_rembgservices.yaml"
CHILDREN = (
    ("/apis/apps/v1", "deployments"),
    ("/api/v1", "services"),
    ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("/apis/policy/v1", "poddisruptionbudgets"),
    ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
)
TIMEOUT_SECONDS = 300.0
# A watch stream quiet this long is reopened where it left off (bookmarks come every minute).
WATCH_SILENCE_SECONDS = 20.0


def spec() -> dict[str, Any]:
    return {
        "cpu": {
            "minReplicas": 1,
            "maxReplicas": 2,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "1"}},
        }
    }


@dataclass
class Timeline:
    created: dict[str, float] = field(default_factory=dict)
    children: dict[str, dict[str, float]] = field(default_factory=dict)
    ready: dict[str, float] = field(default_factory=dict)


class PeakRss(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.1)


def operator_counters(port: int) -> tuple[float, float]:
    """(API requests sent, full reconciles) from the operator's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    requests = reconciles = 0.0
    for line in text.splitlines():
        if line.startswith("rembg_operator_api_requests_total{"):
            requests += float(line.rsplit(" ", 1)[1])
        if line.startswith("rembg_operator_reconciles_total{") and 'kind="full"' in line:
            reconciles += float(line.rsplit(" ", 1)[1])
    return requests, reconciles


async def _open_watch(client: KubeClient, path: str, query: list[tuple[str, str]]) -> Any:
    """The streaming response; ApiException when refused (429 while a CRD's cache starts)."""
    api = client._api  # the bench reuses the operator's authenticated session
    response = await asyncio.wait_for(
        api.call_api(
            path,
            "GET",
            query_params=query,
            auth_settings=["BearerToken"],
            _preload_content=False,
            _request_timeout=None,
        ),
        WATCH_SILENCE_SECONDS,
    )
    if response.status != 200:
        response.release()
        raise ApiException(status=response.status, reason=response.reason)
    return response


async def watch(
    client: KubeClient, path: str, on_event: Any, stop: asyncio.Event, query: list[tuple[str, str]]
) -> None:
    """Follow a watch stream until stopped, resuming where a dropped connection left off."""
    version = ""
    while not stop.is_set():
        params = [("watch", "true"), ("timeoutSeconds", "60"), ("allowWatchBookmarks", "true")]
        if version:
            params.append(("resourceVersion", version))
        try:
            async with await _open_watch(client, path, [*params, *query]) as response:
                while not stop.is_set():
                    line = await asyncio.wait_for(
                        response.content.readline(), WATCH_SILENCE_SECONDS
                    )
                    if not line:
                        break
                    event = json.loads(line)
                    if event["type"] == "ERROR":  # 410 Gone: list again from now
                        version = ""
                        break
                    version = event["object"]["metadata"].get("resourceVersion") or version
                    if event["type"] != "BOOKMARK":
                        on_event(event)
        except (ApiException, aiohttp.ClientError, TimeoutError, ValueError) as error:
            # A loaded API server drops streams, refuses them, or leaves one silent (kopf's
            # known problem, which the operator guards against the same way); losing a stream
            # would lose every later event.
            if not isinstance(error, TimeoutError):
                print(f"watch {path}: {error!r}, reconnecting", file=sys.stderr, flush=True)
            await asyncio.sleep(0.5)


async def run_size(
    client: KubeClient, cluster: DevCluster | ExternalCluster, size: int, port: int
) -> dict[str, Any]:
    namespace = f"bench-{size}"
    cluster.create_namespace(namespace)
    cluster.wait_for_default_service_account(namespace)
    timeline = Timeline()
    stop = asyncio.Event()
    names = [f"rbs-{i:04d}" for i in range(size)]

    def child_seen(event: dict[str, Any]) -> None:
        obj = event["object"]
        service = obj["metadata"].get("labels", {}).get("rembg.io/service")
        if service and event["type"] in ("ADDED", "MODIFIED"):
            timeline.children.setdefault(service, {}).setdefault(obj["kind"], time.perf_counter())

    def service_seen(event: dict[str, Any]) -> None:
        obj = event["object"]
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True":
                timeline.ready.setdefault(obj["metadata"]["name"], time.perf_counter())

    selector = [("labelSelector", "app.kubernetes.io/managed-by=rembg-operator")]
    watches = [
        asyncio.create_task(
            watch(client, f"{base}/namespaces/{namespace}/{plural}", child_seen, stop, selector)
        )
        for base, plural in CHILDREN
    ]
    watches.append(
        asyncio.create_task(
            watch(
                client,
                f"/apis/rembg.io/v1alpha1/namespaces/{namespace}/rembgservices",
                service_seen,
                stop,
                [],
            )
        )
    )
    await asyncio.sleep(1.0)  # let the watches open
    requests_before, reconciles_before = operator_counters(port)
    limit = asyncio.Semaphore(16)

    async def create(name: str) -> None:
        body = {
            "apiVersion": "rembg.io/v1alpha1",
            "kind": "RembgService",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec(),
        }
        async with limit:
            await client.request(
                "POST", f"/apis/rembg.io/v1alpha1/namespaces/{namespace}/rembgservices", body=body
            )
            timeline.created[name] = time.perf_counter()

    started = time.perf_counter()
    await asyncio.gather(*(create(n) for n in names))
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while len(timeline.ready) < size and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a dict the watches fill
        await asyncio.sleep(0.2)
    # Let trailing status writes settle before reading the counters.
    await asyncio.sleep(2.0)
    requests_after, reconciles_after = operator_counters(port)
    stop.set()
    for task in watches:
        task.cancel()
    await asyncio.gather(*watches, return_exceptions=True)

    latencies = []
    for name in names:
        seen = timeline.children.get(name, {})
        if len(seen) == len(CHILDREN):
            latencies.append(max(seen.values()) - timeline.created[name])
    latencies.sort()
    per_kind = {
        kind: _quantile(
            sorted(
                seen[kind] - timeline.created[name]
                for name, seen in timeline.children.items()
                if kind in seen and name in timeline.created
            ),
            0.99,
        )
        for kind in sorted({k for seen in timeline.children.values() for k in seen})
    }
    all_ready = max(timeline.ready.values()) - started if len(timeline.ready) == size else None
    requests = requests_after - requests_before
    reconciles = reconciles_after - reconciles_before
    return {
        "services": size,
        "children_complete": len(latencies),
        "apply_to_children_p50_s": _quantile(latencies, 0.5),
        "apply_to_children_p99_s": _quantile(latencies, 0.99),
        "child_kind_p99_s": per_kind,
        "all_ready_s": all_ready,
        "ready": len(timeline.ready),
        "api_requests": requests,
        "full_reconciles": reconciles,
        "api_requests_per_service": requests / size,
        "api_requests_per_full_reconcile": requests / reconciles if reconciles else None,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.3f}{unit}"


async def bench(
    sizes: list[int], cpu_nodes: int, kubeconfig: Path | None, controller_manager_qps: int | None
) -> int:
    with tempfile.TemporaryDirectory(prefix="rembg-bench-") as state:
        cluster: DevCluster | ExternalCluster
        if kubeconfig is not None:
            cluster = ExternalCluster(kubeconfig, Path(state))
            _add_nodes(cluster, cpu_nodes)
        else:
            print(f"starting a local control plane ({cpu_nodes} CPU KWOK nodes) ...", flush=True)
            qps = controller_manager_qps
            cluster = DevCluster.start(
                ClusterConfig(
                    state_dir=Path(state),
                    cpu_nodes=cpu_nodes,
                    gpu_nodes=0,
                    controller_manager_args=(
                        (f"--kube-api-qps={qps}", f"--kube-api-burst={2 * qps}") if qps else ()
                    ),
                )
            )
        try:
            return await _bench_on(cluster, sizes)
        finally:
            cluster.stop()


def _add_nodes(cluster: ExternalCluster, count: int) -> None:
    """KWOK CPU nodes for the bench pods (an existing cluster may have too few)."""
    if count == 0:
        return
    nodes = [build_kwok_node(f"bench-cpu-{i}", "cpu") for i in range(count)]
    # KWOK nodes carry a partial status.nodeInfo, which client-side validation refuses.
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=listing)


async def _bench_on(cluster: DevCluster | ExternalCluster, sizes: list[int]) -> int:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    _wait_established(cluster)
    metrics_port = _free_port()
    env = {
        **cluster.env,
        "REMBG_OPERATOR_METRICS_PORT": str(metrics_port),
        "REMBG_OPERATOR_LIVENESS_PORT": str(_free_port()),
        "REMBG_OPERATOR_BIND_ADDRESS": "127.0.0.1",
        "REMBG_OPERATOR_LOG_LEVEL": "WARNING",
        "REMBG_OPERATOR_NAMESPACES": ",".join(f"bench-{size}" for size in sizes),
    }
    record = cluster.spawn("operator", [sys.executable, "-m", "rembg_operator"], env=env)
    rss = PeakRss(record.pid)
    rss.start()
    client = await KubeClient.connect(cluster.kubeconfig)
    try:
        await _wait_for_metrics(metrics_port)
        results = [await run_size(client, cluster, size, metrics_port) for size in sizes]
    finally:
        await client.close()
        rss.running = False
        cluster.stop_process("operator")
    print()
    print(f"{'services':>8} {'p50':>9} {'p99':>9} {'all Ready':>10} {'req/svc':>8} {'req/rec':>8}")
    for r in results:
        per_reconcile = r["api_requests_per_full_reconcile"]
        print(
            f"{r['services']:>8} {_fmt(r['apply_to_children_p50_s']):>9} "
            f"{_fmt(r['apply_to_children_p99_s']):>9} {_fmt(r['all_ready_s']):>10} "
            f"{r['api_requests_per_service']:>8.1f} "
            f"{'n/a' if per_reconcile is None else f'{per_reconcile:.1f}':>8}"
        )
    peak_mb = rss.peak / 2**20
    print(f"operator peak RSS: {peak_mb:.0f} MiB")
    print(json.dumps({"results": results, "operator_peak_rss_mib": round(peak_mb, 1)}))
    biggest = results[-1]
    ok = (
        all(r["ready"] == r["services"] for r in results)
        and (biggest["apply_to_children_p99_s"] or 1e9) <= 1.0
        and (biggest["all_ready_s"] or 1e9) <= 60.0
        and peak_mb <= 250
    )
    print("targets (p99 <= 1 s, all Ready <= 60 s, RSS <= 250 MB):", "met" if ok else "NOT met")
    return 0


def _wait_established(cluster: DevCluster | ExternalCluster) -> None:
    # kubectl wait fails at once, not waits, while a new CRD has no conditions at all.
    deadline = time.monotonic() + 60
    while True:
        try:
            cluster.kubectl(
                "wait", "crd/rembgservices.rembg.io", "--for=condition=Established", "--timeout=60s"
            )
        except KubectlError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
        else:
            return


async def _wait_for_metrics(port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            operator_counters(port)
        except OSError:
            await asyncio.sleep(0.3)
        else:
            return
    raise RuntimeError("the operator's metrics endpoint never came up")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,100,500", help="comma-separated service counts")
    parser.add_argument("--cpu-nodes", type=int, default=6, help="KWOK CPU nodes (110 pods each)")
    parser.add_argument("--kubeconfig", type=Path, help="use this cluster instead of a new one")
    parser.add_argument(
        "--controller-manager-qps",
        type=int,
        help="kube-controller-manager --kube-api-qps (burst twice that) of the cluster started "
        "here; default: its own 20/30, which paces Deployments -> ReplicaSets -> Pods",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    return asyncio.run(bench(sizes, args.cpu_nodes, args.kubeconfig, args.controller_manager_qps))


if __name__ == "__main__":
    sys.exit(main())
