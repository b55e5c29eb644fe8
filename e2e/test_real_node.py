"""The real node itself: pods run on kubelet + containerd, Services route through kube-proxy,
`kubectl logs`/`exec` reach the kubelet, and stopping the node leaves the host as it was.

Its own cluster, started and stopped inside the test, so the host can be compared before and
after (one real node per host: this module runs alone, before test_real_pods.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import psutil
from rembg_devcluster import DevCluster, host_state
from rembg_devcluster.cluster import stop_from_state
from rembg_devcluster.node_config import NODE_TYPE_LABEL, NodePaths

from e2e.operator_support import eventually
from e2e.real_node_support import (
    create_restricted_namespace,
    describe_pods,
    image_ref,
    on_real_node,
    pod_condition,
    restricted_container_security,
    start_real_node_cluster,
    wait_for_endpoints,
)

PORT = 8000


def _web_deployment(image: str, replicas: int = 1) -> dict[str, Any]:
    """Python's http.server from the operator image: a small real workload, no model needed."""
    labels = {"app": "web"}
    container = {
        "name": "web",
        "image": image,
        "imagePullPolicy": "Never",
        "command": ["python", "-m", "http.server", str(PORT), "--directory", "/etc"],
        "ports": [{"containerPort": PORT}],
        "readinessProbe": {"tcpSocket": {"port": PORT}, "periodSeconds": 1},
        "resources": {"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "96Mi"}},
        "securityContext": restricted_container_security(),
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "nodeSelector": {NODE_TYPE_LABEL: "real"},
                    "terminationGracePeriodSeconds": 1,
                    "securityContext": {"runAsUser": 10001, "runAsGroup": 10001},
                    "containers": [container],
                },
            },
        },
    }


def _service() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": PORT}]},
    }


def _processes_under(root: Path) -> list[str]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or ())
        if str(root) in cmdline:
            found.append(f"{proc.info['pid']}: {cmdline[:120]}")
    return found


def test_real_pods_run_route_and_leave_the_host_as_it_was(tmp_path: Path) -> None:
    before = host_state.take_snapshot()
    state_dir = tmp_path / "cluster"
    cluster = start_real_node_cluster(state_dir, gpu_nodes=0, monitoring_crds=False)
    try:
        timings = cluster.state.timings_seconds
        print(f"real node: cluster ready in {timings['ready']}s ({json.dumps(timings)})")
        _exercise_node(cluster)
        during = host_state.take_snapshot()
        changed = host_state.differences(before, during)
        assert any("iptables rule added" in line for line in changed), changed
        assert any("link added: rembg0" in line for line in changed), changed
    finally:
        cluster.stop()
    after = host_state.take_snapshot()
    assert cluster.state.teardown_problems == []
    assert host_state.differences(before, after) == []
    assert _processes_under(state_dir) == []
    assert cluster.state.node is not None
    assert _processes_under(NodePaths(cluster.state.node.root).socket_dir) == []


def _exercise_node(cluster: Any) -> None:
    namespace = create_restricted_namespace(cluster, "real-node-web")
    cluster.apply([_web_deployment(image_ref("operator")), _service()], "-n", namespace)
    _wait_for_ready_pod(cluster, namespace)
    listing = cluster.get_json("pods", "-n", namespace, "-l", "app=web")
    (pod,) = listing["items"]
    assert on_real_node(pod), describe_pods(cluster, namespace)
    assert pod_condition(pod, "Ready") == "True"
    name = pod["metadata"]["name"]
    pod_ip = pod["status"]["podIP"]
    assert pod_ip.startswith("10.213.0."), pod_ip

    # kubelet enforced the restricted securityContext: uid 10001, read-only root.
    uid = cluster.kubectl("exec", "-n", namespace, name, "--", "id", "-u").stdout.strip()
    assert uid == "10001"
    touch = cluster.kubectl("exec", "-n", namespace, name, "--", "touch", "/x", check=False)
    assert touch.returncode != 0
    assert "Read-only file system" in touch.stderr
    assert "Serving HTTP" in cluster.kubectl("logs", "-n", namespace, name).stdout

    # host -> pod IP, host -> ClusterIP (kube-proxy's OUTPUT rules), pod -> ClusterIP (forwarding).
    wait_for_endpoints(cluster, namespace, "web")
    service_ip = cluster.get_json("service", "web", "-n", namespace)["spec"]["clusterIP"]
    for url in (f"http://{pod_ip}:{PORT}/hostname", f"http://{service_ip}/hostname"):
        # kube-proxy rejects a Service it has not yet seen an endpoint for: give it its sync.
        eventually(lambda url=url: _status(url) == 200, what=f"GET {url}", timeout=30)
    url = f"http://{service_ip}/hostname"
    fetch = f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).status)"
    from_pod = cluster.kubectl("exec", "-n", namespace, name, "--", "python", "-c", fetch)
    assert from_pod.stdout.strip() == "200"


def _status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except OSError:
        return None


def _wait_for_ready_pod(cluster: Any, namespace: str) -> None:
    def probe() -> bool:
        listing = cluster.get_json("pods", "-n", namespace, "-l", "app=web")
        return any(pod_condition(p, "Ready") == "True" for p in listing["items"])

    try:
        eventually(probe, what="the web pod to be Ready", timeout=120)
    except AssertionError as error:
        raise AssertionError(f"{error}\n{describe_pods(cluster, namespace)}") from None


def test_a_node_left_by_a_killed_run_is_torn_down_by_the_next_start(tmp_path: Path) -> None:
    """A run killed before its teardown (SIGKILL to every process, the way a session or CI job
    ends) leaves the bridge, rules and mounts; the next real-node start puts the host back from
    the state the dead run recorded, then starts its own node."""
    before = host_state.take_snapshot()
    # Started by another process that exits, like `up` from a shell or a CI job.
    cli = [sys.executable, "-m", "rembg_devcluster", "--dir", str(tmp_path / "killed")]
    subprocess.run([*cli, "up", "--real-node"], check=True, capture_output=True, timeout=300)
    killed = DevCluster.attach(tmp_path / "killed")
    try:
        # A running pod: its shim, container processes, mounts and veth are left behind too.
        namespace = create_restricted_namespace(killed, "killed-run")
        killed.apply([_web_deployment(image_ref("operator")), _service()], "-n", namespace)
        _wait_for_ready_pod(killed, namespace)
        for record in killed.state.processes:
            os.killpg(record.pid, signal.SIGKILL)
        eventually(
            lambda: not any(r.alive() for r in killed.state.processes),
            what="the killed run's processes to be gone",
            timeout=30,
        )
        assert host_state.differences(before, host_state.take_snapshot()) != []
        second = start_real_node_cluster(tmp_path / "second", gpu_nodes=0, monitoring_crds=False)
        try:
            assert cluster_ready(second)
            assert killed.state.node is not None
            assert _processes_under(NodePaths(killed.state.node.root).socket_dir) == []
        finally:
            second.stop()
    finally:
        stop_from_state(tmp_path / "killed")  # a no-op once the second start tore it down
    assert second.state.teardown_problems == []
    assert host_state.differences(before, host_state.take_snapshot()) == []


def cluster_ready(cluster: Any) -> bool:
    nodes = cluster.get_json("nodes")["items"]
    return any(
        n["metadata"]["name"] == "real-node-0"
        and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
        for n in nodes
    )
