"""Pod objects the way kube-scheduler and the kubelet write them, for the pod-health tests."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
CREATED = NOW - timedelta(minutes=30)


def ts(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _container_spec() -> dict[str, Any]:
    # As builders/workload.py writes it: a startup probe of 120 s, readiness 2 x 5 s.
    probe = {"httpGet": {"path": "/readyz", "port": "http"}, "periodSeconds": 5}
    return {
        "name": "server",
        "image": "ghcr.io/example/rembg-server:1.0",
        "resources": {"limits": {"cpu": "2", "memory": "2Gi"}, "requests": {"cpu": "1"}},
        "startupProbe": {**probe, "failureThreshold": 24, "timeoutSeconds": 2},
        "readinessProbe": {**probe, "failureThreshold": 2, "timeoutSeconds": 2},
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"}, "periodSeconds": 10},
    }


def condition(kind: str, status: bool, **extra: str) -> dict[str, Any]:
    return {
        "type": kind,
        "status": "True" if status else "False",
        "lastProbeTime": None,
        "lastTransitionTime": ts(CREATED),
        **extra,
    }


def pod(
    name: str = "demo-cpu-7d9f8c6b5-abc12",
    *,
    pool: str = "cpu",
    service: str = "demo",
    phase: str = "Running",
    conditions: list[dict[str, Any]] | None = None,
    containers: list[dict[str, Any]] | None = None,
    deleting: bool = False,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": f"uid-{name}",
        "creationTimestamp": ts(CREATED),
        "labels": {
            "app.kubernetes.io/name": "rembg-server",
            "app.kubernetes.io/instance": service,
            "app.kubernetes.io/managed-by": "rembg-operator",
            "rembg.io/service": service,
            "rembg.io/pool": pool,
            "pod-template-hash": "7d9f8c6b5",
        },
        "ownerReferences": [{"kind": "ReplicaSet", "name": f"{service}-{pool}-7d9f8c6b5"}],
    }
    if deleting:
        meta["deletionTimestamp"] = ts(NOW)
    status: dict[str, Any] = {"phase": phase, "qosClass": "Burstable"}
    if conditions is not None:
        status["conditions"] = conditions
    if containers is not None:
        status["containerStatuses"] = containers
        status["hostIP"] = "10.0.0.4"
        status["podIP"] = "10.244.1.17"
        status["startTime"] = ts(CREATED)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [_container_spec()], "nodeName": "node-1"},
        "status": status,
    }


def scheduled_conditions(ready: bool) -> list[dict[str, Any]]:
    return [
        condition("PodReadyToStartContainers", True),
        condition("Initialized", True),
        condition("Ready", ready, **({} if ready else {"reason": "ContainersNotReady"})),
        condition("ContainersReady", ready, **({} if ready else {"reason": "ContainersNotReady"})),
        condition("PodScheduled", True),
    ]


def container(
    *,
    state: dict[str, Any],
    ready: bool = False,
    started: bool = False,
    restarts: int = 0,
    last: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": "server",
        "image": "ghcr.io/example/rembg-server:1.0",
        "imageID": "",
        "containerID": "containerd://4f1c" if "waiting" not in state else None,
        "ready": ready,
        "started": started,
        "restartCount": restarts,
        "state": state,
        "lastState": {"terminated": last} if last else {},
    }


def terminated(reason: str, exit_code: int, finished: datetime, **extra: Any) -> dict[str, Any]:
    return {
        "exitCode": exit_code,
        "reason": reason,
        "startedAt": ts(finished - timedelta(seconds=40)),
        "finishedAt": ts(finished),
        "containerID": "containerd://9e2b",
        **extra,
    }


def healthy(name: str = "demo-cpu-7d9f8c6b5-ok001", **kw: Any) -> dict[str, Any]:
    running = {"running": {"startedAt": ts(CREATED)}}
    return pod(
        name,
        conditions=scheduled_conditions(True),
        containers=[container(state=running, ready=True, started=True)],
        **kw,
    )


def image_pull_backoff(name: str = "demo-cpu-7d9f8c6b5-abc12", **kw: Any) -> dict[str, Any]:
    waiting = {
        "waiting": {
            "reason": "ImagePullBackOff",
            "message": 'Back-off pulling image "ghcr.io/example/rembg-server:nope"',
        }
    }
    return pod(
        name,
        phase="Pending",
        conditions=scheduled_conditions(False),
        containers=[container(state=waiting)],
        **kw,
    )


def err_image_pull(name: str = "demo-cpu-7d9f8c6b5-abc12") -> dict[str, Any]:
    found = image_pull_backoff(name)
    found["status"]["containerStatuses"][0]["state"] = {
        "waiting": {
            "reason": "ErrImagePull",
            "message": 'failed to pull and unpack image "ghcr.io/example/rembg-server:nope": '
            "not found",
        }
    }
    return found


def oom_crash_loop(name: str = "demo-cpu-7d9f8c6b5-oom01") -> dict[str, Any]:
    waiting = {
        "waiting": {
            "reason": "CrashLoopBackOff",
            "message": f"back-off 2m40s restarting failed container=server pod={name}_ns(uid)",
        }
    }
    return pod(
        name,
        conditions=scheduled_conditions(False),
        containers=[
            container(
                state=waiting,
                restarts=5,
                last=terminated("OOMKilled", 137, NOW - timedelta(seconds=30)),
            )
        ],
    )


def error_crash_loop(name: str = "demo-cpu-7d9f8c6b5-err01") -> dict[str, Any]:
    found = oom_crash_loop(name)
    status = found["status"]["containerStatuses"][0]
    status["restartCount"] = 3
    status["lastState"]["terminated"] = terminated(
        "Error", 1, NOW - timedelta(seconds=20), message="ModuleNotFoundError: onnxruntime"
    )
    return found


def unschedulable(name: str = "demo-cpu-7d9f8c6b5-pend1") -> dict[str, Any]:
    message = (
        "0/3 nodes are available: 1 Insufficient cpu, 2 node(s) had untolerated taint "
        "{nvidia.com/gpu: present}. preemption: 0/3 nodes are available: 1 No preemption "
        "victims found for incoming pod, 2 Preemption is not helpful for scheduling."
    )
    found = pod(
        name,
        phase="Pending",
        conditions=[condition("PodScheduled", False, reason="Unschedulable", message=message)],
    )
    del found["spec"]["nodeName"]
    return found


def container_creating(name: str = "demo-cpu-7d9f8c6b5-new01") -> dict[str, Any]:
    return pod(
        name,
        phase="Pending",
        conditions=[
            condition("PodReadyToStartContainers", False),
            condition("Initialized", True),
            condition("Ready", False, reason="ContainersNotReady"),
            condition("ContainersReady", False, reason="ContainersNotReady"),
            condition("PodScheduled", True),
        ],
        containers=[container(state={"waiting": {"reason": "ContainerCreating"}})],
    )


def warming_up(
    name: str = "demo-cpu-7d9f8c6b5-warm1", seconds: int = 30, now: datetime = NOW
) -> dict[str, Any]:
    running = {"running": {"startedAt": ts(now - timedelta(seconds=seconds))}}
    return pod(name, conditions=scheduled_conditions(False), containers=[container(state=running)])


def readiness_failing(name: str = "demo-cpu-7d9f8c6b5-slow1") -> dict[str, Any]:
    running = {"running": {"startedAt": ts(NOW - timedelta(minutes=20))}}
    return pod(
        name,
        conditions=scheduled_conditions(False),
        containers=[container(state=running, started=True)],
    )


def with_waiting(reason: str, message: str, name: str = "demo-cpu-7d9f8c6b5-wait1") -> Any:
    found = image_pull_backoff(name)
    found["status"]["containerStatuses"][0]["state"] = {
        "waiting": {"reason": reason, "message": message}
    }
    return copy.deepcopy(found)
