"""The monitoring stack kube-prometheus-stack users run, on a cluster with a real node.

    stack = MonitoringStack.start(cluster, workdir, alertmanager_config)
    stack.prometheus.query('up{namespace="demo"}')
    stack.alertmanager.alerts()
    stack.stop()

What runs where:
- In pods on the real node, from images `make images` built FROM scratch around binaries
  built from their Go modules: the Prometheus Operator (its upstream RBAC and Deployment
  manifests, in namespace `monitoring`), the Prometheus it runs for a `Prometheus` resource
  (the operator's StatefulSet, with its config reloader), and kube-state-metrics (its
  upstream "standard" manifests). Prometheus selects ServiceMonitors and PrometheusRules in
  every namespace by `release: kube-prometheus-stack`, the label kube-prometheus-stack's own
  Prometheus selects by and the one our docs tell users to add; the RembgService's
  `spec.monitoring.labels` carries it, so the operator's ServiceMonitor is what makes
  Prometheus scrape the fleet.
- Beside the cluster, as a process: Alertmanager (Debian's `prometheus-alertmanager`, which
  has no container image here), listening on the node's bridge address so Prometheus' pod
  reaches it. A Service without selector and an EndpointSlice naming that address are how
  the `Prometheus` resource finds it, as it would find an in-cluster Alertmanager.

Nothing listens beyond loopback and the node's bridge.
"""

from __future__ import annotations

import contextlib
import copy
import json
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import yaml

from rembg_devcluster.binaries import VERSIONS_FILE, cache_dir, parse_versions_env
from rembg_devcluster.cluster import DevCluster
from rembg_devcluster.errors import BinaryMissingError, DevClusterError
from rembg_devcluster.images import MONITORING_IMAGES, load_image_index
from rembg_devcluster.kube import load_manifests
from rembg_devcluster.node_config import NodeNetwork
from rembg_devcluster.ports import free_port
from rembg_devcluster.waiting import wait_until

Manifest = dict[str, Any]

NAMESPACE = "monitoring"
# kube-prometheus-stack's Prometheus selects ServiceMonitors and rules by its release label.
SELECTOR_LABELS = {"release": "kube-prometheus-stack"}
PROMETHEUS_NAME = "rembg"
PROMETHEUS_PORT = 9090
ALERTMANAGER_SERVICE = "alertmanager"
ALERTMANAGER_PROCESS = "alertmanager"
RESTRICTED = "pod-security.kubernetes.io/enforce"
BUILD_HINT = "run `make binaries images` first"

_NAMESPACED_KINDS = {"Deployment", "Service", "ServiceAccount", "ServiceMonitor"}


# ---- what the build left ---------------------------------------------------------------------


@dataclass(frozen=True)
class MonitoringImages:
    operator: str
    prometheus: str
    reloader: str
    kube_state_metrics: str

    @property
    def prometheus_version(self) -> str:
        return self.prometheus.rpartition(":")[2]


def monitoring_images() -> MonitoringImages:
    index = load_image_index()
    if index is None or index.absent(MONITORING_IMAGES):
        raise BinaryMissingError(f"no monitoring images in build/images.json; {BUILD_HINT}")
    operator, prometheus, reloader, ksm = (index.ref(name) for name in MONITORING_IMAGES)
    return MonitoringImages(operator, prometheus, reloader, ksm)


def _bin_dir(component: str, pin: str) -> Path:
    version = parse_versions_env(VERSIONS_FILE.read_text())[pin]
    return cache_dir() / "bin" / f"{component}-{version}"


def operator_crds() -> list[Path]:
    """Every CRD the Prometheus Operator watches (the cluster installs only three)."""
    files = sorted(
        (_bin_dir("prometheus-operator", "PROMETHEUS_OPERATOR_VERSION") / "crds").glob("*.yaml")
    )
    if not files:
        raise BinaryMissingError(f"no Prometheus Operator CRDs; {BUILD_HINT}")
    return files


def upstream_manifests() -> tuple[list[Manifest], list[Manifest]]:
    """The Prometheus Operator's and kube-state-metrics' own manifests, as build-binaries.sh
    copied them from their Go modules."""
    found = []
    for component, pin in (
        ("prometheus-operator", "PROMETHEUS_OPERATOR_VERSION"),
        ("kube-state-metrics", "KUBE_STATE_METRICS_VERSION"),
    ):
        folder = _bin_dir(component, pin) / "manifests"
        files = sorted(folder.glob("*.yaml"))
        if not files:
            raise BinaryMissingError(f"no manifests in {folder}; {BUILD_HINT}")
        found.append([d for f in files for d in load_manifests(f.read_text())])
    return found[0], found[1]


def alertmanager_binary() -> Path:
    found = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if found is None:
        raise BinaryMissingError(
            "no prometheus-alertmanager binary; `make system-deps` installs Debian's"
        )
    return Path(found)


# ---- manifests (pure) --------------------------------------------------------------------------


def in_namespace(manifests: Sequence[Manifest], namespace: str) -> list[Manifest]:
    """Upstream manifests moved to namespace (their binding subjects too), copies."""
    moved = []
    for original in manifests:
        manifest = copy.deepcopy(original)
        if manifest["kind"] in _NAMESPACED_KINDS:
            manifest["metadata"]["namespace"] = namespace
        for subject in manifest.get("subjects") or []:
            subject["namespace"] = namespace
        moved.append(manifest)
    return moved


def _only(manifests: Sequence[Manifest], kind: str) -> Manifest:
    (found,) = (m for m in manifests if m["kind"] == kind)
    return found


def build_operator_manifests(
    upstream: Sequence[Manifest], images: MonitoringImages, namespace: str = NAMESPACE
) -> list[Manifest]:
    """The operator's upstream RBAC, Deployment, Service and ServiceMonitor, with our images.

    The kubelet Service it can maintain (for cAdvisor scraping) is left off: nothing here
    scrapes kubelets, and it would write into kube-system."""
    manifests = in_namespace(upstream, namespace)
    container = _only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["image"] = images.operator
    container["imagePullPolicy"] = "Never"
    # Every namespace (the default): the fleet's ServiceMonitors live in the users' ones.
    container["args"] = [f"--prometheus-config-reloader={images.reloader}", "--log-level=info"]
    _only(manifests, "ServiceMonitor")["metadata"]["labels"].update(SELECTOR_LABELS)
    return manifests


def build_kube_state_metrics_manifests(
    upstream: Sequence[Manifest],
    images: MonitoringImages,
    scrape_interval: str,
    namespace: str = NAMESPACE,
) -> list[Manifest]:
    """kube-state-metrics' upstream manifests with our image, and the ServiceMonitor
    kube-prometheus-stack gives it (honorLabels: its series name the objects' namespaces)."""
    manifests = in_namespace(upstream, namespace)
    container = _only(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    container["image"] = images.kube_state_metrics
    container["imagePullPolicy"] = "Never"
    labels = _only(manifests, "Service")["metadata"]["labels"]
    monitor = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": "kube-state-metrics",
            "namespace": namespace,
            "labels": {**labels, **SELECTOR_LABELS},
        },
        "spec": {
            "selector": {"matchLabels": {"app.kubernetes.io/name": "kube-state-metrics"}},
            "endpoints": [
                {"port": "http-metrics", "honorLabels": True, "interval": scrape_interval}
            ],
        },
    }
    return [*manifests, monitor]


def build_prometheus(
    images: MonitoringImages,
    scrape_interval: str,
    evaluation_interval: str,
    namespace: str = NAMESPACE,
) -> Manifest:
    """The Prometheus resource: every namespace's ServiceMonitors and PrometheusRules that carry
    SELECTOR_LABELS, alerts to the Alertmanager Service, restricted-compliant pods."""
    selector = {"matchLabels": dict(SELECTOR_LABELS)}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "Prometheus",
        "metadata": {"name": PROMETHEUS_NAME, "namespace": namespace},
        "spec": {
            "image": images.prometheus,
            "version": images.prometheus_version,
            "imagePullPolicy": "Never",
            "replicas": 1,
            "serviceAccountName": "prometheus",
            "serviceDiscoveryRole": "EndpointSlice",
            "serviceMonitorSelector": selector,
            "serviceMonitorNamespaceSelector": {},
            "ruleSelector": selector,
            "ruleNamespaceSelector": {},
            "scrapeInterval": scrape_interval,
            "evaluationInterval": evaluation_interval,
            "retention": "2h",
            "alerting": {
                "alertmanagers": [
                    {
                        "namespace": namespace,
                        "name": ALERTMANAGER_SERVICE,
                        "port": "web",
                        "apiVersion": "v2",
                    }
                ]
            },
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65534,
                "runAsGroup": 65534,
                "fsGroup": 65534,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "resources": {"requests": {"cpu": "50m", "memory": "128Mi"}},
        },
    }


def build_alertmanager_endpoint(
    address: str, port: int, namespace: str = NAMESPACE
) -> list[Manifest]:
    """A Service without selector and the EndpointSlice that points it at Alertmanager."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": ALERTMANAGER_SERVICE, "namespace": namespace},
            "spec": {"ports": [{"name": "web", "port": port, "targetPort": port}]},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{ALERTMANAGER_SERVICE}-host",
                "namespace": namespace,
                "labels": {
                    "kubernetes.io/service-name": ALERTMANAGER_SERVICE,
                    "endpointslice.kubernetes.io/managed-by": "rembg-devcluster",
                },
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}],
            "ports": [{"name": "web", "port": port, "protocol": "TCP"}],
        },
    ]


def build_namespace(namespace: str = NAMESPACE) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": namespace, "labels": {RESTRICTED: "restricted"}},
    }


def build_alertmanager_args(binary: Path, workdir: Path, listen: str) -> list[str]:
    return [
        str(binary),
        f"--config.file={workdir / 'alertmanager.yaml'}",
        f"--storage.path={workdir / 'alertmanager-data'}",
        f"--web.listen-address={listen}",
        # One instance: no gossip port.
        "--cluster.listen-address=",
        "--log.level=info",
    ]


# ---- clients -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrometheusAPI:
    url: str

    def _get(self, path: str, **params: str) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=15)
        response.raise_for_status()
        return response.json()["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        result: list[dict[str, Any]] = self._get("/api/v1/query", query=promql)["result"]
        return result

    def alerts(self) -> list[dict[str, Any]]:
        """Pending and firing alerts, with their labels and activeAt."""
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def rule_groups(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self._get("/api/v1/rules")["groups"]
        return groups

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self._get("/api/v1/targets", state="active")[
            "activeTargets"
        ]
        return targets

    def alertmanagers(self) -> list[str]:
        data = self._get("/api/v1/alertmanagers")
        return [a["url"] for a in data.get("activeAlertmanagers", [])]


@dataclass(frozen=True)
class AlertmanagerAPI:
    url: str

    def alerts(self, *, inhibited: bool = True) -> list[dict[str, Any]]:
        params = {"inhibited": str(inhibited).lower(), "silenced": "false"}
        response = httpx.get(f"{self.url}/api/v2/alerts", params=params, timeout=15)
        response.raise_for_status()
        alerts: list[dict[str, Any]] = response.json()
        return alerts

    def ready(self) -> bool:
        return httpx.get(f"{self.url}/-/ready", timeout=5).status_code == 200


@dataclass(frozen=True)
class Delivery:
    """One alert of one webhook notification, as Alertmanager delivered it."""

    at: float  # time.monotonic() on arrival
    receiver: str
    status: str  # firing | resolved
    labels: dict[str, str]


class WebhookSink:
    """An HTTP server on 127.0.0.1 recording every alert Alertmanager's webhooks deliver;
    point each receiver at f"{sink.url}/{receiver name}"."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deliveries: list[Delivery] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                now = time.monotonic()
                with sink._lock:
                    sink._deliveries += [
                        Delivery(now, body["receiver"], alert["status"], alert["labels"])
                        for alert in body["alerts"]
                    ]
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                """Quiet: the deliveries are the record."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def deliveries(self) -> list[Delivery]:
        with self._lock:
            return list(self._deliveries)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def route_to_sink(
    config: Mapping[str, Any], sink_url: str, group_wait: str = "1s", group_interval: str = "1s"
) -> dict[str, Any]:
    """An Alertmanager config whose webhook receivers all deliver to a WebhookSink, with short
    grouping timings; routes, receivers' names and inhibitions stay as they were."""
    routed: dict[str, Any] = copy.deepcopy(dict(config))
    for receiver in routed["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = f"{sink_url}/{receiver['name']}"
    routed["route"].update(group_wait=group_wait, group_interval=group_interval)
    return routed


# ---- the running stack ---------------------------------------------------------------------------


@dataclass
class MonitoringStack:
    cluster: DevCluster
    workdir: Path
    alertmanager: AlertmanagerAPI
    prometheus: PrometheusAPI

    @classmethod
    def start(
        cls,
        cluster: DevCluster,
        workdir: Path,
        alertmanager_config: Mapping[str, Any],
        *,
        scrape_interval: str = "5s",
        evaluation_interval: str = "5s",
        timeout: float = 240.0,
    ) -> MonitoringStack:
        """Alertmanager, then the operator, kube-state-metrics and Prometheus; returns once
        Prometheus answers and knows its Alertmanager."""
        node = cluster.state.node
        if node is None:
            raise DevClusterError("the monitoring stack runs its pods on a real node")
        images = monitoring_images()
        operator_upstream, ksm_upstream = upstream_manifests()
        gateway = NodeNetwork(node.bridge, node.pod_cidr).gateway
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "alertmanager.yaml").write_text(yaml.safe_dump(dict(alertmanager_config)))
        port = free_port(gateway)
        cluster.spawn(
            ALERTMANAGER_PROCESS,
            build_alertmanager_args(alertmanager_binary(), workdir, f"{gateway}:{port}"),
        )
        alertmanager = AlertmanagerAPI(f"http://{gateway}:{port}")
        stack = cls(cluster, workdir, alertmanager, PrometheusAPI(""))
        try:
            stack._wait("alertmanager", timeout, alertmanager.ready, ALERTMANAGER_PROCESS)
            cluster.install_crds(operator_crds())
            cluster.apply(build_namespace())
            cluster.wait_for_default_service_account(NAMESPACE)
            cluster.apply(
                [
                    *build_operator_manifests(operator_upstream, images),
                    *build_kube_state_metrics_manifests(ksm_upstream, images, scrape_interval),
                    *build_alertmanager_endpoint(gateway, port),
                ]
            )
            cluster.apply(build_prometheus(images, scrape_interval, evaluation_interval))
            stack._wait("the Prometheus pod", timeout, stack._prometheus_ready)
            stack._wait(
                "Prometheus' Alertmanager", timeout, lambda: bool(stack.prometheus.alertmanagers())
            )
        except BaseException:
            stack.stop()
            raise
        return stack

    def _wait(
        self, what: str, timeout: float, probe: Callable[[], bool], process: str | None = None
    ) -> None:
        wait_until(
            what,
            timeout,
            probe,
            lambda: self.cluster.log_tail(process) if process else self.describe(),
        )

    def _prometheus_ready(self) -> bool:
        pod = self.cluster.get_json("pod", f"prometheus-{PROMETHEUS_NAME}-0", "-n", NAMESPACE)
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in pod.get("status", {}).get("conditions", [])
        )
        if not ready:
            return False
        self.prometheus = PrometheusAPI(f"http://{pod['status']['podIP']}:{PROMETHEUS_PORT}")
        return httpx.get(f"{self.prometheus.url}/-/ready", timeout=5).status_code == 200

    def describe(self) -> str:
        """Pods, the Prometheus resource's conditions and the operator's log tail."""
        kubectl = self.cluster.kubectl
        pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        prometheus = kubectl(
            "get", "prometheus", PROMETHEUS_NAME, "-n", NAMESPACE, "-o", "yaml", check=False
        ).stdout
        events = kubectl(
            "get", "events", "-n", NAMESPACE, "--sort-by=.lastTimestamp", check=False
        ).stdout
        logs = kubectl(
            "logs", "-n", NAMESPACE, "deploy/prometheus-operator", "--tail=30", check=False
        ).stdout
        status = prometheus.partition("\nstatus:")[2]
        return f"{pods}\nPrometheus status:{status}\n{events[-2500:]}\noperator log:\n{logs}"

    def stop(self) -> None:
        """Stops Alertmanager; the pods go with the cluster's node."""
        with contextlib.suppress(Exception):
            self.cluster.stop_process(ALERTMANAGER_PROCESS, grace_seconds=5)
