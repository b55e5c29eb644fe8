"""Operator benchmark: 1, 100 and 500 RembgServices on the local control plane, against its floor.

    python bench/bench_operator.py [--sizes 1,100,500] [--cpu-nodes 6] [--kubeconfig PATH]
                                   [--controller-manager-qps N] [--floor | --no-floor]
                                   [--idle-seconds 300]

Operator runs. Starts its own control plane (etcd, kube-apiserver, controller-manager,
scheduler, KWOK), or uses the one behind --kubeconfig (adding KWOK CPU nodes so the pods fit),
and `python -m rembg_operator` as a real process watching the bench namespaces, then per size,
in a fresh namespace: creates N RembgServices (one CPU pool each, tiny requests so N pods fit
on KWOK nodes) concurrently through the API, watches the children and the RembgServices, and
prints

- apply -> all children: p50/p99 over services (creation answered -> last of its six
  children seen: Deployment, Service, HPA, PDB, ServiceMonitor, PrometheusRule), the time
  from the first creation sent to the last child of any service seen ("all children"), and
  in the JSON line the p99 per kind (which child comes last),
- time until all Ready (first create sent -> last Ready=True seen), which includes the
  scheduler, KWOK and the controller-manager, not only the operator: the controller-manager's
  own client limit (20 requests/s, --controller-manager-qps raises it) paces every
  Deployment's ReplicaSet and Pod,
- operator peak RSS (sampled every 100 ms),
- API requests per service and per full reconcile (the operator's own counters).

Steady state: once the largest size is all Ready, the operator is left idle for --idle-seconds
and its API writes in that window are counted: POST, PUT, PATCH and DELETE in its own
rembg_operator_api_requests_total{method,resource,code}, after minus before, by request. Its
resync (a full pass of every service, sending only what differs, and a deep audit of whole
children) comes once per resync_seconds, the first about resync_seconds after it started; the
output says when the window reaches that far. The audit's lists (resource `<Kind>List`) are
reads, counted apart, and not in the requests per reconcile.

Floor runs (--floor, the default): the same sizes, in the same order, with no operator. The
operator's control plane is stopped and a fresh one started with the same configuration (KWOK
nodes, controller-manager flags); each size gets a fresh namespace of the same name, so every
floor size meets the cluster history its operator size met (the smaller sizes' services and
pods still there), on a control plane nothing else loads. That is fairer than fresh namespaces
on the operator's cluster, where every floor size would also carry all the operator runs'
objects and the state their garbage collector, scheduler and KWOK keep. bench/operator_floor.py,
a process of its own as the operator is, creates the same RembgServices and server-side
applies the very children the operator builds for each (its builders, kopf.adopt to the real
RembgService, KubeClient.apply, max_concurrent_reconciles services at a time; its docstring
says exactly what, and what it leaves out). The same watches time it: apply -> all children
from each creation answered, and "all Ready" as every Deployment available (observedGeneration
current and availableReplicas == replicas) from the first creation sent. With --kubeconfig
the floor runs on that same cluster once the operator is stopped, in namespaces
bench-floor-<size>, next to the operator runs' objects: not a fresh cluster.

Then per size the ratios operator / floor of apply -> children (p50, p99, all children) and of
all Ready, next to their targets. Targets: apply -> all children <= 1.15x the floor, all Ready
<= 1.1x the floor, API requests per full reconcile <= 9, all judged at sizes of 100 services
or more (the largest size when every size is smaller: at 1 service a few milliseconds of watch
latency are most of the time); operator peak RSS <= 250 MiB at the largest size; 0 API writes
while idle; and, on 2 cores, p99 <= 1 s and 500 Ready <= 60 s. The last line is one JSON object
with every number.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from kubernetes_asyncio.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families
from rembg_devcluster import ClusterConfig, DevCluster
from rembg_devcluster.errors import KubectlError
from rembg_devcluster.external import ExternalCluster
from rembg_devcluster.nodes import build_kwok_node
from rembg_operator.builders import ServiceRef, build_children
from rembg_operator.kube import KubeClient
from rembg_operator.models import RembgServiceSpec
from rembg_operator.settings import Settings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.operator_floor import (  # noqa: E402 - the repository root, just above
    CAPABILITIES,
    Job,
    Result,
    clock,
    rembg_service,
)

CRD = REPO / "crds" / "rembg.io_rembgservices.yaml"
FLOOR_SCRIPT = Path(__file__).resolve().with_name("operator_floor.py")
CHILDREN = (
    ("/apis/apps/v1", "deployments"),
    ("/api/v1", "services"),
    ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("/apis/policy/v1", "poddisruptionbudgets"),
    ("/apis/monitoring.coreos.com/v1", "servicemonitors"),
    ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
)
CREATE_CONCURRENCY = 16  # RembgService creations in flight, in both kinds of run
TIMEOUT_SECONDS = 300.0
# A watch stream quiet this long is reopened where it left off (bookmarks come every minute).
WATCH_SILENCE_SECONDS = 20.0
WATCH_OPEN_SECONDS = 60.0
SETTLE_SECONDS = 2.0  # trailing status writes, before the counters are read
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
JUDGED_FROM = 100  # services; smaller sizes are printed, not judged (unless all are smaller)
TARGET_CHILDREN_RATIO = 1.15
TARGET_READY_RATIO = 1.1
TARGET_RSS_MIB = 250.0
TARGET_REQUESTS_PER_RECONCILE = 9.0
TARGET_P99_SECONDS = 1.0
TARGET_READY_500_SECONDS = 60.0


def spec() -> dict[str, Any]:
    return {
        "cpu": {
            "minReplicas": 1,
            "maxReplicas": 2,
            "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"cpu": "1"}},
        }
    }


def deployments_per_service() -> int:
    """How many Deployments the operator's builders make for spec() (one per pool)."""
    desired = build_children(
        ServiceRef(name="count", namespace="bench"),
        RembgServiceSpec.model_validate(spec()),
        CAPABILITIES,
    )
    return sum(manifest["kind"] == "Deployment" for manifest in desired.manifests)


def service_names(size: int) -> list[str]:
    return [f"rbs-{i:04d}" for i in range(size)]


@dataclass
class Timeline:
    """When each service was created and each of its children first seen (clock())."""

    created: dict[str, float] = field(default_factory=dict)
    children: dict[str, dict[str, float]] = field(default_factory=dict)
    # Operator runs: the RembgService's Ready=True condition first seen.
    ready: dict[str, float] = field(default_factory=dict)
    # service -> Deployment name -> first seen available (both kinds of run).
    available: dict[str, dict[str, float]] = field(default_factory=dict)

    def all_available(self, per_service: int) -> dict[str, float]:
        """service -> when the last of its Deployments was first seen available."""
        return {
            service: max(seen.values())
            for service, seen in self.available.items()
            if len(seen) >= per_service
        }


def deployment_available(deployment: Mapping[str, Any]) -> bool:
    """The controller saw the newest spec and every replica it asks for is available."""
    meta = deployment["metadata"]
    status = deployment.get("status") or {}
    replicas = int((deployment.get("spec") or {}).get("replicas", 1))
    return (
        int(status.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
        and int(status.get("availableReplicas") or 0) == replicas
    )


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


def _operator_samples(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of everything the operator's /metrics exports."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def full_reconciles(port: int) -> float:
    """Full reconciles so far, from the operator's /metrics."""
    return sum(
        value
        for name, labels, value in _operator_samples(port)
        if name == "rembg_operator_reconciles_total" and labels.get("kind") == "full"
    )


def requests_by_kind(port: int, *, audit: bool = False) -> dict[str, float]:
    """'METHOD resource' -> requests sent so far: the reconciles' or (audit) the audit's lists
    (resource `<Kind>List`), which are per namespace and interval, not per reconcile."""
    found: dict[str, float] = {}
    for name, labels, value in _operator_samples(port):
        if name != "rembg_operator_api_requests_total":
            continue
        if labels["resource"].endswith("List") == audit:
            request = f"{labels['method']} {labels['resource']}"
            found[request] = found.get(request, 0.0) + value
    return found


def operator_writes(port: int) -> dict[str, float]:
    """'METHOD resource code' -> requests sent, for the writing methods only."""
    return {
        f"{labels['method']} {labels['resource']} {labels['code']}": value
        for name, labels, value in _operator_samples(port)
        if name == "rembg_operator_api_requests_total" and labels.get("method") in WRITE_METHODS
    }


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
    client: KubeClient,
    path: str,
    on_event: Any,
    stop: asyncio.Event,
    query: list[tuple[str, str]],
    opened: asyncio.Event | None = None,
) -> None:
    """Follow a watch stream until stopped, resuming where a dropped connection left off.

    `opened` is set once the API server has accepted the stream.
    """
    version = ""
    while not stop.is_set():
        params = [("watch", "true"), ("timeoutSeconds", "60"), ("allowWatchBookmarks", "true")]
        if version:
            params.append(("resourceVersion", version))
        try:
            async with await _open_watch(client, path, [*params, *query]) as response:
                if opened is not None:
                    opened.set()
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


@contextlib.asynccontextmanager
async def watching(client: KubeClient, namespace: str) -> AsyncIterator[Timeline]:
    """A Timeline the watches of the namespace's children and RembgServices fill."""
    timeline = Timeline()
    stop = asyncio.Event()

    def child_seen(event: dict[str, Any]) -> None:
        obj = event["object"]
        service = obj["metadata"].get("labels", {}).get("rembg.io/service")
        if not service or event["type"] not in ("ADDED", "MODIFIED"):
            return
        seen = clock()
        timeline.children.setdefault(service, {}).setdefault(obj["kind"], seen)
        if obj["kind"] == "Deployment" and deployment_available(obj):
            timeline.available.setdefault(service, {}).setdefault(obj["metadata"]["name"], seen)

    def service_seen(event: dict[str, Any]) -> None:
        obj = event["object"]
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True":
                timeline.ready.setdefault(obj["metadata"]["name"], clock())

    selector = [("labelSelector", "app.kubernetes.io/managed-by=rembg-operator")]
    streams = [
        (f"{base}/namespaces/{namespace}/{plural}", child_seen, selector)
        for base, plural in CHILDREN
    ]
    streams.append(
        (f"/apis/rembg.io/v1alpha1/namespaces/{namespace}/rembgservices", service_seen, [])
    )
    opened = [asyncio.Event() for _ in streams]
    watches = [
        asyncio.create_task(watch(client, path, on_event, stop, query, is_open))
        for (path, on_event, query), is_open in zip(streams, opened, strict=True)
    ]
    try:
        # Every stream accepted before anything is created: a watch that is refused at first
        # (429 while a new CRD's cache starts) would see the first objects late.
        async with asyncio.timeout(WATCH_OPEN_SECONDS):
            await asyncio.gather(*(is_open.wait() for is_open in opened))
        # and a moment more: a creation sent the instant they open stalled on a fresh cluster.
        await asyncio.sleep(1.0)
        yield timeline
    finally:
        stop.set()
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)


async def wait_for_all(count: Callable[[], int], size: int) -> None:
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while count() < size and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a dict the watches fill
        await asyncio.sleep(0.2)


def _fresh_namespace(cluster: DevCluster | ExternalCluster, namespace: str) -> None:
    cluster.create_namespace(namespace)
    cluster.wait_for_default_service_account(namespace)


async def run_size(
    client: KubeClient, cluster: DevCluster | ExternalCluster, size: int, port: int
) -> dict[str, Any]:
    """One operator run: N RembgServices created, the operator builds the rest."""
    namespace = f"bench-{size}"
    _fresh_namespace(cluster, namespace)
    names = service_names(size)
    limit = asyncio.Semaphore(CREATE_CONCURRENCY)
    async with watching(client, namespace) as timeline:
        reconciles_before = full_reconciles(port)
        kinds_before = requests_by_kind(port)

        async def create(name: str) -> None:
            async with limit:
                await client.request(
                    "POST",
                    f"/apis/rembg.io/v1alpha1/namespaces/{namespace}/rembgservices",
                    body=rembg_service(name, namespace, spec()),
                )
                timeline.created[name] = clock()

        started = clock()
        await asyncio.gather(*(create(n) for n in names))
        await wait_for_all(lambda: len(timeline.ready), size)
        await asyncio.sleep(SETTLE_SECONDS)
        reconciles_after = full_reconciles(port)
        kinds_after = requests_by_kind(port)
    requests = sum(kinds_after.values()) - sum(kinds_before.values())
    reconciles = reconciles_after - reconciles_before
    return {
        **summarize(timeline, names, started, timeline.ready),
        "api_requests": requests,
        "full_reconciles": reconciles,
        "api_requests_per_service": requests / size,
        "api_requests_per_full_reconcile": requests / reconciles if reconciles else None,
        "api_requests_by_kind": {
            request: count - kinds_before.get(request, 0.0)
            for request, count in sorted(kinds_after.items())
            if count > kinds_before.get(request, 0.0)
        },
    }


async def run_floor_size(
    client: KubeClient,
    cluster: DevCluster | ExternalCluster,
    size: int,
    namespace: str,
    workdir: Path,
) -> dict[str, Any]:
    """One floor run: bench/operator_floor.py does the operator's writes, no operator runs."""
    _fresh_namespace(cluster, namespace)
    names = service_names(size)
    job: Job = {
        "kubeconfig": str(cluster.kubeconfig),
        "namespace": namespace,
        "names": names,
        "spec": spec(),
        "create_concurrency": CREATE_CONCURRENCY,
        "concurrency": Settings().max_concurrent_reconciles,
    }
    per_service = deployments_per_service()
    async with watching(client, namespace) as timeline:
        outcome, peak = await _run_floor_process(cluster, f"floor-{size}", job, workdir)
        timeline.created.update(outcome["created"])
        await wait_for_all(lambda: len(timeline.all_available(per_service)), size)
    return {
        **summarize(timeline, names, outcome["started"], timeline.all_available(per_service)),
        "concurrency": job["concurrency"],
        "apply_retries": outcome["retries"],
        "apply_failures": len(outcome["failures"]),
        "client_peak_rss_mib": round(peak / 2**20, 1),
    }


async def _run_floor_process(
    cluster: DevCluster | ExternalCluster, name: str, job: Job, workdir: Path
) -> tuple[Result, int]:
    """Run operator_floor.py to its end (stopped with the cluster if this is cancelled)."""
    job_path, result_path = workdir / f"{name}.job.json", workdir / f"{name}.result.json"
    job_path.write_text(json.dumps(job))
    argv = [sys.executable, str(FLOOR_SCRIPT), str(job_path), str(result_path)]
    record = cluster.spawn(name, argv)
    rss = PeakRss(record.pid)
    rss.start()
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        while record.alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} still running after {TIMEOUT_SECONDS:.0f} s")
            await asyncio.sleep(0.2)
    finally:
        rss.running = False
        cluster.stop_process(name)
    code = cluster.wait_process(name, timeout=10)
    if code != 0:
        raise RuntimeError(f"{name} exited {code}:\n{cluster.log_tail(name)}")
    outcome: Result = json.loads(result_path.read_text())
    if outcome["failures"]:
        print(f"{name}: {len(outcome['failures'])} applies failed; see {record.log}", flush=True)
    return outcome, rss.peak


def summarize(
    timeline: Timeline, names: list[str], started: float, ready: Mapping[str, float]
) -> dict[str, Any]:
    """The numbers both kinds of run report; `ready` is what counts as Ready in this run."""
    latencies = []
    for name in names:
        seen = timeline.children.get(name, {})
        if len(seen) == len(CHILDREN) and name in timeline.created:
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
    size = len(names)
    available = timeline.all_available(deployments_per_service())
    return {
        "services": size,
        "children_complete": len(latencies),
        "apply_to_children_p50_s": _quantile(latencies, 0.5),
        "apply_to_children_p99_s": _quantile(latencies, 0.99),
        "all_children_s": (
            max(max(timeline.children[n].values()) for n in names) - started
            if len(latencies) == size
            else None
        ),
        "child_kind_p99_s": per_kind,
        "all_ready_s": max(ready.values()) - started if len(ready) == size else None,
        "ready": len(ready),
        "all_deployments_available_s": (
            max(available.values()) - started if len(available) == size else None
        ),
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def _fmt(value: float | None, unit: str = "s") -> str:
    return "n/a" if value is None else f"{value:.3f}{unit}"


@dataclass
class OperatorRuns:
    results: list[dict[str, Any]]
    peak_rss_mib: float
    idle: dict[str, Any] | None


async def bench(
    sizes: list[int],
    cpu_nodes: int,
    kubeconfig: Path | None,
    controller_manager_qps: int | None,
    *,
    floor: bool = True,
    idle_seconds: float = 300.0,
) -> int:
    _cancel_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="rembg-bench-") as state:
        root = Path(state)
        config = (cpu_nodes, kubeconfig, controller_manager_qps)
        with _cluster(root / "operator", *config, purpose="operator") as cluster:
            operator = await _bench_on(cluster, sizes, idle_seconds)
        floor_results = None
        if floor:
            with _cluster(root / "floor", *config, purpose="floor") as cluster:
                prefix = "bench-floor" if kubeconfig is not None else "bench"
                floor_results = await _floor_on(cluster, sizes, prefix, root)
    _report(operator, floor_results)
    return 0


@contextlib.contextmanager
def _cluster(
    state_dir: Path,
    cpu_nodes: int,
    kubeconfig: Path | None,
    controller_manager_qps: int | None,
    *,
    purpose: str,
) -> Iterator[DevCluster | ExternalCluster]:
    """A control plane for one kind of run; everything started on it is stopped on the way out."""
    cluster: DevCluster | ExternalCluster
    if kubeconfig is not None:
        cluster = ExternalCluster(kubeconfig, state_dir)
    else:
        print(f"starting a control plane for the {purpose} runs ({cpu_nodes} CPU KWOK nodes) ...")
        qps = controller_manager_qps
        cluster = DevCluster.start(  # stops what it started if it fails
            ClusterConfig(
                state_dir=state_dir,
                cpu_nodes=cpu_nodes,
                gpu_nodes=0,
                controller_manager_args=(
                    (f"--kube-api-qps={qps}", f"--kube-api-burst={2 * qps}") if qps else ()
                ),
            )
        )
    try:
        if isinstance(cluster, ExternalCluster):
            _add_nodes(cluster, cpu_nodes)
        yield cluster
    finally:
        with _signals_ignored():
            cluster.stop()


def _cancel_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C: the main task is cancelled, every `finally` runs."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


@contextlib.contextmanager
def _signals_ignored() -> Iterator[None]:
    """While a cluster stops, a second Ctrl-C (or a SIGTERM) must not leave half of it running."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _add_nodes(cluster: ExternalCluster, count: int) -> None:
    """KWOK CPU nodes for the bench pods (an existing cluster may have too few)."""
    if count == 0:
        return
    nodes = [build_kwok_node(f"bench-cpu-{i}", "cpu") for i in range(count)]
    # KWOK nodes carry a partial status.nodeInfo, which client-side validation refuses.
    listing = json.dumps({"apiVersion": "v1", "kind": "List", "items": nodes})
    cluster.kubectl("apply", "--validate=false", "-f", "-", input=listing)


def _install_crd(cluster: DevCluster | ExternalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD))
    _wait_established(cluster)


async def _bench_on(
    cluster: DevCluster | ExternalCluster, sizes: list[int], idle_seconds: float
) -> OperatorRuns:
    """Every operator run, then the idle window after the largest."""
    _install_crd(cluster)
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
    operator_started = clock()
    rss = PeakRss(record.pid)
    rss.start()
    client = await KubeClient.connect(cluster.kubeconfig)
    results: list[dict[str, Any]] = []
    idle = None
    try:
        await _wait_for_metrics(metrics_port)
        for size in sizes:
            print(f"operator: {size} services ...", flush=True)
            results.append(await run_size(client, cluster, size, metrics_port))
            if size == max(sizes) and idle is None and idle_seconds > 0:
                idle = await idle_window(metrics_port, idle_seconds, operator_started)
    finally:
        await client.close()
        rss.running = False
        cluster.stop_process("operator")
    return OperatorRuns(results, round(rss.peak / 2**20, 1), idle)


async def idle_window(port: int, seconds: float, operator_started: float) -> dict[str, Any]:
    """The operator's API writes while nothing changes (counter after minus before)."""
    print(f"operator: idle for {seconds:.0f} s, counting its API writes ...", flush=True)
    uptime = clock() - operator_started
    before = operator_writes(port)
    lists_before = sum(requests_by_kind(port, audit=True).values())
    await asyncio.sleep(seconds)
    after = operator_writes(port)
    audit_lists = sum(requests_by_kind(port, audit=True).values()) - lists_before
    by_request = {
        request: after[request] - before.get(request, 0.0)
        for request in sorted(after)
        if after[request] > before.get(request, 0.0)
    }
    resync = Settings().resync_seconds
    return {
        "seconds": seconds,
        "writes": sum(by_request.values()),
        "writes_by_request": by_request,
        "audit_lists": audit_lists,
        "operator_uptime_at_start_s": round(uptime, 1),
        "resync_seconds": resync,
        "reaches_first_resync": uptime + seconds >= resync,
    }


async def _floor_on(
    cluster: DevCluster | ExternalCluster, sizes: list[int], prefix: str, workdir: Path
) -> list[dict[str, Any]]:
    _install_crd(cluster)
    client = await KubeClient.connect(cluster.kubeconfig)
    try:
        results = []
        for size in sizes:
            print(f"floor: {size} services ...", flush=True)
            results.append(await run_floor_size(client, cluster, size, f"{prefix}-{size}", workdir))
        return results
    finally:
        await client.close()


def _ratio(operator: float | None, floor: float | None) -> float | None:
    if operator is None or floor is None or floor <= 0:
        return None
    return operator / floor


RATIOS = (  # key, label, target
    ("apply_to_children_p50_s", "apply->children p50", TARGET_CHILDREN_RATIO),
    ("apply_to_children_p99_s", "apply->children p99", TARGET_CHILDREN_RATIO),
    ("all_children_s", "apply->all children", TARGET_CHILDREN_RATIO),
    ("all_ready_s", "all Ready", TARGET_READY_RATIO),
)


def _judged(sizes: list[int]) -> set[int]:
    return {s for s in sizes if s >= min(JUDGED_FROM, max(sizes))}


def _report(operator: OperatorRuns, floor: list[dict[str, Any]] | None) -> None:
    results = operator.results
    judged = _judged([r["services"] for r in results])
    print()
    print("operator:")
    _print_runs(results, operator_columns=True)
    ratios: list[dict[str, Any]] = []
    ratios_met = None
    if floor is not None:
        print("floor (no operator; the same children, server-side applied by a plain client):")
        _print_runs(floor, operator_columns=False)
        ratios, ratios_met = _print_ratios(results, floor, judged)
    targets = {
        "judged_sizes": sorted(judged),
        **_print_operator_targets(operator, judged),
        "floor_ratios_met": ratios_met,
    }
    if floor is not None:
        print(
            f"floor targets (apply->all children <= {TARGET_CHILDREN_RATIO}x, "
            f"all Ready <= {TARGET_READY_RATIO}x):",
            "met" if ratios_met else "NOT met",
        )
    print(
        json.dumps(
            {
                "results": results,
                "operator_peak_rss_mib": operator.peak_rss_mib,
                "floor": floor,
                "ratios": ratios,
                "idle": operator.idle,
                "targets": targets,
            }
        )
    )


def _print_ratios(
    results: list[dict[str, Any]], floor: list[dict[str, Any]], judged: set[int]
) -> tuple[list[dict[str, Any]], bool]:
    """operator / floor per size and measure, each next to its target."""
    print(f"operator / floor (targets judged at {', '.join(map(str, sorted(judged)))} services):")
    print(f"{'services':>8}  {'':<20} {'operator':>9} {'floor':>9} {'ratio':>7}  target")
    rows: list[dict[str, Any]] = []
    all_met = True
    for mine, base in zip(results, floor, strict=True):
        row: dict[str, Any] = {"services": mine["services"]}
        for key, label, target in RATIOS:
            ratio = _ratio(mine[key], base[key])
            row[key.removesuffix("_s")] = ratio
            verdict = "not judged"
            if mine["services"] in judged:
                met = ratio is not None and ratio <= target
                all_met = all_met and met
                verdict = "met" if met else "NOT met"
            print(
                f"{mine['services']:>8}  {label:<20} {_fmt(mine[key]):>9} "
                f"{_fmt(base[key]):>9} {_fmt(ratio, 'x'):>7}  <= {target}x {verdict}"
            )
        rows.append(row)
    return rows, all_met


def _print_operator_targets(operator: OperatorRuns, judged: set[int]) -> dict[str, bool | None]:
    """RSS, requests per reconcile, idle writes and the absolute targets, each with its verdict."""
    results = operator.results
    largest = max(r["services"] for r in results)
    rss_met = operator.peak_rss_mib <= TARGET_RSS_MIB
    print(
        f"operator peak RSS: {operator.peak_rss_mib:.0f} MiB "
        f"(target <= {TARGET_RSS_MIB:.0f} MiB at {largest} services):",
        "met" if rss_met else "NOT met",
    )
    per_reconcile = {r["services"]: r["api_requests_per_full_reconcile"] for r in results}
    requests_met = all(
        per_reconcile[s] is not None and per_reconcile[s] <= TARGET_REQUESTS_PER_RECONCILE
        for s in judged
    )
    listed = ", ".join(
        f"{'n/a' if v is None else f'{v:.1f}'} at {s}" for s, v in per_reconcile.items()
    )
    print(
        f"API requests per full reconcile: {listed} "
        f"(target <= {TARGET_REQUESTS_PER_RECONCILE:.0f}):",
        "met" if requests_met else "NOT met",
    )
    idle_met = None
    if (idle := operator.idle) is not None:
        idle_met = idle["writes"] == 0
        print(
            f"API writes while idle for {idle['seconds']:.0f} s after {largest} services: "
            f"{idle['writes']:.0f} (target 0):",
            "met" if idle_met else "NOT met",
        )
        for request, count in idle["writes_by_request"].items():
            print(f"    {count:>6.0f}  {request}")
        print(f"    (reads meanwhile: {idle['audit_lists']:.0f} audit lists)")
        if idle["reaches_first_resync"]:
            ends = idle["operator_uptime_at_start_s"] + idle["seconds"]
            print(
                f"    the window ends {ends:.0f} s after the operator started, past its "
                f"resync_seconds ({idle['resync_seconds']:.0f} s): a resync pass of every "
                "service and a deep audit fall in it"
            )
    biggest = results[-1]
    absolute_met = (
        all(r["ready"] == r["services"] for r in results)
        and (biggest["apply_to_children_p99_s"] or 1e9) <= TARGET_P99_SECONDS
        and (biggest["all_ready_s"] or 1e9) <= TARGET_READY_500_SECONDS
        and rss_met
    )
    print(
        "targets (p99 <= 1 s, all Ready <= 60 s, RSS <= 250 MB):",
        "met" if absolute_met else "NOT met",
    )
    return {
        "absolute_met": absolute_met,
        "rss_met": rss_met,
        "api_requests_per_reconcile_met": requests_met,
        "idle_writes_met": idle_met,
    }


def _print_runs(results: list[dict[str, Any]], *, operator_columns: bool) -> None:
    extra = f" {'req/svc':>8} {'req/rec':>8}" if operator_columns else f" {'retries':>8}"
    print(
        f"{'services':>8} {'p50':>9} {'p99':>9} {'all ch.':>9} {'all Ready':>10} {'ready':>6}"
        + extra
    )
    for r in results:
        if operator_columns:
            per_reconcile = r["api_requests_per_full_reconcile"]
            tail = (
                f" {r['api_requests_per_service']:>8.1f} "
                f"{'n/a' if per_reconcile is None else f'{per_reconcile:.1f}':>8}"
            )
        else:
            tail = f" {r['apply_retries']:>8}"
        print(
            f"{r['services']:>8} {_fmt(r['apply_to_children_p50_s']):>9} "
            f"{_fmt(r['apply_to_children_p99_s']):>9} {_fmt(r['all_children_s']):>9} "
            f"{_fmt(r['all_ready_s']):>10} {r['ready']:>6}" + tail
        )


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
            full_reconciles(port)
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
    parser.add_argument(
        "--floor",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run every size with no operator, on a fresh control plane, and print the "
        "ratios operator / floor (default: on)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=300.0,
        help="keep the operator idle this long after the largest size is Ready and count its "
        "API writes (0: skip)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    try:
        return asyncio.run(
            bench(
                sizes,
                args.cpu_nodes,
                args.kubeconfig,
                args.controller_manager_qps,
                floor=args.floor,
                idle_seconds=args.idle_seconds,
            )
        )
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: everything this run started has been stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
