"""A cluster someone else runs (kind, a real one): reached through an existing kubeconfig.

The e2e suite uses it when REMBG_E2E_KUBECONFIG is set (a cluster you run); processes the tests
spawn (the operator) still run here, against that cluster.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from rembg_devcluster.binaries import locate_binaries
from rembg_devcluster.errors import BinaryMissingError
from rembg_devcluster.kube import KubeHandle
from rembg_devcluster.process import ProcessHost, ProcessRecord


def find_kubectl() -> Path:
    """The pinned kubectl from our cache, else the one on PATH."""
    cached = locate_binaries().kubectl
    if cached.exists():
        return cached
    on_path = shutil.which("kubectl")
    if on_path is None:
        raise BinaryMissingError("no kubectl: run `make binaries` or put kubectl on PATH")
    return Path(on_path)


class ExternalCluster(KubeHandle, ProcessHost):
    def __init__(self, kubeconfig: Path, log_dir: Path, kubectl_binary: Path | None = None):
        binary = kubectl_binary or find_kubectl()
        helm = locate_binaries().helm
        super().__init__(kubeconfig.resolve(), binary, extra_path=[helm.parent])
        self.records: list[ProcessRecord] = []
        self._popens: dict[str, subprocess.Popen[bytes]] = {}
        self._log_dir = log_dir

    @property
    def log_dir(self) -> Path:
        return self._log_dir

    def stop(self) -> None:
        """Stops what we spawned; the cluster itself is not ours to stop."""
        self.stop_extras()
