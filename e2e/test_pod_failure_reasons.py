"""The RembgService says why its pods are not ready, where `kubectl get`, `kubectl wait` and
Argo CD read it: a CPU request larger than any node (KWOK nodes have 16 CPUs) leaves the pool's
pod Unschedulable; the status names the pod and the scheduler's reason, a Warning Event says
it once, and fixing the request clears it.

The operator runs as a ServiceAccount bound to exactly the rules in rbac.py (the namespaced
Role and the cluster-scoped ClusterRole the chart renders), so a missing pod verb shows up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rembg_operator.rbac import build_namespaced_roles

from e2e.operator_support import (
    OperatorProcess,
    condition,
    eventually,
    get,
    kubectl_apply,
    rembg_service,
    running_operator,
    wait_condition,
    wait_ready,
)

NAME = "toobig"


def _spec(cpu: str) -> dict[str, Any]:
    return {
        "models": ["u2netp"],
        "autoscaling": {"enabled": False},
        "cpu": {
            "replicas": 1,
            "resources": {
                "requests": {"cpu": cpu, "memory": "1Gi"},
                "limits": {"cpu": cpu, "memory": "2Gi"},
            },
        },
    }


def _binding(kind: str, role: str, namespace: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": role}
    if kind == "RoleBinding":
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind[:-7], "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": "rembg-operator", "namespace": namespace}],
    }


@pytest.fixture
def exact_rbac_operator(crd: Any, namespace: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    """The operator as a ServiceAccount with the chart's namespaced RBAC, nothing more."""
    role, cluster_role = build_namespaced_roles(name=f"rembg-operator-{namespace}")
    role["metadata"]["namespace"] = namespace
    items = [
        role,
        cluster_role,
        _binding("RoleBinding", role["metadata"]["name"], namespace),
        _binding("ClusterRoleBinding", cluster_role["metadata"]["name"], namespace),
    ]
    kubeconfig = crd.service_account_kubeconfig(
        namespace, "rembg-operator", tmp_path / "sa.kubeconfig"
    )
    crd.kubectl(
        "apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
    )
    try:
        with running_operator(crd, namespace, KUBECONFIG=str(kubeconfig)) as operator:
            yield operator
    finally:
        crd.kubectl(
            "delete",
            "clusterrolebinding,clusterrole",
            cluster_role["metadata"]["name"],
            "--ignore-not-found",
            check=False,
        )


def _warning_events(cluster: Any, namespace: str) -> list[dict[str, Any]]:
    # The RembgService's own: its Service has the same name, and kube-apiserver's ClusterIP
    # repair loop may post a ClusterIPNotAllocated warning on it when it races the allocator.
    selector = f"involvedObject.name={NAME},involvedObject.kind=RembgService"
    events = get(cluster, namespace, "events", "--field-selector", selector)
    return [e for e in (events or {}).get("items", []) if e.get("type") == "Warning"]


def _pod_names(cluster: Any, namespace: str) -> set[str]:
    pods = get(cluster, namespace, "pods", "-l", f"rembg.io/service={NAME},rembg.io/pool=cpu")
    return {p["metadata"]["name"] for p in (pods or {}).get("items", [])}


def test_an_unschedulable_pool_is_degraded_naming_the_pod_and_the_schedulers_reason(
    crd: Any, namespace: str, exact_rbac_operator: OperatorProcess
) -> None:
    kubectl_apply(crd, namespace, rembg_service(NAME, _spec("64")))

    degraded = wait_condition(crd, namespace, NAME, "Degraded", "True", "Unschedulable")
    (pod,) = eventually(lambda: _pod_names(crd, namespace), what="the pool's pod")
    assert f"pod {pod}: Unschedulable: 0/" in degraded["message"]
    assert "Insufficient cpu" in degraded["message"]

    service = get(crd, namespace, "rembgservice", NAME)
    assert service is not None
    ready = condition(service, "Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "PodsNotReady"
    assert ready["message"].startswith(f"cpu: 0/1 ready; pod {pod}: Unschedulable: 0/")
    cpu = service["status"]["pools"]["cpu"]
    assert cpu["notReadyPods"] == 1
    (entry,) = cpu["notReady"]
    assert (entry["pod"], entry["reason"]) == (pod, "Unschedulable")
    assert "Insufficient cpu" in entry["message"]
    # Where users look first: the table's Reason column (-o wide), and `kubectl wait`.
    table = crd.kubectl("get", "rbs", NAME, "-n", namespace, "-o", "wide").stdout
    assert "PodsNotReady" in table
    crd.kubectl(
        "wait",
        f"rembgservice/{NAME}",
        "-n",
        namespace,
        "--for=condition=Degraded",
        "--timeout=30s",
    )

    events = eventually(
        lambda: [e for e in _warning_events(crd, namespace) if e["reason"] == "Unschedulable"],
        what="a Warning Event about the unschedulable pod",
    )
    (event,) = events
    assert f"pod {pod}: Unschedulable" in event["message"]
    assert event["source"]["component"] == "rembg-operator"

    kubectl_apply(crd, namespace, rembg_service(NAME, _spec("1")))
    wait_ready(crd, namespace, NAME)
    healed = wait_condition(crd, namespace, NAME, "Degraded", "False")
    assert healed["reason"] == "AsExpected"

    def cleared() -> dict[str, Any] | None:
        found = get(crd, namespace, "rembgservice", NAME)
        pool = ((found or {}).get("status") or {}).get("pools", {}).get("cpu", {})
        return found if pool and "notReady" not in pool and "notReadyPods" not in pool else None

    cleared_service = eventually(cleared, what="status.pools.cpu.notReady to be removed")
    assert cleared_service["status"]["cpuReplicas"] == "1/1"
    # One Event for the one (pod, reason): not one per watch event or status refresh.
    assert [e["reason"] for e in _warning_events(crd, namespace)] == ["Unschedulable"]
    assert exact_rbac_operator.metric("rembg_operator_api_requests_total", code="403") == 0
