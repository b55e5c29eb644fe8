"""Fixtures for the chart tests: the pinned helm binary, a renderer, and the Lua health runner."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import lupa.lua51  # Argo CD runs health checks in gopher-lua, a Lua 5.1 implementation
import pytest
import skimage.data
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from rembg_devcluster.binaries import (
    BUILD_HINT,
    VERSIONS_FILE,
    locate_binaries,
    parse_versions_env,
)

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


# Offline commands render for the Kubernetes version we test against. (A helm built with
# `go install` defaults its capabilities to v1.20, below the chart's kubeVersion.)
KUBE_VERSION = parse_versions_env(VERSIONS_FILE.read_text())["KUBERNETES_VERSION"]


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs helm offline, with its state in a throwaway place (no repositories, no cluster)."""
    if args and args[0] in ("template", "lint"):
        args = (*args, "--kube-version", KUBE_VERSION)
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


@pytest.fixture(scope="session")
def server_metric_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Sample names the real inference server (`python -m rembg_server`: real onnxruntime, the
    real u2netp weights from U2NET_HOME) exports after serving one real image; labelled series
    appear only once observed, so one removal request comes first."""
    image = io.BytesIO()
    Image.fromarray(skimage.data.astronaut()).save(image, format="PNG")  # type: ignore[no-untyped-call]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "REMBG_HOST": "127.0.0.1",
        "REMBG_PORT": str(port),
        "REMBG_WARMUP_RUNS": "1",
        "REMBG_LOG_FORMAT": "text",
    }
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "rembg_server"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(base):
            assert server.poll() is None, f"server exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, f"server not ready: {log.read_text()[-2000:]}"
            time.sleep(0.2)
        removed = httpx.post(
            f"{base}/v1/remove",
            content=image.getvalue(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
        assert removed.status_code == 200, removed.text
        exposition = _metrics_after_canary(base, deadline=time.monotonic() + 120)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)
    return {
        sample.name
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def _metrics_after_canary(base: str, deadline: float) -> str:
    """/metrics once the canary's first run is in it (it runs right after warmup, so this
    rarely waits)."""
    while True:
        exposition = httpx.get(f"{base}/metrics", timeout=10).text
        if "rembg_canary_success{" in exposition:
            return exposition
        assert time.monotonic() < deadline, "no canary run in /metrics"
        time.sleep(0.2)


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
