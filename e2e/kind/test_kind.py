"""Our operator and fleet on a kind cluster (`make e2e-kind`; `-m kind_smoke` runs in `make test`).

The operator runs in the cluster, installed with our chart from our image; the fleet's pods
run on kind's nodes (containerd in a container, kubelet under its systemd), reached through
their Service from this host (kind.route_services). kind_smoke: cluster up (the fixture),
chart install, one RembgService Ready, one cutout, cluster down (the fixture's teardown).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from rembg_devcluster.images import load_image_index

from e2e.kind.conftest import Kind
from e2e.operator_support import (
    assert_deployment_drift_repaired,
    children,
    condition,
    eventually,
    example,
    get,
    kubectl_apply,
    wait_ready,
)
from e2e.real_node_support import (
    CHART,
    assert_cutout_matches_rembg,
    cluster_ip,
    create_restricted_namespace,
    describe_pods,
    helm,
    pods,
    ready_pods,
    roll_under_load,
    wait_for_endpoints,
)

# The first test carries the session's setup: a cold node-image build, the cluster, the chart.
pytestmark = pytest.mark.timeout(2400)
OPERATOR_NAMESPACE = "rembg-system"
FLEET = "fleet"
READY_TIMEOUT = 300.0
# Half a CPU each: a rolling update's surge pod fits beside the old one on the CPU worker.
RESOURCES = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "2Gi"}}


@dataclass
class Fleet:
    kind: Kind
    operator_image: str
    server_image: str

    @property
    def cluster(self) -> Any:
        return self.kind.cluster


@pytest.fixture(scope="module")
def fleet(kind: Kind) -> Iterator[Fleet]:
    """Our chart installed as users install it (its CRD included), watching a namespace where
    the restricted Pod Security Standard is enforced."""
    cluster = kind.cluster
    images = load_image_index()
    assert images is not None
    create_restricted_namespace(cluster, FLEET)
    cluster.kubectl("create", "namespace", OPERATOR_NAMESPACE)
    repository, _, tag = images.ref("operator").rpartition(":")
    helm(
        cluster,
        OPERATOR_NAMESPACE,
        "install",
        "rembg-operator",
        str(CHART),
        "--namespace",
        OPERATOR_NAMESPACE,
        "--set",
        f"watch.namespaces[0]={FLEET}",
        "--set",
        f"image.repository={repository}",
        "--set",
        f"image.tag={tag}",
        "--wait",
        "--timeout=240s",
    )
    yield Fleet(kind, images.ref("operator"), images.ref("server"))
    helm(
        cluster,
        OPERATOR_NAMESPACE,
        "uninstall",
        "rembg-operator",
        "--namespace",
        OPERATOR_NAMESPACE,
    )


def _minimal(name: str) -> dict[str, Any]:
    manifest = example(
        "minimal.yaml", cpu={"minReplicas": 1, "maxReplicas": 1, "resources": RESOURCES}
    )
    manifest["metadata"]["name"] = name
    return manifest


def _ready_fleet(fleet: Fleet, name: str) -> dict[str, Any]:
    """Applies a one-replica minimal RembgService; returns its Ready pod."""
    cluster = fleet.cluster
    kubectl_apply(cluster, FLEET, _minimal(name))
    try:
        wait_ready(cluster, FLEET, name, timeout=READY_TIMEOUT)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_pods(cluster, FLEET)}") from None
    wait_for_endpoints(cluster, FLEET, name)
    (pod,) = ready_pods(cluster, FLEET, f"rembg.io/service={name},rembg.io/pool=cpu")
    return pod


def _delete(fleet: Fleet, name: str) -> None:
    fleet.cluster.kubectl("delete", "rembgservice", name, "-n", FLEET, "--wait=true", timeout=180)


@pytest.mark.kind_smoke
def test_the_chart_installs_the_operator_from_our_image(fleet: Fleet) -> None:
    cluster = fleet.cluster
    (pod,) = ready_pods(cluster, OPERATOR_NAMESPACE, "app.kubernetes.io/name=rembg-operator")
    container = pod["spec"]["containers"][0]
    assert container["image"] == fleet.operator_image
    assert pod["spec"]["nodeName"] in fleet.kind.cpu_nodes
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    crd = get(cluster, "default", "crd", "rembgservices.rembg.io")
    assert crd is not None
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    nodes = cluster.get_json("nodes")["items"]
    runtime = {n["status"]["nodeInfo"]["containerRuntimeVersion"] for n in nodes}
    print(f"\noperator {pod['metadata']['name']} on {pod['spec']['nodeName']}; nodes run {runtime}")


@pytest.mark.kind_smoke
def test_minimal_example_is_ready_with_real_pods_and_cuts_out_through_the_service(
    fleet: Fleet,
) -> None:
    cluster = fleet.cluster
    pod = _ready_fleet(fleet, "demo")
    assert pod["spec"]["nodeName"] in fleet.kind.cpu_nodes
    assert pod["spec"]["containers"][0]["image"] == fleet.server_image
    name = pod["metadata"]["name"]
    uid = cluster.kubectl("exec", "-n", FLEET, name, "--", "id", "-u").stdout.strip()
    assert uid == "10001"
    service = get(cluster, FLEET, "rembgservice", "demo")
    assert condition(service, "Ready")["status"] == "True"
    address = cluster_ip(cluster, FLEET, "demo")
    # Cluster DNS (CoreDNS) answers for the Service's name from inside a pod.
    lookup = "import socket; print(socket.gethostbyname('demo.fleet.svc.cluster.local'))"
    resolved = cluster.kubectl("exec", "-n", FLEET, name, "--", "python", "-c", lookup)
    assert resolved.stdout.strip() == address
    assert_cutout_matches_rembg(f"http://{address}/v1/remove")
    _delete(fleet, "demo")


def test_drift_is_repaired(fleet: Fleet) -> None:
    cluster = fleet.cluster
    _ready_fleet(fleet, "drift")
    assert_deployment_drift_repaired(cluster, FLEET, "drift-cpu")
    deployment = get(cluster, FLEET, "deployment", "drift-cpu")
    assert deployment is not None
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == fleet.server_image
    wait_ready(cluster, FLEET, "drift", timeout=READY_TIMEOUT)
    _delete(fleet, "drift")


def test_a_rolling_update_fails_no_request(fleet: Fleet) -> None:
    cluster = fleet.cluster
    _ready_fleet(fleet, "rolling")
    before, after = roll_under_load(cluster, FLEET, _minimal("rolling"), timeout=READY_TIMEOUT)
    assert after["metadata"]["name"] != before["metadata"]["name"]
    assert after["spec"]["nodeName"] in fleet.kind.cpu_nodes
    _delete(fleet, "rolling")


def test_deleting_the_rembgservice_garbage_collects_its_children(fleet: Fleet) -> None:
    cluster = fleet.cluster
    _ready_fleet(fleet, "doomed")
    made = children(cluster, FLEET, "doomed")
    assert made["deployments.apps"] == {"doomed-cpu"}
    assert made["services"] == {"doomed"}
    cluster.kubectl("delete", "rembgservice", "doomed", "-n", FLEET, "--wait=false")
    eventually(
        lambda: (
            not any(children(cluster, FLEET, "doomed").values())
            and not pods(cluster, FLEET, "rembg.io/service=doomed")
        ),
        what="the garbage collector to remove every child and pod of the deleted RembgService",
        timeout=READY_TIMEOUT,
    )


def test_a_gpu_pool_is_scheduled_on_the_gpu_worker_only(fleet: Fleet) -> None:
    """The GPU worker advertises nvidia.com/gpu (patched capacity, no device): the GPU pool's
    pods land there and nowhere else. They never start (kind nodes have no GPU, and the CUDA
    image is not built here: imagePullPolicy Never, so nothing is pulled)."""
    cluster = fleet.cluster
    manifest = example("gpu-only.yaml", imagePullPolicy="Never")
    # The example's GPU pods ask for more CPU than a kind node on this 2-CPU host has.
    manifest["spec"]["gpu"]["resources"] = {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"cpu": "1", "memory": "2Gi"},
    }
    kubectl_apply(cluster, FLEET, manifest)
    found = eventually(
        lambda: (
            (
                c := condition(
                    get(cluster, FLEET, "rembgservice", "gpu-only"), "GpuCapacityAvailable"
                )
            )
            and c.get("status") == "True"
            and c
        ),
        what="GpuCapacityAvailable=True",
    )
    assert "nvidia.com/gpu" in found["message"]

    def scheduled() -> list[dict[str, Any]] | None:
        listed = pods(cluster, FLEET, "rembg.io/service=gpu-only,rembg.io/pool=gpu")
        return (
            listed if len(listed) == 2 and all(p["spec"].get("nodeName") for p in listed) else None
        )

    placed = eventually(scheduled, what="both GPU pods to be scheduled", timeout=120)
    assert {p["spec"]["nodeName"] for p in placed} <= set(fleet.kind.gpu_nodes)
    limits = placed[0]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1"
    _delete(fleet, "gpu-only")
