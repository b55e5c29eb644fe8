"""The real node's configuration and host bookkeeping, as pure functions (no node started)."""

import tomllib
from pathlib import Path

import pytest
from rembg_devcluster import flags, host_state, real_node
from rembg_devcluster.images import BuiltImage, ImageIndex
from rembg_devcluster.layout import Layout, Ports
from rembg_devcluster.node_config import (
    NodeNetwork,
    NodePaths,
    NodePorts,
    build_cni_config,
    build_containerd_config,
    build_kube_proxy_config,
    build_kubelet_args,
    build_kubelet_config,
)

PORTS = NodePorts(kubelet=1, kubelet_healthz=2, proxy_healthz=3, proxy_metrics=4)


@pytest.fixture
def paths(tmp_path: Path) -> NodePaths:
    return NodePaths.of(Layout(tmp_path))


def test_containerd_keeps_everything_private_and_carries_the_two_settings_no_guide_mentions(
    paths: NodePaths,
) -> None:
    config = tomllib.loads(build_containerd_config(paths, "localhost/pause:1"))
    assert config["root"].startswith(str(paths.root))
    assert config["state"].startswith(str(paths.root))
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["restrict_oom_score_adj"] is True
    assert cri["sandbox_image"] == "localhost/pause:1"
    assert cri["cni"]["conf_dir"] == str(paths.cni_conf_dir)
    runc = cri["containerd"]["runtimes"]["runc"]["options"]
    assert runc["SystemdCgroup"] is False


def test_sockets_fit_the_unix_path_limit_however_deep_the_state_dir(tmp_path: Path) -> None:
    deep = NodePaths(tmp_path / ("x" * 200) / "node")
    assert len(str(deep.containerd_socket) + ".ttrpc") < 104
    # kubelet's own sockets under its root, e.g. pod-resources/<10 digits>
    assert len(str(deep.kubelet_root / "pod-resources" / "1234567890")) < 104
    assert deep.socket_dir != NodePaths(tmp_path / "other").socket_dir


def test_the_cni_bridge_neither_routes_nor_masquerades_and_uses_a_private_ipam_dir(
    paths: NodePaths,
) -> None:
    network = NodeNetwork()
    (bridge,) = build_cni_config(network, paths)["plugins"]  # type: ignore[misc]
    assert bridge["bridge"] == "rembg0"
    assert bridge["isGateway"] is False
    assert bridge["ipMasq"] is False
    assert bridge["ipam"]["dataDir"] == str(paths.ipam_dir)
    assert network.gateway == "10.213.0.1"


def test_kubelet_listens_on_the_bridge_and_changes_no_kernel_default_it_could_refuse(
    paths: NodePaths, tmp_path: Path
) -> None:
    network = NodeNetwork()
    config = build_kubelet_config(
        network, paths, PORTS, tmp_path / "ca", (tmp_path / "c", tmp_path / "k")
    )
    assert config["address"] == network.gateway
    assert config["cgroupDriver"] == "cgroupfs"
    assert config["failCgroupV1"] is False
    assert config["protectKernelDefaults"] is False
    assert config["readOnlyPort"] == 0
    assert config["authentication"]["anonymous"] == {"enabled": False}  # type: ignore[index]
    args = build_kubelet_args(Path("/k/kubelet"), paths, network, tmp_path / "kc")
    assert f"--root-dir={paths.kubelet_root}" in args
    assert "--node-labels=rembg.io/node-kind=cpu,rembg.io/node-type=real" in args


def test_kube_proxy_leaves_conntrack_alone_and_masquerades_service_traffic(tmp_path: Path) -> None:
    config = build_kube_proxy_config(NodeNetwork(), PORTS, tmp_path / "kc")
    assert config["mode"] == "iptables"
    assert set(config["conntrack"].values()) == {0, "0s"}  # type: ignore[union-attr]
    assert config["iptables"]["masqueradeAll"] is True  # type: ignore[index]
    assert config["iptables"]["localhostNodePorts"] is False  # type: ignore[index]


def test_with_a_real_node_the_apiserver_listens_on_the_bridge_and_reaches_kubelets(
    tmp_path: Path,
) -> None:
    layout = Layout(tmp_path)
    ports = Ports(1, 2, 3, 4, 5)
    plain = flags.build_apiserver_args(Path("a"), layout, ports)
    assert "--bind-address=127.0.0.1" in plain
    assert "--endpoint-reconciler-type=none" in plain
    node = flags.build_apiserver_args(Path("a"), layout, ports, node_ip="10.213.0.1")
    assert "--bind-address=10.213.0.1" in node
    assert "--authorization-mode=Node,RBAC" in node
    assert "--endpoint-reconciler-type=lease" in node
    assert "--kubelet-preferred-address-types=InternalIP" in node


def test_empty_iptables_tables_compare_equal_to_absent_ones() -> None:
    dump = (
        "*mangle\n:PREROUTING ACCEPT [3:4]\nCOMMIT\n"
        "*nat\n:KUBE-X - [0:0]\n-A OUTPUT -j KUBE-X\nCOMMIT\n"
    )
    assert host_state.normalise_iptables_save(dump) == [
        "*nat",
        ":KUBE-X -",
        "-A OUTPUT -j KUBE-X",
        "COMMIT",
    ]


def _snapshot(**changes: object) -> host_state.HostSnapshot:
    base: dict[str, object] = {
        "sysctls": {"net.ipv4.ip_forward": "0"},
        "iptables": {"iptables": ["*filter", "COMMIT"]},
        "mounts": ["/"],
        "links": ["lo"],
        "cgroups": ["/sys/fs/cgroup/cpu/user"],
        "paths": {"/var/lib/kubelet": False},
    }
    return host_state.HostSnapshot.model_validate({**base, **changes})


def test_every_kind_of_host_change_is_named() -> None:
    before = _snapshot()
    after = _snapshot(
        sysctls={"net.ipv4.ip_forward": "1"},
        mounts=["/", "/tmp/x/node/kubelet"],
        links=["lo", "rembg0"],
        cgroups=["/sys/fs/cgroup/cpu/user", "/sys/fs/cgroup/cpu/kubepods"],
        paths={"/var/lib/kubelet": True},
    )
    assert host_state.differences(before, before) == []
    assert host_state.differences(before, after) == [
        "sysctl net.ipv4.ip_forward was 0 and is 1",
        "mount added: /tmp/x/node/kubelet",
        "link added: rembg0",
        "cgroup added: /sys/fs/cgroup/cpu/kubepods",
        "path /var/lib/kubelet appeared",
    ]


def test_only_chains_the_node_made_are_removed() -> None:
    before = ["*nat", ":DOCKER -", ":KUBE-OLD -", "COMMIT"]
    now = ["*nat", ":DOCKER -", ":KUBE-OLD -", ":KUBE-SERVICES -", ":CNI-1 -", "COMMIT"]
    assert real_node._new_chains(before, now) == {"nat": ["CNI-1", "KUBE-SERVICES"]}


def test_a_host_without_the_parts_is_told_what_is_missing(tmp_path: Path) -> None:
    index = ImageIndex(images={"pause": BuiltImage(ref="p", archive=tmp_path / "none.tar")})
    missing = real_node.missing_host_parts([tmp_path / "kubelet"], index)
    assert any("kubelet" in line and "make binaries" in line for line in missing)
    assert any("none.tar" in line and "make images" in line for line in missing)
    assert any("images" in line for line in real_node.missing_host_parts([], None))
