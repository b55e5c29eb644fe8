"""The fleet on real pods: our inference image on the real node, managed by the operator.

One cluster for the module whose only CPU node is the real one (kubelet + containerd), a
namespace where the API server enforces the restricted Pod Security Standard, and the operator
as a process watching it. Every pod here runs `ghcr.io/rembg-fleet/server:0.1.0` as built by
`make images`; requests go through the Service's ClusterIP (kube-proxy's rules).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import pytest
from rembg_devcluster import DevCluster
from rembg_devcluster.metrics_stack import MetricsStack
from rembg_operator.custom_metrics import build_adapter_config

from e2e.operator_support import (
    OperatorProcess,
    condition,
    eventually,
    example,
    get,
    install_crd,
    kubectl_apply,
    running_operator,
    wait_ready,
)
from e2e.real_node_support import (
    LoadClient,
    assert_cutout_matches_rembg,
    cluster_ip,
    container_host_pid,
    create_restricted_namespace,
    describe_pods,
    install_operator,
    on_real_node,
    photo,
    pods,
    ready_pods,
    roll_under_load,
    start_real_node_cluster,
    wait_for_endpoints,
)

TOLERANCE = 1 / 255
READY_TIMEOUT = 300.0


@dataclass
class Fleet:
    cluster: DevCluster
    namespace: str
    operator: OperatorProcess


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    cluster = start_real_node_cluster(
        tmp_path_factory.mktemp("real-pods"),
        # The HPA controller's loop: 15 s by default; shorter so the scaling test is quick.
        controller_manager_args=("--horizontal-pod-autoscaler-sync-period=3s",),
    )
    try:
        install_crd(cluster)
        namespace = create_restricted_namespace(cluster, "fleet")
        with running_operator(cluster, namespace) as operator:
            yield Fleet(cluster, namespace, operator)
    finally:
        cluster.stop()
    assert cluster.state.teardown_problems == []


def _timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _selector(service: str) -> str:
    return f"rembg.io/service={service},rembg.io/pool=cpu"


def _scrape(url: str) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def _sum(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def test_minimal_example_runs_real_pods_and_cuts_out_through_the_service(fleet: Fleet) -> None:
    cluster, namespace = fleet.cluster, fleet.namespace
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo", timeout=READY_TIMEOUT)

    (pod,) = ready_pods(cluster, namespace, _selector("demo"))
    assert on_real_node(pod), describe_pods(cluster, namespace)
    name = pod["metadata"]["name"]
    uid = cluster.kubectl("exec", "-n", namespace, name, "--", "id", "-u").stdout.strip()
    assert uid == "10001"
    write = cluster.kubectl("exec", "-n", namespace, name, "--", "touch", "/x", check=False)
    assert "Read-only file system" in write.stderr

    # Not Ready before warmup ended: Ready comes at least the warmup after the container start.
    metrics = _scrape(f"http://{pod['status']['podIP']}:8080/metrics")
    warmup = _sum(metrics, "rembg_warmup_seconds")
    started = _timestamp(pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"])
    ready_at = next(
        _timestamp(c["lastTransitionTime"])
        for c in pod["status"]["conditions"]
        if c["type"] == "Ready"
    )
    start_to_ready = (ready_at - started).total_seconds()
    scheduled = _timestamp(pod["metadata"]["creationTimestamp"])
    print(
        f"real pod {name}: created -> Ready {(ready_at - scheduled).total_seconds():.0f}s, "
        f"container start -> Ready {start_to_ready:.0f}s, warmup {warmup:.2f}s"
    )
    assert warmup > 0
    # Kubernetes timestamps have second resolution: allow one second of rounding.
    assert start_to_ready >= warmup - 1.0

    wait_for_endpoints(cluster, namespace, "demo")
    assert_cutout_matches_rembg(f"http://{cluster_ip(cluster, namespace, 'demo')}/v1/remove")
    cluster.kubectl("delete", "rembgservice", "demo", "-n", namespace, "--wait=false")


def test_a_spec_change_rolls_the_pool_under_load_without_a_failed_request(
    fleet: Fleet,
) -> None:
    """Surge first, drain last: the new pod is Ready before the old one goes, the old one's
    endpoint stops taking new connections while its preStop and in-flight requests run, and a
    client sending real images through the ClusterIP the whole time sees no failure."""
    cluster, namespace = fleet.cluster, fleet.namespace
    # Half a CPU each, so the surge pod fits beside the old one on the 2-CPU node.
    resources = {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    spec = {"cpu": {"minReplicas": 1, "maxReplicas": 1, "resources": resources}}
    manifest = example("minimal.yaml", **spec)
    manifest["metadata"]["name"] = "rolling"
    kubectl_apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "rolling", timeout=READY_TIMEOUT)
    wait_for_endpoints(cluster, namespace, "rolling")
    before, after = roll_under_load(cluster, namespace, manifest, timeout=READY_TIMEOUT)
    assert after["metadata"]["name"] != before["metadata"]["name"]
    assert on_real_node(after)
    cluster.kubectl("delete", "rembgservice", "rolling", "-n", namespace, "--wait=false")


def _failing(name: str, cpu: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    manifest = example("minimal.yaml", **overrides)
    manifest["metadata"]["name"] = name
    manifest["spec"]["cpu"] = {"minReplicas": 1, "maxReplicas": 1, **cpu}
    return manifest


def _degraded(cluster: DevCluster, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        service = get(cluster, namespace, "rembgservice", name)
        found = condition(service, "Degraded")
        return service if found.get("status") == "True" and found.get("reason") == reason else None

    try:
        return eventually(probe, what=f"{name}: Degraded={reason}", timeout=READY_TIMEOUT)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_pods(cluster, namespace)}") from None


def test_pods_that_cannot_run_are_reported_with_their_reason(fleet: Fleet) -> None:
    """A wrong image tag, a memory limit the model does not fit in, and a CPU request larger
    than the node: each RembgService says which pod and why, without `kubectl describe`."""
    cluster, namespace = fleet.cluster, fleet.namespace
    small = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    cases = {
        # Never: a missing tag must not make the kubelet try a registry (none is reachable).
        "badtag": (
            _failing(
                "badtag",
                {"resources": {**small, "limits": {"memory": "2Gi"}}},
                image="ghcr.io/rembg-fleet/server:no-such-tag",
                imagePullPolicy="Never",
            ),
            "ErrImageNeverPull",
        ),
        "tinymem": (
            _failing("tinymem", {"resources": {**small, "limits": {"memory": "96Mi"}}}),
            "OOMKilled",
        ),
        "toobig": (
            _failing("toobig", {"resources": {"requests": {"cpu": "8"}, "limits": {"cpu": "8"}}}),
            "Unschedulable",
        ),
    }
    for manifest, _ in cases.values():
        kubectl_apply(cluster, namespace, manifest)
    try:
        for name, (_, reason) in cases.items():
            service = _degraded(cluster, namespace, name, reason)
            message = condition(service, "Degraded")["message"]
            pool = service["status"]["pools"]["cpu"]
            (finding,) = pool["notReady"]
            assert finding["reason"] == reason
            assert finding["pod"].startswith(f"{name}-cpu-")
            assert finding["pod"] in message, message
            assert condition(service, "Ready")["status"] == "False"
            print(f"{name}: Degraded {reason}: {message}")
            events = get(
                cluster, namespace, "events", "--field-selector", f"involvedObject.name={name}"
            )
            warnings = [e for e in (events or {}).get("items", []) if e.get("type") == "Warning"]
            assert any(finding["pod"] in e.get("message", "") for e in warnings), warnings
            table = cluster.kubectl("get", "rbs", name, "-n", namespace, "-o", "wide").stdout
            assert "False" in table
    finally:
        for name in cases:
            cluster.kubectl("delete", "rembgservice", name, "-n", namespace, "--wait=false")


def test_the_operator_runs_as_a_pod_from_its_image_installed_by_helm(fleet: Fleet) -> None:
    """`helm install` of our chart: the operator pod (our image, restricted, read-only root)
    talks to the API server with the ServiceAccount token the kubelet mounts, through the
    `kubernetes` Service, and brings a RembgService in the namespace it watches to Ready."""
    cluster = fleet.cluster
    system = create_restricted_namespace(cluster, "rembg-system")
    watched = create_restricted_namespace(cluster, "helm-fleet")
    install_operator(cluster, system, watched)  # the module's fixture installed the CRD
    (operator_pod,) = pods(cluster, system, "app.kubernetes.io/name=rembg-operator")
    assert on_real_node(operator_pod), describe_pods(cluster, system)
    (container,) = operator_pod["spec"]["containers"]
    assert container["image"] == "ghcr.io/rembg-fleet/operator:0.1.0"
    token = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    name = operator_pod["metadata"]["name"]
    mounted = cluster.kubectl("exec", "-n", system, name, "--", "test", "-s", token, check=False)
    assert mounted.returncode == 0, "no ServiceAccount token mounted by the kubelet"

    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    manifest = example(
        "minimal.yaml", cpu={"minReplicas": 1, "maxReplicas": 1, "resources": resources}
    )
    kubectl_apply(cluster, watched, manifest)
    wait_ready(cluster, watched, "demo", timeout=READY_TIMEOUT)
    (server_pod,) = ready_pods(cluster, watched, _selector("demo"))
    assert on_real_node(server_pod)
    # The pod's own metrics: it did the reconciling (the host operator watches another
    # namespace), and the API server never refused it.
    metrics = _scrape(f"http://{operator_pod['status']['podIP']}:8081/metrics")
    reconciled = {
        k: v for k, v in metrics.items() if k.startswith("rembg_operator_reconciles_total")
    }
    assert any('result="ok"' in k and v >= 1 for k, v in reconciled.items()), reconciled
    refused = {k: v for k, v in metrics.items() if 'code="403"' in k or 'code="401"' in k}
    assert refused == {}
    cluster.kubectl("delete", "rembgservice", "demo", "-n", watched, "--wait=false")


def test_a_wedged_server_is_restarted_by_its_liveness_probe(fleet: Fleet) -> None:
    """SIGSTOP from the host freezes the server (a signal to a container's PID 1 from inside is
    ignored): /livez stops answering, the kubelet kills and restarts the container, and the
    pool comes back Ready on its own."""
    cluster, namespace = fleet.cluster, fleet.namespace
    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    manifest = example(
        "minimal.yaml",
        cpu={"minReplicas": 1, "maxReplicas": 1, "resources": resources},
        # A short grace period: the kubelet's kill waits for it before SIGKILL.
        server={"drainSeconds": 1, "requestTimeoutSeconds": 5},
    )
    manifest["metadata"]["name"] = "wedge"
    kubectl_apply(cluster, namespace, manifest)
    wait_ready(cluster, namespace, "wedge", timeout=READY_TIMEOUT)
    (pod,) = ready_pods(cluster, namespace, _selector("wedge"))
    status = pod["status"]["containerStatuses"][0]
    container_id = status["containerID"].removeprefix("containerd://")
    os.kill(container_host_pid(cluster, container_id), signal.SIGSTOP)
    stopped = time.monotonic()

    def restarted() -> dict[str, Any] | None:
        for current in ready_pods(cluster, namespace, _selector("wedge")):
            statuses = current["status"]["containerStatuses"]
            if (
                current["metadata"]["name"] == pod["metadata"]["name"]
                and statuses[0]["restartCount"] > status["restartCount"]
            ):
                return current
        return None

    try:
        again = eventually(restarted, what="the wedged container restarted and Ready", timeout=240)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_pods(cluster, namespace)}") from None
    took = time.monotonic() - stopped
    print(f"wedged server: restarted by its liveness probe and Ready in {took:.0f}s")
    last = again["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] != 0
    events = get(cluster, namespace, "events", "--field-selector", "reason=Unhealthy")
    assert any("Liveness probe failed" in e["message"] for e in (events or {}).get("items", []))
    wait_ready(cluster, namespace, "wedge", timeout=READY_TIMEOUT)
    cluster.kubectl("delete", "rembgservice", "wedge", "-n", namespace, "--wait=false")


def _requests_by_pod(cluster: DevCluster, namespace: str, service: str) -> dict[str, float]:
    """Each pod's own count of answered removal requests, from its /metrics."""
    counts = {}
    for pod in ready_pods(cluster, namespace, _selector(service)):
        metrics = _scrape(f"http://{pod['status']['podIP']}:8080/metrics")
        counts[pod["metadata"]["name"]] = _sum(metrics, "rembg_requests_total")
    return counts


def _replicas(cluster: DevCluster, namespace: str, deployment: str) -> tuple[int, int]:
    found = get(cluster, namespace, "deployment", deployment) or {}
    return found.get("spec", {}).get("replicas", 0), found.get("status", {}).get("readyReplicas", 0)


def test_load_through_the_service_scales_real_pods_up_and_back_down(
    fleet: Fleet, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Prometheus finds the pods through Kubernetes service discovery (no file_sd mapping),
    the operator's recording rules and prometheus-adapter feed the HPA, load through the
    Service's ClusterIP scales the pool from 1 to 2 real pods, the new pod serves a share, and
    the pool scales back down once the load stops."""
    cluster, namespace = fleet.cluster, fleet.namespace
    window = {"maxPercent": 100, "maxPods": 2, "periodSeconds": 5}
    resources = {
        "requests": {"cpu": "500m", "memory": "1Gi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    manifest = example(
        "minimal.yaml",
        cpu={"minReplicas": 1, "maxReplicas": 2, "resources": resources},
        autoscaling={
            "targetQueueDepthPerPod": 1,
            "targetLatencyP95Seconds": 3600,
            "scaleUp": {"stabilizationWindowSeconds": 0, **window},
            "scaleDown": {"stabilizationWindowSeconds": 10, **window},
        },
        monitoring={"scrapeInterval": "2s", "scrapeTimeout": "2s"},
    )
    manifest["metadata"]["name"] = "scaling"
    stack = MetricsStack.start(
        cluster, tmp_path_factory.mktemp("metrics"), build_adapter_config(), {}, discover_pods=True
    )
    try:
        stack.start_sync_loop(every_seconds=1.0)
        kubectl_apply(cluster, namespace, manifest)
        wait_ready(cluster, namespace, "scaling", timeout=READY_TIMEOUT)
        wait_for_endpoints(cluster, namespace, "scaling")
        eventually(
            lambda: stack.query('up{job="rembg-pods", rembg_service="scaling"} == 1'),
            what="Prometheus to discover and scrape the pod",
            timeout=60,
        )
        _scale_up_and_down(fleet, stack)
    finally:
        stack.stop()
        cluster.kubectl("delete", "rembgservice", "scaling", "-n", namespace, "--wait=false")


def _scale_up_and_down(fleet: Fleet, stack: MetricsStack) -> None:
    cluster, namespace = fleet.cluster, fleet.namespace
    url = f"http://{cluster_ip(cluster, namespace, 'scaling')}/v1/remove"
    load = LoadClient(url, photo((320, 240)), clients=4)
    started = time.monotonic()
    load.start()
    try:

        def scaled_up() -> bool:
            return _replicas(cluster, namespace, "scaling-cpu") == (2, 2)

        try:
            eventually(scaled_up, what="the pool at 2 ready pods", timeout=READY_TIMEOUT)
        except AssertionError as error:
            pending = stack.query("rembg:pending_requests:sum_by_pod")
            raise AssertionError(
                f"{error}; recorded pending {pending}; {stack.last_sync_error}\n"
                f"{describe_pods(cluster, namespace)}"
            ) from None
        up_after = time.monotonic() - started
        # Both pods serve: the Service spreads new connections over the endpoints.
        wait_for_endpoints(cluster, namespace, "scaling", count=2)
        eventually(
            lambda: min(_requests_by_pod(cluster, namespace, "scaling").values(), default=0) >= 3,
            what="the new pod to answer a share of the requests",
            timeout=120,
        )
        shares = _requests_by_pod(cluster, namespace, "scaling")
    finally:
        outcomes = load.stop()
    stopped = time.monotonic()
    eventually(
        lambda: _replicas(cluster, namespace, "scaling-cpu")[0] == 1,
        what="the pool back at 1 pod after the load",
        timeout=READY_TIMEOUT,
    )
    print(
        f"autoscaling on real pods: 1 -> 2 pods {up_after:.0f}s after the load started, back to "
        f"1 {time.monotonic() - stopped:.0f}s after it stopped; requests per pod {shares}; "
        f"outcomes {dict(outcomes)}"
    )
    assert len(shares) == 2
    assert outcomes["200"] > 0

    def status_desired() -> int:
        service = get(cluster, namespace, "rembgservice", "scaling") or {}
        pools = service.get("status", {}).get("pools", {})
        return int(pools.get("cpu", {}).get("desiredReplicas", 0))

    eventually(lambda: status_desired() == 1, what="status.pools.cpu back at 1", timeout=60)
