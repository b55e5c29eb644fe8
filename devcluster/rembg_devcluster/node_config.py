"""Configuration of the real node: containerd, CNI, kubelet and kube-proxy. Pure functions.

What each setting is for is in ../shared/REAL_NODE.md; the comments here say why where it is
not obvious. Every path lives under the cluster's state directory, so two clusters never share
a file, and nothing is written under /etc.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path

from rembg_devcluster.layout import Layout

CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_PLUGINS = ("bridge", "host-local", "loopback")
NODE_NAME = "real-node-0"
# The node's bridge, its address (the node IP, the gateway of every pod) and the pod CIDR. One
# real node per host: the names are fixed so a left-over bridge is found and reported.
BRIDGE = "rembg0"
POD_CIDR = "10.213.0.0/24"
NODE_KIND_LABEL = "rembg.io/node-kind"
NODE_TYPE_LABEL = "rembg.io/node-type"
MAX_PODS = 16


@dataclass(frozen=True)
class NodeNetwork:
    """The bridge network of the real node."""

    bridge: str = BRIDGE
    pod_cidr: str = POD_CIDR

    @property
    def gateway(self) -> str:
        """The bridge's own address: the node IP and every pod's default gateway."""
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def prefix_length(self) -> int:
        return ipaddress.ip_network(self.pod_cidr).prefixlen


@dataclass(frozen=True)
class NodePorts:
    """Ports of the node's daemons (kubelet on the node IP, health endpoints on loopback)."""

    kubelet: int
    kubelet_healthz: int
    proxy_healthz: int
    proxy_metrics: int


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps its state: all under <state dir>/node."""

    root: Path

    @classmethod
    def of(cls, layout: Layout) -> NodePaths:
        return cls(layout.root / "node")

    @property
    def containerd_root(self) -> Path:
        return self.root / "containerd" / "root"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd" / "state"

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd" / "config.toml"

    @property
    def _digest(self) -> str:
        return hashlib.sha256(str(self.root).encode()).hexdigest()[:12]

    @property
    def socket_dir(self) -> Path:
        """Unix socket paths are limited to 108 bytes, which a deep state dir (a pytest temp
        dir, a checkout's .cluster) easily passes: sockets live in a short directory named
        after the state directory."""
        return Path("/run") / f"rembg-node-{self._digest}"

    @property
    def kubelet_root(self) -> Path:
        """kubelet makes its own sockets below its root (pod-resources, plugins), so the root is
        a short path too; on disk, not /run, because emptyDir volumes live there."""
        return Path("/var/lib") / f"rembg-node-{self._digest}" / "kubelet"

    @property
    def host_dirs(self) -> tuple[Path, ...]:
        """The directories outside the state dir that the node makes (removed at teardown)."""
        return (self.socket_dir, self.kubelet_root.parent)

    @property
    def containerd_socket(self) -> Path:
        return self.socket_dir / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet-config.yaml"

    @property
    def pod_logs(self) -> Path:
        return self.root / "pod-logs"

    @property
    def resolv_conf(self) -> Path:
        return self.root / "resolv.conf"

    @property
    def proxy_config(self) -> Path:
        return self.root / "kube-proxy-config.yaml"


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def build_containerd_config(paths: NodePaths, sandbox_image: str) -> str:
    """containerd 1.6's config (version 2): private root, state and socket; CRI for kubelet."""
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    lines = [
        "version = 2",
        f"root = {_toml_string(str(paths.containerd_root))}",
        f"state = {_toml_string(str(paths.containerd_state))}",
        # Snapshotters this host cannot run only log errors at every start.
        'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", '
        '"io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper", '
        '"io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp"]',
        "",
        "[grpc]",
        f"  address = {_toml_string(str(paths.containerd_socket))}",
        "",
        "[ttrpc]",
        f"  address = {_toml_string(str(paths.containerd_socket) + '.ttrpc')}",
        "",
        f"[{cri}]",
        # No registry is reachable: the sandbox image is built locally from pause.c.
        f"  sandbox_image = {_toml_string(sandbox_image)}",
        # Root here lacks CAP_SYS_RESOURCE: without this every sandbox fails with
        # "can't get final child's PID from pipe: EOF".
        "  restrict_oom_score_adj = true",
        "  netns_mounts_under_state_dir = true",
        "  enable_selinux = false",
        f"[{cri}.containerd]",
        '  snapshotter = "overlayfs"',
        '  default_runtime_name = "runc"',
        f"[{cri}.containerd.runtimes.runc]",
        '  runtime_type = "io.containerd.runc.v2"',
        f"[{cri}.containerd.runtimes.runc.options]",
        "  SystemdCgroup = false",
        f"[{cri}.cni]",
        f"  bin_dir = {_toml_string(str(CNI_BIN_DIR))}",
        f"  conf_dir = {_toml_string(str(paths.cni_conf_dir))}",
        "  max_conf_num = 1",
        "",
    ]
    return "\n".join(lines)


def build_cni_config(network: NodeNetwork, paths: NodePaths) -> dict[str, object]:
    """A bridge network on our own bridge. The plugin neither routes nor masquerades
    (isGateway/ipMasq off): the bridge is made beforehand, and changing ip_forward is ours."""
    return {
        "cniVersion": "1.0.0",
        "name": "rembg-devcluster",
        "plugins": [
            {
                "type": "bridge",
                "bridge": network.bridge,
                "isGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.ipam_dir),
                    "ranges": [[{"subnet": network.pod_cidr, "gateway": network.gateway}]],
                    "routes": [{"dst": "0.0.0.0/0", "gw": network.gateway}],
                },
            },
        ],
    }


def build_kubelet_config(
    network: NodeNetwork,
    paths: NodePaths,
    ports: NodePorts,
    ca_file: Path,
    serving: tuple[Path, Path],
) -> dict[str, object]:
    """KubeletConfiguration for this host: cgroup v1 through cgroupfs, no swap check, kernel
    defaults left alone where it would refuse to start, and small eviction margins so a busy
    shared disk does not evict the test's pods."""
    cert, key = serving
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": network.gateway,
        "port": ports.kubelet,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports.kubelet_healthz,
        "tlsCertFile": str(cert),
        "tlsPrivateKeyFile": str(key),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca_file)},
        },
        "authorization": {"mode": "Webhook"},
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "protectKernelDefaults": False,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_socket}",
        "podLogsDir": str(paths.pod_logs),
        "resolvConf": str(paths.resolv_conf),
        "maxPods": MAX_PODS,
        "serializeImagePulls": False,
        "registerNode": True,
        "clusterDomain": "cluster.local",
        "evictionHard": {
            "memory.available": "200Mi",
            "nodefs.available": "2%",
            "imagefs.available": "2%",
        },
        "imageGCHighThresholdPercent": 99,
        "imageGCLowThresholdPercent": 98,
        "shutdownGracePeriod": "0s",
        "shutdownGracePeriodCriticalPods": "0s",
        "nodeStatusUpdateFrequency": "5s",
        # ConfigMap and Secret volumes are refreshed at each periodic sync: the Prometheus
        # Operator's rule files and config reach its pods within seconds, not a minute.
        "syncFrequency": "10s",
        "staticPodPath": "",
    }


def build_kubelet_args(
    kubelet: Path, paths: NodePaths, network: NodeNetwork, kubeconfig: Path
) -> list[str]:
    labels = {NODE_KIND_LABEL: "cpu", NODE_TYPE_LABEL: "real"}
    return [
        str(kubelet),
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={paths.kubelet_root}",
        f"--node-ip={network.gateway}",
        f"--hostname-override={NODE_NAME}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())),
        "--v=1",
    ]


def build_kube_proxy_config(
    network: NodeNetwork, ports: NodePorts, kubeconfig: Path
) -> dict[str, object]:
    """kube-proxy in iptables mode (this kernel has no IPVS) that changes no sysctl.

    masqueradeAll: a pod reaching a Service whose endpoint is on the same bridge would get the
    answer straight from the endpoint's IP (the bridge does not hand bridged frames to iptables
    without br_netfilter), so Service traffic is masqueraded to the node IP instead.
    """
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "hostnameOverride": NODE_NAME,
        "bindAddress": network.gateway,
        "healthzBindAddress": f"127.0.0.1:{ports.proxy_healthz}",
        "metricsBindAddress": f"127.0.0.1:{ports.proxy_metrics}",
        "clusterCIDR": network.pod_cidr,
        "nodePortAddresses": [f"{network.gateway}/32"],
        "oomScoreAdj": 0,
        "iptables": {"masqueradeAll": True, "localhostNodePorts": False, "syncPeriod": "10s"},
        # Zero means "leave the kernel's conntrack settings as they are".
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
    }


def build_kube_proxy_args(kube_proxy: Path, paths: NodePaths) -> list[str]:
    return [str(kube_proxy), f"--config={paths.proxy_config}", "--v=1"]
