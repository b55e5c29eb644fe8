"""KEDA on a cluster with a real node: its operator and metrics API server in pods.

    keda = KedaStack.start(cluster)
    cluster.kubectl("get", "--raw", "/apis/external.metrics.k8s.io/v1beta1")
    keda.stop()

What runs: KEDA's operator (`keda`) and metrics API server (`keda-adapter`), built from the
`github.com/kedacore/keda/v2` module by build-binaries.sh, in images FROM scratch that
`make images` made, deployed from KEDA's own `config/` manifests (namespace, RBAC, both
Deployments and Services, the `v1beta1.external.metrics.k8s.io` APIService) and every CRD it
watches. Its certificate rotation makes the TLS certificates and patches the APIService's
CA bundle, as in a Helm install of KEDA. This cluster's `external.metrics.k8s.io` is KEDA's:
do not start prometheus-adapter (metrics_stack.py) on the same cluster.

Changed from upstream, and why:
- our images, `imagePullPolicy: Never` (no registry; the node imported them);
- the operator runs with `--enable-webhook-patching=false`: the admission webhooks are not
  deployed, and their configuration does not exist to patch;
- the metrics API server reaches the operator's gRPC service by its Service's cluster IP,
  with the TLS authority set to the name KEDA's certificate carries: there is no cluster DNS
  here (real clusters resolve `keda-operator.keda.svc.cluster.local`);
- the namespace enforces the restricted Pod Security Standard (upstream's pods meet it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rembg_devcluster.binaries import VERSIONS_FILE, cache_dir, parse_versions_env
from rembg_devcluster.cluster import DevCluster
from rembg_devcluster.errors import BinaryMissingError, DevClusterError
from rembg_devcluster.images import KEDA_IMAGES, load_image_index
from rembg_devcluster.kube import load_manifests
from rembg_devcluster.waiting import wait_until

Manifest = dict[str, Any]

NAMESPACE = "keda"
OPERATOR = "keda-operator"
ADAPTER = "keda-metrics-apiserver"
APISERVICE = "v1beta1.external.metrics.k8s.io"
GRPC_PORT = 9666
RESTRICTED = "pod-security.kubernetes.io/enforce"
BUILD_HINT = "run `make binaries images` first"
# The name KEDA's certificate rotation puts in the operator's serving certificate.
OPERATOR_AUTHORITY = f"{OPERATOR}.{NAMESPACE}.svc.cluster.local"


@dataclass(frozen=True)
class KedaImages:
    operator: str
    adapter: str


def keda_images() -> KedaImages:
    index = load_image_index()
    if index is None or index.absent(KEDA_IMAGES):
        raise BinaryMissingError(f"no KEDA images in build/images.json; {BUILD_HINT}")
    operator, adapter = (index.ref(name) for name in KEDA_IMAGES)
    return KedaImages(operator, adapter)


def keda_dir() -> Path:
    version = parse_versions_env(VERSIONS_FILE.read_text())["KEDA_VERSION"]
    return cache_dir() / "bin" / f"keda-{version}"


def keda_crds() -> list[Path]:
    files = sorted((keda_dir() / "crds").glob("*.yaml"))
    if not files:
        raise BinaryMissingError(f"no KEDA CRDs in {keda_dir()}; {BUILD_HINT}")
    return files


def upstream_manifests() -> list[Manifest]:
    """KEDA's config/ manifests as build-binaries.sh copied them from its Go module."""
    files = sorted((keda_dir() / "manifests").rglob("*.yaml"))
    if not files:
        raise BinaryMissingError(f"no KEDA manifests in {keda_dir()}; {BUILD_HINT}")
    return [d for f in files for d in load_manifests(f.read_text())]


# ---- manifests (pure) --------------------------------------------------------------------------


def _deployment(manifests: Sequence[Manifest], name: str) -> Manifest:
    (found,) = (m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"] == name)
    return found


def _container(deployment: Manifest) -> Manifest:
    container: Manifest = deployment["spec"]["template"]["spec"]["containers"][0]
    return container


def build_keda_manifests(upstream: Sequence[Manifest], images: KedaImages) -> list[Manifest]:
    """Everything but the metrics API server's Deployment (it needs the operator Service's
    address: build_adapter_deployment)."""
    manifests = [copy.deepcopy(m) for m in upstream if m["kind"] != "Deployment"]
    for manifest in manifests:
        if manifest["kind"] == "Namespace":
            manifest["metadata"].setdefault("labels", {})[RESTRICTED] = "restricted"
    operator = copy.deepcopy(_deployment(upstream, OPERATOR))
    container = _container(operator)
    container["image"] = images.operator
    container["imagePullPolicy"] = "Never"
    container["args"] = [*container.get("args", []), "--enable-webhook-patching=false"]
    return [*manifests, operator]


def build_adapter_deployment(
    upstream: Sequence[Manifest], images: KedaImages, operator_ip: str
) -> Manifest:
    """The metrics API server, reaching the operator's gRPC service at operator_ip."""
    adapter = copy.deepcopy(_deployment(upstream, ADAPTER))
    container = _container(adapter)
    container["image"] = images.adapter
    container["imagePullPolicy"] = "Never"
    container["args"] = [
        *container.get("args", []),
        f"--metrics-service-address={operator_ip}:{GRPC_PORT}",
        f"--metrics-service-grpc-authority={OPERATOR_AUTHORITY}",
    ]
    return adapter


# ---- the running stack -------------------------------------------------------------------------


@dataclass
class KedaStack:
    cluster: DevCluster

    @classmethod
    def start(cls, cluster: DevCluster, *, timeout: float = 240.0) -> KedaStack:
        """CRDs, the operator, then the metrics API server; returns once the API server
        serves external.metrics.k8s.io through KEDA."""
        if cluster.state.node is None:
            raise DevClusterError("KEDA runs its pods on a real node")
        images = keda_images()
        upstream = upstream_manifests()
        stack = cls(cluster)
        try:
            cluster.install_crds(keda_crds())
            manifests = build_keda_manifests(upstream, images)
            cluster.apply([m for m in manifests if m["kind"] == "Namespace"])
            cluster.wait_for_default_service_account(NAMESPACE)
            cluster.apply([m for m in manifests if m["kind"] != "Namespace"])
            operator_ip = cluster.get_json("service", OPERATOR, "-n", NAMESPACE)["spec"][
                "clusterIP"
            ]
            cluster.apply(build_adapter_deployment(upstream, images, operator_ip))
            stack._wait("KEDA's operator", timeout, lambda: stack._deployment_ready(OPERATOR))
            stack._wait("KEDA's metrics API server", timeout, stack.serves_external_metrics)
        except BaseException:
            stack.stop()
            raise
        return stack

    def _wait(self, what: str, timeout: float, probe: Any) -> None:
        wait_until(what, timeout, probe, self.describe)

    def _deployment_ready(self, name: str) -> bool:
        deployment = self.cluster.get_json("deployment", name, "-n", NAMESPACE)
        return int((deployment.get("status") or {}).get("readyReplicas") or 0) >= 1

    def serves_external_metrics(self) -> bool:
        """The APIService is Available (the aggregator reached KEDA's server with its CA)."""
        service = self.cluster.get_json("apiservice", APISERVICE)
        conditions = (service.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Available" and c.get("status") == "True" for c in conditions)

    def apiservice(self) -> Manifest:
        return self.cluster.get_json("apiservice", APISERVICE)

    def describe(self) -> str:
        """Pods, the APIService's conditions and both components' log tails."""
        kubectl = self.cluster.kubectl
        pods = kubectl("get", "pods", "-n", NAMESPACE, "-o", "wide", check=False).stdout
        apiservice = kubectl("get", "apiservice", APISERVICE, "-o", "yaml", check=False).stdout
        logs = [
            kubectl("logs", "-n", NAMESPACE, f"deploy/{name}", "--tail=20", check=False).stdout
            for name in (OPERATOR, ADAPTER)
        ]
        status = apiservice.partition("\nstatus:")[2]
        return (
            f"{pods}\nAPIService status:{status}\noperator log:\n{logs[0]}\n"
            f"metrics API server log:\n{logs[1]}"
        )

    def stop(self) -> None:
        """The pods go with the cluster's node; the APIService goes first, so the API server's
        discovery stops asking for a group no one serves while the cluster winds down."""
        with contextlib.suppress(Exception):
            self.cluster.kubectl("delete", "apiservice", APISERVICE, "--wait=false", check=False)
