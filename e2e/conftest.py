"""Fixtures for the end-to-end suite: a real Kubernetes control plane per pytest session.

- `cluster` (session): etcd + kube-apiserver + kube-controller-manager + kube-scheduler + KWOK
  on free loopback ports in a temp dir, with 2 CPU and 2 GPU KWOK nodes and the Prometheus
  Operator CRDs; torn down at the end. With REMBG_E2E_KUBECONFIG=<path> it uses that cluster
  instead (any cluster you run) and starts no control plane.
- `bare_cluster` (session, started on first use): the same without the monitoring CRDs.
- `cpu_only_cluster` (session, started on first use): no GPU nodes at all.
- `cluster_factory` (session): start more clusters with custom ClusterConfig options
  (e.g. no GPU nodes); each is stopped at the end of the session.
- `namespace` (function): a fresh namespace on `cluster`, ready for pods, deleted afterwards.

Every handle offers .kubeconfig, .kubectl(*args, input=None, check=True, kubeconfig=None), .env,
.server, .ca_pem, .apply(), .get_json(), .exists(), .wait_for(), .install_crds(),
.create_namespace(), .service_account_kubeconfig() (a TokenRequest identity), and
.spawn()/.wait_process()/.kill_process()/.stop_process()/.log_tail() for processes that run
against it (e.g. `python -m rembg_operator`); spawned processes stop before the cluster does.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from rembg_devcluster import ClusterConfig, DevCluster
from rembg_devcluster.external import ExternalCluster
from rembg_devcluster.kube import KubeHandle

from e2e.operator_support import OperatorProcess, install_crd, running_operator

EXTERNAL_KUBECONFIG_ENV = "REMBG_E2E_KUBECONFIG"
Cluster = DevCluster | ExternalCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Everything under e2e/ needs a cluster: mark it so `-m "not cluster"` can deselect it.
    for item in items:
        item.add_marker(pytest.mark.cluster)


def _external_kubeconfig() -> Path | None:
    value = os.environ.get(EXTERNAL_KUBECONFIG_ENV)
    return Path(value) if value else None


def _print_logs_on_failure(handle: Cluster, names: list[str]) -> str:
    return "\n".join(f"--- {name} ---\n{handle.log_tail(name, 40)}" for name in names)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The session's cluster (see the module docstring)."""
    external = _external_kubeconfig()
    if external is not None:
        handle = ExternalCluster(external, tmp_path_factory.mktemp("external-logs"))
        try:
            yield handle
        finally:
            handle.stop()
        return
    started = DevCluster.start(ClusterConfig(state_dir=tmp_path_factory.mktemp("cluster")))
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="session")
def cluster_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., DevCluster]]:
    """start(**ClusterConfig options) -> a new local cluster, stopped at the end of the session."""
    started: list[DevCluster] = []

    def start(**options: Any) -> DevCluster:
        if _external_kubeconfig() is not None:
            pytest.skip(f"{EXTERNAL_KUBECONFIG_ENV} is set: extra local clusters are not started")
        config = ClusterConfig(state_dir=tmp_path_factory.mktemp("cluster"), **options)
        handle = DevCluster.start(config)
        started.append(handle)
        return handle

    try:
        yield start
    finally:
        for handle in reversed(started):
            handle.stop()


@pytest.fixture(scope="session")
def cpu_only_cluster(cluster_factory: Callable[..., DevCluster]) -> DevCluster:
    """A local cluster with CPU nodes only (no GPU nodes), monitoring CRDs installed."""
    return cluster_factory(gpu_nodes=0)


@pytest.fixture(scope="session")
def bare_cluster(cluster_factory: Callable[..., DevCluster]) -> DevCluster:
    """A second local cluster without the Prometheus Operator CRDs (started on first use)."""
    return cluster_factory(monitoring_crds=False)


def _namespace_name(node_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-")
    return f"e2e-{slug}-{uuid.uuid4().hex[:6]}"


def make_namespace(handle: KubeHandle, node_name: str) -> Iterator[str]:
    """Creates a namespace, waits for its default ServiceAccount, deletes it afterwards."""
    name = _namespace_name(node_name)
    handle.create_namespace(name)
    handle.wait_for_default_service_account(name)
    try:
        yield name
    finally:
        handle.kubectl(
            "delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False
        )


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on `cluster` for one test."""
    yield from make_namespace(cluster, request.node.name)


@pytest.fixture
def bare_namespace(bare_cluster: DevCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace on `bare_cluster` for one test."""
    yield from make_namespace(bare_cluster, request.node.name)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """On failure, attach the tail of every process log (operator, servers, control plane)."""
    report = yield
    if report.failed:  # call, or a fixture (setup/teardown) such as a process that never came up
        for fixture_name in ("cluster", "bare_cluster"):
            handle = item.funcargs.get(fixture_name) if hasattr(item, "funcargs") else None
            if isinstance(handle, DevCluster | ExternalCluster):
                names = [r.name for r in handle.records if r.name not in {"etcd"}]
                report.sections.append(
                    (f"{fixture_name} logs", _print_logs_on_failure(handle, names))
                )
    return report


@pytest.fixture(scope="module")
def crd(cluster: Cluster) -> Cluster:
    """The session cluster with our CRD installed (idempotent, so once per module is cheap)."""
    install_crd(cluster)
    return cluster


@pytest.fixture
def operator(crd: Cluster, namespace: str) -> Iterator[OperatorProcess]:
    """`python -m rembg_operator` as a real process watching the test's namespace."""
    with running_operator(crd, namespace) as running:
        yield running
