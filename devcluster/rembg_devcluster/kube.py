"""A thin kubectl-based client for any cluster we hold a kubeconfig for (local or kind)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from rembg_devcluster.errors import ComponentTimeoutError, KubectlError
from rembg_devcluster.kubeconfig import TokenCredentials, build_kubeconfig, write_kubeconfig


class _ManifestLoader(yaml.SafeLoader):
    """YAML 1.1 as Kubernetes reads it: a bare `=` is a string (PyYAML alone makes it the
    undefined `value` tag; the Prometheus Operator's CRDs list it in an enum)."""


def _bare_value(loader: yaml.SafeLoader, node: yaml.Node) -> str:
    assert isinstance(node, yaml.ScalarNode)  # the tag is only ever resolved for scalars
    return str(loader.construct_scalar(node))


_ManifestLoader.add_constructor("tag:yaml.org,2002:value", _bare_value)


def load_manifests(text: str) -> list[dict[str, Any]]:
    """The documents of a multi-document YAML manifest (empty ones dropped)."""
    return [doc for doc in yaml.load_all(text, Loader=_ManifestLoader) if doc]


KUBECTL_TIMEOUT_SECONDS = 120.0


def _render(manifests: str | dict[str, Any] | Sequence[dict[str, Any]]) -> str:
    if isinstance(manifests, str):
        return manifests
    docs = [manifests] if isinstance(manifests, dict) else list(manifests)
    return yaml.safe_dump_all(docs, sort_keys=False)


class KubeHandle:
    """What tests and tools need from a cluster: kubeconfig, server URL, kubectl, env."""

    def __init__(self, kubeconfig: Path, kubectl_binary: Path, extra_path: Sequence[Path] = ()):
        self.kubeconfig = kubeconfig
        self.kubectl_binary = kubectl_binary
        self._extra_path = [kubectl_binary.parent, *extra_path]

    @property
    def server(self) -> str:
        """The API server URL of the kubeconfig's current context (https://127.0.0.1:PORT)."""
        config = yaml.safe_load(self.kubeconfig.read_text())
        context_name = config["current-context"]
        context = next(c["context"] for c in config["contexts"] if c["name"] == context_name)
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        return str(cluster["server"])

    @property
    def ca_pem(self) -> bytes:
        config = yaml.safe_load(self.kubeconfig.read_text())
        return base64.b64decode(config["clusters"][0]["cluster"]["certificate-authority-data"])

    @property
    def env(self) -> dict[str, str]:
        """Environment for subprocesses: KUBECONFIG set, kubectl (and helm) first on PATH."""
        env = dict(os.environ)
        env["KUBECONFIG"] = str(self.kubeconfig)
        path_dirs = [str(p) for p in self._extra_path]
        env["PATH"] = os.pathsep.join([*path_dirs, env.get("PATH", "")])
        return env

    def kubectl(
        self,
        *args: str,
        input: str | None = None,  # noqa: A002 (mirrors subprocess.run)
        check: bool = True,
        timeout: float = KUBECTL_TIMEOUT_SECONDS,
        kubeconfig: Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Runs kubectl here; with check, failure raises KubectlError (a CalledProcessError)."""
        argv = [
            str(self.kubectl_binary),
            f"--kubeconfig={kubeconfig or self.kubeconfig}",
            *args,
        ]
        result = subprocess.run(
            argv,
            input=input,
            text=True,
            capture_output=True,
            timeout=timeout,
            env=self.env,
            check=False,
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def apply(
        self,
        manifests: str | dict[str, Any] | Sequence[dict[str, Any]],
        *args: str,
        server_side: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """kubectl apply of YAML text or manifest dicts (server-side by default: CRDs are large)."""
        mode = ["--server-side", "--force-conflicts"] if server_side else []
        return self.kubectl("apply", *mode, *args, "-f", "-", input=_render(manifests))

    def install_crds(self, paths: Sequence[Path], timeout: float = 60.0) -> list[str]:
        """Applies CRD files and waits until the API server serves them; returns their names."""
        names: list[str] = []
        for path in paths:
            text = path.read_text()
            self.apply(text)
            names += [
                str(doc["metadata"]["name"])
                for doc in load_manifests(text)
                if doc.get("kind") == "CustomResourceDefinition"
            ]
        if names:
            self.wait_for(
                "--for=condition=Established", *[f"crd/{n}" for n in names], timeout=timeout
            )
        return names

    def get_json(self, *args: str) -> dict[str, Any]:
        """`kubectl get ... -o json` parsed."""
        out = self.kubectl("get", *args, "-o", "json").stdout
        parsed: dict[str, Any] = json.loads(out)
        return parsed

    def exists(self, *args: str) -> bool:
        result = self.kubectl("get", *args, "--ignore-not-found", "-o", "name", check=False)
        return result.returncode == 0 and bool(result.stdout.strip())

    def wait_for(
        self,
        *args: str,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Bounded kubectl wait, e.g. wait_for("deploy/x", "--for=condition=Available")."""
        return self.kubectl("wait", *args, f"--timeout={int(timeout)}s", timeout=timeout + 30)

    def create_namespace(self, name: str) -> None:
        self.apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    def wait_for_default_service_account(self, namespace: str, timeout: float = 60.0) -> None:
        """Pods are refused until the controller manager made the namespace's `default` SA."""
        deadline = time.monotonic() + timeout
        while not self.exists("serviceaccount", "default", "-n", namespace):
            if time.monotonic() > deadline:
                raise ComponentTimeoutError(
                    f"no default ServiceAccount in namespace {namespace} after {timeout:.0f}s "
                    "(is kube-controller-manager running?)"
                )
            time.sleep(0.2)

    def service_account_token(
        self, namespace: str, name: str, duration: str = "1h", audience: str | None = None
    ) -> str:
        """A token for a ServiceAccount from the TokenRequest API (`kubectl create token`)."""
        args = ["create", "token", name, "-n", namespace, f"--duration={duration}"]
        if audience:
            args.append(f"--audience={audience}")
        return self.kubectl(*args).stdout.strip()

    def service_account_kubeconfig(
        self,
        namespace: str,
        name: str,
        path: Path,
        duration: str = "1h",
        create: bool = True,
    ) -> Path:
        """Writes a kubeconfig that acts as system:serviceaccount:<namespace>:<name>.

        Use it to run a process (e.g. the operator) with exactly the RBAC the chart grants.
        With create=True the ServiceAccount (and namespace) are created when missing.
        """
        if create:
            self.apply(
                [
                    {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}},
                    {
                        "apiVersion": "v1",
                        "kind": "ServiceAccount",
                        "metadata": {"name": name, "namespace": namespace},
                    },
                ]
            )
        token = self.service_account_token(namespace, name, duration)
        document = build_kubeconfig(
            self.server,
            self.ca_pem,
            f"system:serviceaccount:{namespace}:{name}",
            TokenCredentials(token),
            namespace=namespace,
        )
        return write_kubeconfig(path, document)
