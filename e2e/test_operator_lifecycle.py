"""The operator's lifecycle against a real API server, driven the way users drive it.

create -> Ready with every child, GPU pods on GPU nodes only, drift repaired, spec update
rolls only what changed, pool removal prunes, delete garbage-collects, restart converges.
Each test runs `python -m rembg_operator` as a real process watching its own namespace.
"""

from __future__ import annotations

import json
from typing import Any

from e2e.operator_support import (
    OperatorProcess,
    assert_deployment_drift_repaired,
    children,
    condition,
    eventually,
    example,
    get,
    kubectl_apply,
    rembg_service,
    wait_condition,
    wait_ready,
)


def _deployment(cluster: Any, namespace: str, name: str) -> dict[str, Any] | None:
    return get(cluster, namespace, "deployment", name)


def _pods(cluster: Any, namespace: str, service: str, pool: str) -> list[dict[str, Any]]:
    listing = get(
        cluster, namespace, "pods", "-l", f"rembg.io/service={service},rembg.io/pool={pool}"
    )
    return list((listing or {}).get("items", []))


def test_minimal_example_becomes_ready_with_every_child(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo")

    assert children(cluster, namespace, "demo") == {
        "deployments.apps": {"demo-cpu"},
        "services": {"demo"},
        "horizontalpodautoscalers.autoscaling": {"demo-cpu"},
        "poddisruptionbudgets.policy": {"demo-cpu"},
        "servicemonitors.monitoring.coreos.com": {"demo"},
        "prometheusrules.monitoring.coreos.com": {"demo"},
    }
    service = get(cluster, namespace, "rembgservice", "demo")
    assert service is not None
    uid = service["metadata"]["uid"]
    for kind, names in children(cluster, namespace, "demo").items():
        for name in names:
            child = get(cluster, namespace, kind, name, "--show-managed-fields")
            assert child is not None
            (owner,) = child["metadata"]["ownerReferences"]
            assert owner["uid"] == uid, (kind, name)
            assert owner["controller"] is True
            managers = {m["manager"] for m in child["metadata"]["managedFields"]}
            assert "rembg-operator" in managers
    status = service["status"]
    assert status["observedGeneration"] == service["metadata"]["generation"]
    assert status["endpoint"] == f"http://demo.{namespace}.svc:80"
    assert status["pools"]["cpu"]["readyReplicas"] >= 1
    assert status["cpuReplicas"] == "1/1"
    assert condition(service, "Degraded")["status"] == "False"
    assert condition(service, "Stalled")["status"] == "False"
    assert condition(service, "Reconciling")["status"] == "False"
    assert condition(service, "MonitoringAvailable")["status"] == "True"
    table = cluster.kubectl("get", "rbs", "demo", "-n", namespace).stdout
    assert "True" in table
    assert "u2netp" in table
    events = get(cluster, namespace, "events", "--field-selector", "involvedObject.name=demo")
    assert "Applied" in {e["reason"] for e in (events or {}).get("items", [])}
    assert operator.metric("rembg_operator_reconciles_total", kind="full", result="ok") >= 1


def test_gpu_pool_lands_on_gpu_nodes_only(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("gpu-cpu-autoscaling.yaml"))
    wait_ready(cluster, namespace, "fleet")
    nodes = get(cluster, "default", "nodes")
    assert nodes is not None
    gpu_nodes = {
        n["metadata"]["name"]
        for n in nodes["items"]
        if n["metadata"].get("labels", {}).get("nvidia.com/gpu.present") == "true"
    }
    assert gpu_nodes, "the cluster fixture has GPU nodes"
    gpu_pods = _pods(cluster, namespace, "fleet", "gpu")
    cpu_pods = _pods(cluster, namespace, "fleet", "cpu")
    assert gpu_pods
    assert len(cpu_pods) >= 2
    assert {p["spec"]["nodeName"] for p in gpu_pods} <= gpu_nodes
    # CPU pods do not tolerate the GPU taint, so they keep off the GPU nodes.
    assert not {p["spec"]["nodeName"] for p in cpu_pods} & gpu_nodes
    limits = gpu_pods[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    service = get(cluster, namespace, "rembgservice", "fleet")
    assert condition(service, "GpuCapacityAvailable")["status"] == "True"


def test_drift_is_repaired(cluster: Any, namespace: str, operator: OperatorProcess) -> None:
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo")
    assert_deployment_drift_repaired(cluster, namespace, "demo-cpu")

    cluster.kubectl(
        "patch",
        "pdb",
        "demo-cpu",
        "-n",
        namespace,
        "--type=merge",
        "-p",
        json.dumps({"spec": {"maxUnavailable": 7}}),
    )
    eventually(
        lambda: (
            (p := get(cluster, namespace, "pdb", "demo-cpu"))
            and p["spec"].get("maxUnavailable") == 1
        ),
        what="the PDB budget to be restored",
    )

    cluster.kubectl("delete", "service", "demo", "-n", namespace)
    cluster.kubectl("delete", "prometheusrule", "demo", "-n", namespace)
    eventually(
        lambda: (
            get(cluster, namespace, "service", "demo")
            and get(cluster, namespace, "prometheusrule", "demo")
        ),
        what="the deleted Service and PrometheusRule to be recreated",
    )

    # A hand-added Service port belongs to another field manager; the operator replaces
    # the Service whole so that only its own port remains.
    ports = {"spec": {"ports": [{"name": "http", "port": 81, "targetPort": "http"}]}}
    cluster.kubectl(
        "patch", "service", "demo", "-n", namespace, "--type=merge", "-p", json.dumps(ports)
    )
    eventually(
        lambda: (
            (s := get(cluster, namespace, "service", "demo"))
            and [p["port"] for p in s["spec"]["ports"]] == [80]
        ),
        what="the Service to serve port 80 only again",
    )
    wait_ready(cluster, namespace, "demo")


def test_spec_update_rolls_only_the_changed_pool(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("gpu-cpu-autoscaling.yaml"))
    wait_ready(cluster, namespace, "fleet")
    gpu_before = _deployment(cluster, namespace, "fleet-gpu")
    cpu_before = _deployment(cluster, namespace, "fleet-cpu")
    assert gpu_before is not None
    assert cpu_before is not None

    updated = example("gpu-cpu-autoscaling.yaml")
    updated["spec"]["cpu"]["resources"]["limits"]["cpu"] = "3"
    kubectl_apply(cluster, namespace, updated)

    cpu_after = eventually(
        lambda: (
            (d := _deployment(cluster, namespace, "fleet-cpu"))
            and d["metadata"]["generation"] > cpu_before["metadata"]["generation"]
            and d
        ),
        what="the CPU Deployment to change",
    )
    container = cpu_after["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["cpu"] == "3"
    env = {e["name"]: e["value"] for e in container["env"]}
    # Threads and queue stay the server's to size, from the new limit (its cgroup quota).
    assert "REMBG_THREADS" not in env
    assert "REMBG_QUEUE_MAX_REQUESTS" not in env
    wait_ready(cluster, namespace, "fleet")
    service = get(cluster, namespace, "rembgservice", "fleet")
    assert service is not None
    assert service["status"]["observedGeneration"] == service["metadata"]["generation"] == 2
    gpu_after = _deployment(cluster, namespace, "fleet-gpu")
    assert gpu_after is not None
    assert gpu_after["metadata"]["generation"] == gpu_before["metadata"]["generation"]
    assert gpu_after["spec"]["template"] == gpu_before["spec"]["template"]
    # The rollout replaced the CPU pods with pods of the new template.
    new_hash = eventually(
        lambda: (
            (pods := _pods(cluster, namespace, "fleet", "cpu"))
            and all(
                p["spec"]["containers"][0]["resources"]["limits"]["cpu"] == "3"
                and not p["metadata"].get("deletionTimestamp")
                for p in pods
            )
            and pods
        ),
        what="every CPU pod to run the new template",
    )
    assert new_hash


def test_removing_a_pool_prunes_its_children(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("gpu-cpu-autoscaling.yaml"))
    wait_ready(cluster, namespace, "fleet")
    assert "fleet-gpu" in children(cluster, namespace, "fleet")["deployments.apps"]
    cluster.kubectl(
        "patch",
        "rembgservice",
        "fleet",
        "-n",
        namespace,
        "--type=json",
        "-p",
        json.dumps([{"op": "remove", "path": "/spec/gpu"}]),
    )

    def gpu_children_gone() -> bool:
        found = children(cluster, namespace, "fleet")
        return all(not {n for n in names if n.endswith("-gpu")} for names in found.values())

    eventually(gpu_children_gone, what="the GPU pool's Deployment, HPA and PDB to be deleted")
    wait_ready(cluster, namespace, "fleet")
    service = get(cluster, namespace, "rembgservice", "fleet")
    assert service is not None
    assert set(service["status"]["pools"]) == {"cpu"}
    assert service["status"]["gpuReplicas"] == "-"


def test_delete_garbage_collects_every_child(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("gpu-cpu-autoscaling.yaml"))
    wait_ready(cluster, namespace, "fleet")
    assert any(children(cluster, namespace, "fleet").values())
    cluster.kubectl("delete", "rembgservice", "fleet", "-n", namespace, "--wait=true")
    # The garbage collector notices a new CRD's type at its discovery resync (~10 s first).
    eventually(
        lambda: not any(children(cluster, namespace, "fleet").values()),
        what="the garbage collector to delete every child",
        timeout=180,
    )
    # Pods go through graceful termination (preStop drain): gone or on their way out.
    eventually(
        lambda: all(
            p["metadata"].get("deletionTimestamp")
            for p in _pods(cluster, namespace, "fleet", "cpu")
        ),
        what="the pods to be deleted with their ReplicaSets",
    )


def test_operator_restart_resumes_without_churn(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo")
    before = _deployment(cluster, namespace, "demo-cpu")
    assert before is not None
    operator.stop()
    operator.start()
    eventually(
        lambda: operator.metric("rembg_operator_reconciles_total", kind="full") >= 1,
        what="the restarted operator to resume the service",
    )
    after = _deployment(cluster, namespace, "demo-cpu")
    assert after is not None
    # Nothing changed, so nothing was written: the Deployment is the same object version.
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    wait_ready(cluster, namespace, "demo")


def test_operator_killed_mid_reconcile_converges(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    names = [f"svc-{i}" for i in range(12)]
    manifests = [rembg_service(n, {"cpu": {"minReplicas": 1}}) for n in names]
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input=json.dumps({"apiVersion": "v1", "kind": "List", "items": manifests}),
    )
    # SIGKILL as soon as the operator has started working on the batch.
    eventually(
        lambda: operator.metric("rembg_operator_api_requests_total", method="PATCH") >= 1,
        what="the operator to start applying children",
        every=0.05,
    )
    operator.kill()
    operator.start()
    for name in names:
        wait_ready(cluster, namespace, name)
        found = children(cluster, namespace, name)
        assert found["deployments.apps"] == {f"{name}-cpu"}
        assert found["services"] == {name}
        assert found["horizontalpodautoscalers.autoscaling"] == {f"{name}-cpu"}


def test_operator_liveness_and_metrics(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    assert operator.healthy()
    text = operator.metrics()
    for family in (
        "rembg_operator_reconciles_total",
        "rembg_operator_reconcile_errors_total",
        "rembg_operator_reconcile_duration_seconds",
        "rembg_operator_api_requests_total",
    ):
        assert f"# TYPE {family}" in text
    kubectl_apply(cluster, namespace, example("minimal.yaml"))
    wait_ready(cluster, namespace, "demo")
    assert operator.metric("rembg_operator_reconcile_duration_seconds_count") >= 1
    # Logs are JSON lines.
    lines = [line for line in operator.log(200).splitlines() if line.startswith("{")]
    assert lines
    assert all("message" in json.loads(line) for line in lines)


def test_pool_condition_reports_gpu_capacity(
    cluster: Any, namespace: str, operator: OperatorProcess
) -> None:
    kubectl_apply(cluster, namespace, example("gpu-only.yaml"))
    wait_ready(cluster, namespace, "gpu-only")
    found = wait_condition(cluster, namespace, "gpu-only", "GpuCapacityAvailable", "True")
    assert "nvidia.com/gpu" in found["message"]
    deployment = _deployment(cluster, namespace, "gpu-only-gpu")
    assert deployment is not None
    assert deployment["spec"]["replicas"] == 2  # autoscaling disabled: pinned
    assert not children(cluster, namespace, "gpu-only")["horizontalpodautoscalers.autoscaling"]
