"""The Argo CD Applications in examples/argocd point at real things: the chart path with values
its schema accepts, and a folder/include that holds a RembgService."""

from __future__ import annotations

import fnmatch
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


@pytest.mark.parametrize("name", ["application-operator.yaml", "application-rembgservice.yaml"])
def test_application_shape(name: str) -> None:
    app = application(name)
    source = app["spec"]["source"]
    assert source["repoURL"] == "REPO_URL_PLACEHOLDER", "the placeholder must stay obvious"
    assert (REPO / source["path"]).is_dir(), source["path"]
    assert app["spec"]["destination"]["server"] == "https://kubernetes.default.svc"
    assert "ServerSideApply=true" in app["spec"]["syncPolicy"]["syncOptions"]


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
