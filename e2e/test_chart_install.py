"""The Helm chart on the local control plane, with the operator running as the chart's own
ServiceAccount (a TokenRequest token, not admin):

1. `helm install` (ServiceMonitor and dashboard on): every chart object is accepted by the real
   API server and the operator Deployment becomes Available (on a KWOK node);
2. `python -m rembg_operator` with the Deployment's own args/env and the ServiceAccount's token
   reconciles examples/minimal.yaml to Ready with all its children, repairs a deleted child and
   reports an invalid spec: the RBAC is sufficient;
3. the same with one verb removed from the ClusterRole fails (Forbidden), and recovers when the
   verb comes back: the RBAC is not merely broad;
4. `helm upgrade` changes the operator and keeps the CRD (same object, now chart-managed);
5. `helm uninstall` leaves the CRD (keep policy) and nothing else of the chart.

With REMBG_CAPTURE_FIXTURES=1 the RembgServices seen in each state are written to
tests/chart/fixtures/ for the health.lua tests.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "rembg-operator"
MINIMAL = REPO / "examples" / "minimal.yaml"
FIXTURES = REPO / "tests" / "chart" / "fixtures"
RELEASE = "rembg-operator"
RELEASE_NAMESPACE = "rembg-system"
CRD = "rembgservices.rembg.io"
OPERATOR = "chart-operator"
READY_TIMEOUT = 180
# Kinds the chart can create; after uninstall none may remain with the release's label.
CHART_KINDS = (
    "deployments,serviceaccounts,services,configmaps,roles,rolebindings,"
    "clusterroles,clusterrolebindings,servicemonitors"
)
CHILD_KINDS = (
    "deployments,services,horizontalpodautoscalers,poddisruptionbudgets,"
    "servicemonitors,prometheusrules"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Release:
    cluster: Any
    workdir: Path
    health_port: int
    metrics_port: int
    notes: str = ""

    def helm(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["helm", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**self.cluster.env, "HELM_CACHE_HOME": str(self.workdir / "helm-cache")},
            check=False,
        )
        assert result.returncode == 0, f"helm {' '.join(args)}:\n{result.stdout}{result.stderr}"
        return result

    def container(self) -> dict[str, Any]:
        deployment = self.cluster.get_json("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        return dict(container)

    def start_operator(self) -> None:
        """Runs the operator the way the chart's Deployment does, as the chart's ServiceAccount."""
        container = self.container()
        kubeconfig = self.cluster.service_account_kubeconfig(
            RELEASE_NAMESPACE,
            container_service_account(self.cluster),
            self.workdir / "operator.kubeconfig",
            create=False,
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("REMBG_")}
        env["KUBECONFIG"] = str(kubeconfig)
        # The chart sets only literal variables (operator.env); copy them as the kubelet would.
        env.update({var["name"]: var["value"] for var in container.get("env", [])})
        argv = [sys.executable, "-m", "rembg_operator", *container["args"]]
        self.cluster.spawn(OPERATOR, argv, env=env, cwd=self.workdir)
        wait_until(lambda: http_ok(self.health_port), 60, "operator /healthz")

    def operator_metric(self, name: str, **labels: str) -> float:
        """Sum of the operator's own samples `name` whose labels include `labels`."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5
        ) as response:
            text = response.read().decode()
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def operator_running(self) -> bool:
        return any(r.name == OPERATOR and r.alive() for r in self.cluster.records)

    def stop_operator(self) -> None:
        self.cluster.stop_process(OPERATOR)
        # stop() can return after the process died but before its Popen was reaped, and the
        # unreaped Popen later raises ResourceWarning (an error under filterwarnings=error).
        popen = self.cluster._popens.get(OPERATOR)
        if popen is not None:
            popen.wait(timeout=30)


def container_service_account(cluster: Any) -> str:
    deployment = cluster.get_json("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    return str(deployment["spec"]["template"]["spec"]["serviceAccountName"])


def http_ok(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.5)


def adopt_existing_crd(cluster: Any) -> None:
    """Another e2e module may have applied crds/ with kubectl: hand the CRD to this release the
    way users adopt existing objects into Helm (ownership label and annotations)."""
    if not cluster.exists("crd", CRD):
        return
    cluster.kubectl("label", "--overwrite", "crd", CRD, "app.kubernetes.io/managed-by=Helm")
    cluster.kubectl(
        "annotate",
        "--overwrite",
        "crd",
        CRD,
        f"meta.helm.sh/release-name={RELEASE}",
        f"meta.helm.sh/release-namespace={RELEASE_NAMESPACE}",
    )


@pytest.fixture(scope="module")
def release(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    installed = Release(
        cluster, tmp_path_factory.mktemp("chart"), health_port=free_port(), metrics_port=free_port()
    )
    adopt_existing_crd(cluster)
    installed.notes = installed.helm(
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        "--create-namespace",
        "--set",
        f"operator.healthPort={installed.health_port}",
        "--set",
        f"operator.metricsPort={installed.metrics_port}",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "dashboards.enabled=true",
        "--wait",
        "--timeout",
        "120s",
    ).stdout
    try:
        yield installed
    finally:
        if installed.operator_running():
            installed.stop_operator()
        subprocess.run(
            ["helm", "uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--ignore-not-found"],
            env=cluster.env,
            capture_output=True,
            timeout=120,
            check=False,
        )


def rembgservice(cluster: Any, namespace: str, name: str) -> dict[str, Any]:
    return dict(cluster.get_json("rembgservice", name, "-n", namespace))


def conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in obj.get("status", {}).get("conditions", [])}


def capture(obj: dict[str, Any], name: str) -> None:
    """Writes a RembgService seen in a real run as a health.lua test fixture (opt-in)."""
    if os.environ.get("REMBG_CAPTURE_FIXTURES") != "1":
        return
    cleaned = copy.deepcopy(obj)
    for key in ("managedFields", "uid", "resourceVersion", "creationTimestamp"):
        cleaned["metadata"].pop(key, None)
    cleaned["metadata"].get("annotations", {}).pop(
        "kubectl.kubernetes.io/last-applied-configuration", None
    )
    FIXTURES.mkdir(parents=True, exist_ok=True)
    (FIXTURES / f"{name}.yaml").write_text(
        "# Captured from a real e2e run (e2e/test_chart_install.py); health = file name prefix.\n"
        + yaml.safe_dump(cleaned, sort_keys=False)
    )


def apply_minimal(cluster: Any, namespace: str) -> str:
    manifest = yaml.safe_load(MINIMAL.read_text())
    manifest["metadata"]["namespace"] = namespace
    cluster.apply(manifest)
    return str(manifest["metadata"]["name"])


def patch_spec(cluster: Any, namespace: str, name: str, spec: dict[str, Any]) -> None:
    cluster.kubectl(
        "patch", "rembgservice", name, "-n", namespace, "--type=merge",
        "-p", json.dumps({"spec": spec}),
    )  # fmt: skip


def children(cluster: Any, namespace: str, owner_uid: str) -> list[dict[str, Any]]:
    listed = cluster.get_json(CHILD_KINDS, "-n", namespace)
    return [
        item
        for item in listed["items"]
        if any(ref["uid"] == owner_uid for ref in item["metadata"].get("ownerReferences", []))
    ]


def test_install_creates_every_chart_object(release: Release) -> None:
    cluster = release.cluster
    # NOTES.txt tells the user what to apply next.
    notes = release.notes.split("NOTES:", 1)[1]
    assert "kubectl apply -n default -f examples/minimal.yaml" in notes
    assert "--for=condition=Ready rembgservice" in notes
    assert "ServiceMonitor rembg-operator" in notes
    assert "kubectl delete crd rembgservices.rembg.io" in notes
    for kind, name in [
        ("serviceaccount", "rembg-operator"),
        ("service", "rembg-operator-metrics"),
        ("servicemonitor", "rembg-operator"),
        ("configmap", "rembg-operator-dashboards"),
    ]:
        assert cluster.exists(kind, name, "-n", RELEASE_NAMESPACE), f"{kind}/{name}"
    assert cluster.exists("clusterrole", "rembg-operator")
    assert cluster.exists("clusterrolebinding", "rembg-operator")
    crd = cluster.get_json("crd", CRD)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    cluster.wait_for("--for=condition=Established", f"crd/{CRD}", timeout=60)
    deployment = cluster.get_json("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    assert deployment["status"].get("availableReplicas") == 1


def test_operator_with_the_chart_token_reconciles_minimal_example(
    release: Release, namespace: str
) -> None:
    cluster = release.cluster
    # The token really is the ServiceAccount's, and it is not an admin.
    kubeconfig = release.workdir / "probe.kubeconfig"
    cluster.service_account_kubeconfig(
        RELEASE_NAMESPACE, container_service_account(cluster), kubeconfig, create=False
    )
    whoami = cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{RELEASE_NAMESPACE}:rembg-operator"
    for forbidden in ("create secrets", "delete nodes", "create clusterroles"):
        can = cluster.kubectl(
            "auth", "can-i", *forbidden.split(), kubeconfig=kubeconfig, check=False
        )
        assert can.stdout.strip() == "no", forbidden

    release.start_operator()
    try:
        name = apply_minimal(cluster, namespace)
        wait_until(lambda: conditions(rembgservice(cluster, namespace, name)), 60, "first status")
        first = rembgservice(cluster, namespace, name)
        if conditions(first).get("Ready", {}).get("status") != "True":
            capture(first, "progressing-just-created")
        cluster.wait_for(
            f"rembgservice/{name}", "-n", namespace, "--for=condition=Ready", timeout=READY_TIMEOUT
        )
        obj = rembgservice(cluster, namespace, name)
        capture(obj, "healthy-minimal-ready")
        assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
        owned = children(cluster, namespace, obj["metadata"]["uid"])
        kinds = {item["kind"] for item in owned}
        assert {"Deployment", "Service"} <= kinds, kinds
        # Every child the operator lists in its inventory exists and is owned by the resource.
        inventory = {(c["kind"], c["name"]) for c in obj["status"]["inventory"]}
        assert inventory == {(i["kind"], i["metadata"]["name"]) for i in owned}
        for item in owned:
            if item["kind"] == "Deployment":
                assert item["status"].get("availableReplicas", 0) >= 1, item["metadata"]["name"]
        assert "Forbidden" not in json.dumps(obj["status"])
        # The chart-token operator is the one that did it: its own metrics count the reconciles.
        assert release.operator_metric("rembg_operator_reconciles_total", kind="full") >= 1

        # Drift repair needs watch + create on children: delete a pool and see it come back.
        deployment = next(i for i in owned if i["kind"] == "Deployment")
        old_uid = deployment["metadata"]["uid"]
        cluster.kubectl("delete", "deployment", deployment["metadata"]["name"], "-n", namespace)

        def recreated() -> bool:
            found = cluster.kubectl(
                "get", "deployment", deployment["metadata"]["name"], "-n", namespace,
                "-o", "jsonpath={.metadata.uid}", "--ignore-not-found",
            ).stdout.strip()  # fmt: skip
            return bool(found) and found != old_uid

        wait_until(recreated, 90, "the deleted pool Deployment to be recreated")

        # An invalid spec the schema cannot catch: Stalled (Degraded for Argo CD).
        patch_spec(cluster, namespace, name, {"models": ["no-such-model"]})
        cluster.wait_for(
            f"rembgservice/{name}", "-n", namespace, "--for=condition=Stalled", timeout=60
        )
        capture(rembgservice(cluster, namespace, name), "degraded-invalid-spec")

        # A spec change the operator has not observed yet (it is stopped): stale status.
        release.stop_operator()
        patch_spec(cluster, namespace, name, {"models": ["u2netp"]})
        stale = rembgservice(cluster, namespace, name)
        assert stale["status"]["observedGeneration"] < stale["metadata"]["generation"]
        capture(stale, "progressing-spec-not-yet-observed")
    finally:
        if release.operator_running():
            release.stop_operator()


def one_verb_removed(cluster_role: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The ClusterRole without `patch` on Deployments: the operator server-side-applies its
    children, so it cannot create or repair a pool without it."""
    weakened = copy.deepcopy(cluster_role)
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        weakened["metadata"].pop(key, None)
    for rule in weakened["rules"]:
        if "apps" in rule["apiGroups"] and "deployments" in rule["resources"]:
            assert "patch" in rule["verbs"], rule
            rule["verbs"] = [v for v in rule["verbs"] if v != "patch"]
            return weakened, "patch deployments.apps"
    pytest.fail("the ClusterRole has no rule for deployments.apps")


def test_one_verb_less_and_the_operator_fails(release: Release, namespace: str) -> None:
    cluster = release.cluster
    original = cluster.get_json("clusterrole", "rembg-operator")
    weakened, removed = one_verb_removed(original)
    cluster.kubectl("replace", "-f", "-", input=json.dumps(weakened))
    release.start_operator()
    try:
        name = apply_minimal(cluster, namespace)

        def refused() -> bool:
            obj = rembgservice(cluster, namespace, name)
            ready = conditions(obj).get("Ready", {}).get("status")
            assert ready != "True", f"Ready without {removed}: the verb is not needed"
            denied = release.operator_metric("rembg_operator_api_requests_total", code="403")
            return denied > 0 or "forbidden" in cluster.log_tail(OPERATOR, 200).lower()

        wait_until(refused, 90, f"a Forbidden error without {removed}")
        obj = rembgservice(cluster, namespace, name)
        if any(conditions(obj).get(t, {}).get("status") == "True" for t in ("Degraded", "Stalled")):
            capture(obj, "degraded-forbidden")
        assert not cluster.exists("deployment", "-n", namespace, "-l", f"rembg.io/service={name}")

        # Give the verb back: the same operator process recovers on its own.
        restored = copy.deepcopy(original)
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            restored["metadata"].pop(key, None)
        cluster.kubectl("replace", "-f", "-", input=json.dumps(restored))
        cluster.wait_for(
            f"rembgservice/{name}", "-n", namespace, "--for=condition=Ready", timeout=READY_TIMEOUT
        )
    finally:
        if release.operator_running():
            release.stop_operator()


def test_upgrade_changes_the_operator_and_keeps_the_crd(release: Release) -> None:
    """The CRD is a template, so `helm upgrade` manages it (Helm never upgrades crds/)."""
    cluster = release.cluster
    before = cluster.get_json("crd", CRD)["metadata"]["uid"]
    release.helm(
        "upgrade", RELEASE, str(CHART), "-n", RELEASE_NAMESPACE, "--reuse-values",
        "--set", "operator.logLevel=debug", "--wait", "--timeout", "120s",
    )  # fmt: skip
    assert "--log-level=DEBUG" in release.container()["args"]
    crd = cluster.get_json("crd", CRD)
    assert crd["metadata"]["uid"] == before, "an upgrade must never recreate the CRD"
    assert crd["metadata"]["labels"]["helm.sh/chart"] == "rembg-operator-0.1.0"
    assert crd["metadata"]["annotations"]["meta.helm.sh/release-name"] == RELEASE
    deployment = cluster.get_json("deployment", RELEASE, "-n", RELEASE_NAMESPACE)
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    assert deployment["metadata"]["generation"] >= 2


def test_uninstall_keeps_the_crd_and_nothing_else(release: Release) -> None:
    cluster = release.cluster
    release.helm("uninstall", RELEASE, "-n", RELEASE_NAMESPACE, "--wait", "--timeout", "120s")
    crd = cluster.get_json("crd", CRD)
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    left = cluster.get_json(CHART_KINDS, "-A", "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert [f"{i['kind']}/{i['metadata']['name']}" for i in left["items"]] == []
    releases = release.helm("list", "-A", "-o", "json")
    assert json.loads(releases.stdout) == []
