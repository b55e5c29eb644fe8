"""Where each file of one local cluster lives inside its state directory, and its ports."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Ports:
    """Loopback ports of one cluster; every session picks free ones so clusters can coexist."""

    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    def named(self) -> dict[str, int]:
        return {
            "etcd client": self.etcd_client,
            "etcd peer": self.etcd_peer,
            "kube-apiserver": self.apiserver,
            "kube-controller-manager": self.controller_manager,
            "kube-scheduler": self.scheduler,
        }


@dataclass(frozen=True)
class Layout:
    """Paths under one cluster's state directory. Pure: creating a Layout touches no disk."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def ca_cert(self) -> Path:
        return self.pki / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.pki / "ca.key"

    @property
    def serving_cert(self) -> Path:
        return self.pki / "apiserver.crt"

    @property
    def serving_key(self) -> Path:
        return self.pki / "apiserver.key"

    @property
    def sa_private_key(self) -> Path:
        return self.pki / "sa.key"

    @property
    def sa_public_key(self) -> Path:
        return self.pki / "sa.pub"

    @property
    def token_file(self) -> Path:
        return self.pki / "tokens.csv"

    def cert(self, component: str) -> Path:
        return self.pki / f"{component}.crt"

    def key(self, component: str) -> Path:
        return self.pki / f"{component}.key"

    def component_kubeconfig(self, component: str) -> Path:
        return self.root / "kubeconfigs" / f"{component}.yaml"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig users and tests read."""
        return self.root / "kubeconfig"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd-data"

    @property
    def apiserver_cert_dir(self) -> Path:
        return self.root / "apiserver-certs"

    @property
    def kwok_config(self) -> Path:
        return self.root / "kwok.yaml"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, component: str) -> Path:
        return self.logs / f"{component}.log"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"
