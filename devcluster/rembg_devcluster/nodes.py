"""KWOK fake nodes: CPU nodes and GPU nodes that advertise nvidia.com/gpu like the device plugin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rembg_devcluster.flags import KWOK_NODE_ANNOTATION, KWOK_NODE_VALUE

GPU_RESOURCE = "nvidia.com/gpu"
GPU_PRESENT_LABEL = "nvidia.com/gpu.present"
# The taint GPU node pools carry (GKE, EKS and the NVIDIA GPU operator docs use this shape),
# so only pods that tolerate it, i.e. GPU pods, land there.
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
NodeKind = Literal["cpu", "gpu"]


@dataclass(frozen=True)
class NodeShape:
    """What a fake node offers the scheduler."""

    cpu: str = "16"
    memory: str = "64Gi"
    pods: int = 110
    gpus: int = 4


def build_kwok_node(name: str, kind: NodeKind, shape: NodeShape = NodeShape()) -> dict[str, object]:
    """A Node manifest KWOK manages (selected by its annotation) with the given capacity."""
    capacity: dict[str, str] = {"cpu": shape.cpu, "memory": shape.memory, "pods": str(shape.pods)}
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/os": "linux",
        "kubernetes.io/hostname": name,
        "node-role.kubernetes.io/agent": "",
        "type": "kwok",
        "rembg.io/node-kind": kind,
    }
    taints: list[dict[str, str]] = []
    if kind == "gpu":
        capacity[GPU_RESOURCE] = str(shape.gpus)
        labels[GPU_PRESENT_LABEL] = "true"
        taints.append(dict(GPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {
                KWOK_NODE_ANNOTATION: KWOK_NODE_VALUE,
                "node.alpha.kubernetes.io/ttl": "0",
            },
            "labels": labels,
        },
        "spec": {"taints": taints},
        "status": {
            "capacity": capacity,
            "allocatable": dict(capacity),
            "nodeInfo": {"architecture": "amd64", "operatingSystem": "linux"},
        },
    }


def build_default_nodes(cpu_nodes: int = 2, gpu_nodes: int = 2) -> list[dict[str, object]]:
    """The fleet every local cluster starts with: kwok-cpu-0.. and kwok-gpu-0.."""
    cpu = [build_kwok_node(f"kwok-cpu-{i}", "cpu") for i in range(cpu_nodes)]
    gpu = [build_kwok_node(f"kwok-gpu-{i}", "gpu") for i in range(gpu_nodes)]
    return cpu + gpu
