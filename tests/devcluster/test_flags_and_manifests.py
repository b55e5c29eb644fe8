"""Pure builders: component command lines, kubeconfigs, KWOK nodes, versions."""

import base64
from pathlib import Path

import pytest
import yaml
from rembg_devcluster import flags, nodes
from rembg_devcluster.binaries import Binaries, locate_binaries, parse_versions_env
from rembg_devcluster.errors import BinaryMissingError
from rembg_devcluster.kubeconfig import (
    CertCredentials,
    TokenCredentials,
    build_kubeconfig,
    write_kubeconfig,
)
from rembg_devcluster.layout import Layout, Ports

PORTS = Ports(
    etcd_client=41001, etcd_peer=41002, apiserver=41003, controller_manager=41004, scheduler=41005
)
LAYOUT = Layout(Path("/state"))


def _flag_map(argv: list[str]) -> dict[str, str]:
    return dict(a.removeprefix("--").split("=", 1) for a in argv[1:] if "=" in a)


def test_etcd_listens_only_on_its_loopback_ports() -> None:
    args = _flag_map(flags.build_etcd_args(Path("/bin/etcd"), LAYOUT, PORTS))
    assert args["listen-client-urls"] == "http://127.0.0.1:41001"
    assert args["listen-peer-urls"] == "http://127.0.0.1:41002"
    assert args["data-dir"] == "/state/etcd-data"
    assert "--unsafe-no-fsync" in flags.build_etcd_args(Path("/bin/etcd"), LAYOUT, PORTS)


def test_apiserver_has_real_authn_authz_and_loopback_settings() -> None:
    argv = flags.build_apiserver_args(Path("/bin/kube-apiserver"), LAYOUT, PORTS)
    args = _flag_map(argv)
    assert argv[0] == "/bin/kube-apiserver"
    assert args["etcd-servers"] == "http://127.0.0.1:41001"
    assert args["secure-port"] == "41003"
    assert args["bind-address"] == "127.0.0.1"
    assert args["authorization-mode"] == "RBAC"
    assert args["anonymous-auth"] == "false"
    assert args["endpoint-reconciler-type"] == "none"
    assert args["token-auth-file"] == "/state/pki/tokens.csv"
    assert args["client-ca-file"] == "/state/pki/ca.crt"
    assert args["service-account-signing-key-file"] == "/state/pki/sa.key"
    assert args["service-account-key-file"] == "/state/pki/sa.pub"
    assert args["cert-dir"].startswith("/state/")


def test_controller_manager_runs_every_controller_without_leader_election() -> None:
    args = _flag_map(flags.build_controller_manager_args(Path("/kcm"), LAYOUT, PORTS))
    assert args["controllers"] == "*"
    assert args["leader-elect"] == "false"
    assert args["use-service-account-credentials"] == "false"
    assert args["authentication-skip-lookup"] == "true"
    assert args["secure-port"] == "41004"
    assert args["root-ca-file"] == "/state/pki/ca.crt"
    assert args["cluster-signing-key-file"] == "/state/pki/ca.key"
    assert args["kubeconfig"] == "/state/kubeconfigs/kube-controller-manager.yaml"


def test_scheduler_and_kwok_use_their_own_identities() -> None:
    scheduler = _flag_map(flags.build_scheduler_args(Path("/s"), LAYOUT, PORTS))
    assert scheduler["kubeconfig"] == "/state/kubeconfigs/kube-scheduler.yaml"
    assert scheduler["secure-port"] == "41005"
    kwok = _flag_map(flags.build_kwok_args(Path("/kwok"), LAYOUT))
    assert kwok["kubeconfig"] == "/state/kubeconfigs/kwok.yaml"
    assert kwok["manage-all-nodes"] == "false"
    assert kwok["manage-nodes-with-annotation-selector"] == "kwok.x-k8s.io/node=fake"
    assert kwok["config"] == "/state/kwok.yaml"


def test_no_component_falls_back_to_a_well_known_port() -> None:
    """Two sessions must be able to run side by side: every listener gets our port."""
    everything = " ".join(
        flags.build_etcd_args(Path("e"), LAYOUT, PORTS)
        + flags.build_apiserver_args(Path("a"), LAYOUT, PORTS)
        + flags.build_controller_manager_args(Path("c"), LAYOUT, PORTS)
        + flags.build_scheduler_args(Path("s"), LAYOUT, PORTS)
    )
    for well_known in (":2379", ":2380", "=6443", "=10257", "=10259"):
        assert well_known not in everything


def test_token_kubeconfig_is_self_contained() -> None:
    doc = build_kubeconfig(
        "https://127.0.0.1:1", b"CA PEM", "alice", TokenCredentials("tok"), namespace="ns"
    )
    cluster = doc["clusters"][0]["cluster"]  # type: ignore[index]
    assert cluster["server"] == "https://127.0.0.1:1"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"CA PEM"
    assert doc["users"] == [{"name": "alice", "user": {"token": "tok"}}]
    context = doc["contexts"][0]  # type: ignore[index]
    assert doc["current-context"] == context["name"]
    assert context["context"]["namespace"] == "ns"


def test_cert_kubeconfig_inlines_cert_and_key(tmp_path: Path) -> None:
    doc = build_kubeconfig("https://h", b"CA", "bob", CertCredentials(b"CERT", b"KEY"))
    path = write_kubeconfig(tmp_path / "kc", doc)
    loaded = yaml.safe_load(path.read_text())
    user = loaded["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == b"CERT"
    assert base64.b64decode(user["client-key-data"]) == b"KEY"
    assert path.stat().st_mode & 0o777 == 0o600


def test_gpu_nodes_advertise_gpus_with_label_and_taint() -> None:
    node = nodes.build_kwok_node("g", "gpu", nodes.NodeShape(gpus=4))
    meta = node["metadata"]
    assert meta["labels"]["nvidia.com/gpu.present"] == "true"  # type: ignore[index]
    assert meta["annotations"]["kwok.x-k8s.io/node"] == "fake"  # type: ignore[index]
    assert node["spec"] == {
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    }
    status = node["status"]
    assert status["capacity"]["nvidia.com/gpu"] == "4"  # type: ignore[index]
    assert status["allocatable"]["nvidia.com/gpu"] == "4"  # type: ignore[index]


def test_cpu_nodes_have_no_gpu_and_no_taint() -> None:
    node = nodes.build_kwok_node("c", "cpu")
    assert node["spec"] == {"taints": []}
    assert "nvidia.com/gpu" not in node["status"]["capacity"]  # type: ignore[index]
    assert "nvidia.com/gpu.present" not in node["metadata"]["labels"]  # type: ignore[index]


def test_default_fleet_is_two_cpu_and_two_gpu_nodes() -> None:
    names = [n["metadata"]["name"] for n in nodes.build_default_nodes()]  # type: ignore[index]
    assert names == ["kwok-cpu-0", "kwok-cpu-1", "kwok-gpu-0", "kwok-gpu-1"]


def test_versions_env_parsing_and_the_pinned_file() -> None:
    parsed = parse_versions_env("# comment\nA=1\n\nB='v2' \nnot a pair\n")
    assert parsed == {"A": "1", "B": "v2"}
    pinned = parse_versions_env((Path(__file__).parents[2] / "devcluster/versions.env").read_text())
    assert pinned["KUBERNETES_VERSION"].startswith("v1.36.")


def test_binary_paths_are_keyed_by_version(tmp_path: Path) -> None:
    versions = {
        "KUBERNETES_VERSION": "v1.2.3",
        "KWOK_VERSION": "v0.1.0",
        "HELM_VERSION": "v3.0.0",
        "PROMETHEUS_OPERATOR_VERSION": "v0.9.0",
    }
    found = locate_binaries(tmp_path, versions)
    assert found.kube_apiserver == tmp_path / "bin/kubernetes-v1.2.3/kube-apiserver"
    assert found.kwok == tmp_path / "bin/kwok-v0.1.0/kwok"
    assert found.monitoring_crds_dir == tmp_path / "bin/prometheus-operator-crds-v0.9.0"


def test_missing_binaries_are_named_with_the_command_that_builds_them(tmp_path: Path) -> None:
    missing = Binaries(
        etcd=Path("/bin/true"),
        kube_apiserver=tmp_path / "nope/kube-apiserver",
        kube_controller_manager=Path("/bin/true"),
        kube_scheduler=Path("/bin/true"),
        kubectl=Path("/bin/true"),
        kwok=Path("/bin/true"),
        helm=Path("/bin/true"),
        monitoring_crds_dir=tmp_path,
        kubelet=Path("/bin/true"),
        kube_proxy=Path("/bin/true"),
    )
    with pytest.raises(BinaryMissingError, match=r"kube-apiserver.*make binaries"):
        missing.require(monitoring_crds=False)
    with pytest.raises(BinaryMissingError, match=r"\*\.yaml"):
        missing.require(monitoring_crds=True)
