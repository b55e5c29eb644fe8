"""The Argo CD Applications in examples/argocd point at real things: the chart path with values
its schema accepts, a folder/include that holds a RembgService, and an app of apps that syncs
exactly those two, the chart's wave first."""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lupa.lua51  # gopher-lua, which runs Argo CD health checks, is Lua 5.1
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ARGOCD = REPO / "examples" / "argocd"
Helm = Callable[..., subprocess.CompletedProcess[str]]


def application(name: str) -> dict[str, Any]:
    app: dict[str, Any] = yaml.safe_load((ARGOCD / name).read_text())
    assert app["apiVersion"] == "argoproj.io/v1alpha1"
    assert app["kind"] == "Application"
    return app


CHILDREN = ["application-operator.yaml", "application-rembgservice.yaml"]
ROOT = "root-application.yaml"


@pytest.mark.parametrize("name", [*CHILDREN, ROOT])
def test_application_shape(name: str) -> None:
    app = application(name)
    source = app["spec"]["source"]
    assert source["repoURL"] == "REPO_URL_PLACEHOLDER", "the placeholder must stay obvious"
    assert source["targetRevision"] == "main"
    assert (REPO / source["path"]).is_dir(), source["path"]
    assert app["metadata"]["namespace"] == "argocd"
    assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
    assert app["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}


@pytest.mark.parametrize("name", CHILDREN)
def test_children_apply_server_side_and_cascade_on_delete(name: str) -> None:
    app = application(name)
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]
    assert app["metadata"]["finalizers"] == ["resources-finalizer.argocd.argoproj.io"]


def _wave(app: dict[str, Any]) -> int:
    return int(app["metadata"].get("annotations", {}).get("argocd.argoproj.io/sync-wave", "0"))


def test_root_application_syncs_exactly_the_two_applications_chart_first() -> None:
    root = application(ROOT)
    source = root["spec"]["source"]
    assert root["spec"]["destination"]["namespace"] == "argocd"
    include = source["directory"]["include"]
    # Argo CD's include is a glob with {a,b} alternatives: expand it the same way.
    assert include.startswith("{"), include
    assert include.endswith("}"), include
    patterns = include[1:-1].split(",")
    folder = REPO / source["path"]
    synced = sorted(
        p.name
        for p in folder.iterdir()
        if p.suffix in {".yaml", ".yml", ".json"}
        and any(fnmatch.fnmatch(p.name, g) for g in patterns)
    )
    assert synced == sorted(CHILDREN)
    waves = {name: _wave(application(name)) for name in CHILDREN}
    assert waves["application-operator.yaml"] < waves["application-rembgservice.yaml"], waves
    # The root has no finalizer: deleting it must not cascade to the operator and the fleet.
    assert "finalizers" not in root["metadata"]


def test_argocd_cm_snippet_judges_applications_for_the_app_of_apps() -> None:
    snippet = yaml.safe_load((ARGOCD / "argocd-cm-health.yaml").read_text())
    assert "resource.customizations.health.argoproj.io_Application" in snippet["data"]


def test_operator_application_values_pass_the_chart_schema(helm_run: Helm, tmp_path: Path) -> None:
    source = application("application-operator.yaml")["spec"]["source"]
    assert source["path"] == "charts/rembg-operator"
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump(source["helm"]["valuesObject"]))
    result = helm_run(
        "template", source["helm"]["releaseName"], str(REPO / source["path"]), "-f", str(values)
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout) if doc}
    assert {"Deployment", "ServiceMonitor", "ConfigMap", "CustomResourceDefinition"} <= kinds


def test_rembgservice_application_syncs_a_rembgservice() -> None:
    source = application("application-rembgservice.yaml")["spec"]["source"]
    folder = REPO / source["path"]
    included = [
        p for p in folder.iterdir() if fnmatch.fnmatch(p.name, source["directory"]["include"])
    ]
    assert included, f"{source['directory']['include']} matches nothing in {folder}"
    for path in included:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
        assert docs
        assert all(d["apiVersion"] == "rembg.io/v1alpha1" for d in docs)
        assert all(d["kind"] == "RembgService" for d in docs)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, ("Progressing", "")),
        ({}, ("Progressing", "")),
        ({"health": {"status": "Healthy"}}, ("Healthy", "")),
        ({"health": {"status": "Degraded", "message": "m"}}, ("Degraded", "m")),
    ],
)
def test_application_health_lua_reports_the_child_applications_own_health(
    status: dict[str, Any] | None, expected: tuple[str, str]
) -> None:
    """Under Lua 5.1 (lupa): the Application's status.health, Progressing until it has one
    (so the app of apps waits for a wave's Application instead of passing it at once)."""
    lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=False)
    obj: dict[str, Any] = {"metadata": {"name": "child"}}
    if status is not None:
        obj["status"] = status

    def table(value: Any) -> Any:
        if isinstance(value, dict):
            return lua.table_from({k: table(v) for k, v in value.items()})
        return value

    lua.globals().obj = table(obj)
    result = lua.execute((ARGOCD / "application-health.lua").read_text())
    assert (str(result["status"]), str(result["message"])) == expected
