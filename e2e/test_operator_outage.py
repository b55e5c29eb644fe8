"""The operator across a control-plane outage, on a cluster of its own (the outage would
disturb the session's shared cluster).

kube-apiserver is killed, stays down, and comes back; right after, while the operator's
watches reconnect, the Deployment, Service and HPA of a Ready service are deleted. No watch
event may ever say so: the operator must notice (its audit lists the children and compares
them with what it applied) and restore every one within seconds.

What the watches miss is kube-apiserver's doing: with the restarted API server's watch cache
off (`--watch-cache=false`) every deletion arrived as a watch event and the audit found
nothing; with it on (the default, as here) the audit found two or three of the three, and
kube-controller-manager's informers missed them too (its garbage collector kept the deleted
Deployment's ReplicaSet for minutes). The README's devcluster section has the details.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from rembg_devcluster import DevCluster

from e2e.operator_support import (
    children,
    condition,
    eventually,
    example,
    get,
    install_crd,
    kubectl_apply,
    running_operator,
    wait_ready,
)

NAMESPACE = "outage"
SERVICE = "demo"  # examples/minimal.yaml
DOWN_SECONDS = 40.0
# Deleted this long after the API server answers again: while the watches reconnect.
DELETE_AFTER_SECONDS = 5.0
AUDIT_SECONDS = 30
RESTORE_SECONDS = 20.0
DELETED = (("deployment", f"{SERVICE}-cpu"), ("service", SERVICE), ("hpa", f"{SERVICE}-cpu"))


@pytest.fixture(scope="module")
def outage_cluster(cluster_factory: Callable[..., DevCluster]) -> DevCluster:
    cluster = cluster_factory(cpu_nodes=1, gpu_nodes=0)
    install_crd(cluster)
    cluster.create_namespace(NAMESPACE)
    return cluster


def _apiserver_ready(cluster: DevCluster) -> bool:
    result = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=10)
    return bool(result.returncode == 0 and result.stdout.strip() == "ok")


def _missing(cluster: DevCluster) -> list[str]:
    return [
        f"{kind}/{name}" for kind, name in DELETED if get(cluster, NAMESPACE, kind, name) is None
    ]


def test_children_deleted_while_the_watches_reconnect_are_restored(
    outage_cluster: DevCluster,
) -> None:
    cluster = outage_cluster
    with running_operator(
        cluster, NAMESPACE, REMBG_OPERATOR_AUDIT_SECONDS=str(AUDIT_SECONDS)
    ) as operator:
        kubectl_apply(cluster, NAMESPACE, example("minimal.yaml"))
        wait_ready(cluster, NAMESPACE, SERVICE)
        before = children(cluster, NAMESPACE, SERVICE)

        argv = cluster.process("kube-apiserver").argv
        cluster.kill_process("kube-apiserver")
        time.sleep(DOWN_SECONDS)
        cluster.spawn("kube-apiserver", argv)
        eventually(lambda: _apiserver_ready(cluster), what="kube-apiserver back", timeout=120)
        time.sleep(DELETE_AFTER_SECONDS)

        deleted_at = time.monotonic()
        for kind, name in DELETED:
            cluster.kubectl("delete", kind, name, "-n", NAMESPACE, "--wait=false")
        samples: list[tuple[float, list[str], str]] = []

        def restored() -> bool:
            missing = _missing(cluster)
            ready = condition(get(cluster, NAMESPACE, "rembgservice", SERVICE), "Ready")
            samples.append((time.monotonic() - deleted_at, missing, str(ready.get("status"))))
            return not missing

        eventually(restored, what="every deleted child restored", timeout=3 * AUDIT_SECONDS)
        restored_after = time.monotonic() - deleted_at
        wait_ready(cluster, NAMESPACE, SERVICE)
        ready_after = time.monotonic() - deleted_at
        running = cluster.running()
        audits_ok = operator.metric("rembg_operator_audits_total", result="ok")
        vanished = operator.metric("rembg_operator_audit_repairs_total", reason="vanished")

    print(
        f"\noutage: apiserver down {DOWN_SECONDS:.0f}s, children deleted "
        f"{DELETE_AFTER_SECONDS:.0f}s after it was back; restored after {restored_after:.1f}s, "
        f"Ready again after {ready_after:.1f}s; the audit found {vanished:.0f} of "
        f"{len(DELETED)} missing (the rest came as watch events)"
    )
    assert audits_ok >= 1, "no audit succeeded"
    # Single replicas without leader election: nothing made them exit across the outage.
    assert running["kube-controller-manager"], running
    assert running["kube-scheduler"], running
    # The audit runs every few seconds for a minute after an outage: restored within a few
    # audits, not at the next audit interval, the next resync (600 s) or never, as before.
    assert restored_after < RESTORE_SECONDS, samples
    assert children(cluster, NAMESPACE, SERVICE) == before, "every child is back, nothing else"
