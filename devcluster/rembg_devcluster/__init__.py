"""A local Kubernetes control plane of real upstream components for tests and local runs."""

from rembg_devcluster.cluster import ClusterConfig, DevCluster
from rembg_devcluster.errors import (
    BinaryMissingError,
    ComponentDiedError,
    ComponentTimeoutError,
    DevClusterError,
    KubectlError,
    PortInUseError,
)
from rembg_devcluster.kube import KubeHandle

__all__ = [
    "BinaryMissingError",
    "ClusterConfig",
    "ComponentDiedError",
    "ComponentTimeoutError",
    "DevCluster",
    "DevClusterError",
    "KubeHandle",
    "KubectlError",
    "PortInUseError",
]
