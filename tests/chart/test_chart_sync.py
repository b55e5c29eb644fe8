"""One source of truth each: the chart's CRD is crds/ (written by `make crds`), its RBAC is
operator/rembg_operator/rbac.py, the argocd-cm snippet is health.lua. These fail on drift."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from rembg_operator import rbac

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rembg-operator"
Render = Callable[..., list[dict[str, Any]]]


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chart_generate", CHART / "hack" / "generate.py")
    assert spec
    assert spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_crds_are_the_bytes_of_crds_dir() -> None:
    source = {p.name: p.read_bytes() for p in (REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert source, "crds/ is empty: run `make crds`"
    assert chart == source, "charts/rembg-operator/files/crds/ drifted from crds/: run `make crds`"


def test_generated_files_are_up_to_date() -> None:
    generator = load_generator()
    for path, build in generator.GENERATED.items():
        assert path.read_text() == build(), f"{path} is stale: run `make chart`"


def test_argocd_cm_snippet_carries_both_health_checks_verbatim() -> None:
    snippet = yaml.safe_load((REPO / "examples" / "argocd" / "argocd-cm-health.yaml").read_text())
    assert snippet["kind"] == "ConfigMap"
    assert snippet["metadata"]["name"] == "argocd-cm"
    folder = REPO / "examples" / "argocd"
    assert snippet["data"] == {
        "resource.customizations.health.rembg.io_RembgService": (folder / "health.lua").read_text(),
        "resource.customizations.health.argoproj.io_Application": (
            folder / "application-health.lua"
        ).read_text(),
    }


def permissions(rules: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """Rules flattened to (apiGroup, resource, verb) triples: equal triples, equal power."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def operator_rules() -> dict[str, list[dict[str, Any]]]:
    rules: dict[str, list[dict[str, Any]]] = load_generator().operator_rules()
    return rules


def test_cluster_wide_rbac_is_exactly_what_the_operator_uses(render: Render) -> None:
    wanted = operator_rules()
    docs = render()
    (role,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert permissions(role["rules"]) == permissions(
        wanted["clusterRules"] + wanted["namespacedRules"]
    )


def test_namespaced_rbac_is_exactly_what_the_operator_uses(render: Render) -> None:
    wanted = operator_rules()
    docs = render("namespaced.yaml")
    for role in (d for d in docs if d["kind"] == "Role"):
        assert permissions(role["rules"]) == permissions(wanted["namespacedRules"])
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    granted = permissions(r for role in cluster_roles for r in role["rules"])
    assert granted == permissions(wanted["clusterRules"])


def test_no_wildcards() -> None:
    wanted = operator_rules()
    for group, resource, verb in permissions(wanted["clusterRules"] + wanted["namespacedRules"]):
        assert "*" not in (group, resource, verb)


def test_chart_roles_grant_what_the_operators_own_builders_grant(render: Render) -> None:
    """Cross-check against rbac.py's own ClusterRole/Role builders (used by the operator e2e)."""
    (cluster_role,) = [d for d in render() if d["kind"] == "ClusterRole"]
    assert permissions(cluster_role["rules"]) == permissions(rbac.build_cluster_role()["rules"])
    role, cluster_part = rbac.build_namespaced_roles()
    docs = render("namespaced.yaml")
    chart_role = next(d for d in docs if d["kind"] == "Role")
    (chart_cluster_part,) = [d for d in docs if d["kind"] == "ClusterRole"]
    assert permissions(chart_role["rules"]) == permissions(role["rules"])
    assert permissions(chart_cluster_part["rules"]) == permissions(cluster_part["rules"])
