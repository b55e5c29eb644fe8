"""The controller and the pods of its pools: pod events refresh status (never apply), status
says why pods are not ready, and a Warning Event is posted once per (pod, reason)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import kopf
import pytest
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.controller import Controller
from rembg_operator.models import RembgServiceSpec
from rembg_operator.rbac import RULES
from rembg_operator.reconciler import merge_patch
from rembg_operator.startup import POD_SELECTOR, filter_pods
from rembg_operator.status import now_utc

from tests.operator import pod_objects as pods
from tests.operator.controller_support import (
    RecordingClient,
    created,
    owner,
    running,
    settle,
    until,
)

pytestmark = pytest.mark.anyio

SPEC: dict[str, Any] = {"cpu": {}}


def _cpu_status(client: RecordingClient) -> dict[str, Any]:
    return dict(client.statuses[-1]["pools"]["cpu"])


def _condition(client: RecordingClient, kind: str) -> dict[str, Any]:
    # The latest status patch that carries conditions (every patch does).
    (found,) = [c for c in client.statuses[-1]["conditions"] if c["type"] == kind]
    return dict(found)


def _pod_events(client: RecordingClient) -> list[tuple[str, str]]:
    return [e for e in client.events if e[0] not in ("Applied",)]


@asynccontextmanager
async def with_pods(client: RecordingClient, *bodies: dict[str, Any]) -> AsyncIterator[Controller]:
    async with running(client) as controller:
        await created(controller, SPEC)
        for body in bodies:
            controller.on_pod_event("ADDED", body)
        await settle(controller)
        yield controller


async def test_a_pod_event_refreshes_status_and_never_applies() -> None:
    client = RecordingClient()
    async with with_pods(client) as controller:
        applied = len(client.applies())
        controller.on_pod_event("ADDED", pods.image_pull_backoff("demo-cpu-abc12"))
        await settle(controller)
        assert len(client.applies()) == applied
    cpu = _cpu_status(client)
    assert cpu["notReadyPods"] == 1
    assert cpu["notReady"][0]["pod"] == "demo-cpu-abc12"
    assert cpu["notReady"][0]["reason"] == "ImagePullBackOff"
    ready = _condition(client, "Ready")
    assert ready["reason"] == "PodsNotReady"
    assert ready["message"].startswith("cpu: 0/1 ready; pod demo-cpu-abc12: ImagePullBackOff")
    assert _condition(client, "Degraded")["reason"] == "ImagePullBackOff"


async def test_a_warning_event_names_the_pod_and_the_reason_once() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.unschedulable("demo-cpu-pend1")) as controller:
        # The same pod again (a resync, a status heartbeat): no second Event.
        controller.on_pod_event("MODIFIED", pods.unschedulable("demo-cpu-pend1"))
        controller.request(("ns", "demo"), full=True)
        await settle(controller)
    (event,) = _pod_events(client)
    assert event[0] == "Unschedulable"
    assert event[1].startswith("pool cpu: pod demo-cpu-pend1: Unschedulable: 0/3 nodes")


async def test_a_pull_that_alternates_reasons_posts_each_reason_once() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.err_image_pull()) as controller:
        for _ in range(3):
            controller.on_pod_event("MODIFIED", pods.image_pull_backoff())
            await settle(controller)
            controller.on_pod_event("MODIFIED", pods.err_image_pull())
            await settle(controller)
    assert [e[0] for e in _pod_events(client)] == ["ErrImagePull", "ImagePullBackOff"]


async def test_a_relapse_after_the_pod_got_ready_is_posted_again() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.oom_crash_loop("demo-cpu-x")) as controller:
        controller.on_pod_event("MODIFIED", pods.healthy("demo-cpu-x"))
        await settle(controller)
        controller.on_pod_event("MODIFIED", pods.oom_crash_loop("demo-cpu-x"))
        await settle(controller)
    assert [e[0] for e in _pod_events(client)] == ["OOMKilled", "OOMKilled"]
    assert "(state CrashLoopBackOff)" in _pod_events(client)[0][1]


async def test_a_pod_merely_starting_posts_no_event_and_is_not_degraded() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.container_creating()):
        pass
    assert _pod_events(client) == []
    assert _condition(client, "Degraded")["status"] == "False"
    assert _cpu_status(client)["notReady"][0]["reason"] == "ContainerCreating"


async def test_a_whole_pool_failing_at_once_posts_a_few_events() -> None:
    client = RecordingClient()
    many = [pods.image_pull_backoff(f"demo-cpu-{i:02}") for i in range(12)]
    async with with_pods(client, *many):
        pass
    assert len(_pod_events(client)) == 5
    cpu = _cpu_status(client)
    assert cpu["notReadyPods"] == 12
    assert len(cpu["notReady"]) == 5


async def test_pods_seen_before_their_service_count_once_it_is_known() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        controller.on_pod_event("ADDED", pods.unschedulable("demo-cpu-early"))
        await created(controller, SPEC)
    assert _cpu_status(client)["notReady"][0]["pod"] == "demo-cpu-early"


async def test_a_deleted_pod_leaves_the_status() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.image_pull_backoff("demo-cpu-abc12")) as controller:
        controller.on_pod_event("DELETED", pods.image_pull_backoff("demo-cpu-abc12"))
        await settle(controller)
    assert client.statuses[-1]["pools"]["cpu"]["notReady"] is None
    assert client.statuses[-1]["pools"]["cpu"]["notReadyPods"] is None
    assert _condition(client, "Degraded")["status"] == "False"


async def test_pods_of_other_services_do_not_touch_this_one() -> None:
    client = RecordingClient()
    async with with_pods(client) as controller:
        written = len(client.statuses)
        controller.on_pod_event("ADDED", pods.image_pull_backoff(service="other"))
        await settle(controller)
        assert len(client.statuses) == written


async def test_a_container_warming_up_gets_a_second_look_when_its_grace_ends() -> None:
    client = RecordingClient()
    # The controller reads the clock itself: a pod that started a moment ago.
    async with with_pods(client, pods.warming_up(now=now_utc())) as controller:
        assert _cpu_status(client)["notReady"][0]["reason"] == "Starting"
        assert controller.queue.delayed(("ns", "demo"))
        controller.forget(("ns", "demo"))
        assert not controller.queue.delayed(("ns", "demo"))


async def test_forgetting_a_service_forgets_its_pods() -> None:
    client = RecordingClient()
    async with with_pods(client, pods.image_pull_backoff("demo-cpu-abc12")) as controller:
        controller.forget(("ns", "demo"))
        controller.on_service_event("ADDED", owner(SPEC))
        await settle(controller)
    # Known again from scratch: no pod until the pod watch delivers one.
    assert "notReady" not in client.statuses[-1]["pools"]["cpu"]


def test_merge_patch_drops_a_pools_vanished_keys() -> None:
    previous = {"pools": {"cpu": {"readyReplicas": 0, "notReady": [{"pod": "x"}]}}}
    patch = merge_patch(previous, {"pools": {"cpu": {"readyReplicas": 1}}})
    assert patch["pools"] == {"cpu": {"readyReplicas": 1, "notReady": None}}


def test_only_our_pools_pods_are_watched_and_rbac_grants_exactly_list_and_watch() -> None:
    settings = kopf.OperatorSettings()
    filter_pods(settings)
    assert POD_SELECTOR == "app.kubernetes.io/managed-by=rembg-operator,rembg.io/pool"
    (selector,) = list(settings.watching.label_selectors.values())
    assert selector == POD_SELECTOR
    (rule,) = [r for r in RULES if "pods" in r.resources]
    assert (rule.api_group, rule.verbs) == ("", ("list", "watch"))


def test_the_pod_selector_matches_the_labels_the_pod_template_carries() -> None:
    spec = RembgServiceSpec.model_validate({"cpu": {}, "gpu": {}})
    built = build_children(ServiceRef("demo", "ns"), spec, Capabilities(gpu_capacity=2))
    templates = [m for m in built.manifests if m["kind"] == "Deployment"]
    assert len(templates) == 2
    for deployment in templates:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "rembg-operator"
        assert labels["rembg.io/pool"] in ("cpu", "gpu")
        assert labels["rembg.io/service"] == "demo"


async def test_a_burst_of_readiness_events_is_one_status_write() -> None:
    client = RecordingClient()
    async with running(client, status_coalesce_seconds=0.2) as controller:
        await created(controller, SPEC)
        writes = len(client.statuses)
        for name in ("demo-cpu-a", "demo-cpu-b", "demo-cpu-c"):
            controller.on_pod_event("ADDED", pods.image_pull_backoff(name))
        await until(lambda: len(client.statuses) > writes)
        await asyncio.sleep(0.3)
        await settle(controller)
        assert len(client.statuses) == writes + 1
        assert _cpu_status(client)["notReadyPods"] == 3
