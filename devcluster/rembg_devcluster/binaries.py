"""Where the control-plane binaries live: built by build-binaries.sh, cached by version."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from rembg_devcluster.errors import BinaryMissingError

VERSIONS_FILE = Path(__file__).resolve().parents[1] / "versions.env"
BUILD_HINT = "run `make binaries` (devcluster/build-binaries.sh) first"


def parse_versions_env(text: str) -> dict[str, str]:
    """Parses the KEY=VALUE lines of versions.env (comments and blank lines ignored)."""
    versions: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        versions[key.strip()] = value.strip().strip("'\"")
    return versions


def cache_dir() -> Path:
    """The cache root the build script writes to (same rule as build-binaries.sh)."""
    if explicit := os.environ.get("REMBG_FLEET_CACHE"):
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "rembg-fleet"


@dataclass(frozen=True)
class Binaries:
    """Absolute paths of every executable and data file the control plane needs."""

    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path
    kube_scheduler: Path
    kubectl: Path
    kwok: Path
    helm: Path
    monitoring_crds_dir: Path
    kubelet: Path
    kube_proxy: Path

    @property
    def kubectl_dir(self) -> Path:
        return self.kubectl.parent

    def require(self, *, monitoring_crds: bool) -> None:
        """Raises BinaryMissingError naming every missing piece, with the command that builds it."""
        executables = [
            self.etcd,
            self.kube_apiserver,
            self.kube_controller_manager,
            self.kube_scheduler,
            self.kubectl,
            self.kwok,
        ]
        missing = [str(p) for p in executables if not os.access(p, os.X_OK)]
        if monitoring_crds and not any(self.monitoring_crds_dir.glob("*.yaml")):
            missing.append(f"{self.monitoring_crds_dir}/*.yaml")
        if missing:
            raise BinaryMissingError(
                f"missing control-plane binaries: {', '.join(missing)}; {BUILD_HINT}"
            )


def locate_binaries(root: Path | None = None, versions: dict[str, str] | None = None) -> Binaries:
    """Paths of the cached binaries for the pinned versions; nothing is checked or built here."""
    bin_root = (root or cache_dir()) / "bin"
    pins = versions if versions is not None else parse_versions_env(VERSIONS_FILE.read_text())
    k8s = bin_root / f"kubernetes-{pins['KUBERNETES_VERSION']}"
    return Binaries(
        etcd=k8s / "etcd",
        kube_apiserver=k8s / "kube-apiserver",
        kube_controller_manager=k8s / "kube-controller-manager",
        kube_scheduler=k8s / "kube-scheduler",
        kubectl=k8s / "kubectl",
        kubelet=k8s / "kubelet",
        kube_proxy=k8s / "kube-proxy",
        kwok=bin_root / f"kwok-{pins['KWOK_VERSION']}" / "kwok",
        helm=bin_root / f"helm-{pins['HELM_VERSION']}" / "helm",
        monitoring_crds_dir=bin_root
        / f"prometheus-operator-crds-{pins['PROMETHEUS_OPERATOR_VERSION']}",
    )
