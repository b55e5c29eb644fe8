"""Helpers for tests on the real node: restricted namespaces, pod specs, HTTP through Services.

The real node is kubelet + containerd on this host (rembg_devcluster/real_node.py); its pods run
the images `make images` built. A host that cannot run one fails the test with one line
(RealNodeUnavailableError), it never skips.
"""

from __future__ import annotations

import io
import json
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from rembg import new_session, remove
from rembg_devcluster import ClusterConfig, DevCluster, real_node
from rembg_devcluster.images import load_image_index
from rembg_devcluster.kube import KubeHandle
from rembg_devcluster.node_config import NODE_NAME, NodePaths
from skimage import data

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


def endpoints(cluster: DevCluster, namespace: str, service: str) -> list[dict[str, Any]]:
    """Every endpoint of the Service's EndpointSlices (ready or not)."""
    listing = get(
        cluster, namespace, "endpointslices", "-l", f"kubernetes.io/service-name={service}"
    )
    return [e for item in (listing or {}).get("items", []) for e in item.get("endpoints") or []]


def wait_for_endpoints(cluster: DevCluster, namespace: str, service: str, count: int = 1) -> None:
    def ready_addresses() -> int:
        return sum(
            1
            for endpoint in endpoints(cluster, namespace, service)
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


@dataclass
class LoadClient:
    """Closed-loop clients posting real images to a URL until stopped, one connection each time
    (a rollout must not depend on which pod a kept-alive connection is pinned to)."""

    url: str
    image: bytes
    clients: int = 2
    # Each client's pause between requests: 0 is as fast as the server answers.
    pause_seconds: float = 0.0
    content_type: str = "image/jpeg"
    # Polite clients wait out a 429/503's Retry-After, up to this many seconds (0: retry at once).
    max_retry_after_seconds: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    # time.monotonic() of the first answer of each outcome.
    first_seen: dict[str, float] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for _ in range(self.clients):
            thread = threading.Thread(target=self._run, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> Counter[str]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=180)
        return self.outcomes

    def _run(self) -> None:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=120, limits=limits) as client:
            while not self._stop.is_set():
                try:
                    response = client.post(
                        self.url, content=self.image, headers={"Content-Type": self.content_type}
                    )
                    outcome = str(response.status_code)
                    pause = self.pause_seconds
                    if response.status_code in (429, 503):
                        wanted = float(response.headers.get("Retry-After", "0") or 0)
                        pause = max(pause, min(wanted, self.max_retry_after_seconds))
                except httpx.HTTPError as error:
                    outcome, pause = type(error).__name__, self.pause_seconds
                now = time.monotonic()
                with self._lock:
                    self.outcomes[outcome] += 1
                    self.first_seen.setdefault(outcome, now)
                self._stop.wait(pause)


CHART = Path(__file__).resolve().parents[1] / "charts" / "rembg-operator"


def helm(cluster: DevCluster, namespace: str, *args: str) -> str:
    result = subprocess.run(
        ["helm", *args], capture_output=True, text=True, timeout=300, env=cluster.env, check=False
    )
    if result.returncode != 0:
        logs = cluster.kubectl(
            "logs",
            "-n",
            namespace,
            "-l",
            "app.kubernetes.io/name=rembg-operator",
            "--tail=30",
            check=False,
        )
        raise AssertionError(
            f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}\n"
            f"{describe_pods(cluster, namespace)}\n{logs.stdout}{logs.stderr}"
        )
    return result.stdout


def install_operator(cluster: DevCluster, namespace: str, watched: str, *values: str) -> str:
    """`helm install` of our chart into namespace, watching `watched`, with the CRD left to the
    caller (already installed); values are extra `--set` assignments. Waits for the pod."""
    sets = [arg for value in values for arg in ("--set", value)]
    return helm(
        cluster,
        namespace,
        "install",
        "rembg-operator",
        str(CHART),
        "--namespace",
        namespace,
        "--set",
        f"watch.namespaces[0]={watched}",
        "--set",
        "crds.enabled=false",
        *sets,
        "--wait",
        "--timeout=240s",
    )


def container_host_pid(cluster: DevCluster, container_id: str) -> int:
    """The host PID of a container's init process, from the node's containerd."""
    assert cluster.state.node is not None
    paths = NodePaths(cluster.state.node.root)
    for line in real_node.ctr(paths, "tasks", "ls").splitlines()[1:]:
        task, pid, *_ = line.split()
        if task == container_id:
            return int(pid)
    raise AssertionError(f"no containerd task {container_id}")


def photo(size: tuple[int, int] = (640, 480)) -> bytes:
    """A real photograph from scikit-image's wheel (no download), as JPEG bytes."""
    image = Image.fromarray(data.astronaut()).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


# ---- What the real-pod suites (the real node's, kind's) assert the same way ---------------------
CUTOUT_TOLERANCE = 1 / 255


def alpha_diff(a: Image.Image, b: Image.Image) -> float:
    ours = np.asarray(a, dtype=np.float64)
    theirs = np.asarray(b, dtype=np.float64)
    return float(np.mean(np.abs(ours - theirs)) / 255)


def assert_cutout_matches_rembg(url: str) -> None:
    """POSTs a real photo to url (a Service's /v1/remove); the cutout must match what the rembg
    library makes of it in this process, within one grey level on average."""
    image = photo()
    response = httpx.post(url, content=image, headers={"Content-Type": "image/jpeg"}, timeout=120)
    assert response.status_code == 200, response.text
    ours = Image.open(io.BytesIO(response.content))
    theirs = Image.open(io.BytesIO(remove(image, session=new_session("u2netp"))))
    assert ours.size == theirs.size
    assert alpha_diff(ours.getchannel("A"), theirs.getchannel("A")) <= CUTOUT_TOLERANCE
    assert alpha_diff(ours, theirs) <= CUTOUT_TOLERANCE


def rolled_out(cluster: KubeHandle, namespace: str, deployment: str, generation: int) -> bool:
    found = get(cluster, namespace, "deployment", deployment) or {}
    status = found.get("status", {})
    replicas = found.get("spec", {}).get("replicas", 0)
    return bool(
        status.get("observedGeneration", 0) >= generation
        and status.get("updatedReplicas") == replicas
        and status.get("replicas") == replicas
        and status.get("availableReplicas") == replicas
    )


def endpoint_conditions(
    cluster: KubeHandle, namespace: str, service: str, pod: dict[str, Any]
) -> list[dict[str, Any]]:
    """The conditions of the pod's endpoint in its Service's EndpointSlices, as now seen."""
    listing = get(
        cluster, namespace, "endpointslices", "-l", f"kubernetes.io/service-name={service}"
    )
    return [
        dict(endpoint.get("conditions") or {})
        for item in (listing or {}).get("items", [])
        for endpoint in item.get("endpoints") or []
        if (endpoint.get("targetRef") or {}).get("name") == pod["metadata"]["name"]
    ]


def roll_under_load(
    cluster: KubeHandle, namespace: str, manifest: dict[str, Any], timeout: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Rolls a Ready one-replica CPU pool (a pod annotation changed) while closed-loop clients
    post real images through its ClusterIP. Surge first, drain last: the old pod's endpoint is
    seen draining (not ready, still serving), and no request fails. Returns (old, new) pod."""
    name = manifest["metadata"]["name"]
    selector = f"rembg.io/service={name},rembg.io/pool=cpu"
    (before,) = ready_pods(cluster, namespace, selector)
    load = LoadClient(f"http://{cluster_ip(cluster, namespace, name)}/v1/remove", photo())
    load.start()
    try:
        time.sleep(5)
        deployment = f"{name}-cpu"
        generation = (get(cluster, namespace, "deployment", deployment) or {})["metadata"][
            "generation"
        ]
        manifest["spec"]["cpu"]["podAnnotations"] = {"rembg.io/rollout-test": str(generation)}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(manifest))
        eventually(
            lambda: rolled_out(cluster, namespace, deployment, generation + 1),
            what="the CPU pool to roll to its new template",
            timeout=timeout,
        )
        # The old pod drains (preStop, then in-flight requests) while the load goes on: its
        # endpoint is no longer ready (new connections go elsewhere) while it still serves.
        seen: list[dict[str, Any]] = []

        def old_pod_gone() -> bool:
            seen.extend(endpoint_conditions(cluster, namespace, name, before))
            return all(
                p["metadata"]["name"] != before["metadata"]["name"]
                for p in pods(cluster, namespace, selector)
            )

        eventually(old_pod_gone, what="the old pod to be gone", timeout=timeout)
        draining = {"ready": False, "serving": True, "terminating": True}
        assert draining in seen, seen
        time.sleep(3)
    finally:
        outcomes = load.stop()
    total = sum(outcomes.values())
    print(f"rolling update under load: {total} requests, outcomes {dict(outcomes)}")
    assert total >= 10
    assert outcomes == Counter({"200": total}), describe_pods(cluster, namespace)
    (after,) = ready_pods(cluster, namespace, selector)
    return before, after
