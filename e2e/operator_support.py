"""Helpers for the operator's end-to-end tests: the CRD, a real `python -m rembg_operator`
process per test (watching only that test's namespace), and bounded waits.

Pods are simulated by KWOK: the image never runs, readiness comes from KWOK's stages.
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO = Path(__file__).resolve().parents[1]
CRD_FILE = REPO / "crds" / "rembg.io_rembgservices.yaml"
EXAMPLES = REPO / "examples"
CHILD_KINDS = (
    "deployments.apps",
    "services",
    "horizontalpodautoscalers.autoscaling",
    "poddisruptionbudgets.policy",
    "servicemonitors.monitoring.coreos.com",
    "prometheusrules.monitoring.coreos.com",
)
WAIT_SECONDS = 120.0

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def install_crd(cluster: Any) -> None:
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    # kubectl wait errors out while .status.conditions is still absent: poll instead.
    eventually(
        lambda: (
            condition(get(cluster, "default", "crd", "rembgservices.rembg.io"), "Established").get(
                "status"
            )
            == "True"
        ),
        what="the RembgService CRD to be established",
        timeout=60,
    )


def eventually(
    probe: Callable[[], T | None], *, what: str, timeout: float = WAIT_SECONDS, every: float = 0.5
) -> T:
    """Polls until probe returns something truthy; fails with `what` after timeout."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


@dataclass
class OperatorProcess:
    cluster: Any
    name: str
    namespace: str
    metrics_port: int
    liveness_port: int
    extra_env: dict[str, str]

    def start(self) -> None:
        env = {
            **self.cluster.env,
            "REMBG_OPERATOR_NAMESPACES": self.namespace,
            "REMBG_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "REMBG_OPERATOR_LIVENESS_PORT": str(self.liveness_port),
            "REMBG_OPERATOR_BIND_ADDRESS": "127.0.0.1",
            "REMBG_OPERATOR_LOG_FORMAT": "json",
            **self.extra_env,
        }
        self.cluster.spawn(self.name, [sys.executable, "-m", "rembg_operator"], env=env)
        eventually(self.healthy, what=f"operator liveness on :{self.liveness_port}", timeout=60)

    def healthy(self) -> bool:
        with contextlib.suppress(OSError):
            url = f"http://127.0.0.1:{self.liveness_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        return False

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text: str = response.read().decode()
            return text

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        total = 0.0
        for line in self.metrics().splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        self.cluster.kill_process(self.name)

    def stop(self) -> None:
        self.cluster.stop_process(self.name, grace_seconds=10)

    def log(self, lines: int = 80) -> str:
        tail: str = self.cluster.log_tail(self.name, lines)
        return tail


@contextlib.contextmanager
def running_operator(cluster: Any, namespace: str, **extra_env: str) -> Iterator[OperatorProcess]:
    operator = OperatorProcess(
        cluster=cluster,
        name=f"operator-{namespace}",
        namespace=namespace,
        metrics_port=free_port(),
        liveness_port=free_port(),
        extra_env=extra_env,
    )
    operator.start()
    try:
        yield operator
    finally:
        operator.stop()


def example(name: str, **overrides: Any) -> dict[str, Any]:
    """An example manifest from examples/, with top-level spec keys replaced."""
    manifest: dict[str, Any] = yaml.safe_load((EXAMPLES / name).read_text())
    manifest["spec"].update(overrides)
    return manifest


def rembg_service(name: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": name},
        "spec": spec,
    }


def kubectl_apply(
    cluster: Any, namespace: str, manifest: dict[str, Any], check: bool = True
) -> Any:
    """Client-side `kubectl apply`, the way users apply examples."""
    return cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input=json.dumps(manifest), check=check
    )


def get(cluster: Any, namespace: str, *what: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", "-n", namespace, *what, "-o", "json", check=False)
    if result.returncode != 0:
        return None
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def condition(resource: dict[str, Any] | None, kind: str) -> dict[str, Any]:
    for entry in ((resource or {}).get("status") or {}).get("conditions") or []:
        if entry.get("type") == kind:
            return dict(entry)
    return {}


def wait_ready(cluster: Any, namespace: str, name: str, timeout: float = WAIT_SECONDS) -> None:
    """`kubectl wait --for=condition=Ready`, as users do; on timeout, say what was seen."""
    result = cluster.kubectl(
        "wait",
        f"rembgservice/{name}",
        "-n",
        namespace,
        "--for=condition=Ready",
        f"--timeout={int(timeout)}s",
        check=False,
        timeout=timeout + 30,
    )
    if result.returncode == 0:
        return
    service = get(cluster, namespace, "rembgservice", name)
    nodes = cluster.kubectl("get", "nodes", check=False).stdout
    pods = cluster.kubectl(
        "get", "deployments,pods", "-n", namespace, "-o", "wide", check=False
    ).stdout
    raise AssertionError(
        f"{name} not Ready after {timeout:.0f}s: {result.stderr}\n"
        f"status: {json.dumps((service or {}).get('status'), indent=1)}\n{nodes}\n{pods}"
    )


def wait_condition(
    cluster: Any, namespace: str, name: str, kind: str, status: str, reason: str | None = None
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        found = condition(get(cluster, namespace, "rembgservice", name), kind)
        if found.get("status") == status and (reason is None or found.get("reason") == reason):
            return found
        return None

    return eventually(probe, what=f"{name}: {kind}={status} ({reason})")


def children(cluster: Any, namespace: str, service: str) -> dict[str, set[str]]:
    """Names of the service's children, by kind (found through the operator's label)."""
    found: dict[str, set[str]] = {}
    for kind in CHILD_KINDS:
        listing = get(cluster, namespace, kind, "-l", f"rembg.io/service={service}")
        found[kind] = {i["metadata"]["name"] for i in (listing or {}).get("items", [])}
    return found


def assert_deployment_drift_repaired(cluster: Any, namespace: str, deployment: str) -> None:
    """The operator puts a pool's Deployment back: deleted, it is recreated (a new uid); its
    container image edited by hand, the image is restored."""
    original = get(cluster, namespace, "deployment", deployment)
    assert original is not None
    image = original["spec"]["template"]["spec"]["containers"][0]["image"]
    cluster.kubectl("delete", "deployment", deployment, "-n", namespace)
    eventually(
        lambda: (
            (d := get(cluster, namespace, "deployment", deployment))
            and d["metadata"]["uid"] != original["metadata"]["uid"]
        ),
        what=f"the deleted Deployment {deployment} to be recreated",
    )
    patch = {
        "spec": {"template": {"spec": {"containers": [{"name": "server", "image": "evil:1"}]}}}
    }
    cluster.kubectl("patch", "deployment", deployment, "-n", namespace, "-p", json.dumps(patch))
    eventually(
        lambda: (
            (d := get(cluster, namespace, "deployment", deployment))
            and d["spec"]["template"]["spec"]["containers"][0]["image"] == image
        ),
        what=f"the edited image of {deployment} to be restored",
    )
