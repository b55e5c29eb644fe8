"""Monitoring for real: the Prometheus Operator runs our ServiceMonitor and rules, alerts fire
from real faults and reach Alertmanager, and the inference canary catches a wrong model.

One cluster for the module: a real node running the Prometheus Operator, Prometheus (with its
config reloader) and kube-state-metrics as pods from their upstream manifests; Alertmanager
beside it, loaded with examples/monitoring/alertmanager.yaml (only its receivers' URLs and its
grouping timings changed) and delivering to a local webhook sink; our operator installed by
Helm, watching namespace `fleet`. Every RembgService here carries the label Prometheus selects
by and short thresholds, set through its spec. Each test injects a fault, waits for the alert in
Prometheus and at its receiver, ends the fault and waits for the resolution, and prints the
times. Bounds: an alert fires within its `for` plus a scrape and an evaluation interval, plus
what the fault itself takes to show (a rate window to fill, a restart) and a small allowance for
Alertmanager's group wait and this test's polling.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from rembg_devcluster import DevCluster
from rembg_devcluster.images import (
    BROKEN_MODEL_IMAGE,
    MONITORING_IMAGES,
    NODE_IMAGES,
)
from rembg_devcluster.monitoring import (
    NAMESPACE as MONITORING_NAMESPACE,
)
from rembg_devcluster.monitoring import (
    SELECTOR_LABELS,
    MonitoringStack,
    WebhookSink,
    route_to_sink,
)
from rembg_devcluster.node_config import NODE_NAME

from e2e.images.broken_model import build_model
from e2e.monitoring_support import AlertWatch, Fired, report, wall_to_monotonic
from e2e.operator_support import (
    EXAMPLES,
    eventually,
    get,
    install_crd,
    kubectl_apply,
    rembg_service,
    wait_ready,
)
from e2e.real_node_support import (
    LoadClient,
    cluster_ip,
    container_host_pid,
    create_restricted_namespace,
    describe_pods,
    endpoints,
    image_ref,
    install_operator,
    photo,
    pods,
    start_real_node_cluster,
)

FLEET = "fleet"
SYSTEM = "rembg-system"
SCRAPE_SECONDS = 5
EVALUATION_SECONDS = 5
FOR_SECONDS = 15
RATE_WINDOW_SECONDS = 30
GROUP_WAIT_SECONDS = 2
GROUP_INTERVAL_SECONDS = 5
# This test's polling (1 s), the API server -> kube-state-metrics -> scrape path, and
# Alertmanager's dispatch.
ALLOWANCE_SECONDS = 15
READY_TIMEOUT = 300.0
# From a fault being visible to its alert pending: a scrape, an evaluation, the allowance.
DETECTION = SCRAPE_SECONDS + EVALUATION_SECONDS + ALLOWANCE_SECONDS
# From a fault's end being visible to the resolved notification.
RESOLVE_BOUND = SCRAPE_SECONDS + EVALUATION_SECONDS + GROUP_INTERVAL_SECONDS + ALLOWANCE_SECONDS
# A new pod's start-up and warmup before its first canary verdict.
WARMUP_SECONDS = 30
TIMEOUT = 240.0

ALERT_THRESHOLDS = {
    "rateWindow": f"{RATE_WINDOW_SECONDS}s",
    "errorRatio": 0.2,
    "errorRatioFor": f"{FOR_SECONDS}s",
    "latencyP95Seconds": 1.5,
    "latencyFor": f"{FOR_SECONDS}s",
    "queueSaturationRatio": 0.5,
    "queueSaturationFor": f"{FOR_SECONDS}s",
    "noReadyReplicasFor": f"{FOR_SECONDS}s",
    "gpuFallbackFor": f"{FOR_SECONDS}s",
    "canaryFailingFor": f"{FOR_SECONDS}s",
}
MONITORING = {
    "labels": dict(SELECTOR_LABELS),
    "scrapeInterval": f"{SCRAPE_SECONDS}s",
    "alerts": ALERT_THRESHOLDS,
}
SMALL = {"requests": {"cpu": "100m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "2Gi"}}
# One CPU admitting 4 requests (the server's default for one CPU is 2: 4 makes the queue
# visible before 429s start), one image a batch: overload means a full queue and 429s.
SERVER = {
    "drainSeconds": 1,
    "queueMaxRequests": 4,
    "batchMaxSize": 1,
    "canary": {"intervalSeconds": 10},
}


@dataclass
class Monitored:
    cluster: DevCluster
    stack: MonitoringStack
    sink: WebhookSink
    watch: AlertWatch
    light: LoadClient  # steady traffic to `demo` for the whole module


def _service(name: str, **spec: Any) -> dict[str, Any]:
    """One pool of one replica (a CPU pool unless spec names a GPU pool), the monitoring
    label and thresholds above."""
    pools = {} if "gpu" in spec else {"cpu": {"replicas": 1, "resources": SMALL}}
    base: dict[str, Any] = {
        "models": ["u2netp"],
        "autoscaling": {"enabled": False},
        **pools,
        "server": SERVER,
        "monitoring": MONITORING,
    }
    base.update(spec)
    return rembg_service(name, copy.deepcopy(base))


def _check_fired(fired: Fired, detection: float) -> None:
    """Pending within `detection` of the fault's start, firing only once `for` has passed
    (debounced) and no later than one evaluation after, delivered within the group wait."""
    assert fired.pending <= detection, fired
    assert fired.in_prometheus >= fired.pending + FOR_SECONDS - 1, fired
    assert fired.in_prometheus <= fired.pending + FOR_SECONDS + EVALUATION_SECONDS + 2, fired
    if fired.delivered is not None:
        assert fired.delivered <= fired.in_prometheus + GROUP_WAIT_SECONDS + ALLOWANCE_SECONDS


def _container_started(cluster: DevCluster, selector: str) -> float:
    """When the (only) pod's container last started, on this process' monotonic clock."""
    (pod,) = pods(cluster, FLEET, selector)
    state = pod["status"]["containerStatuses"][0]["state"]
    return wall_to_monotonic(state["running"]["startedAt"])


def _url(cluster: DevCluster, service: str) -> str:
    return f"http://{cluster_ip(cluster, FLEET, service)}/v1/remove"


def _rollout(cluster: DevCluster, deployment: str) -> None:
    cluster.kubectl(
        "rollout",
        "status",
        f"deployment/{deployment}",
        "-n",
        FLEET,
        "--timeout=240s",
        timeout=270,
    )


def _alertmanager_config(sink: WebhookSink) -> dict[str, Any]:
    example = yaml.safe_load((EXAMPLES / "monitoring" / "alertmanager.yaml").read_text())
    return route_to_sink(example, sink.url, f"{GROUP_WAIT_SECONDS}s", f"{GROUP_INTERVAL_SECONDS}s")


@pytest.fixture(scope="module")
def monitored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Monitored]:
    workdir = tmp_path_factory.mktemp("monitoring")
    cluster = start_real_node_cluster(
        workdir / "cluster", node_images=(*NODE_IMAGES, *MONITORING_IMAGES, BROKEN_MODEL_IMAGE)
    )
    sink = WebhookSink()
    stack: MonitoringStack | None = None
    light: LoadClient | None = None
    try:
        started = time.monotonic()
        stack = MonitoringStack.start(cluster, workdir / "stack", _alertmanager_config(sink))
        print(f"\nmonitoring stack up in {time.monotonic() - started:.0f}s: {stack.prometheus.url}")
        install_crd(cluster)
        create_restricted_namespace(cluster, SYSTEM)
        create_restricted_namespace(cluster, FLEET)
        install_operator(
            cluster,
            SYSTEM,
            FLEET,
            "serviceMonitor.enabled=true",
            f"serviceMonitor.labels.release={SELECTOR_LABELS['release']}",
            f"serviceMonitor.interval={SCRAPE_SECONDS}s",
            f"serviceMonitor.scrapeTimeout={SCRAPE_SECONDS}s",
            "dashboards.enabled=true",
        )
        kubectl_apply(cluster, FLEET, _service("demo"))
        wait_ready(cluster, FLEET, "demo", timeout=READY_TIMEOUT)
        light = LoadClient(_url(cluster, "demo"), photo((320, 240)), clients=1, pause_seconds=0.5)
        light.start()
        yield Monitored(cluster, stack, sink, AlertWatch(stack, sink), light)
    finally:
        if light is not None:
            print(f"\nsteady load on demo: {dict(light.stop())}")
        if stack is not None:
            stack.stop()
        sink.close()
        cluster.stop()
    assert cluster.state.teardown_problems == []


def _scraped(targets: list[dict[str, Any]], monitor: str) -> bool:
    mine = [t for t in targets if t["scrapePool"].startswith(f"serviceMonitor/{monitor}")]
    if any(t["health"] == "up" for t in mine):
        return True
    print(f"not up yet: {[(t['scrapeUrl'], t['health'], t.get('lastError')) for t in mine]}")
    return False


def test_prometheus_scrapes_the_fleet_through_our_service_monitor(monitored: Monitored) -> None:
    """The operator's ServiceMonitor (not a hand-written scrape config) makes the Prometheus
    Operator's Prometheus scrape the pods, with the labels our rules select by; our
    PrometheusRule is loaded; kube-state-metrics and the operator pod are scraped too."""
    prometheus = monitored.stack.prometheus
    demo = eventually(
        lambda: [
            t
            for t in prometheus.active_targets()
            if t["labels"].get("rembg_service") == "demo" and t["health"] == "up"
        ],
        what="an up target for demo's pod",
        timeout=120,
    )
    (target,) = demo
    assert target["scrapePool"] == f"serviceMonitor/{FLEET}/demo/0", target
    assert target["labels"]["namespace"] == FLEET
    assert target["labels"]["pool"] == "cpu"
    groups = {g["name"] for g in prometheus.rule_groups()}
    assert {f"rembg.{FLEET}.demo.alerts", f"rembg.{FLEET}.demo.recording"} <= groups, groups
    for monitor in (f"{MONITORING_NAMESPACE}/kube-state-metrics", SYSTEM):
        # Each is scraped on its own schedule: the first scrape may still be due.
        eventually(
            lambda monitor=monitor: _scraped(prometheus.active_targets(), monitor),
            what=f"an up target of {monitor}",
            timeout=60,
        )
    alertmanagers = prometheus.alertmanagers()
    assert alertmanagers == [f"{monitored.stack.alertmanager.url}/api/v2/alerts"], alertmanagers


def test_high_error_ratio_fires_and_resolves(monitored: Monitored) -> None:
    """Half of demo's requests fail server-side (the test-only REMBG_FAULT_ERROR_RATIO: nothing
    real makes our server answer 5xx on demand): RembgHighErrorRate pages, then resolves once
    the fault is rolled back and the rate window has only good answers."""
    cluster, watch, light = monitored.cluster, monitored.watch, monitored.light
    faulty = _service("demo")
    faulty["spec"]["server"]["extraEnv"] = [{"name": "REMBG_FAULT_ERROR_RATIO", "value": "0.5"}]
    kubectl_apply(cluster, FLEET, faulty)
    _rollout(cluster, "demo-cpu")
    started = eventually(
        lambda: light.first_seen.get("500"), what="the first injected 500", timeout=60
    )
    labels = {"namespace": FLEET, "rembg_service": "demo", "pool": "cpu"}
    fired = watch.fired("RembgHighErrorRate", labels, started, TIMEOUT)
    ended = time.monotonic()
    kubectl_apply(cluster, FLEET, _service("demo"))
    _rollout(cluster, "demo-cpu")
    rolled_back = time.monotonic() - ended
    resolved = watch.resolved("RembgHighErrorRate", labels, ended, TIMEOUT)
    print("\n" + report("RembgHighErrorRate", fired, resolved) + f" (rollback {rolled_back:.0f}s)")
    assert fired.receiver == "rembg-page"
    # The ratio passes 20% at the first evaluation with two scrapes of errors in the window.
    _check_fired(fired, DETECTION + SCRAPE_SECONDS)
    # The faulty pod answers until the rollback ends; then the window must empty of its errors.
    assert resolved.delivered <= rolled_back + RATE_WINDOW_SECONDS + RESOLVE_BOUND


def test_overload_fires_high_latency_and_queue_saturation(monitored: Monitored) -> None:
    """Twelve clients of 1080p photos through the Service against one 1-CPU pod admitting 4
    (clients wait out the 429s' Retry-After, up to 1 s): the p95 latency and the queue pass
    their thresholds (warnings, to the ticket receiver); when the load stops both resolve.
    Meanwhile every dashboard query returns data."""
    cluster, watch = monitored.cluster, monitored.watch
    heavy = LoadClient(
        _url(cluster, "demo"), photo((1920, 1080)), clients=12, max_retry_after_seconds=1.0
    )
    started = time.monotonic()
    heavy.start()
    pool = {"namespace": FLEET, "rembg_service": "demo", "pool": "cpu"}
    try:
        saturated = watch.fired("RembgQueueSaturated", pool, started, TIMEOUT)
        slow = watch.fired("RembgHighLatency", pool, started, TIMEOUT)
        dashboard_empty = _empty_dashboard_queries(monitored)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_pods(cluster, FLEET)}") from None
    finally:
        outcomes = heavy.stop()
    ended = time.monotonic()
    print(f"\noverload answers: {dict(outcomes)}")
    saturated_end = watch.resolved("RembgQueueSaturated", pool, ended, TIMEOUT)
    slow_end = watch.resolved("RembgHighLatency", pool, ended, TIMEOUT)
    print(report("RembgQueueSaturated", saturated, saturated_end))
    print(report("RembgHighLatency", slow, slow_end))
    assert dashboard_empty == [], "dashboard queries without data:\n" + "\n".join(dashboard_empty)
    assert outcomes["200"] > 0, outcomes
    assert outcomes["429"] > 0, outcomes  # overloaded, and shedding
    assert saturated.receiver == slow.receiver == "rembg-ticket"
    _check_fired(saturated, DETECTION)
    # The p95 over the window passes 1.5 s once slow answers outnumber the earlier fast ones.
    _check_fired(slow, DETECTION + RATE_WINDOW_SECONDS)
    assert saturated_end.delivered <= RESOLVE_BOUND
    assert slow_end.delivered <= RATE_WINDOW_SECONDS + RESOLVE_BOUND


# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$namespace": FLEET,
    "$service": "demo",
    "$model": "u2netp",
}


def _empty_dashboard_queries(monitored: Monitored) -> list[str]:
    """Every panel query of the dashboard the chart installed, run against the live Prometheus
    while the fleet is loaded: the ones that return no series."""
    listing = get(monitored.cluster, SYSTEM, "configmaps", "-l", "grafana_dashboard=1")
    assert listing is not None
    assert listing["items"], "the chart installed no dashboard ConfigMap"
    empty, queried = [], 0
    for item in listing["items"]:
        for text in item["data"].values():
            for panel in json.loads(text)["panels"]:
                for target in panel.get("targets", []):
                    expr = target["expr"]
                    for variable, value in GRAFANA_VARIABLES.items():
                        expr = expr.replace(variable, value)
                    queried += 1
                    if not monitored.stack.prometheus.query(expr):
                        empty.append(f"{panel['title']}: {expr}")
    assert queried >= 20, f"only {queried} panel queries found"
    return empty


def _crash_loop(cluster: DevCluster, selector: str, stop: threading.Event) -> int:
    """SIGKILLs the pods' server processes whenever they run, until stop; returns the kills."""
    kills = 0
    while not stop.is_set():
        for pod in pods(cluster, FLEET, selector):
            for status in pod.get("status", {}).get("containerStatuses") or []:
                if "running" in (status.get("state") or {}) and status.get("containerID"):
                    container = status["containerID"].removeprefix("containerd://")
                    try:
                        os.kill(container_host_pid(cluster, container), signal.SIGKILL)
                        kills += 1
                    except (AssertionError, ProcessLookupError):
                        pass  # exited between the listing and the kill
        stop.wait(0.5)
    return kills


def test_crashing_pods_page_once_for_the_service(monitored: Monitored) -> None:
    """demo's server process is killed whenever it runs (a crash loop, as the kubelet sees it):
    the pool has no ready replica, so RembgNoReadyReplicas and RembgServiceDown fire in
    Prometheus; Alertmanager pages for the service and inhibits the per-pool alert. When the
    kills stop the kubelet brings the pod back and both resolve."""
    cluster, watch = monitored.cluster, monitored.watch
    stop = threading.Event()
    kills: list[int] = []
    killer = threading.Thread(
        target=lambda: kills.append(_crash_loop(cluster, "rembg.io/service=demo", stop)),
        daemon=True,
    )
    started = time.monotonic()
    killer.start()
    service = {"namespace": FLEET, "rembg_service": "demo"}
    pool_labels = {**service, "pool": "cpu"}
    try:
        down = watch.fired("RembgServiceDown", service, started, TIMEOUT)
        pool = watch.fired("RembgNoReadyReplicas", pool_labels, started, TIMEOUT, delivered=False)
        inhibited = eventually(
            lambda: [
                a
                for a in monitored.stack.alertmanager.alerts()
                if a["labels"].get("alertname") == "RembgNoReadyReplicas"
                and a["labels"].get("rembg_service") == "demo"
                and a["status"]["inhibitedBy"]
            ],
            what="Alertmanager holding RembgNoReadyReplicas, inhibited",
            timeout=60,
        )
    finally:
        stop.set()
        killer.join(timeout=30)
    ended = time.monotonic()
    # The kubelet restarts the container after its crash-loop back-off, then it warms up.
    wait_ready(cluster, FLEET, "demo", timeout=READY_TIMEOUT)
    recovered = time.monotonic() - ended
    down_end = watch.resolved("RembgServiceDown", service, ended, TIMEOUT)
    pool_end = watch.gone("RembgNoReadyReplicas", pool_labels, ended, TIMEOUT)
    print(f"\n{sum(kills)} kills; the pod was Ready again {recovered:.0f}s after the last")
    print(report("RembgServiceDown", down, down_end))
    print(report("RembgNoReadyReplicas", pool, None) + f"; gone {pool_end:.1f}s after the kills")
    assert down.receiver == "rembg-page"
    assert inhibited[0]["status"]["inhibitedBy"]
    assert not watch.ever_delivered("RembgNoReadyReplicas", service), "inhibited, yet delivered"
    assert pool.labels["deployment"] == "demo-cpu"
    # The first kill makes the pod unready at the kubelet's next probe (5 s, 2 failures).
    _check_fired(down, DETECTION + 10)
    _check_fired(pool, DETECTION + 10)
    assert down_end.delivered <= recovered + RESOLVE_BOUND


def test_gpu_pool_serving_on_cpu_warns(monitored: Monitored) -> None:
    """A GPU pool on a node that advertises a GPU but has no CUDA: the server falls back to the
    CPU provider (allowed by the spec), and RembgGpuPoolWithoutGpu warns; scaling the pool to
    zero ends it (deleting the RembgService would delete its rules with it, and Alertmanager
    would only time the alert out)."""
    cluster, watch = monitored.cluster, monitored.watch
    gpu = {
        "replicas": 1,
        "image": image_ref("server"),
        "resources": SMALL,
        "gpuNodeSelector": {"rembg.io/node-type": "real"},
    }
    manifest = _service("gpu-demo", gpu=gpu, fallback={"allowCpuInGpuPods": True})
    labels = {"namespace": FLEET, "rembg_service": "gpu-demo", "pool": "gpu"}
    _set_node_gpus(cluster, "1")
    try:
        started = time.monotonic()
        kubectl_apply(cluster, FLEET, manifest)
        try:
            fired = watch.fired("RembgGpuPoolWithoutGpu", labels, started, READY_TIMEOUT)
        except AssertionError as error:
            raise AssertionError(f"{error}\n{describe_pods(cluster, FLEET)}") from None
        serving = _container_started(cluster, "rembg.io/service=gpu-demo") - started
        ended = time.monotonic()
        manifest["spec"]["gpu"].update(replicas=0, minReplicas=0)
        kubectl_apply(cluster, FLEET, manifest)
        eventually(
            lambda: not pods(cluster, FLEET, "rembg.io/service=gpu-demo"),
            what="gpu-demo's pod gone",
            timeout=120,
        )
        removed = time.monotonic() - ended
        resolved = watch.resolved("RembgGpuPoolWithoutGpu", labels, ended, TIMEOUT)
    finally:
        cluster.kubectl("delete", "rembgservice", "gpu-demo", "-n", FLEET, check=False)
        _set_node_gpus(cluster, None)
    print(
        "\n"
        + report("RembgGpuPoolWithoutGpu", fired, resolved)
        + f" (from the apply; its server started after {serving:.0f}s, was gone {removed:.0f}s"
        " after the scale to zero)"
    )
    assert fired.receiver == "rembg-ticket"
    assert fired.labels["pod"].startswith("gpu-demo-gpu-")
    # The server reports its provider once its model is loaded, a few seconds after it starts.
    _check_fired(fired, serving + WARMUP_SECONDS + DETECTION)
    assert resolved.delivered <= removed + RESOLVE_BOUND


def _set_node_gpus(cluster: DevCluster, count: str | None) -> None:
    """Advertises (or, with None, withdraws) nvidia.com/gpu on the real node, as a device
    plugin would; the kubelet leaves extended resources it does not manage alone."""
    patch: object
    if count is None:
        patch, kind = [{"op": "remove", "path": "/status/capacity/nvidia.com~1gpu"}], "json"
    else:
        patch, kind = {"status": {"capacity": {"nvidia.com/gpu": count}}}, "merge"
    cluster.kubectl(
        "patch",
        "node",
        NODE_NAME,
        "--subresource=status",
        f"--type={kind}",
        "-p",
        json.dumps(patch),
        check=count is not None,
    )


def test_canary_catches_a_model_with_wrong_masks(monitored: Monitored) -> None:
    """A pod serving a model of the right shape whose masks are empty (accepted only through an
    explicit checksum override): the canary fails, RembgCanaryFailing pages, and with
    unreadyAfterFailures the pod never joins the Service's endpoints. Back to the real model,
    the canary passes and the alert resolves."""
    cluster, watch = monitored.cluster, monitored.watch
    digest = "sha256:" + hashlib.sha256(build_model()).hexdigest()
    broken = _service(
        "canary",
        image=image_ref(BROKEN_MODEL_IMAGE),
        server={
            **SERVER,
            "canary": {"intervalSeconds": 5, "unreadyAfterFailures": 2},
            "extraEnv": [
                {"name": "REMBG_MODEL_DIR", "value": "/models-broken"},
                {"name": "REMBG_MODEL_CHECKSUMS", "value": json.dumps({"u2netp": digest})},
            ],
        },
    )
    labels = {"namespace": FLEET, "rembg_service": "canary", "pool": "cpu"}
    selector = f'namespace="{FLEET}", rembg_service="canary"'
    try:
        started = time.monotonic()
        kubectl_apply(cluster, FLEET, broken)
        fired = watch.fired("RembgCanaryFailing", labels, started, READY_TIMEOUT)
        serving = _container_started(cluster, "rembg.io/service=canary") - started
        failing = monitored.stack.prometheus.query(f"rembg_canary_success{{{selector}}}")
        iou = monitored.stack.prometheus.query(f"rembg_canary_iou{{{selector}}}")
        (pod,) = pods(cluster, FLEET, "rembg.io/service=canary")
        name = pod["metadata"]["name"]
        # Listed, and never ready: the canary decides readiness before the first probe passes.
        (endpoint,) = eventually(
            lambda: [
                e
                for e in endpoints(cluster, FLEET, "canary")
                if (e.get("targetRef") or {}).get("name") == name
            ],
            what=f"{name}'s endpoint",
            timeout=60,
        )
        ended = time.monotonic()
        kubectl_apply(cluster, FLEET, _service("canary"))
        wait_ready(cluster, FLEET, "canary", timeout=READY_TIMEOUT)
        _rollout(cluster, "canary-cpu")
        rolled_out = time.monotonic() - ended
        resolved = watch.resolved("RembgCanaryFailing", labels, ended, TIMEOUT)
    finally:
        cluster.kubectl("delete", "rembgservice", "canary", "-n", FLEET, "--wait=false")
    print(
        "\n"
        + report("RembgCanaryFailing", fired, resolved)
        + f" (from the apply; the server started after {serving:.0f}s; the fixed model rolled"
        f" out in {rolled_out:.0f}s); the broken model's canary IoU:"
        f" {[s['value'][1] for s in iou]}"
    )
    assert [s["value"][1] for s in failing] == ["0"], failing
    assert endpoint["conditions"]["ready"] is False, endpoint
    assert fired.receiver == "rembg-page"
    assert fired.labels["model"] == "u2netp"
    _check_fired(fired, serving + WARMUP_SECONDS + DETECTION)
    assert resolved.delivered <= rolled_out + RESOLVE_BOUND


def test_monitoring_stack_runs_in_restricted_pods(monitored: Monitored) -> None:
    """Every monitoring pod runs on the real node, in a namespace enforcing `restricted`."""
    found = (get(monitored.cluster, MONITORING_NAMESPACE, "pods") or {}).get("items", [])
    names = [p["metadata"]["name"] for p in found]
    for prefix in ("prometheus-operator-", "kube-state-metrics-", "prometheus-rembg-0"):
        assert any(n.startswith(prefix) for n in names), names
    assert all(p["spec"]["nodeName"] == NODE_NAME for p in found)
    namespace = get(monitored.cluster, "", "namespace", MONITORING_NAMESPACE)
    assert namespace is not None
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
