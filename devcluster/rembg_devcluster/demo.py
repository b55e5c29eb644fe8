"""`make run`: the whole local fleet in one command.

Starts the control plane, installs the CRDs, runs the operator, applies examples/minimal.yaml,
waits for the RembgService to be Ready, and removes the background of one real photo.

Where the host can run a real node (Linux, root, `make setup images` done), the sample's pod
runs our inference image on it and the photo goes through the Service's ClusterIP. Elsewhere
the pods are KWOK simulations, so one real inference server process serves the photo, and the
demo says in one line why there is no real node.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import yaml
from PIL import Image
from skimage import data

from rembg_devcluster.cluster import ClusterConfig, DevCluster, stop_from_state
from rembg_devcluster.errors import DevClusterError, KubectlError
from rembg_devcluster.images import load_image_index
from rembg_devcluster.ports import free_port
from rembg_devcluster.process import raise_if_dead
from rembg_devcluster.real_node import missing_host_parts

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
SERVER_READY_TIMEOUT_SECONDS = 180.0
SERVICE_READY_TIMEOUT_SECONDS = 180


@dataclass(frozen=True)
class DemoResult:
    cluster: DevCluster
    service: str
    namespace: str
    server_url: str
    cutout: Path


def require_package(module: str, who: str) -> None:
    """Fails with one clear line when a package another part of the project provides is absent."""
    if importlib.util.find_spec(module) is None:
        raise DevClusterError(
            f"demo needs `python -m {module.removesuffix('.__main__')}` ({who}), which is not "
            "installed in this checkout yet"
        )


def install_project_crds(cluster: DevCluster, crds_dir: Path) -> list[str]:
    """Applies crds/*.yaml and waits until the API server serves them."""
    files = sorted(crds_dir.glob("*.yaml"))
    if not files:
        raise DevClusterError(f"no CRDs in {crds_dir}; run `make crds` first")
    return cluster.install_crds(files)


def wait_for_http_ok(url: str, timeout: float, cluster: DevCluster, process: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raise_if_dead(cluster.process(process))
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise DevClusterError(
        f"{process} not ready at {url} after {timeout:.0f}s:\n{cluster.log_tail(process)}"
    )


def wait_for_ready_service(cluster: DevCluster, name: str, namespace: str) -> None:
    """Waits for the Ready condition; on timeout says what the resource and the operator report."""
    resource = f"rembgservice/{name}"
    try:
        cluster.wait_for(
            resource,
            "-n",
            namespace,
            "--for=condition=Ready",
            timeout=SERVICE_READY_TIMEOUT_SECONDS,
        )
    except KubectlError as error:
        status = cluster.kubectl(
            "get", resource, "-n", namespace, "-o", "jsonpath={.status}", check=False
        )
        raise DevClusterError(
            f"{resource} not Ready after {SERVICE_READY_TIMEOUT_SECONDS}s ({error}); "
            f"its status: {status.stdout or '(none)'}\n"
            f"operator log:\n{cluster.log_tail('operator', 20)}"
        ) from error


def sample_photo_png() -> bytes:
    """A real photograph shipped inside scikit-image's wheel (no download), as PNG bytes."""
    buffer = io.BytesIO()
    photo = data.astronaut()  # type: ignore[no-untyped-call]  # skimage ships no annotations here
    Image.fromarray(photo).save(buffer, format="PNG")
    return buffer.getvalue()


def remove_background(server_url: str, image: bytes) -> tuple[bytes, dict[str, str]]:
    response = httpx.post(
        f"{server_url}/v1/remove",
        content=image,
        headers={"Content-Type": "image/png", "Accept": "image/png"},
        timeout=120.0,
    )
    if response.status_code != 200:
        raise DevClusterError(
            f"POST /v1/remove answered {response.status_code}: {response.text[:300]}"
        )
    return response.content, dict(response.headers.items())


def real_node_missing(config: ClusterConfig) -> list[str]:
    """What this host lacks for a real node (empty: the demo runs real pods)."""
    binaries = [config.binaries.kubelet, config.binaries.kube_proxy]
    return missing_host_parts(binaries, load_image_index(config.images_index))


def run_demo(state_dir: Path, example: Path, real_node: bool = True) -> DemoResult:
    require_package("rembg_operator.__main__", "the operator")
    require_package("rembg_server.__main__", "the inference server")
    if not example.exists():
        raise DevClusterError(f"{example} is missing")
    if stop_from_state(state_dir):
        log.info(f"demo: stopped the previous cluster in {state_dir}")
    config = ClusterConfig(state_dir=state_dir)
    missing = real_node_missing(config) if real_node else ["--kwok-only"]
    if missing:
        log.info("demo: no real node (it needs %s); pods run on KWOK nodes", "; ".join(missing))
    else:
        # The real node is the only CPU node, so the sample's pod runs there.
        config = ClusterConfig(state_dir=state_dir, real_node=True, cpu_nodes=0, gpu_nodes=1)
    log.info("demo: starting etcd, kube-apiserver, controller-manager, scheduler and the nodes")
    cluster = DevCluster.start(config)
    try:
        return _run_on(cluster, example)
    except BaseException:
        log.error("demo: failed; logs are in %s", cluster.layout.logs)  # noqa: TRY400
        cluster.stop()
        raise


@dataclass(frozen=True)
class _Served:
    """Where the sample's cutout came from: the Service (real pods) or a host process."""

    server_url: str
    via: str


def _run_on(cluster: DevCluster, example: Path) -> DemoResult:
    ready_after = cluster.state.timings_seconds["ready"]
    log.info("demo: control plane up at %s in %ss", cluster.state.server, ready_after)
    crds = install_project_crds(cluster, REPO_ROOT / "crds")
    log.info(f"demo: installed CRDs {', '.join(crds)}")
    cluster.spawn("operator", [sys.executable, "-m", "rembg_operator"])
    log.info(f"demo: operator running (log: {cluster.layout.log('operator')})")
    real = cluster.state.node is not None
    served = None if real else _start_host_server(cluster)
    name, namespace = _apply_example(cluster, example)
    wait_for_ready_service(cluster, name, namespace)
    where = "run our image on the real node" if real else "run on KWOK nodes"
    log.info(f"demo: rembgservice/{name} is Ready; its pods {where}:")
    log.info(
        cluster.kubectl("get", "rembgservice,deploy,pods", "-n", namespace, "-o", "wide").stdout
    )
    if served is None:
        service = cluster.get_json("service", name, "-n", namespace)
        served = _Served(f"http://{service['spec']['clusterIP']}", "Service")
    else:
        wait_for_http_ok(
            f"{served.server_url}/readyz", SERVER_READY_TIMEOUT_SECONDS, cluster, "rembg-server"
        )
    cutout_png, headers = _remove_with_retries(served.server_url)
    cutout = cluster.layout.root / "astronaut-cutout.png"
    cutout.write_bytes(cutout_png)
    timing = {k: v for k, v in headers.items() if k.lower().startswith(("x-", "server-timing"))}
    log.info(
        f"demo: the {served.via} at {served.server_url} removed the background: {cutout} {timing}"
    )
    return DemoResult(cluster, name, namespace, served.server_url, cutout)


def _start_host_server(cluster: DevCluster) -> _Served:
    """KWOK pods run nothing: one real server process serves the demo's photo."""
    port = free_port()
    server_env = dict(os.environ, REMBG_HOST="127.0.0.1", REMBG_PORT=str(port))
    cluster.spawn("rembg-server", [sys.executable, "-m", "rembg_server"], env=server_env)
    return _Served(f"http://127.0.0.1:{port}", "real inference server")


def _apply_example(cluster: DevCluster, example: Path) -> tuple[str, str]:
    doc = yaml.safe_load(example.read_text())
    name = doc["metadata"]["name"]
    namespace = doc["metadata"].get("namespace", "default")
    cluster.apply(example.read_text(), "-n", namespace)
    log.info("demo: applied %s (rembgservice/%s in %s)", example, name, namespace)
    return name, namespace


def _remove_with_retries(server_url: str) -> tuple[bytes, dict[str, str]]:
    """kube-proxy programs a Service's endpoint a moment after its pod turns Ready."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT_SECONDS
    while True:
        try:
            return remove_background(server_url, sample_photo_png())
        except (httpx.HTTPError, DevClusterError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
