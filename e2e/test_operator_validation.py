"""Specs the API server refuses (CEL and schema), specs only the operator can judge
(Degraded/Stalled + Event, running children untouched), clusters without GPU nodes or
without the monitoring CRDs, and the operator under exactly the RBAC rbac.py declares.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rembg_operator.rbac import build_cluster_role

from e2e.conftest import make_namespace
from e2e.operator_support import (
    OperatorProcess,
    children,
    condition,
    example,
    get,
    install_crd,
    kubectl_apply,
    rembg_service,
    running_operator,
    wait_condition,
    wait_ready,
)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"cpu": {"minReplicas": 5, "maxReplicas": 2}}, "minReplicas must be less than or equal"),
        ({"gpu": {"replicas": 9, "maxReplicas": 2}}, "replicas must lie between"),
        ({"models": ["u2netp"]}, "at least one pool (gpu or cpu) is required"),
        ({"cpu": {}, "availability": {"minAvailable": 1, "maxUnavailable": 1}}, "at most one"),
        ({"cpu": {"resources": {"limits": {"cpu": "lots"}}}}, "should match"),
        ({"cpu": {}, "autoscaling": {"engine": "cron"}}, "Unsupported value"),
        ({"cpu": {"gpuCount": 1}}, "unknown field"),
        ({"cpu": {}, "monitoring": {"alerts": {"latencyFor": "ten minutes"}}}, "should match"),
        ({"gpu": {"gpuCount": 0}}, "should be greater than or equal to 1"),
    ],
    ids=[
        "min-above-max",
        "replicas-out-of-bounds",
        "no-pool",
        "pdb-both",
        "bad-quantity",
        "bad-engine",
        "unknown-field",
        "bad-duration",
        "zero-gpus",
    ],
)
def test_api_server_rejects_invalid_specs(
    crd: Any, namespace: str, spec: dict[str, Any], message: str
) -> None:
    result = kubectl_apply(crd, namespace, rembg_service("bad", spec), check=False)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr
    assert get(crd, namespace, "rembgservice", "bad") is None


def test_api_server_rejects_a_name_too_long_for_children(crd: Any, namespace: str) -> None:
    result = kubectl_apply(crd, namespace, rembg_service("x" * 60, {"cpu": {}}), check=False)
    assert result.returncode != 0
    assert "at most 59 characters" in result.stderr


def test_api_server_applies_schema_defaults(crd: Any, namespace: str) -> None:
    kubectl_apply(crd, namespace, rembg_service("defaults", {"cpu": {}}))
    stored = get(crd, namespace, "rembgservice", "defaults")
    assert stored is not None
    assert stored["spec"]["cpu"]["minReplicas"] == 1
    assert stored["spec"]["image"].startswith("ghcr.io/rembg-fleet/server")


def test_kubectl_explain_documents_the_fields(crd: Any) -> None:
    out = crd.kubectl("explain", "rembgservice.spec.gpu.gpuCount").stdout
    assert "GPUs per pod" in " ".join(out.split())
    out = crd.kubectl("explain", "rbs.spec.autoscaling.targetQueueDepthPerPod").stdout
    assert "queued plus running requests per pod" in " ".join(out.split())


def test_semantically_invalid_spec_is_degraded_and_children_are_kept(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo")
    before = get(cluster, namespace, "deployment", "demo-cpu")
    assert before is not None

    broken = example(
        "minimal.yaml",
        cpu={"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}},
    )
    kubectl_apply(cluster, namespace, broken)
    degraded = wait_condition(cluster, namespace, "demo", "Degraded", "True", "InvalidSpec")
    assert "cpu request 4 is above its limit 2" in degraded["message"]
    service = get(cluster, namespace, "rembgservice", "demo")
    assert condition(service, "Stalled")["status"] == "True"
    assert condition(service, "Ready")["status"] == "False"
    assert service is not None
    assert service["status"]["observedGeneration"] == service["metadata"]["generation"]
    events = get(cluster, namespace, "events", "--field-selector", "reason=InvalidSpec")
    warnings = [e for e in (events or {}).get("items", []) if e["type"] == "Warning"]
    assert warnings
    assert "above its limit" in warnings[0]["message"]
    after = get(cluster, namespace, "deployment", "demo-cpu")
    assert after is not None
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["spec"]["template"] == before["spec"]["template"]

    kubectl_apply(cluster, namespace, example("minimal.yaml", models=["no-such-model"]))
    unknown = wait_condition(cluster, namespace, "demo", "Degraded", "True", "InvalidSpec")
    assert "unknown model(s) no-such-model" in unknown["message"]

    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_condition(cluster, namespace, "demo", "Degraded", "False")
    wait_ready(cluster, namespace, "demo")


@pytest.fixture(scope="module")
def cpu_only(cpu_only_cluster: Any) -> Any:
    install_crd(cpu_only_cluster)
    return cpu_only_cluster


@pytest.fixture
def cpu_only_namespace(cpu_only: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    yield from make_namespace(cpu_only, request.node.name)


def test_no_gpu_nodes_is_reported(cpu_only: Any, cpu_only_namespace: str) -> None:
    namespace = cpu_only_namespace
    with running_operator(cpu_only, namespace):
        kubectl_apply(cpu_only, namespace, example("gpu-only.yaml"))
        gpu = wait_condition(cpu_only, namespace, "gpu-only", "GpuCapacityAvailable", "False")
        assert gpu["reason"] == "NoGpuNodes"
        assert "nvidia.com/gpu" in gpu["message"]
        degraded = wait_condition(cpu_only, namespace, "gpu-only", "Degraded", "True")
        assert degraded["reason"] == "NoGpuCapacity"
        service = get(cpu_only, namespace, "rembgservice", "gpu-only")
        assert condition(service, "Ready")["status"] == "False"
        assert service is not None
        assert service["status"]["gpuCapacity"] == 0
        pods = get(cpu_only, namespace, "pods", "-l", "rembg.io/pool=gpu")
        assert pods is not None
        assert pods["items"]
        assert all(p["status"]["phase"] == "Pending" for p in pods["items"])
        events = get(cpu_only, namespace, "events", "--field-selector", "reason=NoGpuCapacity")
        assert (events or {}).get("items")


def test_cpu_fallback_when_no_gpu_nodes(cpu_only: Any, cpu_only_namespace: str) -> None:
    namespace = cpu_only_namespace
    with running_operator(cpu_only, namespace):
        manifest = example("gpu-only.yaml", fallback={"cpuPoolWhenNoGpuNodes": True})
        kubectl_apply(cpu_only, namespace, manifest)
        wait_ready(cpu_only, namespace, "gpu-only")
        service = get(cpu_only, namespace, "rembgservice", "gpu-only")
        assert service is not None
        assert condition(service, "Degraded")["reason"] == "NoGpuCapacity"
        assert "fallback" in condition(service, "Degraded")["message"]
        cpu = get(cpu_only, namespace, "deployment", "gpu-only-cpu")
        assert cpu is not None
        assert cpu["spec"]["replicas"] == 2
        assert service["status"]["pools"]["cpu"]["readyReplicas"] == 2


@pytest.fixture(scope="module")
def bare(bare_cluster: Any) -> Any:
    install_crd(bare_cluster)
    return bare_cluster


def test_without_monitoring_crds_the_rest_works(bare: Any, bare_namespace: str) -> None:
    namespace = bare_namespace
    with running_operator(bare, namespace):
        kubectl_apply(bare, namespace, example("minimal.yaml"))
        wait_ready(bare, namespace, "demo")
        service = get(bare, namespace, "rembgservice", "demo")
        assert service is not None
        monitoring = condition(service, "MonitoringAvailable")
        assert monitoring["status"] == "False"
        assert monitoring["reason"] == "CrdMissing"
        missing = {(c["kind"], c["reason"]) for c in service["status"]["unavailableChildren"]}
        assert missing == {("ServiceMonitor", "CrdMissing"), ("PrometheusRule", "CrdMissing")}
        assert condition(service, "Degraded")["status"] == "False"
        found = children(bare, namespace, "demo")
        assert found["deployments.apps"] == {"demo-cpu"}
        assert found["services"] == {"demo"}


def test_operator_works_with_exactly_the_declared_rbac(
    crd: Any, namespace: str, tmp_path: Path
) -> None:
    """A ServiceAccount bound to rbac.build_cluster_role() only: everything still works."""
    role = build_cluster_role(name=f"rembg-operator-{namespace}")
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": role["metadata"]["name"]},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": role["metadata"]["name"],
        },
        "subjects": [{"kind": "ServiceAccount", "name": "rembg-operator", "namespace": namespace}],
    }
    crd.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps({"kind": "List", "apiVersion": "v1", "items": [role, binding]}),
    )
    kubeconfig = crd.service_account_kubeconfig(
        namespace, "rembg-operator", tmp_path / "sa.kubeconfig"
    )
    try:
        with running_operator(crd, namespace, KUBECONFIG=str(kubeconfig)) as operator:
            kubectl_apply(crd, namespace, example("gpu-cpu-autoscaling.yaml"))
            wait_ready(crd, namespace, "fleet")
            service = get(crd, namespace, "rembgservice", "fleet")
            assert condition(service, "GpuCapacityAvailable")["status"] == "True"
            assert operator.metric("rembg_operator_api_requests_total", code="403") == 0
    finally:
        crd.kubectl(
            "delete",
            "clusterrolebinding,clusterrole",
            role["metadata"]["name"],
            "--ignore-not-found",
            check=False,
        )
