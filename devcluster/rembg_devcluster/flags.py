"""Command lines of every control-plane component. Pure functions: no I/O, easy to test.

Flags follow ../shared/CONTROL_PLANE.md: everything on 127.0.0.1, free ports, real TLS,
RBAC and service-account tokens, no leader election (one replica of each).
"""

from __future__ import annotations

from pathlib import Path

from rembg_devcluster.layout import Layout, Ports

LOOPBACK = "127.0.0.1"
# A /16: the operator benchmark creates 500 Services, more than a /24 holds.
SERVICE_CIDR = "10.0.0.0/16"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Label and annotation KWOK uses to tell its fake nodes from real ones.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_NODE_VALUE = "fake"
# The aggregation layer's front proxy: its own CA and the client name it presents.
FRONT_PROXY_CA = "front-proxy-ca"
FRONT_PROXY_CLIENT = "front-proxy-client"
# The API server's client identity towards kubelets (logs, exec, port-forward).
KUBELET_CLIENT = "kube-apiserver-kubelet-client"


def build_etcd_args(etcd: Path, layout: Layout, ports: Ports) -> list[str]:
    client = f"http://{LOOPBACK}:{ports.etcd_client}"
    peer = f"http://{LOOPBACK}:{ports.etcd_peer}"
    return [
        str(etcd),
        "--name=devcluster",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=devcluster={peer}",
        # A throwaway test store: durability is not worth the fsync latency.
        "--unsafe-no-fsync",
        "--log-level=warn",
    ]


def build_apiserver_args(
    apiserver: Path, layout: Layout, ports: Ports, node_ip: str | None = None
) -> list[str]:
    """With node_ip (a real node runs), the API server listens on the node's bridge address, so
    pods reach it through the `kubernetes` Service, and talks to the kubelet (logs, exec)."""
    address = node_ip or LOOPBACK
    return [
        str(apiserver),
        f"--etcd-servers=http://{LOOPBACK}:{ports.etcd_client}",
        f"--bind-address={address}",
        f"--advertise-address={address}",
        f"--secure-port={ports.apiserver}",
        f"--cert-dir={layout.apiserver_cert_dir}",
        f"--tls-cert-file={layout.serving_cert}",
        f"--tls-private-key-file={layout.serving_key}",
        f"--client-ca-file={layout.ca_cert}",
        f"--token-auth-file={layout.token_file}",
        # Node: a kubelet may touch only its own node and the pods bound to it.
        "--authorization-mode=Node,RBAC" if node_ip else "--authorization-mode=RBAC",
        "--anonymous-auth=false",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={layout.sa_public_key}",
        f"--service-account-signing-key-file={layout.sa_private_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        *(_real_node_args(layout) if node_ip else _loopback_args()),
        "--allow-privileged=true",
        *build_aggregation_layer_args(layout),
        "--v=0",
    ]


def _loopback_args() -> list[str]:
    # On loopback the endpoint reconciler complains every 10 s; no pod reaches it anyway.
    return ["--endpoint-reconciler-type=none"]


def _real_node_args(layout: Layout) -> list[str]:
    return [
        # The `kubernetes` Service's endpoint is the bridge address: in-cluster clients work.
        "--endpoint-reconciler-type=lease",
        f"--kubelet-client-certificate={layout.cert(KUBELET_CLIENT)}",
        f"--kubelet-client-key={layout.key(KUBELET_CLIENT)}",
        "--kubelet-preferred-address-types=InternalIP",
    ]


def build_aggregation_layer_args(layout: Layout) -> list[str]:
    """The front proxy of the aggregation layer, for extension API servers (prometheus-adapter's
    custom.metrics.k8s.io): the apiserver forwards requests with a client certificate signed by
    a separate CA, and the user in X-Remote-* headers the extension server trusts by that CA."""
    return [
        f"--requestheader-client-ca-file={layout.cert(FRONT_PROXY_CA)}",
        f"--requestheader-allowed-names={FRONT_PROXY_CLIENT}",
        "--requestheader-username-headers=X-Remote-User",
        "--requestheader-group-headers=X-Remote-Group",
        "--requestheader-extra-headers-prefix=X-Remote-Extra-",
        f"--proxy-client-cert-file={layout.cert(FRONT_PROXY_CLIENT)}",
        f"--proxy-client-key-file={layout.key(FRONT_PROXY_CLIENT)}",
    ]


def _secure_component_args(binary: Path, layout: Layout, name: str, port: int) -> list[str]:
    """What kube-controller-manager and kube-scheduler share: their own client identity, a TLS
    serving port on loopback, and no leader election (one replica of each)."""
    kubeconfig = layout.component_kubeconfig(name)
    return [
        str(binary),
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--authentication-skip-lookup=true",
        f"--bind-address={LOOPBACK}",
        f"--secure-port={port}",
        f"--tls-cert-file={layout.cert(f'{name}-serving')}",
        f"--tls-private-key-file={layout.key(f'{name}-serving')}",
        "--leader-elect=false",
    ]


def build_controller_manager_args(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return [
        *_secure_component_args(
            binary, layout, "kube-controller-manager", ports.controller_manager
        ),
        # One identity for every controller: it is in system:masters, so no per-controller RBAC.
        "--use-service-account-credentials=false",
        f"--service-account-private-key-file={layout.sa_private_key}",
        f"--root-ca-file={layout.ca_cert}",
        f"--cluster-signing-cert-file={layout.ca_cert}",
        f"--cluster-signing-key-file={layout.ca_key}",
        f"--service-cluster-ip-range={SERVICE_CIDR}",
        # Fake nodes only go NotReady when our own processes are starved of CPU: be patient
        # rather than mark every pod NotReady (which stalls Deployments) on a busy CI host.
        "--node-monitor-grace-period=2m",
        # Every controller: deployments, replicasets, garbage collector, HPA, disruption, ...
        "--controllers=*",
        "--v=0",
    ]


def build_scheduler_args(binary: Path, layout: Layout, ports: Ports) -> list[str]:
    return [
        *_secure_component_args(binary, layout, "kube-scheduler", ports.scheduler),
        "--v=0",
    ]


def build_kwok_args(binary: Path, layout: Layout) -> list[str]:
    return [
        str(binary),
        f"--kubeconfig={layout.component_kubeconfig('kwok')}",
        # An explicit config file keeps KWOK from reading ~/.kwok/kwok.yaml; with no Stage in it,
        # KWOK plays its built-in default stages (nodes Ready, pods Running and Ready).
        f"--config={layout.kwok_config}",
        "--manage-all-nodes=false",
        f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}={KWOK_NODE_VALUE}",
        f"--node-ip={LOOPBACK}",
        "--cidr=10.244.0.0/16",
        # Without leases KWOK renews node status only every 20-60 s; past the controller-manager's
        # 50 s grace every node (and so every pod) turns NotReady and KWOK never sets pods back.
        "--node-lease-duration-seconds=40",
    ]


def build_kwok_config() -> dict[str, object]:
    """KWOK's own configuration file: defaults only, so its built-in stages apply."""
    return {
        "apiVersion": "config.kwok.x-k8s.io/v1alpha1",
        "kind": "KwokConfiguration",
        "options": {},
    }
