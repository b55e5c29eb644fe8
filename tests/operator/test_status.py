from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from rembg_operator.builders.children import Skipped
from rembg_operator.pod_health import PodFinding, PodState, pool_findings
from rembg_operator.status import (
    Observation,
    PoolObservation,
    build_status,
    conditions_from,
    same_status,
)

from tests.operator import pod_objects as pods

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
LATER = NOW + timedelta(minutes=5)
ENDPOINT = "http://demo.ns.svc:80"


def deployment(
    *,
    replicas: int = 2,
    ready: int = 2,
    updated: int | None = None,
    available: int | None = None,
    generation: int = 3,
    observed: int = 3,
    deadline: bool = False,
) -> dict[str, Any]:
    conditions = []
    if deadline:
        conditions.append({"type": "Progressing", "reason": "ProgressDeadlineExceeded"})
    return {
        "metadata": {"generation": generation},
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": observed,
            "readyReplicas": ready,
            "updatedReplicas": ready if updated is None else updated,
            "availableReplicas": ready if available is None else available,
            "conditions": conditions,
        },
    }


def pool(name: str = "cpu", **kw: Any) -> PoolObservation:
    required = kw.pop("required", True)
    minimum = kw.pop("minimum", 0)
    missing = kw.pop("missing", False)
    findings = kw.pop("findings", ())
    return PoolObservation.from_deployment(
        name,
        None if missing else deployment(**kw),
        required=required,
        minimum=minimum,
        findings=findings,
    )


def observe(*pools: PoolObservation, **kw: Any) -> Observation:
    return Observation(generation=kw.pop("generation", 4), endpoint=ENDPOINT, pools=pools, **kw)


def by_type(conditions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conditions}


def test_all_pools_rolled_out_is_ready() -> None:
    c = by_type(conditions_from(observe(pool("gpu", replicas=1, ready=1), pool()), [], NOW))
    assert c["Ready"]["status"] == "True"
    assert c["Ready"]["reason"] == "AllPoolsReady"
    assert ENDPOINT in c["Ready"]["message"]
    assert c["Progressing"]["status"] == "False"
    assert c["Reconciling"]["status"] == "False"
    assert c["Degraded"]["status"] == "False"
    assert c["Stalled"]["status"] == "False"


def test_every_condition_carries_generation_reason_message_and_time() -> None:
    for condition in conditions_from(observe(pool(), generation=9), [], NOW):
        assert condition["observedGeneration"] == 9
        assert condition["reason"]
        assert condition["message"]
        assert condition["lastTransitionTime"] == "2026-11-22T12:00:00Z"
        assert condition["status"] in {"True", "False", "Unknown"}


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"ready": 1}, "not every replica ready"),
        ({"updated": 1}, "old replicas still running"),
        ({"available": 1}, "not available yet"),
        ({"observed": 2}, "controller has not seen the newest spec"),
        ({"missing": True}, "Deployment absent"),
    ],
)
def test_incomplete_rollouts_are_progressing(kw: dict[str, Any], why: str) -> None:
    c = by_type(conditions_from(observe(pool(**kw)), [], NOW))
    assert c["Ready"]["status"] == "False", why
    assert c["Ready"]["reason"] == "RolloutInProgress"
    assert c["Progressing"]["status"] == "True"
    assert c["Reconciling"]["status"] == "True"
    assert c["Stalled"]["status"] == "False"


def test_ready_waits_for_the_autoscaler_minimum() -> None:
    # The Deployment says 1/1, but the HPA's floor of 3 is not reached yet.
    observation = pool(replicas=1, ready=1, minimum=3)
    assert observation.desired == 3
    c = by_type(conditions_from(observe(observation), [], NOW))
    assert c["Ready"]["status"] == "False"
    assert pool(replicas=3, ready=3, minimum=3).rolled_out


def test_one_pool_pending_keeps_service_not_ready() -> None:
    c = by_type(conditions_from(observe(pool("gpu", ready=0), pool("cpu")), [], NOW))
    assert c["Ready"]["status"] == "False"
    assert "gpu" in c["Ready"]["message"]


def test_pool_not_required_under_fallback() -> None:
    gpu = pool("gpu", ready=0, required=False)
    observed = observe(
        gpu, pool("cpu"), has_gpu_pool=True, gpu_capacity=0, gpu_fallback_active=True
    )
    c = by_type(conditions_from(observed, [], NOW))
    assert c["Ready"]["status"] == "True"
    assert c["Degraded"]["status"] == "True"
    assert c["Degraded"]["reason"] == "NoGpuCapacity"
    assert "fallback" in c["Degraded"]["message"]


def test_progress_deadline_exceeded_is_stalled_and_degraded() -> None:
    c = by_type(conditions_from(observe(pool(ready=0, deadline=True)), [], NOW))
    assert c["Stalled"]["status"] == "True"
    assert c["Stalled"]["reason"] == "ProgressDeadlineExceeded"
    assert c["Degraded"]["status"] == "True"
    assert c["Progressing"]["status"] == "False"
    assert c["Ready"]["status"] == "False"


def test_deadline_condition_is_ignored_once_rolled_out() -> None:
    c = by_type(conditions_from(observe(pool(deadline=True)), [], NOW))
    assert c["Stalled"]["status"] == "False"
    assert c["Ready"]["status"] == "True"


def test_invalid_spec_is_degraded_and_stalled() -> None:
    observed = observe(pool(), spec_problems=["cpu request 4 above limit 2", "unknown model x"])
    c = by_type(conditions_from(observed, [], NOW))
    for kind, status in (
        ("Ready", "False"),
        ("Progressing", "False"),
        ("Degraded", "True"),
        ("Reconciling", "False"),
        ("Stalled", "True"),
    ):
        assert c[kind]["status"] == status, kind
        assert c[kind]["reason"] == "InvalidSpec"
    assert "cpu request 4 above limit 2; unknown model x" in c["Degraded"]["message"]
    assert "previous children kept" in c["Degraded"]["message"]


def test_apply_errors_are_degraded_and_retried() -> None:
    c = by_type(conditions_from(observe(pool(), apply_errors=["Service demo: boom"]), [], NOW))
    assert c["Degraded"]["reason"] == "ApplyFailed"
    assert c["Degraded"]["status"] == "True"
    assert c["Reconciling"]["status"] == "True"
    assert c["Stalled"]["status"] == "False"
    assert "Service demo: boom" in c["Ready"]["message"]


def test_no_gpu_nodes() -> None:
    observed = observe(pool("gpu", ready=0), has_gpu_pool=True, gpu_capacity=0)
    c = by_type(conditions_from(observed, [], NOW))
    assert c["GpuCapacityAvailable"]["status"] == "False"
    assert c["GpuCapacityAvailable"]["reason"] == "NoGpuNodes"
    assert "nvidia.com/gpu" in c["GpuCapacityAvailable"]["message"]
    assert c["Degraded"]["reason"] == "NoGpuCapacity"
    assert c["Ready"]["status"] == "False"


def test_gpu_capacity_known_and_unknown() -> None:
    found = by_type(
        conditions_from(observe(pool("gpu"), has_gpu_pool=True, gpu_capacity=8), [], NOW)
    )
    assert found["GpuCapacityAvailable"]["status"] == "True"
    assert "8 allocatable" in found["GpuCapacityAvailable"]["message"]
    unknown = by_type(
        conditions_from(observe(pool("gpu"), has_gpu_pool=True, gpu_capacity=None), [], NOW)
    )
    assert unknown["GpuCapacityAvailable"]["status"] == "Unknown"


def test_no_gpu_condition_without_gpu_pool() -> None:
    c = by_type(conditions_from(observe(pool()), [], NOW))
    assert "GpuCapacityAvailable" not in c


def test_monitoring_conditions() -> None:
    crd_missing = [
        Skipped("ServiceMonitor", "demo", "CrdMissing", "m"),
        Skipped("PrometheusRule", "demo", "CrdMissing", "m"),
    ]
    missing = by_type(conditions_from(observe(pool(), skipped=crd_missing), [], NOW))
    assert missing["MonitoringAvailable"]["status"] == "False"
    assert missing["MonitoringAvailable"]["reason"] == "CrdMissing"
    assert "PrometheusRule, ServiceMonitor" in missing["MonitoringAvailable"]["message"]
    assert missing["Ready"]["status"] == "True"
    assert missing["Degraded"]["status"] == "False"
    disabled = by_type(conditions_from(observe(pool(), monitoring_enabled=False), [], NOW))
    assert disabled["MonitoringAvailable"]["reason"] == "Disabled"
    present = by_type(conditions_from(observe(pool()), [], NOW))
    assert present["MonitoringAvailable"]["status"] == "True"


def test_autoscaling_conditions() -> None:
    keda = [Skipped("ScaledObject", "demo-cpu", "KedaNotInstalled", "no keda")]
    c = by_type(conditions_from(observe(pool(), skipped=keda), [], NOW))
    assert c["AutoscalingAvailable"]["reason"] == "KedaNotInstalled"
    assert c["AutoscalingAvailable"]["message"] == "no keda"
    off = by_type(conditions_from(observe(pool(), autoscaling_enabled=False), [], NOW))
    assert off["AutoscalingAvailable"]["reason"] == "Disabled"


def test_transition_time_kept_while_status_unchanged() -> None:
    first = conditions_from(observe(pool(ready=0)), [], NOW)
    second = by_type(conditions_from(observe(pool(ready=1)), first, LATER))
    assert second["Ready"]["lastTransitionTime"] == "2026-11-22T12:00:00Z"
    third = by_type(conditions_from(observe(pool()), list(second.values()), LATER))
    assert third["Ready"]["status"] == "True"
    assert third["Ready"]["lastTransitionTime"] == "2026-11-22T12:05:00Z"
    assert third["Degraded"]["lastTransitionTime"] == "2026-11-22T12:00:00Z"


def test_build_status_summary_fields() -> None:
    observed = observe(
        pool("gpu", replicas=1, ready=0),
        pool("cpu", replicas=3, ready=2),
        models=("u2net", "u2netp"),
        has_gpu_pool=True,
        gpu_capacity=4,
        skipped=[Skipped("ServiceMonitor", "demo", "CrdMissing", "m")],
        inventory=[{"apiVersion": "v1", "kind": "Service", "name": "demo"}],
    )
    status = build_status(observed, None, NOW)
    assert status["observedGeneration"] == 4
    assert status["gpuReplicas"] == "0/1"
    assert status["cpuReplicas"] == "2/3"
    assert status["model"] == "u2net,u2netp"
    assert status["endpoint"] == ENDPOINT
    assert status["gpuCapacity"] == 4
    assert status["pools"]["cpu"] == {
        "desiredReplicas": 3,
        "readyReplicas": 2,
        "updatedReplicas": 2,
        "availableReplicas": 2,
    }
    assert status["unavailableChildren"] == [
        {"kind": "ServiceMonitor", "name": "demo", "reason": "CrdMissing", "message": "m"}
    ]
    assert status["inventory"] == [{"apiVersion": "v1", "kind": "Service", "name": "demo"}]


def test_build_status_without_a_pool_prints_a_dash() -> None:
    status = build_status(observe(pool("cpu")), None, NOW)
    assert status["gpuReplicas"] == "-"
    assert "gpuCapacity" not in status


def test_same_status_ignores_transition_times_only() -> None:
    a = build_status(observe(pool()), None, NOW)
    b = build_status(observe(pool()), None, LATER)
    assert a != b
    assert same_status(a, b)
    c = build_status(observe(pool(ready=1)), None, NOW)
    assert not same_status(a, c)
    assert not same_status(None, a)
    assert same_status(None, {})


# -- why pods are not ready ------------------------------------------------------------------


def _findings(*bodies: dict[str, Any]) -> list[PodFinding]:
    return pool_findings([PodState.from_pod(b) for b in bodies], pods.NOW)


def test_a_pool_whose_image_cannot_be_pulled_is_not_ready_and_degraded_saying_which_pod() -> None:
    found = _findings(pods.image_pull_backoff("demo-cpu-abc12"))
    observed = observe(pool(replicas=1, ready=0, findings=found))
    c = by_type(conditions_from(observed, [], NOW))
    assert c["Ready"]["status"] == "False"
    assert c["Ready"]["reason"] == "PodsNotReady"
    assert c["Ready"]["message"] == (
        "cpu: 0/1 ready; pod demo-cpu-abc12: ImagePullBackOff: "
        'Back-off pulling image "ghcr.io/example/rembg-server:nope"'
    )
    assert c["Degraded"]["status"] == "True"
    assert c["Degraded"]["reason"] == "ImagePullBackOff"
    assert "pod demo-cpu-abc12: ImagePullBackOff" in c["Degraded"]["message"]
    assert c["Progressing"]["status"] == "True"


def test_an_oom_in_a_crash_loop_degrades_with_reason_oomkilled() -> None:
    found = _findings(pods.oom_crash_loop("demo-cpu-oom01"))
    c = by_type(conditions_from(observe(pool(replicas=1, ready=0, findings=found)), [], NOW))
    assert c["Degraded"]["reason"] == "OOMKilled"
    assert (
        "pod demo-cpu-oom01: OOMKilled: container server was OOMKilled"
        in (c["Degraded"]["message"])
    )
    assert c["Ready"]["reason"] == "PodsNotReady"


def test_an_unschedulable_pod_degrades_with_the_schedulers_reason() -> None:
    found = _findings(pods.unschedulable("demo-cpu-pend1"))
    c = by_type(conditions_from(observe(pool(replicas=1, ready=0, findings=found)), [], NOW))
    assert c["Degraded"]["reason"] == "Unschedulable"
    assert (
        "pod demo-cpu-pend1: Unschedulable: 0/3 nodes are available: 1 Insufficient cpu"
        in (c["Degraded"]["message"])
    )


def test_pods_merely_starting_are_progressing_not_degraded() -> None:
    found = _findings(pods.container_creating("demo-cpu-new01"), pods.warming_up("demo-cpu-w"))
    c = by_type(conditions_from(observe(pool(replicas=2, ready=0, findings=found)), [], NOW))
    assert c["Degraded"]["status"] == "False"
    assert c["Ready"]["reason"] == "RolloutInProgress"
    assert "pod demo-cpu-new01: ContainerCreating" in c["Ready"]["message"]
    assert c["Progressing"]["status"] == "True"
    assert c["Progressing"]["message"] == c["Ready"]["message"]


def test_a_readiness_probe_failing_is_not_ready_but_not_degraded() -> None:
    found = _findings(pods.readiness_failing("demo-cpu-slow1"))
    c = by_type(conditions_from(observe(pool(replicas=1, ready=0, findings=found)), [], NOW))
    assert c["Ready"]["reason"] == "PodsNotReady"
    assert "not ready: readiness probe failing" in c["Ready"]["message"]
    assert c["Degraded"]["status"] == "False"


def test_pod_failures_explain_more_than_a_progress_deadline() -> None:
    found = _findings(pods.image_pull_backoff())
    observed = observe(pool(replicas=1, ready=0, deadline=True, findings=found))
    c = by_type(conditions_from(observed, [], NOW))
    assert c["Degraded"]["reason"] == "ImagePullBackOff"
    assert c["Stalled"]["reason"] == "ProgressDeadlineExceeded"


def test_no_gpu_capacity_still_explains_a_gpu_pool_that_cannot_schedule() -> None:
    found = _findings(pods.unschedulable("demo-gpu-x"))
    observed = observe(
        pool("gpu", replicas=1, ready=0, findings=found), has_gpu_pool=True, gpu_capacity=0
    )
    assert by_type(conditions_from(observed, [], NOW))["Degraded"]["reason"] == "NoGpuCapacity"


def test_status_pools_carry_the_not_ready_pods_capped() -> None:
    many = [pods.image_pull_backoff(f"demo-cpu-{i:02}") for i in range(8)]
    found = _findings(*many)
    status = build_status(observe(pool(replicas=8, ready=0, findings=found)), None, NOW)
    cpu = status["pools"]["cpu"]
    assert cpu["notReadyPods"] == 8
    assert len(cpu["notReady"]) == 5
    assert cpu["notReady"][0] == {
        "pod": "demo-cpu-00",
        "reason": "ImagePullBackOff",
        "message": 'Back-off pulling image "ghcr.io/example/rembg-server:nope"',
    }
    ready = by_type(status["conditions"])["Ready"]["message"]
    assert ready.count("ImagePullBackOff") == 3
    assert ready.endswith("and 5 more pod(s) not ready")


def test_a_healthy_pool_reports_no_not_ready_pods() -> None:
    found = _findings(pods.healthy())
    status = build_status(observe(pool(replicas=1, ready=1, findings=found)), None, NOW)
    assert "notReady" not in status["pools"]["cpu"]
    assert "notReadyPods" not in status["pools"]["cpu"]
    assert by_type(status["conditions"])["Ready"]["status"] == "True"


def test_every_pool_in_trouble_is_named() -> None:
    observed = observe(
        pool("gpu", replicas=1, ready=0, findings=_findings(pods.oom_crash_loop("demo-gpu-1"))),
        pool("cpu", replicas=1, ready=0, findings=_findings(pods.unschedulable("demo-cpu-2"))),
    )
    c = by_type(conditions_from(observed, [], NOW))
    assert c["Degraded"]["reason"] == "OOMKilled"
    assert c["Degraded"]["message"].startswith("gpu: 0/1 ready; pod demo-gpu-1: OOMKilled")
    assert "cpu: 0/1 ready; pod demo-cpu-2: Unschedulable" in c["Degraded"]["message"]
    assert c["Ready"]["message"].startswith("gpu: 0/1 ready; pod demo-gpu-1: OOMKilled")
