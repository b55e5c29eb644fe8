"""`helm lint --strict` and `helm template` of charts/rembg-operator with default and
non-default values; the schema rejects what it must."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "rembg-operator"
VALUES_DIR = Path(__file__).resolve().parent / "values"
NON_DEFAULT = sorted(p.name for p in VALUES_DIR.glob("*.yaml"))
RESTRICTED_POD = {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
Render = Callable[..., list[dict[str, Any]]]
Helm = Callable[..., subprocess.CompletedProcess[str]]
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


@pytest.mark.parametrize("values", [None, *NON_DEFAULT])
def test_helm_lint_strict(helm_run: Helm, values: str | None) -> None:
    args = ["lint", "--strict", str(CHART)]
    if values:
        args += ["--values", str(VALUES_DIR / values)]
    result = helm_run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def kinds(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


def test_default_render(render: Render) -> None:
    docs = render()
    assert kinds(docs) == [
        ("ClusterRole", "rembg-operator"),
        ("ClusterRoleBinding", "rembg-operator"),
        ("CustomResourceDefinition", "rembgservices.rembg.io"),
        ("Deployment", "rembg-operator"),
        ("ServiceAccount", "rembg-operator"),
    ]
    for doc in docs:
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "rembg-operator"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


def deployment(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (only,) = find(docs, "Deployment")
    return only


def test_deployment_runs_one_restricted_operator(render: Render) -> None:
    dep = deployment(render())
    spec = dep["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "rembg-operator"
    assert RESTRICTED_POD.items() <= pod["securityContext"].items()
    (container,) = pod["containers"]
    assert RESTRICTED_CONTAINER.items() <= container["securityContext"].items()
    assert container["image"] == "ghcr.io/rembg-fleet/operator:0.1.0"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]["memory"]
    assert "--all-namespaces" in container["args"]


def test_probes_hit_the_liveness_endpoint_the_operator_serves(render: Render) -> None:
    (container,) = deployment(render(sets=("operator.healthPort=8181",)))["spec"]["template"][
        "spec"
    ]["containers"]
    assert "--liveness-port=8181" in container["args"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["health"] == 8181
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}


def test_crd_is_a_kept_template_with_the_generated_schema(render: Render) -> None:
    (crd,) = find(render(), "CustomResourceDefinition")
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    source = yaml.safe_load((CHART / "files" / "crds" / "rembg.io_rembgservices.yaml").read_text())
    assert crd["spec"] == source["spec"]


def test_namespaced_scope_gets_a_role_per_namespace(render: Render) -> None:
    docs = render("namespaced.yaml")
    roles = find(docs, "Role")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = find(docs, "RoleBinding")
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "rembg-operator", "namespace": "rembg-system"}
        ]
        assert binding["roleRef"]["kind"] == "Role"
    # Namespaced permissions never leak into the ClusterRole.
    cluster_resources = {
        r for rule in find(docs, "ClusterRole")[0]["rules"] for r in rule["resources"]
    }
    role_resources = {r for rule in roles[0]["rules"] for r in rule["resources"]}
    assert not cluster_resources & role_resources
    assert "rembgservices" in role_resources
    (container,) = deployment(docs)["spec"]["template"]["spec"]["containers"]
    assert "--namespace=team-a" in container["args"]
    assert "--namespace=team-b" in container["args"]
    assert "--all-namespaces" not in container["args"]
    assert container["args"][-1] == "--log-format=json"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    (crd,) = find(docs, "CustomResourceDefinition")
    assert "helm.sh/resource-policy" not in (crd["metadata"].get("annotations") or {})


def test_crds_off_and_existing_service_account(render: Render) -> None:
    docs = render("no-crds.yaml")
    assert not find(docs, "CustomResourceDefinition")
    assert not find(docs, "ServiceAccount")
    pod = deployment(docs)["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "platform-rembg-operator"
    (binding,) = find(docs, "ClusterRoleBinding")
    assert binding["subjects"][0]["name"] == "platform-rembg-operator"
    assert pod["containers"][0]["image"].endswith("@sha256:" + "0123456789abcdef" * 4)
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert pod["priorityClassName"] == "system-cluster-critical"


def test_monitoring_on(render: Render) -> None:
    docs = render("monitoring.yaml")
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["rembg-system"]}
    (service,) = find(docs, "Service")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    pod_labels = deployment(docs)["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (dashboards,) = find(docs, "ConfigMap")
    assert dashboards["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboards["metadata"]["annotations"] == {"grafana_folder": "rembg"}
    source = CHART / "files" / "dashboards" / "rembg-fleet.json"
    assert dashboards["data"]["rembg-fleet.json"] == source.read_text().rstrip("\n")


def test_monitoring_off_by_default(render: Render) -> None:
    docs = render()
    assert not find(docs, "ServiceMonitor")
    assert not find(docs, "ConfigMap")


@pytest.mark.parametrize(
    ("setting", "complaint"),
    [
        ("serviceMonitor.enabeld=true", "enabeld"),  # misspelt key
        ("watchNamespaces={a}", "watchNamespaces"),  # unknown top-level key
        ("image.pullPolicy=Sometimes", "pullPolicy"),  # not an enum value
        ("watch.namespaces={Not_A_Namespace}", "namespaces"),  # not a DNS-1123 label
        ("operator.healthPort=0", "healthPort"),
        ("securityContext.privileged=true", "privileged"),
        ("resources.limits.gpu=1", "gpu"),
    ],
)
def test_schema_rejects(helm_run: Helm, setting: str, complaint: str) -> None:
    for command in ("template", "lint"):
        result = helm_run(command, str(CHART), "--set", setting)
        assert result.returncode != 0, f"{command} accepted {setting}"
        assert complaint in result.stdout + result.stderr
