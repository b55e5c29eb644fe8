"""The local control plane behaves like a real cluster: scheduling onto KWOK nodes, GPU
placement, RBAC, garbage collection, HPA and the Prometheus Operator CRDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from rembg_devcluster import DevCluster, KubectlError

# KWOK never pulls images; kind nodes ship this one preloaded (it is their sandbox image).
IMAGE = "registry.k8s.io/pause:3.10"
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def deployment(name: str, replicas: int, gpus: int = 0, tolerate_gpu: bool = False) -> dict:
    resources: dict = {"requests": {"cpu": "100m", "memory": "64Mi"}}
    if gpus:
        resources["limits"] = {"nvidia.com/gpu": str(gpus)}
    pod_spec: dict = {"containers": [{"name": "app", "image": IMAGE, "resources": resources}]}
    if tolerate_gpu:
        pod_spec["tolerations"] = [GPU_TOLERATION]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def pods_of(cluster, namespace: str, app: str) -> list[dict]:
    return cluster.get_json("pods", "-n", namespace, "-l", f"app={app}")["items"]


def condition(obj: dict, kind: str) -> dict:
    return next(c for c in obj["status"].get("conditions", []) if c["type"] == kind)


def nodes_by_kind(cluster) -> tuple[set[str], set[str]]:
    """(cpu node names, gpu node names), told apart by the label GPU pools carry."""
    gpu = cluster.kubectl(
        "get", "nodes", "-l", "nvidia.com/gpu.present=true", "-o", "name"
    ).stdout.split()
    cpu = cluster.kubectl(
        "get", "nodes", "-l", "rembg.io/node-kind=cpu", "-o", "name"
    ).stdout.split()
    return {n.removeprefix("node/") for n in cpu}, {n.removeprefix("node/") for n in gpu}


def test_cpu_and_gpu_nodes_are_ready(cluster) -> None:
    cpu, gpu = nodes_by_kind(cluster)
    assert cpu
    assert gpu
    nodes = {n["metadata"]["name"]: n for n in cluster.get_json("nodes")["items"]}
    for name in cpu | gpu:
        assert condition(nodes[name], "Ready")["status"] == "True"
    for name in gpu:
        node = nodes[name]
        assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node[
            "spec"
        ]["taints"]
    for name in cpu:
        assert "nvidia.com/gpu" not in nodes[name]["status"]["capacity"]


def test_local_cluster_has_two_kwok_nodes_of_each_kind(cluster) -> None:
    if not isinstance(cluster, DevCluster):
        pytest.skip("KWOK nodes exist on the local control plane only")
    cpu, gpu = nodes_by_kind(cluster)
    assert sorted(cpu) == ["kwok-cpu-0", "kwok-cpu-1"]
    assert sorted(gpu) == ["kwok-gpu-0", "kwok-gpu-1"]


def test_deployment_pods_are_scheduled_run_and_become_available(cluster, namespace) -> None:
    cpu_nodes, _ = nodes_by_kind(cluster)
    cluster.apply(deployment("web", replicas=3), "-n", namespace)
    cluster.wait_for("deployment/web", "-n", namespace, "--for=condition=Available", timeout=120)
    pods = pods_of(cluster, namespace, "web")
    assert len(pods) == 3
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert condition(pod, "Ready")["status"] == "True"
        # The GPU taint keeps pods without the toleration off GPU nodes.
        assert pod["spec"]["nodeName"] in cpu_nodes
    status = cluster.get_json("deployment/web", "-n", namespace)["status"]
    assert status["availableReplicas"] == 3


def test_gpu_pods_land_only_on_gpu_nodes(cluster, namespace) -> None:
    cluster.apply(deployment("gpu", replicas=4, gpus=1, tolerate_gpu=True), "-n", namespace)
    cluster.wait_for("deployment/gpu", "-n", namespace, "--for=condition=Available", timeout=120)
    _, gpu_nodes = nodes_by_kind(cluster)
    used = {pod["spec"]["nodeName"] for pod in pods_of(cluster, namespace, "gpu")}
    assert used
    assert used <= gpu_nodes


def test_gpu_requests_beyond_capacity_stay_pending_with_the_schedulers_reason(
    cluster, namespace
) -> None:
    # Each GPU node has 4 GPUs: a pod asking for 5 fits nowhere.
    cluster.apply(deployment("greedy", replicas=1, gpus=5, tolerate_gpu=True), "-n", namespace)
    pod = wait_unschedulable(cluster, namespace, "greedy")
    assert "Insufficient nvidia.com/gpu" in condition(pod, "PodScheduled")["message"]


def wait_unschedulable(cluster, namespace: str, app: str) -> dict:
    cluster.wait_for("pod", "-l", f"app={app}", "-n", namespace, "--for=create", timeout=60)
    cluster.wait_for(
        "pod",
        "-l",
        f"app={app}",
        "-n",
        namespace,
        "--for=jsonpath={.status.conditions[?(@.type=='PodScheduled')].reason}=Unschedulable",
        timeout=60,
    )
    [pod] = pods_of(cluster, namespace, app)
    assert pod["status"]["phase"] == "Pending"
    return pod


def test_gpu_pod_without_gpu_nodes_stays_pending(cpu_only_cluster) -> None:
    ns = "no-gpu"
    cpu_only_cluster.create_namespace(ns)
    cpu_only_cluster.wait_for_default_service_account(ns)
    cpu_only_cluster.apply(deployment("gpu", replicas=1, gpus=1, tolerate_gpu=True), "-n", ns)
    pod = wait_unschedulable(cpu_only_cluster, ns, "gpu")
    message = condition(pod, "PodScheduled")["message"]
    assert "0/2 nodes are available" in message
    assert "Insufficient nvidia.com/gpu" in message


def test_rbac_is_enforced_for_service_account_tokens(cluster, namespace, tmp_path: Path) -> None:
    kubeconfig = cluster.service_account_kubeconfig(namespace, "nobody", tmp_path / "nobody.yaml")
    whoami = json.loads(
        cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig).stdout
    )
    assert whoami["status"]["userInfo"]["username"] == f"system:serviceaccount:{namespace}:nobody"

    denied = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False)
    assert denied.returncode != 0
    assert "forbidden" in denied.stderr.lower()
    assert f"system:serviceaccount:{namespace}:nobody" in denied.stderr

    cluster.kubectl(
        "create", "role", "pod-reader", "--verb=get,list", "--resource=pods", "-n", namespace
    )
    cluster.kubectl(
        "create", "rolebinding", "nobody-reads", "--role=pod-reader",
        f"--serviceaccount={namespace}:nobody", "-n", namespace,
    )  # fmt: skip
    allowed = cluster.kubectl("get", "pods", "-n", namespace, kubeconfig=kubeconfig)
    assert allowed.returncode == 0
    # The grant is exactly what was bound: other verbs and namespaces stay forbidden.
    delete = cluster.kubectl(
        "auth", "can-i", "delete", "pods", "-n", namespace, kubeconfig=kubeconfig, check=False
    )
    assert delete.stdout.strip() == "no"
    other = cluster.kubectl("get", "pods", "-n", "default", kubeconfig=kubeconfig, check=False)
    assert "forbidden" in other.stderr.lower()


def test_an_unknown_token_is_unauthorized(cluster, tmp_path: Path) -> None:
    text = cluster.kubeconfig.read_text()
    config = yaml.safe_load(text)
    config["users"][0]["user"] = {"token": "not-a-valid-token"}
    bogus = tmp_path / "bogus.yaml"
    bogus.write_text(yaml.safe_dump(config))
    result = cluster.kubectl("get", "namespaces", kubeconfig=bogus, check=False)
    assert result.returncode != 0
    assert "unauthorized" in result.stderr.lower() or "provide credentials" in result.stderr.lower()


def test_garbage_collector_removes_owned_children(cluster, namespace) -> None:
    cluster.kubectl("create", "configmap", "owner", "-n", namespace)
    uid = cluster.get_json("configmap/owner", "-n", namespace)["metadata"]["uid"]
    child = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "child",
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}
            ],
        },
    }
    cluster.apply(child, "-n", namespace)
    cluster.kubectl("delete", "configmap", "owner", "-n", namespace, "--wait=true")
    cluster.wait_for("configmap/child", "-n", namespace, "--for=delete", timeout=90)
    assert not cluster.exists("configmap", "child", "-n", namespace)


def test_deleting_a_deployment_removes_its_replicasets_and_pods(cluster, namespace) -> None:
    cluster.apply(deployment("short", replicas=2), "-n", namespace)
    cluster.wait_for("deployment/short", "-n", namespace, "--for=condition=Available", timeout=120)
    cluster.kubectl("delete", "deployment", "short", "-n", namespace, "--cascade=background")
    cluster.wait_for("replicaset", "-l", "app=short", "-n", namespace, "--for=delete", timeout=90)
    cluster.wait_for("pod", "-l", "app=short", "-n", namespace, "--for=delete", timeout=90)
    assert pods_of(cluster, namespace, "short") == []


def test_the_hpa_controller_acts_on_autoscalers(cluster, namespace) -> None:
    cluster.apply(deployment("scaled", replicas=1), "-n", namespace)
    cluster.apply(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "scaled"},
            "spec": {
                "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "scaled"},
                "minReplicas": 2,
                "maxReplicas": 4,
                "metrics": [
                    {
                        "type": "Resource",
                        "resource": {
                            "name": "cpu",
                            "target": {"type": "Utilization", "averageUtilization": 80},
                        },
                    }
                ],
            },
        },
        "-n",
        namespace,
    )
    # Below minReplicas the HPA controller scales up even without metrics.
    cluster.wait_for(
        "deployment/scaled", "-n", namespace, "--for=jsonpath={.spec.replicas}=2", timeout=120
    )
    able_to_scale = "{.status.conditions[?(@.type=='AbleToScale')].status}"
    cluster.wait_for(
        "hpa/scaled", "-n", namespace, f"--for=jsonpath={able_to_scale}=True", timeout=120
    )


def test_namespaces_get_the_root_ca_and_a_default_service_account(cluster, namespace) -> None:
    cluster.wait_for("configmap/kube-root-ca.crt", "-n", namespace, "--for=create", timeout=60)
    ca = cluster.get_json("configmap/kube-root-ca.crt", "-n", namespace)["data"]["ca.crt"]
    assert ca.encode() in cluster.ca_pem or cluster.ca_pem.decode().strip() == ca.strip()
    assert cluster.exists("serviceaccount", "default", "-n", namespace)


PROMETHEUS_RULE = {
    "apiVersion": "monitoring.coreos.com/v1",
    "kind": "PrometheusRule",
    "metadata": {"name": "rembg-test"},
    "spec": {
        "groups": [
            {
                "name": "rembg",
                "rules": [
                    {
                        "alert": "RembgDown",
                        "expr": "up == 0",
                        "for": "5m",
                        "labels": {"severity": "page"},
                    }
                ],
            }
        ]
    },
}


def test_monitoring_crds_accept_a_prometheus_rule_and_validate_it(cluster, namespace) -> None:
    cluster.apply(PROMETHEUS_RULE, "-n", namespace)
    stored = cluster.get_json("prometheusrule/rembg-test", "-n", namespace)
    assert stored["spec"]["groups"][0]["rules"][0]["alert"] == "RembgDown"
    invalid = json.loads(json.dumps(PROMETHEUS_RULE))
    invalid["metadata"]["name"] = "broken"
    invalid["spec"]["groups"][0]["rules"][0]["for"] = "five minutes"  # not a Prometheus duration
    with pytest.raises(KubectlError, match=r"(?i)invalid|should match"):
        cluster.apply(invalid, "-n", namespace)
    for kind in ("servicemonitors", "podmonitors"):
        assert cluster.exists("crd", f"{kind}.monitoring.coreos.com")


def test_bare_cluster_has_no_monitoring_crds(bare_cluster, bare_namespace) -> None:
    with pytest.raises(KubectlError, match=r"(?i)no matches for kind"):
        bare_cluster.apply(PROMETHEUS_RULE, "-n", bare_namespace)


def test_spawned_processes_see_the_cluster(cluster, tmp_path: Path) -> None:
    """What the operator tests rely on: a spawned process gets KUBECONFIG and kubectl on PATH."""
    script = "kubectl get nodes -o name > " + str(tmp_path / "out.txt")
    cluster.spawn("env-probe", ["bash", "-c", script])
    try:
        assert cluster.wait_process("env-probe", timeout=60) == 0
    finally:
        cluster.stop_process("env-probe")
    assert "node/" in (tmp_path / "out.txt").read_text()
