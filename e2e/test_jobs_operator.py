"""spec.jobs against a real control plane: the operator (a real `python -m rembg_operator`
process) renders the job path's env with secretKeyRefs, the HPA's External backlog metric and
KEDA's redis-streams trigger (validated by KEDA's own CRD schema on the API server), and turning
the job path off removes every one of them. The API server's CEL rule refuses an enabled job
path without a Secret.

Then the backlog scales a pool end to end: jobs submitted to a real `rembg_server` (job path on,
a real redis-server) -> its rembg_jobs_backlog gauge -> Prometheus evaluating the operator's
PrometheusRule (rembg:jobs_backlog:max) -> prometheus-adapter's externalRules served as
external.metrics.k8s.io -> the HPA controller -> Deployment replicas, and back down once the
workers have drained the stream. Scaffolding as in test_autoscaling.py: the pool's KWOK pods are
mapped onto the real server process for scraping. That one process consumes every job whatever
the pod count (a real pod would add a consumer), which only slows the drain, not the signal.

The cluster is this module's own (KEDA's CRDs installed, a fast HPA controller), stopped when
the module is done. Bounded: at most MAX_JOBS jobs, all to 127.0.0.1.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rembg_devcluster import DevCluster
from rembg_devcluster.metrics_stack import MetricsStack
from rembg_operator.custom_metrics import JOBS_BACKLOG_METRIC, build_adapter_config

from e2e.autoscaling_support import (
    autoscaling_cluster,
    job_states,
    small_png,
    start_servers,
    submit_jobs,
)
from e2e.operator_support import (
    OperatorProcess,
    eventually,
    get,
    kubectl_apply,
    rembg_service,
    running_operator,
    wait_ready,
)
from tests.server.processes import RedisServer

SERVICE = "jobs"
SECRET = "redis-credentials"
JOBS = {
    "enabled": True,
    "redis": {"secretName": SECRET, "usernameKey": "user"},
    "targetBacklogPerReplica": 5,
}


@pytest.fixture(scope="module")
def jobs_cluster(cluster_factory: Callable[..., DevCluster]) -> Iterator[DevCluster]:
    yield from autoscaling_cluster(cluster_factory, "2s")


@pytest.fixture
def namespace(jobs_cluster: DevCluster, request: pytest.FixtureRequest) -> str:
    """A fresh namespace per test; the module's cluster goes away with all of them."""
    name = f"jobs-{request.node.name.removeprefix('test_')[:30].replace('_', '-').rstrip('-')}"
    jobs_cluster.create_namespace(name)
    jobs_cluster.wait_for_default_service_account(name)
    return name


@pytest.fixture
def operator(jobs_cluster: DevCluster, namespace: str) -> Iterator[OperatorProcess]:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": SECRET, "namespace": namespace},
        "type": "Opaque",
        "stringData": {"address": "redis.example.svc:6379", "password": "p", "user": "rembg"},
    }
    jobs_cluster.apply(secret)
    with running_operator(jobs_cluster, namespace) as running:
        yield running


def _spec(engine: str, jobs: dict[str, Any] | None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "models": ["u2netp"],
        "cpu": {"minReplicas": 1, "maxReplicas": 3},
        "autoscaling": {"engine": engine},
    }
    if jobs is not None:
        spec["jobs"] = jobs
    return spec


def _apply(cluster: DevCluster, namespace: str, engine: str, jobs: dict[str, Any] | None) -> None:
    kubectl_apply(cluster, namespace, rembg_service(SERVICE, _spec(engine, jobs)))


def _jobs_env(cluster: DevCluster, namespace: str) -> list[dict[str, Any]] | None:
    deployment = get(cluster, namespace, "deployment", f"{SERVICE}-cpu")
    if deployment is None:
        return None
    env = deployment["spec"]["template"]["spec"]["containers"][0].get("env") or []
    return [e for e in env if e["name"].startswith("REMBG_JOBS_")]


def _metric_types(cluster: DevCluster, namespace: str) -> list[str] | None:
    hpa = get(cluster, namespace, "hpa", f"{SERVICE}-cpu")
    return None if hpa is None else [m["type"] for m in hpa["spec"]["metrics"]]


def _triggers(cluster: DevCluster, namespace: str) -> dict[str, Any] | None:
    scaled = get(cluster, namespace, "scaledobject", f"{SERVICE}-cpu")
    return None if scaled is None else {t["name"]: t for t in scaled["spec"]["triggers"]}


def _recorded(cluster: DevCluster, namespace: str) -> set[str]:
    rule = get(cluster, namespace, "prometheusrule", SERVICE) or {"spec": {"groups": []}}
    return {r.get("record") or r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]}


def _secret_ref(name: str, key: str, *, optional: bool) -> dict[str, Any]:
    selector: dict[str, Any] = {"name": SECRET, "key": key}
    if optional:
        selector["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": selector}}


def test_hpa_engine_renders_the_job_path_and_removes_it_when_off(
    jobs_cluster: DevCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster = jobs_cluster
    _apply(cluster, namespace, "hpa", JOBS)
    env = eventually(lambda: _jobs_env(cluster, namespace), what="the job path's env")
    assert env == [
        {"name": "REMBG_JOBS_ENABLED", "value": "true"},
        _secret_ref("REMBG_JOBS_REDIS_ADDRESS", "address", optional=False),
        _secret_ref("REMBG_JOBS_REDIS_USERNAME", "user", optional=True),
        _secret_ref("REMBG_JOBS_REDIS_PASSWORD", "password", optional=True),
        {"name": "REMBG_JOBS_REDIS_DB", "value": "0"},
        {"name": "REMBG_JOBS_REDIS_TLS", "value": "false"},
        {"name": "REMBG_JOBS_KEY_PREFIX", "value": f"rembg:{namespace}:{SERVICE}"},
        {"name": "REMBG_JOBS_RESULT_TTL_SECONDS", "value": "86400"},
        {"name": "REMBG_JOBS_MAX_ATTEMPTS", "value": "3"},
        {"name": "REMBG_JOBS_VISIBILITY_TIMEOUT_SECONDS", "value": "30"},
    ]
    eventually(
        lambda: _metric_types(cluster, namespace) == ["Pods", "Pods", "External"],
        what="the HPA's External backlog metric",
    )
    hpa = get(cluster, namespace, "hpa", f"{SERVICE}-cpu") or {}
    assert hpa["spec"]["metrics"][2]["external"] == {
        "metric": {
            "name": "rembg_jobs_backlog",
            "selector": {"matchLabels": {"rembg_service": SERVICE}},
        },
        "target": {"type": "AverageValue", "averageValue": "5"},
    }
    jobs_rules = {"rembg:jobs_backlog:max", "RembgJobsWaiting", "RembgJobsRedisUnreachable"}
    eventually(
        lambda: jobs_rules <= _recorded(cluster, namespace), what="the jobs rules and alerts"
    )

    # Off again: the server-side apply drops every field the operator no longer renders.
    _apply(cluster, namespace, "hpa", {**JOBS, "enabled": False})
    eventually(lambda: _jobs_env(cluster, namespace) == [], what="the job env to go")
    eventually(
        lambda: _metric_types(cluster, namespace) == ["Pods", "Pods"],
        what="the External metric to go",
    )
    eventually(lambda: not jobs_rules & _recorded(cluster, namespace), what="the jobs rules to go")


def test_keda_engine_adds_a_redis_streams_trigger_and_removes_it_when_off(
    jobs_cluster: DevCluster, namespace: str, operator: OperatorProcess
) -> None:
    cluster = jobs_cluster
    _apply(cluster, namespace, "keda", JOBS)
    triggers = eventually(
        lambda: (t := _triggers(cluster, namespace)) and "jobs-backlog" in t and t,
        what="the ScaledObject's redis-streams trigger",
    )
    # Accepted by the API server under KEDA's own CRD schema, exactly as rendered.
    assert triggers["jobs-backlog"] == {
        "type": "redis-streams",
        "name": "jobs-backlog",
        "metricType": "AverageValue",
        "metadata": {
            "addressFromEnv": "REMBG_JOBS_REDIS_ADDRESS",
            "usernameFromEnv": "REMBG_JOBS_REDIS_USERNAME",
            "passwordFromEnv": "REMBG_JOBS_REDIS_PASSWORD",
            "stream": f"rembg:{namespace}:{SERVICE}:jobs",
            "streamLength": "5",
            "databaseIndex": "0",
            "enableTLS": "false",
        },
    }
    # Every variable KEDA resolves from the scale target is defined on its container.
    env_names = {e["name"] for e in _jobs_env(cluster, namespace) or []}
    from_env = {v for k, v in triggers["jobs-backlog"]["metadata"].items() if k.endswith("FromEnv")}
    assert from_env <= env_names
    assert get(cluster, namespace, "hpa", f"{SERVICE}-cpu") is None

    _apply(cluster, namespace, "keda", None)
    eventually(
        lambda: set(_triggers(cluster, namespace) or {}) == {"queue-depth", "latency-p95"},
        what="the redis-streams trigger to go",
    )
    eventually(lambda: _jobs_env(cluster, namespace) == [], what="the job env to go")


def test_an_enabled_job_path_without_a_secret_is_refused(
    jobs_cluster: DevCluster, namespace: str
) -> None:
    manifest = rembg_service(SERVICE, _spec("hpa", {"enabled": True}))
    refused = jobs_cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=False
    )
    assert refused.returncode != 0
    assert "jobs.redis.secretName is required when jobs.enabled is true" in refused.stderr
    assert get(jobs_cluster, namespace, "rembgservice", SERVICE) is None


# ---- the backlog scales a pool, end to end ----------------------------------------------------

# Enough for minutes of backlog on one loaded core (u2netp at ~0.5-1 job/s).
MAX_JOBS = 60  # > 2 replicas of backlog for ~100 s at a loaded core's ~0.5 jobs/s
BACKLOG_TARGET = 5
MAX_REPLICAS = 3
SCALE_TIMEOUT = 180.0
DRAIN_TIMEOUT = 600.0  # 60 jobs on one worker of a loaded 2-core CI host


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _scaling_spec() -> dict[str, Any]:
    window = {"maxPercent": 100, "maxPods": 4, "periodSeconds": 5}
    return {
        "models": ["u2netp"],
        "cpu": {"minReplicas": 1, "maxReplicas": MAX_REPLICAS},
        "autoscaling": {
            # The Pods signals out of reach: only the backlog may scale this pool.
            "targetQueueDepthPerPod": 1000,
            "targetLatencyP95Seconds": 3600,
            "scaleUp": {"stabilizationWindowSeconds": 0, **window},
            "scaleDown": {"stabilizationWindowSeconds": 10, **window},
        },
        "monitoring": {"scrapeInterval": "2s", "scrapeTimeout": "2s"},
        "jobs": {
            "enabled": True,
            "redis": {"secretName": SECRET},
            "targetBacklogPerReplica": BACKLOG_TARGET,
        },
    }


def _replicas(cluster: DevCluster, namespace: str) -> tuple[int, int]:
    deployment = get(cluster, namespace, "deployment", f"{SERVICE}-cpu") or {}
    spec = int((deployment.get("spec") or {}).get("replicas") or 0)
    return spec, int((deployment.get("status") or {}).get("readyReplicas") or 0)


def _wait(probe: Callable[[], Any], what: Callable[[], str], timeout: float) -> Any:
    """Polls until probe is truthy; the failure message describes the state at the deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(1.0)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what()}")


def _rescale_messages(cluster: DevCluster, namespace: str) -> list[str]:
    listing = cluster.get_json(
        "events",
        "-n",
        namespace,
        "--field-selector",
        f"involvedObject.kind=HorizontalPodAutoscaler,involvedObject.name={SERVICE}-cpu,"
        "reason=SuccessfulRescale",
    )
    return [str(e.get("message", "")) for e in listing.get("items", [])]


def test_backlog_scales_the_pool_up_and_back_down(
    jobs_cluster: DevCluster,
    namespace: str,
    operator: OperatorProcess,
    redis: RedisServer,
    tmp_path: Path,
) -> None:
    cluster = jobs_cluster
    # What the operator gives the pods: the same Redis and the service's own key prefix.
    job_env = {
        "REMBG_JOBS_ENABLED": "true",
        "REMBG_JOBS_REDIS_ADDRESS": redis.address,
        "REMBG_JOBS_KEY_PREFIX": f"rembg:{namespace}:{SERVICE}",
        # One worker: the stream drains slowly enough for the HPA to see the backlog.
        "REMBG_JOBS_CONCURRENCY": "1",
    }
    prefix = f"server-{namespace}"
    (server,) = start_servers(cluster, prefix, 1, extra_env=job_env)
    stack = MetricsStack.start(
        cluster,
        tmp_path / "metrics-stack",
        build_adapter_config(),
        {(namespace, SERVICE, "cpu"): [server]},
    )
    selector = f"rembg_service={SERVICE}"
    backlog = functools.partial(stack.external_metric, namespace, JOBS_BACKLOG_METRIC, selector)

    def state() -> str:
        return (
            f"replicas (spec, ready)={_replicas(cluster, namespace)}, backlog={backlog()}, "
            f"jobs={job_states(server, ids) if ids else {}}, sync error={stack.last_sync_error!r}"
        )

    ids: list[str] = []
    try:
        stack.start_sync_loop(every_seconds=1.0)
        kubectl_apply(cluster, namespace, rembg_service(SERVICE, _scaling_spec()))
        wait_ready(cluster, namespace, SERVICE)
        # Idle: the External metric is served for the service, at 0, and the pool stays at 1.
        _wait(lambda: backlog() == [0.0], lambda: f"an idle backlog of 0: {state()}", SCALE_TIMEOUT)
        assert _replicas(cluster, namespace) == (1, 1)

        started = time.monotonic()
        ids = submit_jobs(server, MAX_JOBS, small_png())
        # More than two replicas' worth: the HPA wants ceil(backlog / 5) > 2 replicas.
        _wait(
            lambda: (values := backlog()) and values[0] > BACKLOG_TARGET * (MAX_REPLICAS - 1),
            lambda: f"the backlog above {BACKLOG_TARGET * (MAX_REPLICAS - 1)}: {state()}",
            SCALE_TIMEOUT,
        )
        _wait(
            lambda: _replicas(cluster, namespace) == (MAX_REPLICAS, MAX_REPLICAS),
            lambda: f"{MAX_REPLICAS} ready replicas: {state()}",
            SCALE_TIMEOUT,
        )
        elapsed = time.monotonic() - started
        print(f"{MAX_JOBS} jobs: 1 -> {MAX_REPLICAS} replicas after {elapsed:.1f}s")
        messages = _rescale_messages(cluster, namespace)
        assert any(f"external metric {JOBS_BACKLOG_METRIC}" in m for m in messages), messages
        assert not any("pods metric" in m and "above target" in m for m in messages), messages

        # Every job finishes, exactly once, and the idle pool scales back to its minimum.
        _wait(
            lambda: job_states(server, ids) == {"done": MAX_JOBS},
            lambda: f"all {MAX_JOBS} jobs done: {state()}",
            DRAIN_TIMEOUT,
        )
        print(f"{MAX_JOBS} jobs: all done after {time.monotonic() - started:.1f}s")
        _wait(
            lambda: _replicas(cluster, namespace) == (1, 1),
            lambda: f"back to 1 replica: {state()}",
            SCALE_TIMEOUT,
        )
        print(f"{MAX_JOBS} jobs: back to 1 replica after {time.monotonic() - started:.1f}s")
    finally:
        stack.stop()
        cluster.stop_process(f"{prefix}-0", grace_seconds=10)
