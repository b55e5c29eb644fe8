"""spec.jobs against a real control plane: the operator (a real `python -m rembg_operator`
process) renders the job path's env with secretKeyRefs, the HPA's External backlog metric and
KEDA's redis-streams trigger (validated by KEDA's own CRD schema on the API server), and turning
the job path off removes every one of them. The API server's CEL rule refuses an enabled job
path without a Secret.

The cluster is this module's own (KEDA's CRDs installed, a fast HPA controller), stopped when
the module is done.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from rembg_devcluster import DevCluster
from rembg_devcluster.metrics_stack import keda_crds_dir

from e2e.operator_support import (
    OperatorProcess,
    eventually,
    get,
    install_crd,
    kubectl_apply,
    rembg_service,
    running_operator,
)

SERVICE = "jobs"
SECRET = "redis-credentials"
JOBS = {
    "enabled": True,
    "redis": {"secretName": SECRET, "usernameKey": "user"},
    "targetBacklogPerReplica": 5,
}


@pytest.fixture(scope="module")
def jobs_cluster(cluster_factory: Callable[..., DevCluster]) -> Iterator[DevCluster]:
    started = cluster_factory(
        gpu_nodes=0,
        controller_manager_args=(
            "--horizontal-pod-autoscaler-sync-period=2s",
            # As in test_autoscaling: KWOK's node heartbeats are slow on a loaded 2-core host.
            "--node-monitor-grace-period=10m",
        ),
    )
    try:
        install_crd(started)
        started.install_crds(sorted(keda_crds_dir().glob("*.yaml")))
        yield started
    finally:
        started.stop()


@pytest.fixture
def namespace(jobs_cluster: DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"jobs-{request.node.name.removeprefix('test_')[:30].replace('_', '-').rstrip('-')}"
    jobs_cluster.create_namespace(name)
    jobs_cluster.wait_for_default_service_account(name)
    yield name


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
    eventually(
        lambda: not jobs_rules & _recorded(cluster, namespace), what="the jobs rules to go"
    )


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
