"""Autoscaling end to end: load on real inference servers -> their /metrics -> Prometheus ->
the operator's recording rules -> prometheus-adapter (custom.metrics.k8s.io) -> the HPA
controller of kube-controller-manager -> Deployment replicas -> RembgService status.

Two RembgServices scale at once, each on one signal only: `by-queue` has a reachable queue
target and a latency target no load reaches; `by-latency` the other way round. Each is
scaled from 1 to 3 pods by its own signal and back to 1 when the load stops.

Scaffolding (see rembg_devcluster.metrics_stack): pods are KWOK pods, so each pod of a pool
is mapped onto one of the pool's three real `rembg_server` processes through a Prometheus
file_sd target labelled with the pod's namespace and name. The load generator plays the
pool's Service. Everything else is the real component. KEDA itself is not run: its CRDs are
installed and the operator's ScaledObject must pass their schema on the API server.

Bounded: at most MAX_REQUESTS requests per pool, all to 127.0.0.1; every wait is a generous
deadline with a message saying what did not happen. The measured times are printed (run with
-s or -rP), never asserted.
"""

from __future__ import annotations

import copy
import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest
from rembg_devcluster import DevCluster
from rembg_devcluster.metrics_stack import MetricsStack, parse_quantity
from rembg_operator.custom_metrics import (
    LATENCY_P95_METRIC,
    QUEUE_DEPTH_METRIC,
    build_adapter_config,
)

from e2e.autoscaling_support import LoadGenerator, autoscaling_cluster, start_servers
from e2e.operator_support import (
    OperatorProcess,
    eventually,
    get,
    kubectl_apply,
    rembg_service,
    running_operator,
    wait_ready,
)

T = TypeVar("T")
SERVERS_PER_POOL = 3
MAX_REPLICAS = 3
MAX_REQUESTS = 4000
SCALE_TIMEOUT = 180.0
# The HPA controller's loop: 15 s by default; short here so the test is quick.
HPA_SYNC_PERIOD = "2s"
QUEUE_TARGET = 2.0
LATENCY_TARGET_SECONDS = 0.05
UNREACHABLE_QUEUE = 1000.0
# Above the top finite latency bucket (60 s): histogram_quantile never reports more.
UNREACHABLE_LATENCY_SECONDS = 3600.0


@dataclass(frozen=True)
class Scenario:
    service: str
    queue_target: float
    latency_target: float
    concurrency: int
    # The metric that must drive this pool, and its target.
    signal: str
    signal_target: float


# by-queue: 8 requests in flight want 8 / 2 = 4 pods from one (capped at 3), and 8 / 3 = 2.7
# per pod stays above target at 3. by-latency: 2 in flight on one inference thread already wait
# far beyond 50 ms, and a queue of 2 is nowhere near 1000.
SCENARIOS = (
    Scenario(
        "by-queue", QUEUE_TARGET, UNREACHABLE_LATENCY_SECONDS, 8, QUEUE_DEPTH_METRIC, QUEUE_TARGET
    ),
    Scenario(
        "by-latency",
        UNREACHABLE_QUEUE,
        LATENCY_TARGET_SECONDS,
        2,
        LATENCY_P95_METRIC,
        LATENCY_TARGET_SECONDS,
    ),
)


def _spec(scenario: Scenario, engine: str = "hpa") -> dict[str, Any]:
    window = {"maxPercent": 100, "maxPods": 4, "periodSeconds": 5}
    return {
        "models": ["u2netp"],
        "cpu": {"minReplicas": 1, "maxReplicas": MAX_REPLICAS},
        "autoscaling": {
            "engine": engine,
            "targetQueueDepthPerPod": scenario.queue_target,
            "targetLatencyP95Seconds": scenario.latency_target,
            "scaleUp": {"stabilizationWindowSeconds": 0, **window},
            "scaleDown": {"stabilizationWindowSeconds": 10, **window},
        },
        "monitoring": {"scrapeInterval": "2s", "scrapeTimeout": "2s"},
    }


@dataclass
class Environment:
    cluster: DevCluster
    namespace: str
    stack: MetricsStack
    operator: OperatorProcess


@pytest.fixture(scope="module")
def hpa_cluster(cluster_factory: Callable[..., DevCluster]) -> Iterator[DevCluster]:
    yield from autoscaling_cluster(cluster_factory, HPA_SYNC_PERIOD)


@pytest.fixture(scope="module")
def environment(
    hpa_cluster: DevCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Environment]:
    namespace = "autoscaling-e2e"
    hpa_cluster.create_namespace(namespace)
    hpa_cluster.wait_for_default_service_account(namespace)
    servers = {
        (namespace, s.service, "cpu"): start_servers(hpa_cluster, s.service, SERVERS_PER_POOL)
        for s in SCENARIOS
    }
    stack = MetricsStack.start(
        hpa_cluster, tmp_path_factory.mktemp("metrics-stack"), build_adapter_config(), servers
    )
    try:
        stack.start_sync_loop(every_seconds=1.0)
        with running_operator(hpa_cluster, namespace) as operator:
            yield Environment(hpa_cluster, namespace, stack, operator)
    finally:
        stack.stop()


def _deployment_replicas(env: Environment, service: str) -> tuple[int, int]:
    """(spec.replicas, status.readyReplicas) of the pool's Deployment."""
    deployment = get(env.cluster, env.namespace, "deployment", f"{service}-cpu") or {}
    spec = int((deployment.get("spec") or {}).get("replicas") or 0)
    return spec, int((deployment.get("status") or {}).get("readyReplicas") or 0)


def _status_pool(env: Environment, service: str) -> dict[str, Any]:
    found = get(env.cluster, env.namespace, "rembgservice", service) or {}
    pools: dict[str, Any] = (found.get("status") or {}).get("pools") or {}
    return dict(pools.get("cpu") or {})


def _hpa_metrics(env: Environment, service: str) -> dict[str, float]:
    """The HPA's own view: current average value of each Pods metric, by metric name."""
    hpa = get(env.cluster, env.namespace, "hpa", f"{service}-cpu") or {}
    values = {}
    for entry in (hpa.get("status") or {}).get("currentMetrics") or []:
        pods = entry.get("pods") or {}
        if "metric" in pods:
            values[pods["metric"]["name"]] = parse_quantity(pods["current"]["averageValue"])
    return values


def _pool_metric(env: Environment, service: str, metric: str) -> dict[str, float]:
    """The custom metrics API's values for the pool's pods (as the HPA controller reads them)."""
    values = env.stack.custom_metric(env.namespace, metric)
    return {pod: v for pod, v in values.items() if pod.startswith(f"{service}-cpu-")}


def _at_replicas(env: Environment, service: str, replicas: int) -> bool:
    spec, ready = _deployment_replicas(env, service)
    status = _status_pool(env, service)
    return (
        spec == replicas
        and ready == replicas
        and status.get("desiredReplicas") == replicas
        and status.get("readyReplicas") == replicas
    )


def _describe(env: Environment, service: str) -> str:
    return (
        f"deployment (spec, ready)={_deployment_replicas(env, service)}, "
        f"status.pools.cpu={_status_pool(env, service)}, hpa metrics={_hpa_metrics(env, service)}, "
        f"sync error={env.stack.last_sync_error!r}"
    )


def wait_until(probe: Callable[[], T | None], what: Callable[[], str], timeout: float) -> T:
    """Polls probe until it returns something truthy; on timeout the message describes the
    state at that moment (not at the start)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what()}")


def _signal_above_target(env: Environment, scenario: Scenario) -> dict[str, float] | None:
    values = _pool_metric(env, scenario.service, scenario.signal)
    return values if values and max(values.values()) > scenario.signal_target else None


def _served_message(env: Environment, service: str, metric: str) -> str:
    return (
        f"{service}: {metric} served by custom.metrics.k8s.io "
        f"(sync error: {env.stack.last_sync_error!r})"
    )


def _rise_message(env: Environment, scenario: Scenario, load: LoadGenerator) -> str:
    now = _pool_metric(env, scenario.service, scenario.signal)
    return (
        f"{scenario.service}: {scenario.signal} above {scenario.signal_target} under load "
        f"(now {now}; {load.summary()})"
    )


def _replicas_message(env: Environment, service: str, replicas: int) -> str:
    return f"{service} at {replicas} replica(s): {_describe(env, service)}"


def _pool_load(env: Environment, scenario: Scenario) -> LoadGenerator:
    return LoadGenerator(
        targets=functools.partial(
            env.stack.mapping.servers_of, env.namespace, scenario.service, "cpu"
        ),
        concurrency=scenario.concurrency,
        max_requests=MAX_REQUESTS,
    )


def test_each_signal_scales_its_pool_up_and_back_down(environment: Environment) -> None:
    env = environment
    for scenario in SCENARIOS:
        kubectl_apply(env.cluster, env.namespace, rembg_service(scenario.service, _spec(scenario)))
    for scenario in SCENARIOS:
        wait_ready(env.cluster, env.namespace, scenario.service)

    # Idle: both Pods metrics are served for the single pod of each pool, and are low.
    for scenario in SCENARIOS:
        for metric in (QUEUE_DEPTH_METRIC, LATENCY_P95_METRIC):
            idle = wait_until(
                functools.partial(_pool_metric, env, scenario.service, metric),
                functools.partial(_served_message, env, scenario.service, metric),
                SCALE_TIMEOUT,
            )
            assert all(v < scenario.signal_target for v in idle.values()), (scenario, metric, idle)
        assert _deployment_replicas(env, scenario.service) == (1, 1)

    loads = {s.service: _pool_load(env, s) for s in SCENARIOS}
    started = time.monotonic()
    timings: dict[str, dict[str, float]] = {s.service: {} for s in SCENARIOS}
    try:
        for load in loads.values():
            load.start()
        for scenario in SCENARIOS:
            # The signal rises in the custom metrics API, above the HPA's target...
            risen = wait_until(
                functools.partial(_signal_above_target, env, scenario),
                functools.partial(_rise_message, env, scenario, loads[scenario.service]),
                SCALE_TIMEOUT,
            )
            timings[scenario.service]["metric_above_target_s"] = time.monotonic() - started
            print(f"{scenario.service}: {scenario.signal} under load: {risen}")
        for scenario in SCENARIOS:
            # ... and the HPA scales the pool to its maximum, driven by that signal alone.
            wait_until(
                functools.partial(_at_replicas, env, scenario.service, MAX_REPLICAS),
                functools.partial(_replicas_message, env, scenario.service, MAX_REPLICAS),
                SCALE_TIMEOUT,
            )
            timings[scenario.service]["scaled_up_s"] = time.monotonic() - started
            _assert_scaled_by_its_own_signal(env, scenario)
    finally:
        for load in loads.values():
            load.stop()
    stopped = time.monotonic()
    for scenario in SCENARIOS:
        wait_until(
            functools.partial(_at_replicas, env, scenario.service, 1),
            functools.partial(_replicas_message, env, scenario.service, 1),
            SCALE_TIMEOUT,
        )
        timings[scenario.service]["scaled_down_after_stop_s"] = time.monotonic() - stopped
    for service, load in loads.items():
        assert load.answered.get(200, 0) > 0, (service, load.summary())
        assert load.sent <= MAX_REQUESTS
        print(f"{service}: {load.summary()}; timings {_rounded(timings[service])}")


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def _rescale_messages(env: Environment, service: str) -> list[str]:
    """Messages of the HPA controller's SuccessfulRescale events for the pool's HPA."""
    listing = env.cluster.get_json(
        "events",
        "-n",
        env.namespace,
        "--field-selector",
        f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={service}-cpu,"
        "reason=SuccessfulRescale",
    )
    return [str(e.get("message", "")) for e in listing.get("items", [])]


def _assert_scaled_by_its_own_signal(env: Environment, scenario: Scenario) -> None:
    """The HPA controller says why it scaled up (its event names the metric above target),
    and its recorded value of the other metric is far below that metric's target."""
    other = LATENCY_P95_METRIC if scenario.signal == QUEUE_DEPTH_METRIC else QUEUE_DEPTH_METRIC
    messages = _rescale_messages(env, scenario.service)
    assert any(f"pods metric {scenario.signal} above target" in m for m in messages), messages
    assert not any(f"pods metric {other} above target" in m for m in messages), messages
    current = _hpa_metrics(env, scenario.service)
    other_target = scenario.latency_target if other == LATENCY_P95_METRIC else scenario.queue_target
    assert set(current) == {QUEUE_DEPTH_METRIC, LATENCY_P95_METRIC}, current
    assert current[other] < other_target / 10, (scenario.service, current)


def test_keda_scaled_object_passes_the_keda_crd_schema(environment: Environment) -> None:
    """engine: keda -> the operator creates a ScaledObject the API server accepts under KEDA's
    own CRD schema (KEDA itself is not running; no HPA is made by the operator)."""
    env = environment
    scenario = Scenario("by-keda", QUEUE_TARGET, 1.0, 1, QUEUE_DEPTH_METRIC, QUEUE_TARGET)
    kubectl_apply(
        env.cluster, env.namespace, rembg_service(scenario.service, _spec(scenario, "keda"))
    )
    scaled = eventually(
        lambda: get(env.cluster, env.namespace, "scaledobject", f"{scenario.service}-cpu"),
        what="the operator's ScaledObject",
    )
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"queue-depth", "latency-p95"}
    assert all(t["type"] == "prometheus" for t in triggers.values())
    assert get(env.cluster, env.namespace, "hpa", f"{scenario.service}-cpu") is None

    # The schema is really enforced: the same object with a trigger lacking its required
    # `metadata` is refused by the API server.
    broken = copy.deepcopy(scaled)
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields", "generation"):
        broken["metadata"].pop(key, None)
    broken["metadata"]["name"] = "broken-scaledobject"
    broken["metadata"].pop("ownerReferences", None)
    broken.pop("status", None)
    del broken["spec"]["triggers"][0]["metadata"]
    refused = env.cluster.kubectl(
        "create", "-n", env.namespace, "-f", "-", input=json.dumps(broken), check=False
    )
    assert refused.returncode != 0
    assert "metadata" in refused.stderr, refused.stderr
