"""Fixtures for the chart tests: the pinned helm binary, a renderer, and the Lua health runner."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lupa.lua51  # Argo CD runs health checks in gopher-lua, a Lua 5.1 implementation
import pytest
import yaml
from rembg_devcluster.binaries import BUILD_HINT, locate_binaries

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rembg-operator"
VALUES_DIR = Path(__file__).resolve().parent / "values"
HEALTH_LUA = REPO / "examples" / "argocd" / "health.lua"

Manifest = dict[str, Any]
Render = Callable[..., list[Manifest]]
Helm = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(scope="session")
def helm() -> Path:
    path = locate_binaries().helm
    if not os.access(path, os.X_OK):
        pytest.fail(f"helm is not built at {path}: {BUILD_HINT}")
    return path


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm offline, with its state in a throwaway place (no repositories, no cluster)."""
    env = {**os.environ, "HELM_CACHE_HOME": "/nonexistent-cache", "KUBECONFIG": "/dev/null"}
    return subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


@pytest.fixture(scope="session")
def helm_run(helm: Path) -> Helm:
    """Runs the pinned helm with arguments, offline; returns the completed process."""

    def _run(*args: str) -> subprocess.CompletedProcess[str]:
        return run_helm(helm, *args)

    return _run


@pytest.fixture(scope="session")
def render(helm: Path) -> Render:
    """`helm template` the chart with values files/--set pairs; returns the documents."""

    def _render(
        *values_files: str, sets: tuple[str, ...] = (), namespace: str = "rembg-system"
    ) -> list[Manifest]:
        args = ["template", "rembg-operator", str(CHART), "--namespace", namespace]
        for name in values_files:
            args += ["--values", str(VALUES_DIR / name)]
        for pair in sets:
            args += ["--set", pair]
        result = run_helm(helm, *args)
        assert result.returncode == 0, result.stderr
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


def _to_lua(lua: Any, value: Any) -> Any:
    """Python JSON-like data as Lua tables, the way Argo CD hands `obj` to a health script."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


@pytest.fixture(scope="session")
def argocd_health() -> Callable[[Manifest], tuple[str, str]]:
    """Runs examples/argocd/health.lua on an object; returns (status, message)."""
    script = HEALTH_LUA.read_text()

    def _health(obj: Manifest) -> tuple[str, str]:
        lua = lupa.lua51.LuaRuntime(unpack_returned_tuples=False)
        # A JSON round trip makes numbers plain, as Argo CD's JSON-decoded objects are.
        lua.globals().obj = _to_lua(lua, json.loads(json.dumps(obj)))
        result = lua.execute(script)
        return str(result["status"]), str(result["message"])

    return _health
