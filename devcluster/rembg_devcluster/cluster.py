"""The local control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and
KWOK as plain processes on 127.0.0.1, with real TLS, token auth, RBAC and fake nodes.

    cluster = DevCluster.start(ClusterConfig(state_dir=Path(".cluster")))
    cluster.kubectl("get", "nodes")
    cluster.stop()

`start` writes state.json (PIDs, ports) so another process can `attach` and `stop` it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from pydantic import BaseModel

from rembg_devcluster import flags, host_state, node_config, nodes, pki, real_node
from rembg_devcluster.binaries import Binaries, locate_binaries
from rembg_devcluster.errors import ComponentTimeoutError, DevClusterError
from rembg_devcluster.images import (
    INDEX_FILE,
    NODE_IMAGES,
    SANDBOX_IMAGE,
    ImageIndex,
    load_image_index,
)
from rembg_devcluster.kube import KubeHandle
from rembg_devcluster.kubeconfig import (
    CertCredentials,
    TokenCredentials,
    build_kubeconfig,
    write_kubeconfig,
)
from rembg_devcluster.layout import Layout, Ports
from rembg_devcluster.node_config import NodeNetwork, NodePaths, NodePorts
from rembg_devcluster.ports import ensure_ports_free, free_port
from rembg_devcluster.process import (
    ProcessHost,
    ProcessRecord,
    log_tail,
    raise_if_dead,
    spawn,
    stop,
)
from rembg_devcluster.real_node import NODE_PROCESSES, NodePki, RealNodeState

log = logging.getLogger(__name__)
ADMIN_USER = "rembg-admin"
# Stop order: whatever runs on top of the cluster first, then the watchers, then the store.
CONTROL_PLANE_ORDER = [
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
]
# Components that talk to the API server with client certificates, and the identity each gets.
COMPONENT_IDENTITIES = {
    # One identity for all controllers (no per-controller service accounts), so full rights.
    "kube-controller-manager": pki.ClientIdentity(
        "system:kube-controller-manager", ("system:masters",)
    ),
    # The bootstrap RBAC policy grants exactly what the scheduler needs to this user.
    "kube-scheduler": pki.ClientIdentity("system:kube-scheduler"),
    # KWOK writes node and pod status for every fake node.
    "kwok": pki.ClientIdentity("kwok-controller", ("system:masters",)),
}


@dataclass
class ClusterConfig:
    """How to start a local cluster. Defaults suit tests: fresh state, free ports."""

    state_dir: Path
    monitoring_crds: bool = True
    cpu_nodes: int = 2
    gpu_nodes: int = 2
    apiserver_port: int | None = None
    start_timeout_seconds: float = 120.0
    binaries: Binaries = field(default_factory=locate_binaries)
    # Appended to kube-controller-manager's command line, e.g. a short
    # --horizontal-pod-autoscaler-sync-period for autoscaling tests.
    controller_manager_args: tuple[str, ...] = ()
    # A real node (kubelet + containerd) beside the KWOK nodes; see real_node.py. It imports
    # the images listed in images_index (written by `make images`).
    real_node: bool = False
    images_index: Path = INDEX_FILE
    # The images of images_index the node imports (the monitoring test adds its own).
    node_images: tuple[str, ...] = NODE_IMAGES


@dataclass(frozen=True)
class _Boot:
    """What the start-up steps share."""

    binaries: Binaries
    ports: Ports
    deadline: float
    t0: float
    admin_token: str
    controller_manager_args: tuple[str, ...] = ()
    node_ip: str | None = None


class ClusterState(BaseModel):
    """What `up` leaves in state.json for `down`, `status` and `attach`."""

    state_dir: Path
    server: str
    ports: dict[str, int]
    processes: list[ProcessRecord]
    monitoring_crds: bool
    kubectl: Path
    helm: Path
    kube_proxy: Path = Path("kube-proxy")
    timings_seconds: dict[str, float] = {}
    node: RealNodeState | None = None
    # What the real node's teardown could not put back (empty: the host is as it was).
    teardown_problems: list[str] = []


def _read_state(path: Path) -> ClusterState | None:
    try:
        return ClusterState.model_validate_json(path.read_text())
    except FileNotFoundError:
        return None


def _pick_ports(apiserver_port: int | None) -> Ports:
    return Ports(
        etcd_client=free_port(),
        etcd_peer=free_port(),
        apiserver=apiserver_port or free_port(),
        controller_manager=free_port(),
        scheduler=free_port(),
    )


def write_pki(layout: Layout, node_ip: str | None = None) -> str:
    """Writes every certificate, key and the token file; returns the admin token."""
    ca = pki.build_ca()
    pki.write_private(layout.ca_cert, ca.cert_pem)
    pki.write_private(layout.ca_key, ca.key_pem)
    serving = pki.build_serving_cert(ca, ips=(*pki.SERVING_IPS, *([node_ip] if node_ip else [])))
    pki.write_private(layout.serving_cert, serving.cert_pem)
    pki.write_private(layout.serving_key, serving.key_pem)
    for name in ("kube-controller-manager-serving", "kube-scheduler-serving"):
        pair = pki.build_serving_cert(
            ca, common_name=name, dns_names=("localhost",), ips=("127.0.0.1",)
        )
        pki.write_private(layout.cert(name), pair.cert_pem)
        pki.write_private(layout.key(name), pair.key_pem)
    write_front_proxy_pki(layout)
    if node_ip:
        # The API server's identity towards kubelets (logs, exec): full rights on them.
        identity = pki.ClientIdentity(flags.KUBELET_CLIENT, ("system:masters",))
        client = pki.build_client_cert(ca, identity)
        pki.write_private(layout.cert(flags.KUBELET_CLIENT), client.cert_pem)
        pki.write_private(layout.key(flags.KUBELET_CLIENT), client.key_pem)
    sa_private, sa_public = pki.build_service_account_key()
    pki.write_private(layout.sa_private_key, sa_private)
    pki.write_private(layout.sa_public_key, sa_public)
    admin_token = pki.new_token()
    line = pki.build_token_auth_line(
        admin_token, ADMIN_USER, "uid-rembg-admin", ("system:masters",)
    )
    pki.write_private(layout.token_file, (line + "\n").encode())
    return admin_token


def write_node_pki(layout: Layout, server: str, node_ip: str) -> NodePki:
    """Identities of the real node: kubelet (system:node:<name>, for the Node authorizer),
    kube-proxy (system:kube-proxy, bound to system:node-proxier by the bootstrap policy) and the
    kubelet's serving certificate."""
    ca_pem = layout.ca_cert.read_bytes()
    ca = pki.KeyPair(ca_pem, layout.ca_key.read_bytes())
    name = node_config.NODE_NAME
    for component, identity in (
        ("kubelet", pki.ClientIdentity(f"system:node:{name}", ("system:nodes",))),
        ("kube-proxy", pki.ClientIdentity("system:kube-proxy")),
    ):
        pair = pki.build_client_cert(ca, identity)
        document = build_kubeconfig(
            server, ca_pem, identity.user, CertCredentials(pair.cert_pem, pair.key_pem)
        )
        write_kubeconfig(layout.component_kubeconfig(component), document)
    serving = pki.build_serving_cert(ca, common_name=name, dns_names=(name,), ips=(node_ip,))
    pki.write_private(layout.cert("kubelet-serving"), serving.cert_pem)
    pki.write_private(layout.key("kubelet-serving"), serving.key_pem)
    return NodePki(
        ca=layout.ca_cert,
        kubelet_kubeconfig=layout.component_kubeconfig("kubelet"),
        kube_proxy_kubeconfig=layout.component_kubeconfig("kube-proxy"),
        kubelet_serving_cert=layout.cert("kubelet-serving"),
        kubelet_serving_key=layout.key("kubelet-serving"),
    )


def write_front_proxy_pki(layout: Layout) -> None:
    """A separate CA for the aggregation layer's front proxy (kube-apiserver -> extension API
    servers), as kubeadm does: a cluster-CA client certificate must not pass as the proxy."""
    ca = pki.build_ca("rembg-devcluster-front-proxy-ca")
    pki.write_private(layout.cert(flags.FRONT_PROXY_CA), ca.cert_pem)
    pki.write_private(layout.key(flags.FRONT_PROXY_CA), ca.key_pem)
    client = pki.build_client_cert(ca, pki.ClientIdentity(flags.FRONT_PROXY_CLIENT))
    pki.write_private(layout.cert(flags.FRONT_PROXY_CLIENT), client.cert_pem)
    pki.write_private(layout.key(flags.FRONT_PROXY_CLIENT), client.key_pem)


def write_kubeconfigs(layout: Layout, server: str, admin_token: str) -> None:
    ca_pem = layout.ca_cert.read_bytes()
    ca = pki.KeyPair(ca_pem, layout.ca_key.read_bytes())
    for component, identity in COMPONENT_IDENTITIES.items():
        pair = pki.build_client_cert(ca, identity)
        document = build_kubeconfig(
            server, ca_pem, identity.user, CertCredentials(pair.cert_pem, pair.key_pem)
        )
        write_kubeconfig(layout.component_kubeconfig(component), document)
    admin = build_kubeconfig(server, ca_pem, ADMIN_USER, TokenCredentials(admin_token))
    write_kubeconfig(layout.kubeconfig, admin)


class DevCluster(KubeHandle, ProcessHost):
    """A running local cluster (started here, or attached to from state.json)."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.layout = Layout(state.state_dir)
        super().__init__(self.layout.kubeconfig, state.kubectl, extra_path=[state.helm.parent])
        # Popen objects exist only in the process that started the children; used to reap them.
        self._popens: dict[str, subprocess.Popen[bytes]] = {}

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(cls, config: ClusterConfig) -> DevCluster:
        """Starts a fresh cluster in config.state_dir and waits until it is fully usable.

        On any failure everything already started is stopped before the error propagates.
        """
        config.binaries.require(monitoring_crds=config.monitoring_crds)
        state_dir = config.state_dir.resolve()
        previous = _read_state(state_dir / "state.json")
        if previous and any(p.alive() for p in previous.processes):
            raise DevClusterError(
                f"a cluster is already running from {state_dir} ({previous.server}); "
                "stop it first with `python -m rembg_devcluster down`"
            )
        if previous and previous.node and not previous.node.torn_down:
            # Its record is the only way to put the host back: use it before wiping it.
            stop_from_state(state_dir)
        images = _require_real_node_host(config) if config.real_node else None
        _wipe(state_dir)
        ports = _pick_ports(config.apiserver_port)
        ensure_ports_free(ports.named())
        node = _plan_real_node(state_dir) if images else None
        address = node_config.NodeNetwork().gateway if node else flags.LOOPBACK
        state = ClusterState(
            state_dir=state_dir,
            server=f"https://{address}:{ports.apiserver}",
            node=node,
            ports=ports.named(),
            processes=[],
            monitoring_crds=config.monitoring_crds,
            kubectl=config.binaries.kubectl,
            helm=config.binaries.helm,
            kube_proxy=config.binaries.kube_proxy,
        )
        cluster = cls(state)
        try:
            cluster._boot(config, ports, images)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @classmethod
    def attach(cls, state_dir: Path) -> DevCluster:
        """The cluster a previous `start` (maybe in another process) left in state_dir."""
        state = _read_state(state_dir.resolve() / "state.json")
        if state is None:
            raise DevClusterError(f"no cluster state in {state_dir} (start one with `up`)")
        return cls(state)

    def stop(self, extra_grace_seconds: float = 10.0) -> None:
        """Stops extra processes (operator, servers) first, then the real node's pods and
        daemons, then the control plane in order, then puts the host back as it was."""
        self.stop_extras(
            names_to_keep=[*CONTROL_PLANE_ORDER, *NODE_PROCESSES],
            grace_seconds=extra_grace_seconds,
        )
        node = self.state.node if self.state.node and not self.state.node.torn_down else None
        problems: list[str] = []
        if node is not None:
            problems += self._stop_real_node(node)
        by_name = {p.name: p for p in self.state.processes}
        for name in CONTROL_PLANE_ORDER:
            if found := by_name.get(name):
                stop(found, self._popens.get(name), grace_seconds=10.0)
        if node is not None:
            problems += self._restore_host(node)
        self.state.teardown_problems = problems
        self.save()

    def _stop_real_node(self, node: RealNodeState) -> list[str]:
        """Workloads, then kube-proxy and kubelet, then containers, containerd and its shims.
        Each step runs whatever the one before it raised; failures come back as problems."""
        problems: list[str] = []
        by_name = {p.name: p for p in self.state.processes}
        apiserver = by_name.get("kube-apiserver")
        kubelet = by_name.get("kubelet")
        paths = NodePaths(node.root)
        if apiserver and apiserver.alive() and kubelet and kubelet.alive():
            real_node.attempt(problems, "drain", lambda: real_node.drain_node(self.kubectl))
        for name in ("kube-proxy", "kubelet"):
            if found := by_name.get(name):
                stop(found, self._popens.get(name), grace_seconds=10.0)
        real_node.attempt(
            problems, "leftover containers", lambda: real_node.remove_leftover_containers(paths)
        )
        if found := by_name.get("containerd"):
            stop(found, self._popens.get("containerd"), grace_seconds=10.0)
        real_node.attempt(problems, "shims", lambda: real_node.kill_shims(paths))
        return problems

    def _restore_host(self, node: RealNodeState) -> list[str]:
        """Only the node this cluster made: never one another cluster owns now."""
        owner = real_node.recorded_owner()
        if owner is not None and owner.path != self.layout.root:
            return [f"the host's real node belongs to {owner.path} now: left it alone"]
        problems: list[str] = []
        real_node.attempt(
            problems,
            "host teardown",
            lambda: problems.extend(real_node.teardown_host(node, self.state.kube_proxy)),
        )
        node.torn_down = not problems
        if node.torn_down:
            real_node.forget_owner(self.layout.root)
        return problems

    @property
    def records(self) -> list[ProcessRecord]:
        return self.state.processes

    @records.setter
    def records(self, value: list[ProcessRecord]) -> None:
        self.state.processes = value

    @property
    def log_dir(self) -> Path:
        return self.layout.logs

    def running(self) -> dict[str, bool]:
        return {p.name: p.alive() for p in self.state.processes}

    def resident_memory(self) -> dict[str, int]:
        """RSS in bytes of each process (with its children)."""
        return {p.name: p.rss_bytes() for p in self.state.processes}

    # ---- boot ------------------------------------------------------------------------------

    def _boot(self, config: ClusterConfig, ports: Ports, images: ImageIndex | None) -> None:
        """Credentials, then each layer once the one below is healthy, then seed and verify."""
        node = self.state.node
        network = NodeNetwork(node.bridge, node.pod_cidr) if node else None
        t0 = time.monotonic()
        if node and network:
            # Recorded before the host changes, so a run killed from here on is undone later.
            self.save()
            real_node.record_owner(self.layout.root)
            # The API server listens on the bridge, so it must exist first.
            real_node.create_network(network)
        boot = _Boot(
            binaries=config.binaries,
            ports=ports,
            deadline=time.monotonic() + config.start_timeout_seconds,
            t0=t0,
            admin_token=write_pki(self.layout, network.gateway if network else None),
            controller_manager_args=config.controller_manager_args,
            node_ip=network.gateway if network else None,
        )
        write_kubeconfigs(self.layout, self.state.server, boot.admin_token)
        self.layout.kwok_config.write_text(yaml.safe_dump(flags.build_kwok_config()))
        self._mark("pki", boot.t0)
        self._start_store_and_apiserver(boot)
        self._start_controllers(boot)
        if config.monitoring_crds:
            self.install_monitoring_crds(config.binaries.monitoring_crds_dir)
        if kwok_nodes := nodes.build_default_nodes(config.cpu_nodes, config.gpu_nodes):
            self.apply(kwok_nodes)
        if node and network and images:
            self._start_real_node(boot, node, network, images)
        self._wait_until_usable(boot)
        self.save()

    def _start_real_node(
        self, boot: _Boot, node: RealNodeState, network: NodeNetwork, images: ImageIndex
    ) -> None:
        """containerd, the images, kubelet until its Node is Ready, then kube-proxy."""
        paths = NodePaths(node.root)
        node_ports = NodePorts(**node.ports)
        node_pki = write_node_pki(self.layout, self.state.server, network.gateway)
        real_node.write_node_files(paths, network, node_ports, images.ref(SANDBOX_IMAGE), node_pki)
        self._start("containerd", ["containerd", f"--config={paths.containerd_config}"])
        self._wait("containerd", boot.deadline, functools.partial(real_node.containerd_up, paths))
        self._mark("containerd_up", boot.t0)
        real_node.import_images(paths, images)
        node.images = {name: image.ref for name, image in images.images.items()}
        self._mark("images_imported", boot.t0)
        kubelet = node_config.build_kubelet_args(
            boot.binaries.kubelet, paths, network, node_pki.kubelet_kubeconfig
        )
        self._start("kubelet", kubelet)
        deadline = max(boot.deadline, time.monotonic() + real_node.NODE_READY_TIMEOUT_SECONDS)
        self._wait("kubelet", deadline, functools.partial(self._node_ready, node_config.NODE_NAME))
        self._mark("real_node_ready", boot.t0)
        proxy = node_config.build_kube_proxy_args(boot.binaries.kube_proxy, paths)
        self._start("kube-proxy", proxy)
        healthz = f"http://127.0.0.1:{node_ports.proxy_healthz}/healthz"
        self._wait("kube-proxy", deadline, functools.partial(_http_ok, healthz))
        self._mark("kube_proxy_ready", boot.t0)

    def _start_store_and_apiserver(self, boot: _Boot) -> None:
        layout, ports = self.layout, boot.ports
        self._start("etcd", flags.build_etcd_args(boot.binaries.etcd, layout, ports))
        etcd_health = f"http://{flags.LOOPBACK}:{ports.etcd_client}/health"
        self._wait("etcd", boot.deadline, functools.partial(_http_ok, etcd_health))
        self._mark("etcd_healthy", boot.t0)
        apiserver = flags.build_apiserver_args(
            boot.binaries.kube_apiserver, layout, ports, node_ip=boot.node_ip
        )
        self._start("kube-apiserver", apiserver)
        readyz = f"{self.state.server}/readyz"
        check = functools.partial(_http_ok, readyz, self._tls(), boot.admin_token)
        self._wait("kube-apiserver", boot.deadline, check)
        self._mark("apiserver_ready", boot.t0)

    def _start_controllers(self, boot: _Boot) -> None:
        layout, ports, binaries = self.layout, boot.ports, boot.binaries
        self._start(
            "kube-controller-manager",
            flags.build_controller_manager_args(binaries.kube_controller_manager, layout, ports)
            + list(boot.controller_manager_args),
        )
        self._start(
            "kube-scheduler", flags.build_scheduler_args(binaries.kube_scheduler, layout, ports)
        )
        self._start("kwok", flags.build_kwok_args(binaries.kwok, layout))

    def _wait_until_usable(self, boot: _Boot) -> None:
        """Controllers healthy, every node Ready, and the default ServiceAccount made."""
        for name, port in (
            ("kube-controller-manager", boot.ports.controller_manager),
            ("kube-scheduler", boot.ports.scheduler),
        ):
            url = f"https://{flags.LOOPBACK}:{port}/healthz"
            self._wait(name, boot.deadline, functools.partial(_http_ok, url, self._tls()))
        self._mark("components_healthy", boot.t0)
        self._wait("kwok", boot.deadline, self._nodes_ready)
        self._mark("nodes_ready", boot.t0)
        # Pods are refused in a namespace until its default ServiceAccount exists.
        has_default_sa = functools.partial(
            self.exists, "serviceaccount", "default", "-n", "default"
        )
        self._wait("kube-controller-manager", boot.deadline, has_default_sa)
        self._mark("ready", boot.t0)

    def _tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.layout.ca_cert))

    def install_monitoring_crds(self, crds_dir: Path) -> list[str]:
        """The Prometheus Operator's CRDs (PrometheusRule, ServiceMonitor, PodMonitor)."""
        return self.install_crds(sorted(crds_dir.glob("*.yaml")))

    def _node_ready(self, name: str) -> bool:
        found = self.get_json("node", name)
        return any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in found.get("status", {}).get("conditions", [])
        )

    def _nodes_ready(self) -> bool:
        listed = self.get_json("nodes")
        items = listed.get("items", [])
        if not items:
            return False
        return all(
            any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in n.get("status", {}).get("conditions", [])
            )
            for n in items
        )

    def _start(self, name: str, argv: list[str]) -> None:
        popen, record = spawn(name, argv, self.layout.log(name))
        self._popens[name] = popen
        self.state.processes.append(record)
        self.save()

    def _wait(self, name: str, deadline: float, ready: Callable[[], bool]) -> None:
        """Polls ready() until it holds; fails fast with the log tail if any component died."""
        while True:
            for record in self.state.processes:
                raise_if_dead(record, self._popens.get(record.name))
            with contextlib.suppress(DevClusterError, OSError, subprocess.SubprocessError):
                if ready():
                    return
            if time.monotonic() > deadline:
                raise ComponentTimeoutError(
                    f"{name} did not become healthy in time; last lines of its log:\n"
                    f"{log_tail(self.layout.log(name))}"
                )
            time.sleep(0.1)

    def _mark(self, step: str, t0: float) -> None:
        self.state.timings_seconds[step] = round(time.monotonic() - t0, 3)

    def save(self) -> None:
        self.layout.root.mkdir(parents=True, exist_ok=True)
        self.layout.state_file.write_text(self.state.model_dump_json(indent=2))


def _http_ok(url: str, context: ssl.SSLContext | None = None, token: str | None = None) -> bool:
    """GET url answered 200 (etcd's /health must also say healthy)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        response = httpx.get(url, headers=headers, timeout=2.0, verify=context or True)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and '"health":"false"' not in response.text


def _require_real_node_host(config: ClusterConfig) -> ImageIndex:
    _tear_down_abandoned_node()
    images = load_image_index(config.images_index)
    if images is not None and (absent := images.absent(config.node_images)):
        raise real_node.RealNodeUnavailableError(
            f"{config.images_index} lists no {', '.join(absent)} image: run `make images`"
        )
    images = images.subset(config.node_images) if images is not None else None
    real_node.require_host([config.binaries.kubelet, config.binaries.kube_proxy], images)
    # One real node per host: the first start to record itself owns it until its teardown.
    if (owner := real_node.recorded_owner()) is not None:
        raise real_node.RealNodeUnavailableError(
            f"a real node already runs on this host (cluster {owner.path}); stop it with "
            f"`python -m rembg_devcluster --dir {owner.path} down`"
        )
    assert images is not None  # require_host refuses a missing index
    return images


def _tear_down_abandoned_node() -> None:
    """A real node whose cluster's processes are all gone (its run was killed before teardown)
    is torn down from the state it recorded, so the host gets back what it had before."""
    owner = real_node.recorded_owner()
    if owner is None or owner.alive():
        return
    state = _read_state(owner.path / "state.json")
    if state is None or state.node is None or any(p.alive() for p in state.processes):
        return
    log.warning("real node: tearing down the one a killed run left in %s", owner.path)
    stop_from_state(owner.path)


def _plan_real_node(state_dir: Path) -> RealNodeState:
    """Records the host before the node changes anything, and picks the node's ports."""
    before = host_state.take_snapshot()
    if theirs := real_node.kube_chains(before):
        # kube-proxy --cleanup at teardown would take another Kubernetes node's rules too.
        raise real_node.RealNodeUnavailableError(
            f"this host already has Kubernetes iptables chains ({', '.join(theirs[:3])}, ...): "
            "another node runs here, and a real node beside it would clash"
        )
    return RealNodeState(
        bridge=node_config.BRIDGE,
        pod_cidr=node_config.POD_CIDR,
        root=NodePaths.of(Layout(state_dir)).root,
        ports={
            "kubelet": free_port(),
            "kubelet_healthz": free_port(),
            "proxy_healthz": free_port(),
            "proxy_metrics": free_port(),
        },
        before=before,
    )


def _wipe(state_dir: Path) -> None:
    """A fresh cluster every time: the state dir only ever holds one cluster's throwaway data.

    Only an empty directory or one a previous cluster left (it has state.json) is wiped, so a
    mistyped --dir never deletes anything else.
    """
    if state_dir.exists() and any(state_dir.iterdir()):
        mounted = [p for p in host_state.mounts_under(state_dir) if p != str(state_dir.resolve())]
        if mounted:
            raise DevClusterError(
                f"{state_dir} still has mounts ({mounted[0]}, ...) from a real node; stop its "
                "cluster first with `python -m rembg_devcluster down`"
            )
        if not (state_dir / "state.json").exists():
            raise DevClusterError(
                f"{state_dir} is not empty and holds no cluster state; pick another --dir"
            )
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)


def stop_from_state(state_dir: Path) -> list[str]:
    """Stops the cluster recorded in state_dir; returns the names of processes that were running."""
    state = _read_state(state_dir.resolve() / "state.json")
    if state is None:
        return []
    running = [p.name for p in state.processes if p.alive()]
    DevCluster(state).stop()
    return running


def teardown_problems(state_dir: Path) -> list[str]:
    """What the last stop of the cluster in state_dir could not put back on the host."""
    state = _read_state(state_dir.resolve() / "state.json")
    return list(state.teardown_problems) if state else []


def describe(cluster: DevCluster) -> dict[str, object]:
    """A JSON-friendly status summary: server, kubeconfig, per-process liveness and RSS."""
    return {
        "server": cluster.state.server,
        "kubeconfig": str(cluster.kubeconfig),
        "processes": {
            p.name: {"pid": p.pid, "alive": p.alive(), "rss_mib": round(p.rss_bytes() / 2**20, 1)}
            for p in cluster.state.processes
        },
        "timings_seconds": cluster.state.timings_seconds,
    }
