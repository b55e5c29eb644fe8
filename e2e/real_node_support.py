"""Helpers for tests on the real node: restricted namespaces, pod specs, HTTP through Services.

The real node is kubelet + containerd on this host (rembg_devcluster/real_node.py); its pods run
the images `make images` built. A host that cannot run one fails the test with one line
(RealNodeUnavailableError), it never skips.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rembg_devcluster import ClusterConfig, DevCluster
from rembg_devcluster.images import load_image_index
from rembg_devcluster.node_config import NODE_NAME

from e2e.operator_support import eventually, get

RESTRICTED = "pod-security.kubernetes.io/enforce"


def start_real_node_cluster(state_dir: Path, **options: Any) -> DevCluster:
    """A local cluster whose only CPU node is the real one (KWOK GPU nodes are tainted, so CPU
    pods can only land on the real node)."""
    settings: dict[str, Any] = {"cpu_nodes": 0, "gpu_nodes": 1, **options}
    return DevCluster.start(ClusterConfig(state_dir=state_dir, real_node=True, **settings))


def image_ref(name: str) -> str:
    index = load_image_index()
    assert index is not None, "no build/images.json: run `make images`"
    return index.ref(name)


def create_restricted_namespace(cluster: DevCluster, name: str) -> str:
    """A namespace where the API server's PodSecurity admission enforces `restricted`."""
    cluster.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {RESTRICTED: "restricted"}},
        }
    )
    cluster.wait_for_default_service_account(name)
    return name


def restricted_container_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pods(cluster: DevCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    listing = get(cluster, namespace, "pods", "-l", selector)
    return list((listing or {}).get("items", []))


def ready_pods(cluster: DevCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    return [p for p in pods(cluster, namespace, selector) if pod_condition(p, "Ready") == "True"]


def pod_condition(pod: dict[str, Any], kind: str) -> str | None:
    for entry in pod.get("status", {}).get("conditions", []):
        if entry.get("type") == kind:
            return str(entry.get("status"))
    return None


def on_real_node(pod: dict[str, Any]) -> bool:
    return bool(pod.get("spec", {}).get("nodeName") == NODE_NAME)


def cluster_ip(cluster: DevCluster, namespace: str, service: str) -> str:
    found = get(cluster, namespace, "service", service)
    assert found is not None, f"no Service {service} in {namespace}"
    return str(found["spec"]["clusterIP"])


def wait_for_endpoints(cluster: DevCluster, namespace: str, service: str, count: int = 1) -> None:
    def ready_addresses() -> int:
        listing = get(
            cluster, namespace, "endpointslices", "-l", f"kubernetes.io/service-name={service}"
        )
        return sum(
            1
            for item in (listing or {}).get("items", [])
            for endpoint in item.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
        )

    eventually(
        lambda: ready_addresses() >= count,
        what=f"{count} ready endpoint(s) of Service {service}",
        timeout=120,
    )


def describe_pods(cluster: DevCluster, namespace: str) -> str:
    """What a failure message needs: pods, their node and status, and recent events."""
    pods_text = cluster.kubectl("get", "pods", "-n", namespace, "-o", "wide", check=False).stdout
    events = cluster.kubectl(
        "get", "events", "-n", namespace, "--sort-by=.lastTimestamp", check=False
    ).stdout
    return f"{pods_text}\n{events[-3000:]}"
