"""Why pods are not ready, from pod objects as the kubelet and the scheduler write them."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from rembg_operator.pod_health import (
    PodFinding,
    PodState,
    degraded_reason,
    diagnose,
    next_change,
    pool_findings,
)

from tests.operator.pod_objects import (
    NOW,
    container,
    container_creating,
    err_image_pull,
    error_crash_loop,
    healthy,
    image_pull_backoff,
    oom_crash_loop,
    pod,
    readiness_failing,
    scheduled_conditions,
    terminated,
    ts,
    unschedulable,
    warming_up,
    with_waiting,
)


def finding(body: dict[str, Any], now: Any = NOW) -> PodFinding:
    found = diagnose(PodState.from_pod(body), now)
    assert found is not None
    return found


def test_a_ready_pod_has_no_finding() -> None:
    assert diagnose(PodState.from_pod(healthy()), NOW) is None


def test_a_terminating_pod_is_not_reported() -> None:
    assert diagnose(PodState.from_pod(image_pull_backoff(deleting=True)), NOW) is None


def test_the_pod_is_parsed_with_its_service_and_pool() -> None:
    state = PodState.from_pod(image_pull_backoff(pool="gpu", service="fleet"))
    assert (state.service, state.pool) == ("fleet", "gpu")


def test_an_image_that_cannot_be_pulled_is_degraded_with_the_kubelets_message() -> None:
    found = finding(image_pull_backoff())
    assert found.reason == "ImagePullBackOff"
    assert found.message == 'Back-off pulling image "ghcr.io/example/rembg-server:nope"'
    assert found.degraded
    assert not found.starting
    assert found.summary() == (
        'pod demo-cpu-7d9f8c6b5-abc12: ImagePullBackOff: Back-off pulling image "'
        'ghcr.io/example/rembg-server:nope"'
    )


def test_err_image_pull_is_degraded_too() -> None:
    found = finding(err_image_pull())
    assert found.reason == "ErrImagePull"
    assert "not found" in found.message
    assert found.degraded


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("ErrImageNeverPull", 'Container image "x:1" is not present with pull policy of Never'),
        ("InvalidImageName", 'Failed to apply default image tag "X::1": invalid reference format'),
        ("CreateContainerConfigError", 'secret "redis-auth" not found'),
        ("CreateContainerError", "failed to reserve container name"),
        ("RunContainerError", "failed to start containerd task: exec: no such file"),
    ],
)
def test_every_hard_waiting_reason_is_degraded_with_its_message(reason: str, message: str) -> None:
    found = finding(with_waiting(reason, message))
    assert (found.reason, found.message, found.degraded) == (reason, message, True)


def test_oom_killed_in_crash_loop_reports_the_oom_as_cause_and_the_loop_as_state() -> None:
    found = finding(oom_crash_loop())
    assert found.reason == "OOMKilled"
    assert found.state == "CrashLoopBackOff"
    assert found.restarts == 5
    assert found.degraded
    assert "memory limit 2Gi" in found.message
    assert "exit code 137" in found.message
    assert "restarted 5 times" in found.message
    assert found.as_status() == {
        "pod": "demo-cpu-7d9f8c6b5-oom01",
        "reason": "OOMKilled",
        "state": "CrashLoopBackOff",
        "message": found.message,
        "restarts": 5,
    }


def test_a_crash_loop_after_an_error_names_the_exit_code_and_the_last_output() -> None:
    found = finding(error_crash_loop())
    assert found.reason == "CrashLoopBackOff"
    assert found.degraded
    assert "exited Error (exit code 1)" in found.message
    assert "restarted 3 times" in found.message
    assert "back-off 2m40s" in found.message
    assert "ModuleNotFoundError: onnxruntime" in found.message


def test_an_unschedulable_pod_carries_the_schedulers_message() -> None:
    found = finding(unschedulable())
    assert found.reason == "Unschedulable"
    assert found.message.startswith("0/3 nodes are available: 1 Insufficient cpu")
    assert found.degraded


def test_a_pod_the_scheduler_has_not_seen_yet_is_starting() -> None:
    found = finding(pod(phase="Pending"))
    assert (found.reason, found.starting, found.degraded) == ("Pending", True, False)


def test_a_pod_scheduling_gated_is_starting_not_degraded() -> None:
    gated = pod(phase="Pending", conditions=[])
    gated["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
    ]
    found = finding(gated)
    assert (found.reason, found.starting, found.degraded) == ("SchedulingGated", True, False)


def test_container_creating_is_starting_not_degraded() -> None:
    found = finding(container_creating())
    assert found.reason == "ContainerCreating"
    assert found.starting
    assert not found.degraded


def test_a_container_warming_up_within_its_startup_probe_is_starting() -> None:
    found = finding(warming_up(seconds=30))
    assert found.reason == "Starting"
    assert found.starting
    assert not found.degraded
    assert "startup probe not passed yet" in found.message
    # Startup 24 x 5 s + readiness 2 x 5 s + 10 s slack = 140 s; 30 s have passed.
    assert found.changes_in == pytest.approx(110)


def test_a_container_not_ready_past_the_probes_budget_has_a_failing_readiness_probe() -> None:
    found = finding(readiness_failing())
    assert found.reason == "ProbeFailing"
    assert found.message.startswith("not ready: readiness probe failing")
    assert "running for 20m" in found.message
    assert not found.starting
    assert not found.degraded


def test_a_startup_probe_that_never_passes_is_reported_as_such() -> None:
    found = finding(warming_up(seconds=600))
    assert found.reason == "ProbeFailing"
    assert found.message.startswith("not ready: startup probe failing")


def test_the_grace_comes_from_the_pods_own_probes() -> None:
    body = warming_up(seconds=30)
    del body["spec"]["containers"][0]["startupProbe"]
    # Readiness only: 2 x 5 s + 10 s slack = 20 s < 30 s.
    found = finding(body)
    assert found.reason == "ProbeFailing"
    assert "readiness probe failing" in found.message


def test_running_again_soon_after_an_oom_is_still_the_oom() -> None:
    running = {"running": {"startedAt": ts(NOW - timedelta(seconds=5))}}
    body = pod(
        conditions=scheduled_conditions(False),
        containers=[
            container(
                state=running,
                restarts=2,
                last=terminated("OOMKilled", 137, NOW - timedelta(seconds=6)),
            )
        ],
    )
    found = finding(body)
    assert (found.reason, found.state, found.degraded) == ("OOMKilled", "Running", True)
    assert found.changes_in == pytest.approx(594)


def test_restarts_with_the_last_termination_are_told_while_not_ready() -> None:
    running = {"running": {"startedAt": ts(NOW - timedelta(minutes=15))}}
    body = pod(
        conditions=scheduled_conditions(False),
        containers=[
            container(
                state=running,
                started=True,
                restarts=4,
                last=terminated("Error", 2, NOW - timedelta(minutes=15)),
            )
        ],
    )
    found = finding(body)
    assert found.reason == "ProbeFailing"
    assert found.restarts == 4
    assert "restarted 4 times, last Error (exit code 2)" in found.message


def test_a_container_terminated_with_an_error_names_its_exit_code() -> None:
    state = {"terminated": terminated("Error", 3, NOW, message="bad config")}
    body = pod(conditions=scheduled_conditions(False), containers=[container(state=state)])
    found = finding(body)
    assert found.reason == "Error"
    assert "exit code 3" in found.message
    assert "bad config" in found.message
    assert not found.degraded


def test_a_failing_init_container_is_the_reason_the_pod_waits() -> None:
    body = pod(
        phase="Pending",
        conditions=scheduled_conditions(False),
        containers=[container(state={"waiting": {"reason": "PodInitializing"}})],
    )
    init = container(state={"waiting": {"reason": "ImagePullBackOff", "message": "init x"}})
    init["name"] = "fetch-model"
    body["status"]["initContainerStatuses"] = [init]
    found = finding(body)
    assert (found.reason, found.message) == ("ImagePullBackOff", "init x")


def test_an_evicted_pod_reports_the_kubelets_reason() -> None:
    body = pod(phase="Failed")
    body["status"].update(reason="Evicted", message="The node was low on resource: memory.")
    found = finding(body)
    assert (found.reason, found.message) == ("Evicted", "The node was low on resource: memory.")


def test_long_messages_are_cut() -> None:
    found = finding(with_waiting("CreateContainerError", "x" * 5000))
    assert len(found.message) == 300
    assert found.message.endswith("...")


def test_pool_findings_put_hard_failures_first_and_skip_ready_pods() -> None:
    pods = [
        PodState.from_pod(p)
        for p in (
            healthy(),
            container_creating("demo-cpu-a"),
            readiness_failing("demo-cpu-b"),
            image_pull_backoff("demo-cpu-c"),
            oom_crash_loop("demo-cpu-d"),
        )
    ]
    found = pool_findings(pods, NOW)
    assert [f.pod for f in found] == ["demo-cpu-c", "demo-cpu-d", "demo-cpu-b", "demo-cpu-a"]
    assert degraded_reason(found) == "OOMKilled"
    assert next_change(found) is None


def test_a_healthy_pool_has_no_findings() -> None:
    pods = [PodState.from_pod(healthy(f"demo-cpu-{i}")) for i in range(3)]
    assert pool_findings(pods, NOW) == []
    assert degraded_reason([]) is None


def test_degraded_reason_ignores_pods_that_are_only_starting() -> None:
    found = pool_findings(
        [PodState.from_pod(container_creating()), PodState.from_pod(warming_up())], NOW
    )
    assert degraded_reason(found) is None
    assert next_change(found) == pytest.approx(110)


def test_equal_pod_states_compare_equal_so_resent_events_change_nothing() -> None:
    assert PodState.from_pod(image_pull_backoff()) == PodState.from_pod(image_pull_backoff())
    assert PodState.from_pod(image_pull_backoff()) != PodState.from_pod(err_image_pull())
