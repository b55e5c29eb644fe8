"""The chart with a namespace-scoped watch (`watch.namespaces`), CRD managed outside the chart
(`crds.enabled=false`): a Role per watched namespace is enough for the operator, run as the
chart's ServiceAccount, to bring a RembgService to Ready there, and it neither can nor does touch
RembgServices anywhere else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rembg-operator"
MINIMAL = REPO / "examples" / "minimal.yaml"
CRD_FILE = REPO / "crds" / "rembg.io_rembgservices.yaml"
RELEASE = "rembg-scoped"
OPERATOR = "chart-scoped-operator"
READY_TIMEOUT = 180


def free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_established(cluster: Any, crd: str, timeout: float = 60) -> None:
    """Polls the CRD (kubectl wait errors out while a fresh object has no conditions yet)."""
    deadline = time.monotonic() + timeout
    while True:
        conditions = cluster.get_json("crd", crd).get("status", {}).get("conditions") or []
        if any(c["type"] == "Established" and c["status"] == "True" for c in conditions):
            return
        assert time.monotonic() < deadline, f"CRD {crd} not Established after {timeout}s"
        time.sleep(0.2)


def helm(cluster: Any, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["helm", *args], capture_output=True, text=True, timeout=180, env=cluster.env, check=False
    )
    assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
    return result


class Scoped:
    def __init__(self, cluster: Any, workdir: Path) -> None:
        suffix = uuid.uuid4().hex[:6]
        self.cluster = cluster
        self.workdir = workdir
        self.release_namespace = f"chart-scoped-system-{suffix}"
        self.watched = f"chart-scoped-watched-{suffix}"
        self.other = f"chart-scoped-other-{suffix}"
        self.health_port = free_port()
        self.metrics_port = free_port()

    def metric(self, name: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        return sum(
            s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == name
        )


@pytest.fixture(scope="module")
def scoped(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scoped]:
    setup = Scoped(cluster, tmp_path_factory.mktemp("chart-scoped"))
    # crds.enabled=false: the CRD comes from crds/ (another e2e module may have installed it).
    if not cluster.exists("crd", "rembgservices.rembg.io"):
        cluster.apply(CRD_FILE.read_text())
    wait_established(cluster, "rembgservices.rembg.io")
    for name in (setup.watched, setup.other):
        cluster.create_namespace(name)
        cluster.wait_for_default_service_account(name)
    helm(
        cluster,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        setup.release_namespace,
        "--create-namespace",
        "--set",
        "crds.enabled=false",
        "--set",
        f"watch.namespaces={{{setup.watched}}}",
        "--set",
        f"operator.healthPort={setup.health_port}",
        "--set",
        f"operator.metricsPort={setup.metrics_port}",
        "--wait",
        "--timeout",
        "120s",
    )
    try:
        yield setup
    finally:
        if any(r.name == OPERATOR and r.alive() for r in cluster.records):
            cluster.stop_process(OPERATOR)
            popen = cluster._popens.get(OPERATOR)  # reap it (see test_chart_install.py)
            if popen is not None:
                popen.wait(timeout=30)
        subprocess.run(
            ["helm", "uninstall", RELEASE, "-n", setup.release_namespace, "--ignore-not-found"],
            env=cluster.env,
            capture_output=True,
            timeout=120,
            check=False,
        )
        for name in (setup.watched, setup.other, setup.release_namespace):
            cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def apply_minimal(cluster: Any, namespace: str) -> str:
    manifest = yaml.safe_load(MINIMAL.read_text())
    manifest["metadata"]["namespace"] = namespace
    cluster.apply(manifest)
    return str(manifest["metadata"]["name"])


def test_roles_only_in_the_watched_namespace(scoped: Scoped) -> None:
    cluster = scoped.cluster
    roles = cluster.get_json("roles", "-A", "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert [r["metadata"]["namespace"] for r in roles["items"]] == [scoped.watched]
    fullname = f"{RELEASE}-rembg-operator"
    cluster_role = cluster.get_json("clusterrole", fullname)
    resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert not resources & {"rembgservices", "deployments", "services"}, resources

    kubeconfig = cluster.service_account_kubeconfig(
        scoped.release_namespace, fullname, scoped.workdir / "sa.kubeconfig", create=False
    )

    def can(*args: str) -> str:
        out = cluster.kubectl("auth", "can-i", *args, kubeconfig=kubeconfig, check=False)
        return str(out.stdout.strip())

    assert can("patch", "deployments.apps", "-n", scoped.watched) == "yes"
    assert can("patch", "deployments.apps", "-n", scoped.other) == "no"
    assert can("list", "rembgservices.rembg.io", "--all-namespaces") == "no"


def test_operator_reconciles_only_the_watched_namespace(scoped: Scoped) -> None:
    cluster = scoped.cluster
    fullname = f"{RELEASE}-rembg-operator"
    deployment = cluster.get_json("deployment", fullname, "-n", scoped.release_namespace)
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert f"--namespace={scoped.watched}" in container["args"]
    kubeconfig = cluster.service_account_kubeconfig(
        scoped.release_namespace, fullname, scoped.workdir / "operator.kubeconfig", create=False
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMBG_")}
    env["KUBECONFIG"] = str(kubeconfig)
    argv = [sys.executable, "-m", "rembg_operator", *container["args"]]
    # Applied before the operator starts: an operator that watched everything would see it first.
    other = apply_minimal(cluster, scoped.other)
    cluster.spawn(OPERATOR, argv, env=env, cwd=scoped.workdir)
    name = apply_minimal(cluster, scoped.watched)

    def ready() -> bool:
        obj = cluster.get_json("rembgservice", name, "-n", scoped.watched)
        conditions = obj.get("status", {}).get("conditions", [])
        return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

    def refusals() -> list[str]:
        lines = cluster.log_tail(OPERATOR, 400).splitlines()
        return [line[:400] for line in lines if "forbidden" in line.lower()]

    # Sufficient means no request is refused on the way: fail at the first Forbidden (kopf
    # would otherwise retry and fall back for minutes) instead of waiting for Ready.
    deadline = time.monotonic() + READY_TIMEOUT
    while not ready():
        assert not refusals(), "RBAC refused the operator:\n" + "\n".join(refusals()[:3])
        assert time.monotonic() < deadline, f"{name} not Ready after {READY_TIMEOUT}s"
        time.sleep(0.5)
    assert not refusals(), "RBAC refused the operator:\n" + "\n".join(refusals()[:3])
    assert scoped.metric("rembg_operator_managed_services") == 1
    untouched = cluster.get_json("rembgservice", other, "-n", scoped.other)
    assert "status" not in untouched, json.dumps(untouched.get("status"))
    assert not cluster.exists("deployment", "-n", scoped.other, "-l", f"rembg.io/service={other}")


def test_uninstall_removes_the_roles(scoped: Scoped) -> None:
    cluster = scoped.cluster
    helm(cluster, "uninstall", RELEASE, "-n", scoped.release_namespace, "--wait")
    left = cluster.get_json(
        "roles,rolebindings,clusterroles,clusterrolebindings,serviceaccounts,deployments",
        "-A",
        "-l",
        f"app.kubernetes.io/instance={RELEASE}",
    )
    assert left["items"] == []
    assert cluster.exists("crd", "rembgservices.rembg.io")
