"""Argo CD as GitOps users run it, beside the local control plane, syncing from a local Git repo.

    repo = GitRepo.create(workdir / "git", source=repo_root, folders=("charts", "examples"))
    stack = ArgoCdStack.start(cluster, workdir / "argocd", health_snippet)
    stack.apply_application(manifest)
    stack.application("rembg-operator")["status"]["sync"]["status"]
    stack.stop()

What runs where, all on 127.0.0.1:
- Argo CD's application controller and repo server, built from the `github.com/argoproj/argo-cd/v3`
  module (build-binaries.sh, one binary linked under both names), as processes of the cluster
  (`cluster.spawn`, so `cluster.stop()` stops them). The argocd-server, Dex, the ApplicationSet
  and notifications controllers are not run: nothing here needs the UI, the API or SSO.
- Redis from Debian (`redis-server`), no persistence, the cache both components share.
- The controller's destination `https://kubernetes.default.svc` (the in-cluster one every shipped
  Application names) is the local API server: `ARGOCD_FAKE_IN_CLUSTER=true` with `KUBECONFIG`
  is Argo CD's own local-development switch (`Cluster.RawRestConfig`), so the Applications from
  examples/argocd sync verbatim.
- In namespace `argocd`: Argo CD's CRDs (Application, AppProject, from the module's manifests),
  `argocd-cm` carrying the health checks exactly as users merge them, `argocd-secret`,
  `argocd-rbac-cm` and the `default` AppProject (argocd-server creates the last two at start).
- Git: a bare repository on disk, served as `file://` (Argo CD's own e2e tests do the same),
  made from the working tree the way a user's fork holds it (`GitRepo`).

The controller's metrics server binds 0.0.0.0 (hard-coded upstream: `appcontroller.go`); it serves
only metrics and /healthz. Everything else listens on 127.0.0.1. Nothing is written outside the
workdir: HOME, TMPDIR and every Argo CD data path point into it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from rembg_devcluster.binaries import (
    VERSIONS_FILE,
    cache_dir,
    locate_binaries,
    parse_versions_env,
)
from rembg_devcluster.cluster import DevCluster
from rembg_devcluster.errors import BinaryMissingError, DevClusterError
from rembg_devcluster.ports import free_port
from rembg_devcluster.waiting import wait_until

Manifest = dict[str, Any]

NAMESPACE = "argocd"
PART_OF = {"app.kubernetes.io/part-of": "argocd"}
REPO_URL_PLACEHOLDER = "REPO_URL_PLACEHOLDER"
REDIS_PROCESS = "argocd-redis"
REPO_SERVER_PROCESS = "argocd-repo-server"
CONTROLLER_PROCESS = "argocd-application-controller"
BUILD_HINT = "run `make binaries` (devcluster/build-binaries.sh) first"
# argocd-cm's timeout.reconciliation: how often Argo CD re-reads Git and re-compares every app.
# Upstream's manifests pass it to both components as ARGOCD_RECONCILIATION_TIMEOUT.
DEFAULT_RECONCILIATION = "10s"


# ---- what the build left -----------------------------------------------------------------------


@dataclass(frozen=True)
class ArgoCdBinaries:
    controller: Path
    repo_server: Path
    crds: tuple[Path, ...]
    version: str


def argocd_version() -> str:
    return parse_versions_env(VERSIONS_FILE.read_text())["ARGOCD_VERSION"]


def argocd_binaries(root: Path | None = None, version: str | None = None) -> ArgoCdBinaries:
    """The cached Argo CD build for the pinned version; BinaryMissingError names what is absent."""
    version = version or argocd_version()
    folder = (root or cache_dir()) / "bin" / f"argocd-{version}"
    found = ArgoCdBinaries(
        controller=folder / "argocd-application-controller",
        repo_server=folder / "argocd-repo-server",
        crds=(folder / "crds" / "application-crd.yaml", folder / "crds" / "appproject-crd.yaml"),
        version=version,
    )
    missing = [str(p) for p in (found.controller, found.repo_server) if not os.access(p, os.X_OK)]
    missing += [str(p) for p in found.crds if not p.is_file()]
    if missing:
        raise BinaryMissingError(
            f"missing Argo CD {version} build: {', '.join(missing)}; {BUILD_HINT}"
        )
    return found


def host_tool(name: str, package: str) -> Path:
    found = shutil.which(name)
    if found is None:
        raise BinaryMissingError(
            f"no {name} binary; `make system-deps` installs Debian's {package}"
        )
    return Path(found)


# ---- manifests (pure) --------------------------------------------------------------------------


def build_namespace(namespace: str = NAMESPACE) -> Manifest:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}


def build_argocd_cm(
    snippet: Mapping[str, Any],
    reconciliation: str = DEFAULT_RECONCILIATION,
    namespace: str = NAMESPACE,
) -> Manifest:
    """argocd-cm as a user has it after merging our snippet: the snippet's data keys verbatim
    (health checks), plus a short reconciliation timeout."""
    if snippet.get("kind") != "ConfigMap" or snippet["metadata"]["name"] != "argocd-cm":
        raise DevClusterError("the health snippet must be the argocd-cm ConfigMap we ship")
    labels = {"app.kubernetes.io/name": "argocd-cm", **PART_OF}
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "argocd-cm", "namespace": namespace, "labels": labels},
        "data": {"timeout.reconciliation": reconciliation, **copy.deepcopy(snippet["data"])},
    }


def build_argocd_secret(server_key: str, namespace: str = NAMESPACE) -> Manifest:
    """argocd-secret with the one key the settings manager insists on (server.secretkey)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "argocd-secret",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "argocd-secret", **PART_OF},
        },
        "type": "Opaque",
        "stringData": {"server.secretkey": server_key},
    }


def build_rbac_cm(namespace: str = NAMESPACE) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "argocd-rbac-cm",
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "argocd-rbac-cm", **PART_OF},
        },
        "data": {},
    }


def build_default_project(namespace: str = NAMESPACE) -> Manifest:
    """The `default` AppProject argocd-server creates on start: any repo, any destination."""
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "AppProject",
        "metadata": {"name": "default", "namespace": namespace},
        "spec": {
            "sourceRepos": ["*"],
            "destinations": [{"server": "*", "namespace": "*"}],
            "clusterResourceWhitelist": [{"group": "*", "kind": "*"}],
        },
    }


def with_repo_url(text: str, repo_url: str) -> str:
    """A shipped manifest's text as a user's fork holds it: the placeholder replaced."""
    return text.replace(REPO_URL_PLACEHOLDER, repo_url)


def build_redis_args(binary: Path, port: int, workdir: Path) -> list[str]:
    return [
        str(binary),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
        "--logfile",
        "",
    ]


def build_repo_server_args(binary: Path, port: int, metrics_port: int, redis: str) -> list[str]:
    return [
        str(binary),
        "--address",
        "127.0.0.1",
        "--port",
        str(port),
        "--metrics-address",
        "127.0.0.1",
        "--metrics-port",
        str(metrics_port),
        "--redis",
        redis,
        # Plaintext gRPC on loopback; the controller connects with --repo-server-plaintext.
        "--disable-tls",
        "--logformat",
        "text",
    ]


def build_controller_args(
    binary: Path,
    kubeconfig: Path,
    *,
    repo_server: str,
    redis: str,
    metrics_port: int,
    reconciliation_seconds: int,
    namespace: str = NAMESPACE,
) -> list[str]:
    return [
        str(binary),
        "--kubeconfig",
        str(kubeconfig),
        "--namespace",
        namespace,
        "--repo-server",
        repo_server,
        "--repo-server-plaintext",
        "--redis",
        redis,
        "--metrics-port",
        str(metrics_port),
        "--app-resync",
        str(reconciliation_seconds),
        "--app-resync-jitter",
        "0",
        # Retry a failed repo fetch soon (the default grace is resync + jitter, 3 min).
        "--repo-error-grace-period-seconds",
        str(reconciliation_seconds),
        # Self-heal at once, then back off 1 s, 2 s, ... 10 s.
        "--self-heal-timeout-seconds",
        "0",
        "--self-heal-backoff-timeout-seconds",
        "1",
        "--self-heal-backoff-factor",
        "2",
        "--self-heal-backoff-cap-seconds",
        "10",
        # v3 keeps per-resource health in Redis for the UI only; persisting it in the
        # Application's status (controller.resource.health.persist=true) lets kubectl, and
        # these tests, read the health message our Lua check returns.
        "--persist-resource-health",
        "--status-processors",
        "4",
        "--operation-processors",
        "2",
        "--logformat",
        "text",
    ]


def build_component_env(
    base: Mapping[str, str],
    workdir: Path,
    path_dirs: Sequence[Path],
    reconciliation: str,
    kubeconfig: Path | None = None,
) -> dict[str, str]:
    """Environment of a component: every Argo CD data path, HOME and TMPDIR under workdir (the
    defaults are /app/config/... and /tmp), no GPG, PATH with our helm and the host's git."""
    env = {k: v for k, v in base.items() if not k.startswith("ARGOCD_")}
    data = workdir / "data"
    env.update(
        HOME=str(workdir / "home"),
        TMPDIR=str(workdir / "tmp"),
        PATH=os.pathsep.join([*map(str, path_dirs), base.get("PATH", "/usr/bin:/bin")]),
        ARGOCD_GPG_ENABLED="false",
        ARGOCD_GNUPGHOME=str(data / "gpg" / "keys"),
        ARGOCD_GPG_DATA_PATH=str(data / "gpg" / "source"),
        ARGOCD_TLS_DATA_PATH=str(data / "tls"),
        ARGOCD_SSH_DATA_PATH=str(data / "ssh"),
        ARGOCD_APP_CONF_PATH=str(data / "app-config"),
        ARGOCD_PLUGINSOCKFILEPATH=str(data / "plugins"),
        ARGOCD_ASK_PASS_SOCK=str(workdir / "askpass.sock"),
        ARGOCD_RECONCILIATION_TIMEOUT=reconciliation,
    )
    if kubeconfig is not None:
        env.update(KUBECONFIG=str(kubeconfig), ARGOCD_FAKE_IN_CLUSTER="true")
    return env


def seconds(duration: str) -> int:
    """'10s' / '2m' / '90' as whole seconds (the forms timeout.reconciliation takes here)."""
    units = {"s": 1, "m": 60, "h": 3600}
    if duration and duration[-1] in units:
        return int(float(duration[:-1]) * units[duration[-1]])
    return int(duration)


# ---- reading Applications (pure) ----------------------------------------------------------------


@dataclass(frozen=True)
class AppState:
    """What Argo CD says about one Application, flattened."""

    sync: str | None  # Synced | OutOfSync | Unknown
    health: str | None  # Healthy | Progressing | Degraded | Missing | Suspended | Unknown
    operation: str | None  # the current/last sync operation's phase
    revision: str | None
    resources: tuple[Mapping[str, Any], ...]

    def resource(self, kind: str, name: str) -> Mapping[str, Any] | None:
        for entry in self.resources:
            if entry.get("kind") == kind and entry.get("name") == name:
                return entry
        return None

    def resource_health(self, kind: str, name: str) -> tuple[str | None, str | None]:
        entry = self.resource(kind, name) or {}
        health = entry.get("health") or {}
        return health.get("status"), health.get("message")


def app_state(app: Mapping[str, Any] | None) -> AppState:
    status = (app or {}).get("status") or {}
    sync = status.get("sync") or {}
    return AppState(
        sync=sync.get("status"),
        health=(status.get("health") or {}).get("status"),
        operation=(status.get("operationState") or {}).get("phase"),
        revision=sync.get("revision"),
        resources=tuple(status.get("resources") or ()),
    )


# ---- the Git repository ------------------------------------------------------------------------


def _git(*args: str, cwd: Path, env: Mapping[str, str]) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise DevClusterError(f"git {' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout.strip()


def git_env(home: Path) -> dict[str, str]:
    """git with no user or system config: a fixed identity, HOME in the workdir."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "rembg-fleet e2e",
        "GIT_AUTHOR_EMAIL": "e2e@rembg-fleet.invalid",
        "GIT_COMMITTER_NAME": "rembg-fleet e2e",
        "GIT_COMMITTER_EMAIL": "e2e@rembg-fleet.invalid",
    }


@dataclass
class GitRepo:
    """A bare repository served as file://, and the clone the tests commit from, like a user's
    fork: the working tree's folders, REPO_URL_PLACEHOLDER replaced by the repo's URL, branch
    main."""

    bare: Path
    clone: Path
    env: dict[str, str]
    branch: str = "main"

    @property
    def url(self) -> str:
        return self.bare.as_uri()

    @classmethod
    def create(
        cls,
        workdir: Path,
        source: Path,
        folders: Sequence[str] = ("charts", "examples"),
        branch: str = "main",
    ) -> GitRepo:
        host_tool("git", "git")
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "home").mkdir(exist_ok=True)
        env = git_env(workdir / "home")
        bare, clone = workdir / "rembg-fleet.git", workdir / "clone"
        _git(
            "init",
            "--quiet",
            "--bare",
            f"--initial-branch={branch}",
            str(bare),
            cwd=workdir,
            env=env,
        )
        _git("init", "--quiet", f"--initial-branch={branch}", str(clone), cwd=workdir, env=env)
        repo = cls(bare, clone, env, branch)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
        for folder in folders:
            shutil.copytree(source / folder, clone / folder, ignore=ignore)
        for path in sorted(clone.rglob("*.yaml")):
            text = path.read_text()
            if REPO_URL_PLACEHOLDER in text:
                path.write_text(with_repo_url(text, repo.url))
        _git("remote", "add", "origin", repo.url, cwd=clone, env=env)
        repo._commit_all("the fleet's charts and examples")
        return repo

    def _commit_all(self, message: str) -> str:
        _git("add", "-A", ".", cwd=self.clone, env=self.env)
        _git("commit", "--quiet", "-m", message, cwd=self.clone, env=self.env)
        _git("push", "--quiet", "origin", f"HEAD:{self.branch}", cwd=self.clone, env=self.env)
        return self.head()

    def head(self) -> str:
        return _git("rev-parse", "HEAD", cwd=self.clone, env=self.env)

    def read(self, path: str) -> str:
        return (self.clone / path).read_text()

    def commit(self, path: str, content: str, message: str) -> str:
        """Writes one file, commits and pushes; returns the new revision."""
        target = self.clone / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content)
        return self._commit_all(message)

    def remove(self, path: str, message: str) -> str:
        (self.clone / path).unlink()
        return self._commit_all(message)

    def revert(self, revision: str = "HEAD") -> str:
        """`git revert` of one commit, pushed; returns the new revision."""
        _git("revert", "--no-edit", revision, cwd=self.clone, env=self.env)
        _git("push", "--quiet", "origin", f"HEAD:{self.branch}", cwd=self.clone, env=self.env)
        return self.head()


# ---- the running stack -------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=5).status_code == 200


@dataclass
class ArgoCdStack:
    cluster: DevCluster
    workdir: Path
    binaries: ArgoCdBinaries
    redis: str
    repo_server: str
    controller_metrics: str

    @classmethod
    def start(
        cls,
        cluster: DevCluster,
        workdir: Path,
        health_snippet: Mapping[str, Any],
        *,
        reconciliation: str = DEFAULT_RECONCILIATION,
        timeout: float = 180.0,
    ) -> ArgoCdStack:
        """Redis, the repo server, Argo CD's objects in namespace argocd, then the controller;
        returns once the controller answers /healthz."""
        binaries = argocd_binaries()
        redis_binary = host_tool("redis-server", "redis-server")
        git = host_tool("git", "git")
        helm = locate_binaries().helm
        if not os.access(helm, os.X_OK):
            raise BinaryMissingError(f"no helm at {helm}; {BUILD_HINT}")
        for sub in ("home", "tmp", "redis", "data"):
            (workdir / sub).mkdir(parents=True, exist_ok=True)
        redis = f"127.0.0.1:{free_port()}"
        repo_port, repo_metrics, controller_metrics = free_port(), free_port(), free_port()
        stack = cls(
            cluster,
            workdir,
            binaries,
            redis,
            f"127.0.0.1:{repo_port}",
            f"http://127.0.0.1:{controller_metrics}",
        )
        path_dirs = [helm.parent, git.parent]
        try:
            cluster.spawn(
                REDIS_PROCESS,
                build_redis_args(redis_binary, int(redis.rpartition(":")[2]), workdir / "redis"),
            )
            stack._wait("redis", timeout, stack._redis_ready, REDIS_PROCESS)
            cluster.spawn(
                REPO_SERVER_PROCESS,
                build_repo_server_args(binaries.repo_server, repo_port, repo_metrics, redis),
                env=build_component_env(os.environ, workdir, path_dirs, reconciliation),
                cwd=workdir,
            )
            stack._wait(
                "the Argo CD repo server",
                timeout,
                lambda: _http_ok(f"http://127.0.0.1:{repo_metrics}/healthz?full=true"),
                REPO_SERVER_PROCESS,
            )
            cluster.apply(build_namespace())
            cluster.install_crds(list(binaries.crds))
            cluster.apply(
                [
                    build_argocd_cm(health_snippet, reconciliation),
                    build_argocd_secret(secrets.token_urlsafe(32)),
                    build_rbac_cm(),
                    build_default_project(),
                ]
            )
            cluster.spawn(
                CONTROLLER_PROCESS,
                build_controller_args(
                    binaries.controller,
                    cluster.kubeconfig,
                    repo_server=stack.repo_server,
                    redis=redis,
                    metrics_port=controller_metrics,
                    reconciliation_seconds=seconds(reconciliation),
                ),
                env=build_component_env(
                    os.environ, workdir, path_dirs, reconciliation, cluster.kubeconfig
                ),
                cwd=workdir,
            )
            stack._wait(
                "the Argo CD application controller",
                timeout,
                lambda: _http_ok(f"{stack.controller_metrics}/healthz"),
                CONTROLLER_PROCESS,
            )
        except BaseException:
            stack.stop()
            raise
        return stack

    def _redis_ready(self) -> bool:
        host, _, port = self.redis.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")

    def _wait(self, what: str, timeout: float, probe: Callable[[], bool], process: str) -> None:
        wait_until(what, timeout, probe, lambda: self.cluster.log_tail(process))

    # -- Applications

    def apply_application(self, manifest: Mapping[str, Any] | str) -> None:
        """kubectl apply -n argocd, as the docs tell users to (client-side)."""
        rendered = manifest if isinstance(manifest, str) else dict(manifest)
        self.cluster.apply(rendered, "-n", NAMESPACE, server_side=False)

    def application(self, name: str) -> Manifest | None:
        result = self.cluster.kubectl(
            "get", "application", name, "-n", NAMESPACE, "-o", "json", check=False
        )
        if result.returncode != 0:
            return None
        parsed: Manifest = json.loads(result.stdout)
        return parsed

    def state(self, name: str) -> AppState:
        return app_state(self.application(name))

    def refresh(self, name: str) -> None:
        """What `argocd app get --refresh` does: the refresh annotation, picked up at once."""
        self.cluster.kubectl(
            "annotate",
            "application",
            name,
            "-n",
            NAMESPACE,
            "argocd.argoproj.io/refresh=normal",
            "--overwrite",
            check=False,
        )

    def describe(self, *apps: str) -> str:
        """Applications' status and both components' log tails, for failure messages."""
        parts = []
        for name in apps:
            app = self.application(name) or {}
            parts.append(f"--- Application {name} status ---\n{app.get('status')}")
        for process in (CONTROLLER_PROCESS, REPO_SERVER_PROCESS):
            parts.append(f"--- {process} ---\n{self.cluster.log_tail(process, 40)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stops the controller first (so nothing syncs while the rest goes), then the others."""
        for process in (CONTROLLER_PROCESS, REPO_SERVER_PROCESS, REDIS_PROCESS):
            with contextlib.suppress(Exception):
                self.cluster.stop_process(process, grace_seconds=5)
