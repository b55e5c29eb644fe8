"""KEDA for real: the ScaledObjects the operator writes for `engine: keda` are run by KEDA.

One cluster for the module, with a real node running, in pods: the Prometheus Operator and its
Prometheus (monitoring.py, scraping the fleet through our ServiceMonitor), KEDA's operator and
metrics API server (keda.py, from KEDA's own manifests; this cluster's external.metrics.k8s.io
is KEDA's), and our operator installed by Helm. A password-protected redis-server runs beside the
node on its bridge address, reachable from the pods and from KEDA. There is no cluster DNS here,
so each RembgService names Prometheus by a ClusterIP Service's address instead of the
`prometheus-operated.monitoring.svc` of examples/keda.yaml.

Each test prints its transitions in seconds since it started. Bounds: KEDA polls every
POLL_SECONDS, the HPA controller syncs every HPA_SYNC_SECONDS, Prometheus scrapes every
SCRAPE_SECONDS; a pool reaches its new size within those plus a pod's start and warmup
(generous: two cores carry inference, Prometheus, KEDA and the control plane).
"""

from __future__ import annotations

import copy
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from rembg_devcluster import DevCluster
from rembg_devcluster.images import KEDA_IMAGES, MONITORING_IMAGES, NODE_IMAGES
from rembg_devcluster.keda import APISERVICE, KedaStack
from rembg_devcluster.monitoring import NAMESPACE as MONITORING_NAMESPACE
from rembg_devcluster.monitoring import SELECTOR_LABELS, MonitoringStack
from rembg_devcluster.node_config import NodeNetwork
from rembg_devcluster.ports import free_port

from e2e.autoscaling_support import submit_jobs
from e2e.operator_support import eventually, get, install_crd, kubectl_apply, rembg_service
from e2e.real_node_support import (
    LoadClient,
    cluster_ip,
    create_restricted_namespace,
    install_operator,
    photo,
    start_real_node_cluster,
)

FLEET = "fleet"
SYSTEM = "rembg-system"
REDIS_SECRET = "redis-credentials"
PROMETHEUS_SERVICE = "prometheus-keda"
SCRAPE_SECONDS = 5
POLL_SECONDS = 5
HPA_SYNC_SECONDS = 5
SCALE_DOWN_WINDOW_SECONDS = 10
READY_TIMEOUT = 300.0
# Up: a scrape, a poll, an HPA sync, then a new pod's start and warmup.
SCALE_UP_TIMEOUT = 240.0
# The HPA writes the metrics behind a scale just after it scaled; a few syncs is ample.
HPA_STATUS_LAG = 45.0
# Down: the same after the load ends, plus the HPA's scale-down window.
SCALE_DOWN_TIMEOUT = 240.0
QUEUE_METRIC = "s0-prometheus"
SMALL = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# Four admitted requests a pod, one image a batch: the queue fills under modest load.
SERVER = {"drainSeconds": 1, "queueMaxRequests": 4, "batchMaxSize": 1}


@dataclass
class KedaCluster:
    cluster: DevCluster
    keda: KedaStack
    prometheus_address: str
    redis_address: str
    redis_password: str


def _start_redis(cluster: DevCluster, host: str, password: str) -> str:
    """redis-server on the node's bridge address (pods and KEDA reach it), with a password."""
    port = free_port(host)
    workdir = cluster.log_dir / "redis-data"
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [
        "redis-server",
        "--bind", host,
        "--port", str(port),
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--requirepass", password,
        "--daemonize", "no",
    ]  # fmt: skip
    cluster.spawn("redis", argv)
    return f"{host}:{port}"


def _prometheus_service(cluster: DevCluster) -> str:
    """A ClusterIP Service in front of Prometheus (the operator's `prometheus-operated` is
    headless: without DNS its name resolves nowhere). Returns the URL KEDA queries."""
    headless = cluster.get_json("service", "prometheus-operated", "-n", MONITORING_NAMESPACE)
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": PROMETHEUS_SERVICE, "namespace": MONITORING_NAMESPACE},
            "spec": {
                "selector": headless["spec"]["selector"],
                "ports": [{"name": "web", "port": 9090, "targetPort": 9090}],
            },
        }
    )
    return f"http://{cluster_ip(cluster, MONITORING_NAMESPACE, PROMETHEUS_SERVICE)}:9090"


@pytest.fixture(scope="module")
def keda_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KedaCluster]:
    workdir = tmp_path_factory.mktemp("keda")
    cluster = start_real_node_cluster(
        workdir / "cluster",
        node_images=(*NODE_IMAGES, *MONITORING_IMAGES, *KEDA_IMAGES),
        controller_manager_args=(f"--horizontal-pod-autoscaler-sync-period={HPA_SYNC_SECONDS}s",),
    )
    monitoring: MonitoringStack | None = None
    keda: KedaStack | None = None
    try:
        started = time.monotonic()
        null_route = {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}
        monitoring = MonitoringStack.start(cluster, workdir / "monitoring", null_route)
        print(f"\nPrometheus up in {time.monotonic() - started:.0f}s")
        keda = KedaStack.start(cluster)
        print(f"KEDA serving {APISERVICE} after {time.monotonic() - started:.0f}s")
        node = cluster.state.node
        assert node is not None
        password = secrets.token_hex(16)
        redis = _start_redis(cluster, NodeNetwork(node.bridge, node.pod_cidr).gateway, password)
        install_crd(cluster)
        create_restricted_namespace(cluster, SYSTEM)
        create_restricted_namespace(cluster, FLEET)
        install_operator(cluster, SYSTEM, FLEET)
        yield KedaCluster(cluster, keda, _prometheus_service(cluster), redis, password)
    finally:
        if keda is not None:
            keda.stop()
        if monitoring is not None:
            monitoring.stop()
        cluster.stop()
    assert cluster.state.teardown_problems == []


def _keda_service(name: str, env: KedaCluster, **autoscaling: Any) -> dict[str, Any]:
    """One CPU pool of 1..2 replicas on engine keda; Prometheus scrapes it every 5 s."""
    spec: dict[str, Any] = {
        "models": ["u2netp"],
        "cpu": {"minReplicas": 1, "maxReplicas": 2, "resources": SMALL},
        "server": SERVER,
        "monitoring": {"labels": dict(SELECTOR_LABELS), "scrapeInterval": f"{SCRAPE_SECONDS}s"},
        "autoscaling": {
            "engine": "keda",
            "targetQueueDepthPerPod": 2,
            "scaleDown": {
                "stabilizationWindowSeconds": SCALE_DOWN_WINDOW_SECONDS,
                "maxPercent": 100,
                "maxPods": 1,
                "periodSeconds": 5,
            },
            "keda": {
                "prometheusAddress": env.prometheus_address,
                "pollingIntervalSeconds": POLL_SECONDS,
                "cooldownPeriodSeconds": 30,
            },
            **autoscaling,
        },
    }
    return rembg_service(name, copy.deepcopy(spec))


def _scaled_object(cluster: DevCluster, name: str) -> dict[str, Any]:
    return get(cluster, FLEET, "scaledobject", f"{name}-cpu") or {}


def _keda_condition(scaled_object: dict[str, Any], kind: str) -> str | None:
    for entry in (scaled_object.get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return str(entry.get("status"))
    return None


def _hpa(cluster: DevCluster, name: str) -> dict[str, Any]:
    return get(cluster, FLEET, "hpa", f"keda-{name}-cpu") or {}


def _replicas(cluster: DevCluster, name: str) -> tuple[int, int]:
    deployment = get(cluster, FLEET, "deployment", f"{name}-cpu") or {}
    status = deployment.get("status") or {}
    return int((deployment.get("spec") or {}).get("replicas") or 0), int(
        status.get("readyReplicas") or 0
    )


def _autoscaler_status(cluster: DevCluster, name: str) -> dict[str, Any]:
    service = get(cluster, FLEET, "rembgservice", name) or {}
    pools = (service.get("status") or {}).get("pools") or {}
    return dict((pools.get("cpu") or {}).get("autoscaler") or {})


def _autoscaling_condition(cluster: DevCluster, name: str) -> dict[str, Any]:
    service = get(cluster, FLEET, "rembgservice", name) or {}
    for entry in (service.get("status") or {}).get("conditions") or []:
        if entry.get("type") == "AutoscalingAvailable":
            return dict(entry)
    return {}


def _external_metrics(hpa: dict[str, Any]) -> dict[str, float]:
    """The HPA's current External metric values (name -> averageValue), as KEDA served them."""
    values = {}
    for metric in (hpa.get("status") or {}).get("currentMetrics") or []:
        external = metric.get("external") or {}
        current = external.get("current") or {}
        quantity = current.get("averageValue") or current.get("value")
        if quantity is not None:
            values[external["metric"]["name"]] = _quantity(str(quantity))
    return values


def _quantity(text: str) -> float:
    if text.endswith("m"):
        return float(text[:-1]) / 1000
    if text.endswith("k"):
        return float(text[:-1]) * 1000
    return float(text)


def _until(what: str, probe: Callable[[], bool], timeout: float, state: Callable[[], str]) -> float:
    """Waits for probe; returns when it held (monotonic). Fails with the last state seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if probe():
            return time.monotonic()
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}: {state()}")


def _back_to_one(cluster: DevCluster, name: str, state: Callable[[], str]) -> float:
    return _until(
        "the pool to scale back to 1",
        lambda: _replicas(cluster, name)[0] == 1,
        SCALE_DOWN_TIMEOUT,
        state,
    )


def _ready(env: KedaCluster, name: str) -> None:
    cluster = env.cluster
    result = cluster.kubectl(
        "wait",
        f"rembgservice/{name}",
        "-n",
        FLEET,
        "--for=condition=Ready",
        f"--timeout={int(READY_TIMEOUT)}s",
        check=False,
        timeout=READY_TIMEOUT + 30,
    )
    assert result.returncode == 0, f"{name} not Ready: {result.stderr}\n{env.keda.describe()}"


def test_keda_runs_the_scaled_object_and_the_status_reports_it(keda_cluster: KedaCluster) -> None:
    """KEDA reads the operator's ScaledObject: Ready, its HPA created (owned by the
    ScaledObject, External metrics from KEDA), the metric served through the aggregation
    layer; the RembgService reports KEDA's conditions."""
    env, cluster, name = keda_cluster, keda_cluster.cluster, "keda-status"
    started = time.monotonic()
    kubectl_apply(cluster, FLEET, _keda_service(name, env))
    _ready(env, name)
    print(f"\n{name} Ready after {time.monotonic() - started:.0f}s")

    def state() -> str:
        return (
            f"ScaledObject status={_scaled_object(cluster, name).get('status')}, "
            f"hpa status={_hpa(cluster, name).get('status')}\n{env.keda.describe()}"
        )

    _until(
        "KEDA to mark the ScaledObject Ready",
        lambda: _keda_condition(_scaled_object(cluster, name), "Ready") == "True",
        SCALE_UP_TIMEOUT,
        state,
    )
    print(f"ScaledObject Ready after {time.monotonic() - started:.0f}s")
    hpa = eventually(lambda: _hpa(cluster, name), what="KEDA's HPA", timeout=60)
    (owner,) = hpa["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"]) == ("ScaledObject", f"{name}-cpu")
    metrics = hpa["spec"]["metrics"]
    assert metrics, hpa["spec"]
    assert all(m["type"] == "External" for m in metrics), metrics
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 2)

    # The HPA controller reads the queue depth through KEDA's metrics API server.
    _until(
        "the HPA to read KEDA's external metric",
        lambda: bool(_external_metrics(_hpa(cluster, name))),
        SCALE_UP_TIMEOUT,
        state,
    )
    metric = metrics[0]["external"]["metric"]
    selector = ",".join(f"{k}={v}" for k, v in metric["selector"]["matchLabels"].items())
    raw = cluster.kubectl(
        "get",
        "--raw",
        f"/apis/external.metrics.k8s.io/v1beta1/namespaces/{FLEET}/{metric['name']}"
        f"?labelSelector={selector}",
    ).stdout
    assert '"kind":"ExternalMetricValueList"' in raw.replace(" ", ""), raw
    print(f"external metric {metric['name']} served: {_external_metrics(_hpa(cluster, name))}")

    condition = eventually(
        lambda: (
            (found := _autoscaling_condition(cluster, name)).get("reason") == "KedaReady" and found
        ),
        what="AutoscalingAvailable=True (KedaReady) on the RembgService",
        timeout=60,
    )
    assert condition["status"] == "True", condition
    reported = eventually(
        lambda: (found := _autoscaler_status(cluster, name)).get("ready") == "True" and found,
        what="status.pools.cpu.autoscaler.ready",
        timeout=60,
    )
    assert reported["kind"] == "ScaledObject", reported
    assert reported["name"] == f"{name}-cpu", reported
    print(f"RembgService reports KEDA: {reported}")
    cluster.kubectl("delete", "rembgservice", name, "-n", FLEET, "--wait=true", timeout=120)


def test_queue_depth_scales_a_pool_up_and_back_down(keda_cluster: KedaCluster) -> None:
    """Load fills the pods' queues; KEDA's prometheus trigger (sum of rembg_pending_requests)
    makes its HPA add the second replica; when the load ends the pool returns to one. KEDA marks
    the trigger Active under load, and the RembgService reports it. (KEDA's return to inactive
    is not waited for: the p95 trigger's rate window keeps it active for two more minutes.)"""
    env, cluster, name = keda_cluster, keda_cluster.cluster, "keda-load"
    # A p95 target out of reach: the queue depth alone must do the scaling.
    kubectl_apply(cluster, FLEET, _keda_service(name, env, targetLatencyP95Seconds=60))
    _ready(env, name)
    _until(
        "an idle, Ready ScaledObject",
        lambda: (
            _keda_condition(_scaled_object(cluster, name), "Ready") == "True"
            and _external_metrics(_hpa(cluster, name)) != {}
        ),
        SCALE_UP_TIMEOUT,
        lambda: str(_scaled_object(cluster, name).get("status")),
    )
    assert _replicas(cluster, name) == (1, 1)

    def state() -> str:
        so = _scaled_object(cluster, name)
        return (
            f"replicas (spec, ready)={_replicas(cluster, name)}, "
            f"metrics={_external_metrics(_hpa(cluster, name))}, "
            f"Active={_keda_condition(so, 'Active')}, load={dict(load.outcomes)}"
        )

    url = f"http://{cluster_ip(cluster, FLEET, name)}/v1/remove"
    load = LoadClient(url, photo((640, 480)), clients=8, max_retry_after_seconds=0.5)
    started = time.monotonic()
    load.start()
    try:
        active = _until(
            "KEDA to mark the trigger Active",
            lambda: _keda_condition(_scaled_object(cluster, name), "Active") == "True",
            SCALE_UP_TIMEOUT,
            state,
        )
        print(f"\nActive after {active - started:.0f}s: {state()}")
        reported = eventually(
            lambda: _autoscaler_status(cluster, name).get("active") == "True",
            what="status.pools.cpu.autoscaler.active=True",
            timeout=60,
        )
        assert reported
        peak = 0.0

        def scaled_up() -> bool:
            nonlocal peak
            # KEDA names a trigger's metric s<index>-<type>: s0 is the queue depth's.
            peak = max(peak, _external_metrics(_hpa(cluster, name)).get(QUEUE_METRIC, 0.0))
            return _replicas(cluster, name) == (2, 2)

        up = _until("the pool to scale to 2 ready replicas", scaled_up, SCALE_UP_TIMEOUT, state)
        print(f"scaled up to 2 after {up - started:.0f}s (queue depth peak {peak}): {state()}")
        assert peak >= 2, f"the queue-depth trigger never reached its target: {state()}"
    finally:
        outcomes = load.stop()
    print(f"load: {dict(outcomes)}")
    assert outcomes.get("200", 0) > 0, outcomes
    stopped = time.monotonic()
    down = _back_to_one(cluster, name, state)
    print(f"scaled down to 1 {down - stopped:.0f}s after the load ended: {state()}")
    cluster.kubectl("delete", "rembgservice", name, "-n", FLEET, "--wait=true", timeout=120)


def _redis_secret(env: KedaCluster) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": REDIS_SECRET, "namespace": FLEET},
        "stringData": {"address": env.redis_address, "password": env.redis_password},
    }


def test_a_job_backlog_scales_through_the_redis_streams_trigger(keda_cluster: KedaCluster) -> None:
    """With spec.jobs, KEDA's redis-streams trigger reads the stream's length from the real
    Redis (connection from the pods' own env, password included): a backlog of jobs, and
    no HTTP load, scales the pool to 2; once the jobs are done it returns to 1."""
    env, cluster, name = keda_cluster, keda_cluster.cluster, "keda-jobs"
    kubectl_apply(cluster, FLEET, _redis_secret(env))
    service = _keda_service(name, env, targetQueueDepthPerPod=1000)
    service["spec"]["jobs"] = {
        "enabled": True,
        "redis": {"secretName": REDIS_SECRET, "passwordKey": "password"},
        "targetBacklogPerReplica": 5,
    }
    kubectl_apply(cluster, FLEET, service)
    _ready(env, name)
    _until(
        "a Ready ScaledObject whose redis-streams metric the HPA reads",
        lambda: (
            _keda_condition(_scaled_object(cluster, name), "Ready") == "True"
            and any("redis-streams" in k for k in _external_metrics(_hpa(cluster, name)))
        ),
        SCALE_UP_TIMEOUT,
        lambda: (
            f"{_scaled_object(cluster, name).get('status')} {_hpa(cluster, name).get('status')}"
        ),
    )
    triggers = _scaled_object(cluster, name)["spec"]["triggers"]
    assert [t["type"] for t in triggers][-1] == "redis-streams", triggers
    assert _replicas(cluster, name) == (1, 1)

    def redis_metric() -> float:
        values = _external_metrics(_hpa(cluster, name))
        return max((v for k, v in values.items() if "redis" in k), default=0.0)

    def state() -> str:
        return (
            f"replicas (spec, ready)={_replicas(cluster, name)}, "
            f"metrics={_external_metrics(_hpa(cluster, name))}"
        )

    address = f"{cluster_ip(cluster, FLEET, name)}:80"
    started = time.monotonic()
    ids = submit_jobs(address, 60, photo((1024, 768)))
    print(f"\n{len(ids)} jobs submitted in {time.monotonic() - started:.0f}s: {state()}")
    peak = 0.0

    def scaled_up() -> bool:
        nonlocal peak
        peak = max(peak, redis_metric())
        return _replicas(cluster, name)[0] == 2

    up = _until("the backlog to scale the pool to 2", scaled_up, SCALE_UP_TIMEOUT, state)
    # The stream's length per replica drove it: above the target of 5 per replica. The HPA
    # scales before it writes the metrics it decided on, so its status may lag a poll.
    _until(
        "the HPA to report the redis-streams metric above its target of 5",
        lambda: max(peak, redis_metric()) > 5,
        HPA_STATUS_LAG,
        state,
    )
    print(f"scaled up to 2 after {up - started:.0f}s: {state()}")

    def all_done() -> bool:
        with httpx.Client(timeout=30) as client:
            return all(
                client.get(f"http://{address}/v1/jobs/{i}").json().get("state") == "done"
                for i in ids
            )

    done = _until("every job to be done", all_done, 600, state)
    print(f"backlog done after {done - started:.0f}s")
    down = _back_to_one(cluster, name, state)
    print(f"scaled down to 1 {down - done:.0f}s after the backlog drained")
    cluster.kubectl("delete", "rembgservice", name, "-n", FLEET, "--wait=true", timeout=120)
