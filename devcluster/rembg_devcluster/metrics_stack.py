"""Prometheus and prometheus-adapter beside the local control plane: the custom and external
metrics APIs.

    stack = MetricsStack.start(cluster, workdir, adapter_config, servers=["127.0.0.1:8081"])
    stack.sync()            # pods -> scrape targets, PrometheusRules -> rule files
    cluster.kubectl("get", "--raw", "/apis/custom.metrics.k8s.io/v1beta1/...")
    stack.stop()

What is real: Prometheus (Debian's `prometheus`, /usr/bin/prometheus) scraping real
`rembg_server` processes and evaluating the recording rules of the PrometheusRule objects the
operator wrote (read from the API server, as the Prometheus Operator would); prometheus-adapter
(built from sigs.k8s.io/prometheus-adapter, cached like the control plane) registered through
the aggregation layer as `custom.metrics.k8s.io` v1beta1 and v1beta2 and as
`external.metrics.k8s.io` v1beta1 (its `externalRules`); kube-controller-manager's HPA
controller reading them.

What is scaffolding (the KWOK mapping): pods on this control plane are simulated by KWOK and
run nothing, so there is no pod IP to scrape. Each Running pod that carries the operator's
`rembg.io/service` label is mapped onto one real server process, and the server's address
becomes a Prometheus file_sd target labelled with the pod's `namespace` and `pod` (plus
`rembg_service` and `pool`, the labels the operator's ServiceMonitor adds). Prometheus then
stores the server's series exactly as Kubernetes discovery would have labelled the pod's own.
A pod keeps its server for its whole life; a new pod gets the server of its pool that the
fewest pods use (the lowest index on ties), so with more pods than servers, pods share servers
round-robin and each shared server is scraped once per pod (its series appear under every pod
it backs). Pods of different pools never share a server (each pool gets its own list).

Ports are free loopback ports; every file lives under the given work dir; the processes are
spawned through the cluster's process host, so `cluster.stop()` stops them too. No systemd
unit is involved (the Debian package's service is not started here; the binary runs as a
plain child process).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import yaml

from rembg_devcluster import pki
from rembg_devcluster.binaries import VERSIONS_FILE, cache_dir, parse_versions_env
from rembg_devcluster.cluster import DevCluster
from rembg_devcluster.errors import BinaryMissingError
from rembg_devcluster.monitoring import PrometheusAPI
from rembg_devcluster.ports import free_port
from rembg_devcluster.waiting import wait_until

LOOPBACK = "127.0.0.1"
PROMETHEUS_NAME = "prometheus"
ADAPTER_NAME = "prometheus-adapter"
ADAPTER_NAMESPACE = "rembg-monitoring"
ADAPTER_SERVICE = "prometheus-adapter"
CUSTOM_METRICS_GROUP = "custom.metrics.k8s.io"
CUSTOM_METRICS_VERSIONS = ("v1beta1", "v1beta2")
EXTERNAL_METRICS_GROUP = "external.metrics.k8s.io"
EXTERNAL_METRICS_VERSIONS = ("v1beta1",)
# Every (group, version) the adapter serves, each registered as one APIService.
ADAPTER_API_VERSIONS = (
    *((CUSTOM_METRICS_GROUP, v) for v in CUSTOM_METRICS_VERSIONS),
    *((EXTERNAL_METRICS_GROUP, v) for v in EXTERNAL_METRICS_VERSIONS),
)
SERVICE_LABEL = "rembg.io/service"
POOL_LABEL = "rembg.io/pool"
JOB_NAME = "rembg-kwok-pods"
REAL_PODS_JOB_NAME = "rembg-pods"
BUILD_HINT = "run `make binaries` (devcluster/build-binaries.sh) first"


# ---- binaries ------------------------------------------------------------------------------


def _pins() -> dict[str, str]:
    return parse_versions_env(VERSIONS_FILE.read_text())


def prometheus_binary(kubernetes_sd: bool = False) -> Path:
    """Debian's Prometheus, or with kubernetes_sd ours from the Go module (Debian builds theirs
    without Kubernetes service discovery)."""
    if kubernetes_sd:
        path = cache_dir() / "bin" / f"prometheus-{_pins()['PROMETHEUS_VERSION']}" / "prometheus"
        if not os.access(path, os.X_OK):
            raise BinaryMissingError(f"missing {path}; {BUILD_HINT}")
        return path
    found = shutil.which("prometheus") or "/usr/bin/prometheus"
    if not os.access(found, os.X_OK):
        raise BinaryMissingError("no prometheus binary; `make system-deps` installs Debian's")
    return Path(found)


def adapter_binary() -> Path:
    path = cache_dir() / "bin" / f"prometheus-adapter-{_pins()['PROMETHEUS_ADAPTER_VERSION']}"
    binary = path / "prometheus-adapter"
    if not os.access(binary, os.X_OK):
        raise BinaryMissingError(f"missing {binary}; {BUILD_HINT}")
    return binary


def keda_crds_dir() -> Path:
    path = cache_dir() / "bin" / f"keda-crds-{_pins()['KEDA_VERSION']}"
    if not any(path.glob("*.yaml")):
        raise BinaryMissingError(f"missing KEDA CRDs in {path}; {BUILD_HINT}")
    return path


# ---- the KWOK mapping (pure) ---------------------------------------------------------------


@dataclass(frozen=True)
class PodRef:
    """A simulated pod of one pool, as the mapping sees it."""

    namespace: str
    name: str
    service: str
    pool: str

    @property
    def pool_key(self) -> tuple[str, str, str]:
        return (self.namespace, self.service, self.pool)


def pods_from_listing(listing: Mapping[str, Any]) -> list[PodRef]:
    """Running, not terminating pods with the operator's labels, oldest first."""
    items = sorted(
        listing.get("items", []),
        key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]),
    )
    pods = []
    for item in items:
        meta, labels = item["metadata"], item["metadata"].get("labels") or {}
        running = (item.get("status") or {}).get("phase") == "Running"
        if not running or meta.get("deletionTimestamp") or SERVICE_LABEL not in labels:
            continue
        pods.append(
            PodRef(
                meta["namespace"], meta["name"], labels[SERVICE_LABEL], labels.get(POOL_LABEL, "")
            )
        )
    return pods


@dataclass
class PodServerMap:
    """Sticky assignment of simulated pods to real server addresses (host:port), per pool."""

    servers_by_pool: Mapping[tuple[str, str, str], Sequence[str]]
    assigned: dict[PodRef, str] = field(default_factory=dict)

    def update(self, pods: Iterable[PodRef]) -> dict[PodRef, str]:
        """Forgets pods that are gone, gives new pods the least used server of their pool."""
        current = [p for p in pods if p.pool_key in self.servers_by_pool]
        # Built aside and swapped in whole: load generators read it from other threads.
        assigned = {p: s for p, s in self.assigned.items() if p in current}
        for pod in current:
            if pod not in assigned:
                assigned[pod] = self._least_used(pod.pool_key, assigned)
        self.assigned = assigned
        return dict(assigned)

    def _least_used(self, key: tuple[str, str, str], assigned: Mapping[PodRef, str]) -> str:
        servers = list(self.servers_by_pool[key])
        load = dict.fromkeys(servers, 0)
        for pod, server in assigned.items():
            if pod.pool_key == key:
                load[server] += 1
        return min(servers, key=lambda s: (load[s], servers.index(s)))

    def servers_of(self, namespace: str, service: str, pool: str) -> list[str]:
        """Distinct servers behind the pool's current pods (what its Service would balance)."""
        key = (namespace, service, pool)
        return sorted({s for p, s in self.assigned.items() if p.pool_key == key})


def build_file_sd(assignments: Mapping[PodRef, str]) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups: one per pod, labelled as Kubernetes discovery would."""
    groups = [
        {
            "targets": [server],
            "labels": {
                "namespace": pod.namespace,
                "pod": pod.name,
                "rembg_service": pod.service,
                "pool": pod.pool,
            },
        }
        for pod, server in assignments.items()
    ]
    return sorted(groups, key=lambda g: (g["labels"]["namespace"], g["labels"]["pod"]))


def build_prometheus_config(
    targets_file: Path,
    rules_glob: str,
    scrape_interval: str = "1s",
    pod_discovery_kubeconfig: Path | None = None,
) -> dict[str, Any]:
    """Prometheus scraping the KWOK mapping's file_sd targets, or, with a kubeconfig, real pods
    found through Kubernetes service discovery (what a ServiceMonitor makes it do)."""
    scrape = (
        build_pod_discovery_scrape_config(pod_discovery_kubeconfig)
        if pod_discovery_kubeconfig
        else {
            "job_name": JOB_NAME,
            "metrics_path": "/metrics",
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": "1s"}],
        }
    )
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "rule_files": [rules_glob],
        "scrape_configs": [scrape],
    }


def _meta_label(label: str) -> str:
    """Prometheus' name for a pod label: rembg.io/service -> ..._label_rembg_io_service."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


def build_pod_discovery_scrape_config(kubeconfig: Path) -> dict[str, Any]:
    """Every running pod of a pool, on its container port named `http`, labelled like the
    operator's ServiceMonitor labels it (namespace, pod, rembg_service, pool)."""
    service, pool = _meta_label(SERVICE_LABEL), _meta_label(POOL_LABEL)
    return {
        "job_name": REAL_PODS_JOB_NAME,
        "metrics_path": "/metrics",
        "kubernetes_sd_configs": [{"role": "pod", "kubeconfig_file": str(kubeconfig)}],
        "relabel_configs": [
            {"source_labels": [service], "regex": ".+", "action": "keep"},
            {
                "source_labels": ["__meta_kubernetes_pod_container_port_name"],
                "regex": "http",
                "action": "keep",
            },
            {
                "source_labels": ["__meta_kubernetes_pod_phase"],
                "regex": "Running",
                "action": "keep",
            },
            {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
            {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
            {"source_labels": [service], "target_label": "rembg_service"},
            {"source_labels": [pool], "target_label": "pool"},
        ],
    }


def rule_groups_from_listing(listing: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every group of every PrometheusRule object, as Prometheus' rule file wants them."""
    groups: list[dict[str, Any]] = []
    for item in sorted(listing.get("items", []), key=lambda i: i["metadata"]["name"]):
        groups.extend((item.get("spec") or {}).get("groups") or [])
    return groups


def _version_priority(group: str, version: str) -> int:
    """Later versions of a group rank higher (v1beta2 over v1beta1 for custom metrics)."""
    versions = [v for g, v in ADAPTER_API_VERSIONS if g == group]
    return 100 + 100 * versions.index(version)


def build_apiservice_manifests(port: int, ca_pem: bytes) -> list[dict[str, Any]]:
    """Namespace, ExternalName Service (-> localhost:port) and one APIService per group version
    the adapter serves (custom metrics v1beta1/v1beta2, external metrics v1beta1).

    An ExternalName Service: the aggregator resolves it to https://localhost:port directly,
    with no kube-proxy or cluster IP route (neither exists here). TLS is verified against
    ca_pem for the name <service>.<namespace>.svc, as for any in-cluster extension server.
    """
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ADAPTER_NAMESPACE}}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": ADAPTER_SERVICE, "namespace": ADAPTER_NAMESPACE},
        "spec": {
            "type": "ExternalName",
            "externalName": "localhost",
            "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
        },
    }
    apiservices = [
        {
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": f"{version}.{group}"},
            "spec": {
                "group": group,
                "version": version,
                "service": {"name": ADAPTER_SERVICE, "namespace": ADAPTER_NAMESPACE, "port": port},
                "caBundle": base64.b64encode(ca_pem).decode(),
                "groupPriorityMinimum": 100,
                "versionPriority": _version_priority(group, version),
            },
        }
        for group, version in ADAPTER_API_VERSIONS
    ]
    return [namespace, service, *apiservices]


def build_adapter_args(
    binary: Path, workdir: Path, port: int, prometheus_url: str, kubeconfig: Path
) -> list[str]:
    return [
        str(binary),
        f"--secure-port={port}",
        f"--bind-address={LOOPBACK}",
        f"--tls-cert-file={workdir / 'adapter.crt'}",
        f"--tls-private-key-file={workdir / 'adapter.key'}",
        f"--cert-dir={workdir / 'adapter-certs'}",
        f"--lister-kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        f"--prometheus-url={prometheus_url}",
        f"--config={workdir / 'adapter-rules.yaml'}",
        # New pods' series are found at the next relist; short, so tests see them quickly.
        "--metrics-relist-interval=2s",
        "--v=1",
    ]


def build_prometheus_args(binary: Path, workdir: Path, port: int) -> list[str]:
    return [
        str(binary),
        f"--config.file={workdir / 'prometheus.yaml'}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        "--storage.tsdb.retention.time=2h",
        f"--web.listen-address={LOOPBACK}:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]


# ---- the running stack ---------------------------------------------------------------------


def _write_atomically(path: Path, text: str) -> bool:
    """Writes text unless the file already holds it; True when it changed. Atomic for
    readers (Prometheus watches these files)."""
    with contextlib.suppress(FileNotFoundError):
        if path.read_text() == text:
            return False
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return True


@dataclass
class MetricsStack:
    cluster: DevCluster
    workdir: Path
    prometheus_port: int
    adapter_port: int
    mapping: PodServerMap
    discover_pods: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _sync_error: str = ""

    @property
    def prometheus_url(self) -> str:
        return f"http://{LOOPBACK}:{self.prometheus_port}"

    @classmethod
    def start(
        cls,
        cluster: DevCluster,
        workdir: Path,
        adapter_config: Mapping[str, Any],
        servers_by_pool: Mapping[tuple[str, str, str], Sequence[str]],
        timeout: float = 120.0,
        *,
        discover_pods: bool = False,
    ) -> MetricsStack:
        """Starts Prometheus and the adapter, registers the APIService, waits until served.

        servers_by_pool maps KWOK pods onto real server processes; with discover_pods (pods on
        a real node) Prometheus finds the pods itself and servers_by_pool is left empty.
        """
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rules").mkdir(exist_ok=True)
        stack = cls(
            cluster,
            workdir,
            free_port(),
            free_port(),
            PodServerMap(servers_by_pool),
            discover_pods=discover_pods,
        )
        stack._write_configs(adapter_config)
        try:
            stack._start_prometheus(timeout)
            stack._start_adapter(timeout)
        except BaseException:
            stack.stop()
            raise
        return stack

    def _write_configs(self, adapter_config: Mapping[str, Any]) -> None:
        targets = self.workdir / "targets.json"
        _write_atomically(targets, "[]")
        config = build_prometheus_config(
            targets,
            str(self.workdir / "rules" / "*.yaml"),
            pod_discovery_kubeconfig=self.cluster.kubeconfig if self.discover_pods else None,
        )
        (self.workdir / "prometheus.yaml").write_text(yaml.safe_dump(config))
        (self.workdir / "adapter-rules.yaml").write_text(yaml.safe_dump(dict(adapter_config)))
        ca = pki.build_ca("rembg-devcluster-adapter-ca")
        serving = pki.build_serving_cert(
            ca,
            common_name=ADAPTER_SERVICE,
            dns_names=(f"{ADAPTER_SERVICE}.{ADAPTER_NAMESPACE}.svc", "localhost"),
            ips=(LOOPBACK,),
        )
        pki.write_private(self.workdir / "adapter-ca.crt", ca.cert_pem)
        pki.write_private(self.workdir / "adapter.crt", serving.cert_pem)
        pki.write_private(self.workdir / "adapter.key", serving.key_pem)

    def _start_prometheus(self, timeout: float) -> None:
        binary = prometheus_binary(kubernetes_sd=self.discover_pods)
        argv = build_prometheus_args(binary, self.workdir, self.prometheus_port)
        self.cluster.spawn(PROMETHEUS_NAME, argv)
        wait_until(
            "prometheus",
            timeout,
            lambda: httpx.get(f"{self.prometheus_url}/-/ready", timeout=2).status_code == 200,
            lambda: self.cluster.log_tail(PROMETHEUS_NAME),
        )

    def _start_adapter(self, timeout: float) -> None:
        argv = build_adapter_args(
            adapter_binary(),
            self.workdir,
            self.adapter_port,
            self.prometheus_url,
            self.cluster.kubeconfig,
        )
        self.cluster.spawn(ADAPTER_NAME, argv)
        ca_pem = (self.workdir / "adapter-ca.crt").read_bytes()
        self.cluster.apply(build_apiservice_manifests(self.adapter_port, ca_pem))
        wait_until(
            "custom.metrics.k8s.io and external.metrics.k8s.io APIServices",
            timeout,
            self._api_served,
            lambda: self.cluster.log_tail(ADAPTER_NAME),
        )

    def _api_served(self) -> bool:
        for group, version in ADAPTER_API_VERSIONS:
            result = self.cluster.kubectl("get", "--raw", f"/apis/{group}/{version}", check=False)
            if result.returncode != 0:
                return False
        return True

    # ---- keeping Prometheus in step with the cluster --------------------------------------

    def sync(self) -> None:
        """Pods -> scrape targets and PrometheusRules -> rule files (reloads on change)."""
        listing = self.cluster.get_json(
            "pods,prometheusrules.monitoring.coreos.com", "-A", "-l", SERVICE_LABEL
        )
        items = listing.get("items", [])
        pods = {"items": [i for i in items if i.get("kind") == "Pod"]}
        rules = {"items": [i for i in items if i.get("kind") == "PrometheusRule"]}
        assignments = self.mapping.update(pods_from_listing(pods))
        _write_atomically(self.workdir / "targets.json", json.dumps(build_file_sd(assignments)))
        rule_file = self.workdir / "rules" / "operator.yaml"
        if _write_atomically(
            rule_file, yaml.safe_dump({"groups": rule_groups_from_listing(rules)})
        ):
            self.reload_prometheus()

    def reload_prometheus(self) -> None:
        response = httpx.post(f"{self.prometheus_url}/-/reload", timeout=10)
        response.raise_for_status()

    def start_sync_loop(self, every_seconds: float = 1.0) -> None:
        """Runs sync() in a background thread until stop(); the last error is kept."""

        def loop() -> None:
            while not self._stop.wait(every_seconds):
                try:
                    self.sync()
                    self._sync_error = ""
                except Exception as error:  # keep syncing; the test reports it on demand
                    self._sync_error = repr(error)

        self._thread = threading.Thread(target=loop, name="metrics-stack-sync", daemon=True)
        self._thread.start()

    @property
    def last_sync_error(self) -> str:
        return self._sync_error

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        return PrometheusAPI(self.prometheus_url).query(promql)

    def custom_metric(self, namespace: str, metric: str) -> dict[str, float]:
        """Pods metric values as the HPA controller reads them: {pod: value}."""
        path = f"/apis/{CUSTOM_METRICS_GROUP}/v1beta1/namespaces/{namespace}/pods/*/{metric}"
        result = self.cluster.kubectl("get", "--raw", path, check=False)
        if result.returncode != 0:
            return {}
        items = json.loads(result.stdout).get("items", [])
        return {i["describedObject"]["name"]: parse_quantity(i["value"]) for i in items}

    def external_metric(self, namespace: str, metric: str, selector: str) -> list[float]:
        """External metric values as the HPA controller reads them (labelSelector = selector)."""
        path = (
            f"/apis/{EXTERNAL_METRICS_GROUP}/v1beta1/namespaces/{namespace}/{metric}"
            f"?labelSelector={quote(selector)}"
        )
        result = self.cluster.kubectl("get", "--raw", path, check=False)
        if result.returncode != 0:
            return []
        items = json.loads(result.stdout).get("items", [])
        return [parse_quantity(i["value"]) for i in items]

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with contextlib.suppress(Exception):
            self.cluster.kubectl(
                "delete",
                "apiservice",
                *(f"{version}.{group}" for group, version in ADAPTER_API_VERSIONS),
                "--ignore-not-found",
                check=False,
            )
        for name in (ADAPTER_NAME, PROMETHEUS_NAME):
            with contextlib.suppress(Exception):
                self.cluster.stop_process(name, grace_seconds=10)


_SUFFIXES = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_quantity(text: str) -> float:
    """A Kubernetes quantity as the adapter writes metric values ("1500m", "2", "3k")."""
    number = text.rstrip("numkMG")
    return float(number) * _SUFFIXES[text[len(number) :]]


__all__ = [
    "MetricsStack",
    "PodRef",
    "PodServerMap",
    "adapter_binary",
    "build_apiservice_manifests",
    "build_file_sd",
    "build_prometheus_config",
    "keda_crds_dir",
    "parse_quantity",
    "pods_from_listing",
    "prometheus_binary",
    "rule_groups_from_listing",
]
