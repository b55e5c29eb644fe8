"""kind clusters (`make e2e-kind`): made by the kind binary on a DockerEngine.

With registry access kind pulls its own node image (kindest/node) and its own CNI (kindnetd).
Without it, the node image is ours (devcluster/build-kind-node.sh: build/kind-node.json), and
so is the CNI: kindnetd's Go module is refused here, so kind's default CNI is off and
devcluster/kind/rembg-fleet-cni runs as a DaemonSet in its place.

What this host needs whatever the image (build_cluster_config): on cgroup v1, kubelet 1.36's
`failCgroupV1: false`; without CAP_SYS_RESOURCE, containerd's `restrict_oom_score_adj`.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from rembg_devcluster import process
from rembg_devcluster.binaries import VERSIONS_FILE, cache_dir, locate_binaries, parse_versions_env
from rembg_devcluster.docker_engine import DockerEngine, missing_capabilities
from rembg_devcluster.errors import DevClusterError
from rembg_devcluster.kube import KubeHandle

REPO_ROOT = Path(__file__).resolve().parents[2]
NODE_INDEX = REPO_ROOT / "build" / "kind-node.json"
# kind's defaults (pkg/apis/config/v1alpha4/default.go), which kube-proxy's clusterCIDR follows.
POD_SUBNET = "10.244.0.0/16"
SERVICE_SUBNET = "10.96.0.0/16"
CNI_NAME = "rembg-fleet-cni"
READY_TIMEOUT_SECONDS = 300.0
NODE_IMAGE_BUILD_TIMEOUT_SECONDS = 1200.0
CGROUP_V2_MARKER = Path("/sys/fs/cgroup/cgroup.controllers")


class NodeImage(BaseModel):
    """The offline node image build-kind-node.sh made (build/kind-node.json)."""

    ref: str
    archive: Path
    key: str
    size_bytes: int = 0
    build_seconds: int = 0
    cached: bool = False
    cni_image: str
    preloaded: list[str]


def load_node_image(path: Path = NODE_INDEX) -> NodeImage | None:
    try:
        return NodeImage.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def kind_binary() -> Path:
    pins = parse_versions_env(VERSIONS_FILE.read_text())
    return cache_dir() / "bin" / f"kind-{pins['KIND_VERSION']}" / "kind"


def kind_default_image() -> str:
    """The node image this kind version pulls by default (its pkg/apis/config/defaults)."""
    pins = parse_versions_env(VERSIONS_FILE.read_text())
    source = (
        cache_dir()
        / "go-mod"
        / f"sigs.k8s.io/kind@{pins['KIND_VERSION']}"
        / "pkg/apis/config/defaults/image.go"
    )
    found = re.search(r'const Image = "([^"@]+)', source.read_text())
    if found is None:
        raise DevClusterError(f"no default node image in {source}")
    return found.group(1)


def ensure_node_image(engine: DockerEngine, log: Path) -> tuple[str | None, str | None]:
    """(node image, CNI image) for `kind create`: (None, None) when kind's default image is
    there or can be pulled (kind then brings kindnetd); else our offline build, built or taken
    from the cache (build output in `log`) and loaded into the engine unless it holds it."""
    default = kind_default_image()
    if engine.docker("image", "inspect", default, check=False).returncode == 0:
        return None, None
    try:
        if engine.docker("pull", "--quiet", default, timeout=900, check=False).returncode == 0:
            return None, None
    except subprocess.TimeoutExpired:
        pass  # a registry that never answers is no registry
    build_node_image(log)
    node = load_node_image()
    if node is None:
        raise DevClusterError(f"build-kind-node.sh wrote no {NODE_INDEX}")
    inspect = ("image", "inspect", "--format")
    label = engine.docker(
        *inspect, '{{index .Config.Labels "io.rembg-fleet.key"}}', node.ref, check=False
    )
    if label.stdout.strip() != node.key:
        old = engine.docker(*inspect, "{{.Id}}", node.ref, check=False).stdout.strip()
        engine.docker("load", "--quiet", "--input", str(node.archive), timeout=900)
        if old:  # the build this one replaces, untagged now
            engine.docker("image", "rm", old, check=False)
    return node.ref, node.cni_image


def build_node_image(log: Path) -> None:
    """Runs devcluster/build-kind-node.sh (seconds when cached) in its own process group: on a
    timeout it gets SIGTERM first, so its EXIT trap stops its containerd and cleans up."""
    script = REPO_ROOT / "devcluster" / "build-kind-node.sh"
    popen, record = process.spawn("build-kind-node", ["bash", str(script)], log)
    try:
        code = popen.wait(timeout=NODE_IMAGE_BUILD_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.stop(record, popen, grace_seconds=60)
        raise DevClusterError(
            f"building the kind node image took over {NODE_IMAGE_BUILD_TIMEOUT_SECONDS:.0f}s:\n"
            f"{process.log_tail(log)}"
        ) from None
    finally:
        if popen.poll() is None:
            process.stop(record, popen, grace_seconds=60)
    if code != 0:
        raise DevClusterError(f"building the kind node image failed:\n{process.log_tail(log, 40)}")


def host_is_cgroup_v1() -> bool:
    return not CGROUP_V2_MARKER.exists()


def build_cluster_config(
    topology: dict[str, Any], *, own_cni: bool, cgroup_v1: bool, restrict_oom_score_adj: bool
) -> dict[str, Any]:
    """The kind Config for this host: the topology (nodes, their labels and patches) plus the
    settings the host and the node image need."""
    config = copy.deepcopy(topology)
    patches: list[str] = list(config.get("kubeadmConfigPatches", []))
    if cgroup_v1:
        # kubelet >= 1.35 refuses cgroup v1 unless told otherwise (KubeletConfiguration).
        patches.append("kind: KubeletConfiguration\nfailCgroupV1: false\n")
    if patches:
        config["kubeadmConfigPatches"] = patches
    if restrict_oom_score_adj:
        containerd: list[str] = list(config.get("containerdConfigPatches", []))
        containerd.append(
            '[plugins."io.containerd.grpc.v1.cri"]\n  restrict_oom_score_adj = true\n'
        )
        config["containerdConfigPatches"] = containerd
    networking = dict(config.get("networking", {}))
    networking.setdefault("podSubnet", POD_SUBNET)
    networking.setdefault("serviceSubnet", SERVICE_SUBNET)
    if own_cni:
        networking["disableDefaultCNI"] = True
    config["networking"] = networking
    return config


def cluster_config_for_host(topology: dict[str, Any], *, own_cni: bool) -> dict[str, Any]:
    return build_cluster_config(
        topology,
        own_cni=own_cni,
        cgroup_v1=host_is_cgroup_v1(),
        restrict_oom_score_adj="CAP_SYS_RESOURCE" in missing_capabilities(),
    )


def build_cni_manifests(image: str, pod_subnet: str = POD_SUBNET) -> list[dict[str, Any]]:
    """The DaemonSet that runs devcluster/kind/rembg-fleet-cni on every node, and its RBAC
    (it reads Nodes: each one's podCIDR and InternalIP)."""
    labels = {"app.kubernetes.io/name": CNI_NAME}
    meta = {"name": CNI_NAME, "namespace": "kube-system", "labels": labels}
    container = {
        "name": "cni",
        "image": image,
        "imagePullPolicy": "Never",
        "env": [
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
            {"name": "CLUSTER_CIDR", "value": pod_subnet},
        ],
        # Routes and NAT rules in the node's network namespace; the CNI config on its disk.
        "securityContext": {"capabilities": {"add": ["NET_ADMIN", "NET_RAW"]}},
        "volumeMounts": [{"name": "cni-conf", "mountPath": "/etc/cni/net.d"}],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": CNI_NAME, "labels": labels},
            "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": CNI_NAME, "labels": labels},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": CNI_NAME,
            },
            "subjects": [{"kind": "ServiceAccount", "name": CNI_NAME, "namespace": "kube-system"}],
        },
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": meta,
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {
                        "serviceAccountName": CNI_NAME,
                        "hostNetwork": True,
                        "priorityClassName": "system-node-critical",
                        "tolerations": [{"operator": "Exists"}],
                        "terminationGracePeriodSeconds": 5,
                        "containers": [container],
                        "volumes": [
                            {
                                "name": "cni-conf",
                                "hostPath": {"path": "/etc/cni/net.d", "type": "DirectoryOrCreate"},
                            }
                        ],
                    },
                },
            },
        },
    ]


class KindCluster(KubeHandle):
    """One kind cluster: `kind create cluster` to Ready nodes, then `delete()`."""

    def __init__(self, name: str, engine: DockerEngine, workdir: Path) -> None:
        self.name = name
        self.engine = engine
        self.workdir = workdir
        self.binary = kind_binary()
        self.timings: dict[str, float] = {}
        binaries = locate_binaries()
        super().__init__(
            workdir / "kubeconfig", binaries.kubectl, extra_path=[binaries.helm.parent]
        )

    def kind(self, *args: str, timeout: float = 600.0) -> str:
        result = subprocess.run(
            [str(self.binary), *args],
            env=self.engine.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise DevClusterError(f"kind {' '.join(args)} failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def create(self, config: dict[str, Any], image: str | None, cni_image: str | None) -> None:
        """Creates the cluster; with cni_image, our CNI goes in before the nodes can be Ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "kind-config.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        started = time.monotonic()
        args = ["create", "cluster", f"--name={self.name}", f"--config={path}"]
        args += [f"--kubeconfig={self.kubeconfig}", "--retain"]
        if image:
            args.append(f"--image={image}")
        self.kind(*args)
        self.timings["kind_create"] = time.monotonic() - started
        if cni_image:
            self.apply(build_cni_manifests(cni_image, config["networking"]["podSubnet"]))
        self.kubectl(
            "wait",
            "--for=condition=Ready",
            "nodes",
            "--all",
            f"--timeout={int(READY_TIMEOUT_SECONDS)}s",
            timeout=READY_TIMEOUT_SECONDS + 30,
        )
        self.timings["nodes_ready"] = time.monotonic() - started

    def delete(self) -> None:
        self.kind("delete", "cluster", f"--name={self.name}", f"--kubeconfig={self.kubeconfig}")

    def nodes(self) -> list[str]:
        return self.kind("get", "nodes", f"--name={self.name}").split()

    def load_archive(self, archive: Path, nodes: list[str] | None = None) -> None:
        """`kind load image-archive` (a docker-archive tarball) into the named nodes, or all."""
        args = ["load", "image-archive", str(archive), f"--name={self.name}"]
        if nodes:
            args.append(f"--nodes={','.join(nodes)}")
        self.kind(*args)

    def node_ip(self, node: str) -> str:
        out = self.engine.docker(
            "inspect", "--format", "{{json .NetworkSettings.Networks}}", node
        ).stdout
        networks: dict[str, Any] = json.loads(out)
        return str(next(iter(networks.values()))["IPAddress"])

    def route_services(self) -> str:
        """Routes the Service network to the control-plane node (its kube-proxy masquerades
        what comes from outside the pod network), so this host reaches ClusterIPs. Returns the
        route, for unroute_services()."""
        route = f"{SERVICE_SUBNET} via {self.node_ip(f'{self.name}-control-plane')}"
        # `add`, not `replace`: a route someone else made to that network is an error, not ours.
        added = subprocess.run(
            ["ip", "route", "add", *route.split()],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if added.returncode != 0:
            raise DevClusterError(
                f"`ip route add {route}` failed ({added.stderr.strip()}): the kind suite reaches "
                "Services from this host through that route, which needs root"
            )
        return route

    @staticmethod
    def unroute_services(route: str) -> None:
        subprocess.run(["ip", "route", "delete", *route.split()], check=False, timeout=30)

    def logs(self, out_dir: Path) -> None:
        """`kind export logs` (each node's journal, kubelet and containerd logs, pod logs)."""
        self.kind("export", "logs", str(out_dir), f"--name={self.name}", timeout=300)
