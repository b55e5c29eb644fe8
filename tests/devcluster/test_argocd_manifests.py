"""The Argo CD stack's pure parts: argocd-cm as a user has it after merging our snippet, the
objects argocd-server would have made, the components' command lines and environments (nothing
outside the workdir), reading an Application's status, and the Git fork (a real `git`, no
cluster)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rembg_devcluster.argocd import (
    REPO_URL_PLACEHOLDER,
    GitRepo,
    app_state,
    argocd_binaries,
    build_argocd_cm,
    build_argocd_secret,
    build_component_env,
    build_controller_args,
    build_default_project,
    build_repo_server_args,
    seconds,
    with_repo_url,
)
from rembg_devcluster.errors import BinaryMissingError, DevClusterError

REPO = Path(__file__).resolve().parents[2]
SNIPPET = REPO / "examples" / "argocd" / "argocd-cm-health.yaml"


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_argocd_cm_carries_the_shipped_snippet_keys_verbatim() -> None:
    snippet = yaml.safe_load(SNIPPET.read_text())
    cm = build_argocd_cm(snippet, "7s")
    assert cm["metadata"]["name"] == "argocd-cm"
    assert cm["metadata"]["namespace"] == "argocd"
    assert cm["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    assert cm["data"].pop("timeout.reconciliation") == "7s"
    assert cm["data"] == snippet["data"]
    assert set(cm["data"]) == {
        "resource.customizations.health.rembg.io_RembgService",
        "resource.customizations.health.argoproj.io_Application",
    }


def test_argocd_cm_refuses_anything_but_the_argocd_cm_snippet() -> None:
    with pytest.raises(DevClusterError):
        build_argocd_cm({"kind": "ConfigMap", "metadata": {"name": "other"}, "data": {}})


def test_secret_and_default_project_are_what_argocd_server_would_create() -> None:
    secret = build_argocd_secret("k")
    assert secret["stringData"] == {"server.secretkey": "k"}
    assert secret["metadata"]["labels"]["app.kubernetes.io/part-of"] == "argocd"
    project = build_default_project()
    assert project["metadata"] == {"name": "default", "namespace": "argocd"}
    assert project["spec"]["sourceRepos"] == ["*"]


def test_components_listen_on_loopback_and_talk_plaintext() -> None:
    repo = build_repo_server_args(Path("/b/argocd-repo-server"), 1, 2, "127.0.0.1:3")
    assert _flag(repo, "--address") == "127.0.0.1"
    assert _flag(repo, "--metrics-address") == "127.0.0.1"
    assert _flag(repo, "--redis") == "127.0.0.1:3"
    assert "--disable-tls" in repo
    controller = build_controller_args(
        Path("/b/argocd-application-controller"),
        Path("/k/admin.kubeconfig"),
        repo_server="127.0.0.1:1",
        redis="127.0.0.1:3",
        metrics_port=4,
        reconciliation_seconds=10,
    )
    assert _flag(controller, "--namespace") == "argocd"
    assert _flag(controller, "--repo-server") == "127.0.0.1:1"
    assert "--repo-server-plaintext" in controller
    assert _flag(controller, "--app-resync") == "10"
    assert _flag(controller, "--app-resync-jitter") == "0"
    assert "--persist-resource-health" in controller


def test_environment_keeps_every_path_in_the_workdir(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin", "ARGOCD_SERVER": "elsewhere", "LANG": "C"}
    kubeconfig = tmp_path / "admin.kubeconfig"
    env = build_component_env(base, tmp_path, [Path("/helm")], "10s", kubeconfig)
    assert "ARGOCD_SERVER" not in env  # nothing of the caller's Argo CD leaks in
    assert env["LANG"] == "C"
    assert env["PATH"].split(os.pathsep) == ["/helm", "/usr/bin"]
    assert env["ARGOCD_GPG_ENABLED"] == "false"
    assert env["ARGOCD_FAKE_IN_CLUSTER"] == "true"
    assert env["KUBECONFIG"] == str(kubeconfig)
    assert env["ARGOCD_RECONCILIATION_TIMEOUT"] == "10s"
    for key in (
        "HOME",
        "TMPDIR",
        "ARGOCD_TLS_DATA_PATH",
        "ARGOCD_SSH_DATA_PATH",
        "ARGOCD_GNUPGHOME",
        "ARGOCD_ASK_PASS_SOCK",
        "ARGOCD_APP_CONF_PATH",
    ):
        assert Path(env[key]).is_relative_to(tmp_path), key
    repo_env = build_component_env(base, tmp_path, [], "10s")
    assert "ARGOCD_FAKE_IN_CLUSTER" not in repo_env


@pytest.mark.parametrize(("text", "expected"), [("10s", 10), ("2m", 120), ("1h", 3600), ("90", 90)])
def test_seconds(text: str, expected: int) -> None:
    assert seconds(text) == expected


def test_app_state_reads_sync_health_and_resource_health() -> None:
    app: dict[str, Any] = {
        "status": {
            "sync": {"status": "Synced", "revision": "abc"},
            "health": {"status": "Degraded"},
            "operationState": {"phase": "Succeeded"},
            "resources": [
                {
                    "kind": "RembgService",
                    "name": "demo",
                    "health": {"status": "Degraded", "message": "m"},
                }
            ],
        }
    }
    state = app_state(app)
    assert (state.sync, state.health, state.operation, state.revision) == (
        "Synced",
        "Degraded",
        "Succeeded",
        "abc",
    )
    assert state.resource_health("RembgService", "demo") == ("Degraded", "m")
    assert state.resource_health("RembgService", "other") == (None, None)
    assert app_state(None).sync is None


def test_with_repo_url_replaces_every_placeholder() -> None:
    text = f"a: {REPO_URL_PLACEHOLDER}\nb: {REPO_URL_PLACEHOLDER}\n"
    assert with_repo_url(text, "file:///r.git") == "a: file:///r.git\nb: file:///r.git\n"


def test_a_missing_build_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        BinaryMissingError, match=r"missing Argo CD v9\.9\.9 build: .*make binaries"
    ):
        argocd_binaries(tmp_path, "v9.9.9")


def _show(repo: GitRepo, revision: str, path: str) -> str:
    return subprocess.run(
        ["git", "--git-dir", str(repo.bare), "show", f"{revision}:{path}"],
        capture_output=True,
        text=True,
        check=True,
        env=repo.env,
    ).stdout


def test_git_repo_is_a_fork_of_the_working_tree_with_commits_and_reverts(tmp_path: Path) -> None:
    repo = GitRepo.create(tmp_path, REPO)
    first = repo.head()
    root = _show(repo, "main", "examples/argocd/root-application.yaml")
    assert REPO_URL_PLACEHOLDER not in root
    assert f"repoURL: {repo.url}" in root
    assert repo.url.startswith("file:///")
    assert _show(repo, "main", "charts/rembg-operator/Chart.yaml")
    changed = repo.commit("examples/minimal.yaml", "changed\n", "change")
    assert _show(repo, "main", "examples/minimal.yaml") == "changed\n"
    reverted = repo.revert()
    assert reverted != changed
    assert _show(repo, "main", "examples/minimal.yaml") == _show(
        repo, first, "examples/minimal.yaml"
    )
    repo.remove("examples/argocd/application-rembgservice.yaml", "remove")
    listing = subprocess.run(
        ["git", "--git-dir", str(repo.bare), "ls-tree", "--name-only", "main", "examples/argocd/"],
        capture_output=True,
        text=True,
        check=True,
        env=repo.env,
    ).stdout
    assert "application-rembgservice.yaml" not in listing
