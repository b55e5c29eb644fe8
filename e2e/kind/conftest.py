"""The kind suite's cluster (`make e2e-kind`; its `kind_smoke` subset runs in `make test`).

One kind cluster per session, from e2e/kind/kind-config.yaml (a control plane, a CPU worker, a
"GPU" worker), on the host's Docker engine or, where none runs, on one we start and stop
(rembg_devcluster.docker_engine). The node image is kind's default where it can be pulled, else
the one devcluster/build-kind-node.sh builds offline. Our images go into the workers with
`kind load image-archive`, as users load theirs; the GPU worker advertises nvidia.com/gpu
capacity as run.sh always did (an extended resource patched into its status).

At the end the cluster is deleted, our engine (if we started one) stopped, and the host
compared with what it was: any difference fails the session.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from rembg_devcluster.binaries import cache_dir
from rembg_devcluster.docker_engine import DockerEngine, existing_engine, start_private_engine
from rembg_devcluster.errors import DevClusterError
from rembg_devcluster.images import load_image_index
from rembg_devcluster.kind import KindCluster, cluster_config_for_host, ensure_node_image

TOPOLOGY = Path(__file__).with_name("kind-config.yaml")
GPU_LABEL = "nvidia.com/gpu.present"
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
CONTROL_PLANE = "node-role.kubernetes.io/control-plane"
GPUS_PER_NODE = "4"


@dataclass
class Kind:
    cluster: KindCluster
    engine: DockerEngine
    gpu_nodes: list[str]
    cpu_nodes: list[str]


def _engine(workdir: Path) -> DockerEngine:
    found = existing_engine()
    if found is not None:
        print("\nkind: using the host's Docker engine")
        return found
    # A short path: the engine's unix socket lives under it.
    root = Path(f"/run/rembg-fleet-docker-{os.getpid()}")
    engine = start_private_engine(root, cache_dir() / "docker", workdir / "dockerd.log")
    print(f"\nkind: started our own Docker engine ({engine.host}, images in {cache_dir()}/docker)")
    return engine


def _workers(cluster: KindCluster) -> tuple[list[str], list[str]]:
    nodes = {
        n["metadata"]["name"]: n["metadata"]["labels"] for n in cluster.get_json("nodes")["items"]
    }
    workers = {name: labels for name, labels in nodes.items() if CONTROL_PLANE not in labels}
    gpu = [name for name, labels in workers.items() if labels.get(GPU_LABEL) == "true"]
    return gpu, [name for name in workers if name not in gpu]


def _advertise_gpus(cluster: KindCluster, node: str) -> None:
    patch = [{"op": "add", "path": "/status/capacity/nvidia.com~1gpu", "value": GPUS_PER_NODE}]
    cluster.kubectl(
        "patch", "node", node, "--subresource=status", "--type=json", "-p", json.dumps(patch)
    )


@pytest.fixture(scope="session")
def kind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kind]:
    workdir = tmp_path_factory.mktemp("kind")
    images = load_image_index()
    assert images is not None, "no build/images.json: run `make images`"
    engine = _engine(workdir)
    problems: list[str] = []
    try:
        started = time.monotonic()
        image, cni = ensure_node_image(engine, workdir / "build-kind-node.log")
        print(
            f"kind: node image {image or 'kind default'} ready in {time.monotonic() - started:.0f}s"
        )
        config = cluster_config_for_host(
            yaml.safe_load(TOPOLOGY.read_text()), own_cni=cni is not None
        )
        cluster = KindCluster(f"rembg-e2e-{os.getpid()}", engine, workdir)
        route = None
        try:
            try:
                cluster.create(config, image, cni)
            except Exception:
                with contextlib.suppress(DevClusterError, subprocess.TimeoutExpired):
                    cluster.logs(workdir / "kind-logs")
                    print(f"kind: create failed; `kind export logs` wrote {workdir / 'kind-logs'}")
                raise
            print(
                f"kind: cluster {cluster.name} created in {cluster.timings['kind_create']:.0f}s, "
                f"nodes Ready at {cluster.timings['nodes_ready']:.0f}s"
            )
            gpu, cpu = _workers(cluster)
            assert gpu, f"kind-config.yaml makes a GPU worker: {gpu} {cpu}"
            assert cpu, f"kind-config.yaml makes a CPU worker: {gpu} {cpu}"
            loading = time.monotonic()
            for name in ("server", "operator"):
                cluster.load_archive(images.images[name].archive, nodes=cpu)
            took = time.monotonic() - loading
            print(f"kind: server and operator images loaded into {cpu} in {took:.0f}s")
            for node in gpu:
                _advertise_gpus(cluster, node)
            route = cluster.route_services()
            yield Kind(cluster, engine, gpu, cpu)
        finally:
            if route:
                cluster.unroute_services(route)
            cluster.delete()
    finally:
        problems = engine.stop()
    assert problems == [], f"the host is not as it was before kind ran: {problems}"
    checked = "sysctls, iptables, mounts, links, routes, cgroups" if engine.ours else "sysctls"
    print(f"\nkind: cluster and engine gone; the host is as it was ({checked} compared)")
