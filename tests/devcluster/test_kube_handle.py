"""KubeHandle's local parts: reading the kubeconfig it was given, the env it hands to processes."""

import subprocess
from pathlib import Path

import pytest
from rembg_devcluster.errors import KubectlError
from rembg_devcluster.kube import KubeHandle
from rembg_devcluster.kubeconfig import TokenCredentials, build_kubeconfig, write_kubeconfig


@pytest.fixture
def handle(tmp_path: Path) -> KubeHandle:
    kubeconfig = write_kubeconfig(
        tmp_path / "kc",
        build_kubeconfig("https://127.0.0.1:6999", b"PEM", "u", TokenCredentials("t")),
    )
    fake_kubectl = tmp_path / "bin" / "kubectl"
    fake_kubectl.parent.mkdir()
    # A stand-in kubectl that reports what it was asked and fails like kubectl does.
    fake_kubectl.write_text(
        '#!/bin/sh\necho "args: $*"; echo "Error from server (Forbidden): nope" >&2; exit 1\n'
    )
    fake_kubectl.chmod(0o755)
    return KubeHandle(kubeconfig, fake_kubectl, extra_path=[tmp_path / "helm"])


def test_server_and_ca_come_from_the_kubeconfig(handle: KubeHandle) -> None:
    assert handle.server == "https://127.0.0.1:6999"
    assert handle.ca_pem == b"PEM"


def test_env_points_subprocesses_at_the_cluster(handle: KubeHandle, tmp_path: Path) -> None:
    env = handle.env
    assert env["KUBECONFIG"] == str(handle.kubeconfig)
    assert env["PATH"].split(":")[:2] == [str(tmp_path / "bin"), str(tmp_path / "helm")]


def test_failed_kubectl_raises_with_the_servers_message(handle: KubeHandle) -> None:
    with pytest.raises(
        KubectlError, match=r"kubectl get pods exited 1: Error from server \(Forbidden\): nope"
    ):
        handle.kubectl("get", "pods")
    result = handle.kubectl("get", "pods", check=False)
    assert result.returncode == 1
    assert f"--kubeconfig={handle.kubeconfig} get pods" in result.stdout


def test_kubectl_error_is_a_called_process_error(handle: KubeHandle) -> None:
    with pytest.raises(subprocess.CalledProcessError) as caught:
        handle.kubectl("version")
    assert caught.value.returncode == 1
    assert "Forbidden" in caught.value.stderr
