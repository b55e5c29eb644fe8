"""KEDA's conditions on a ScaledObject reach the RembgService status through the child watch:
a status-only change is a status refresh (no apply), as for a Deployment."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.operator import keda_objects as keda
from tests.operator.controller_support import (
    RecordingClient,
    conditions,
    created,
    running,
    settle,
    stored_child,
)

pytestmark = pytest.mark.anyio

SPEC = {"cpu": {}, "autoscaling": {"engine": "keda"}}


def as_keda_leaves_it(client: RecordingClient, conditions: list[dict[str, str]]) -> dict[str, Any]:
    """The ScaledObject once KEDA reconciled it: its name label (an update) and its status."""
    scaled = stored_child(client, "ScaledObject", "demo-cpu")
    scaled["metadata"]["labels"]["scaledobject.keda.sh/name"] = "demo-cpu"
    scaled["metadata"]["finalizers"] = ["finalizer.keda.sh"]
    scaled["status"] = keda.status(conditions)
    return scaled


async def test_a_scaled_object_status_event_refreshes_status_with_kedas_conditions() -> None:
    client = RecordingClient(keda=True)
    async with running(client) as controller:
        await created(controller, SPEC)
        first = client.statuses[-1]
        assert first["pools"]["cpu"]["autoscaler"]["ready"] == "Unknown"
        assert conditions(first)["AutoscalingAvailable"]["reason"] == "WaitingForKeda"
        applied = len(client.applies())

        controller.on_child_event("MODIFIED", as_keda_leaves_it(client, keda.ready(active=True)))
        await settle(controller)
        assert len(client.applies()) == applied, "a status change is not an edit"
        status = client.statuses[-1]
        assert status["pools"]["cpu"]["autoscaler"] == keda.READY_AND_ACTIVE
        found = conditions(status)["AutoscalingAvailable"]
        assert (found["status"], found["reason"]) == ("True", "KedaReady")

        controller.on_child_event("MODIFIED", as_keda_leaves_it(client, keda.check_failed()))
        await settle(controller)
        assert len(client.applies()) == applied
        status = client.statuses[-1]
        assert status["pools"]["cpu"]["autoscaler"]["message"] == keda.CHECK_FAILED
        found = conditions(status)["AutoscalingAvailable"]
        assert (found["status"], found["reason"]) == ("False", "KedaNotReady")
        assert found["message"] == f"pool cpu: ScaledObject demo-cpu: {keda.CHECK_FAILED}"


async def test_kedas_verdict_leaves_ready_to_the_pods() -> None:
    client = RecordingClient(keda=True)
    async with running(client) as controller:
        await created(controller, SPEC)
        deployment = stored_child(client, "Deployment", "demo-cpu")
        deployment["status"] = {
            "observedGeneration": 1,
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
        }
        controller.on_child_event("MODIFIED", deployment)
        controller.on_child_event("MODIFIED", as_keda_leaves_it(client, keda.check_failed()))
        await settle(controller)
        found = conditions(client.statuses[-1])
        assert found["AutoscalingAvailable"]["status"] == "False"
        assert (found["Ready"]["status"], found["Ready"]["reason"]) == ("True", "AllPoolsReady")
        assert found["Degraded"]["status"] == "False"


async def test_kedas_status_in_an_apply_answer_is_reported_at_once() -> None:
    """After a restart the first pass applies every child: the answer carries KEDA's status."""

    class KedaReconciled(RecordingClient):
        async def apply(self, manifest: Any) -> dict[str, Any]:
            stored = await super().apply(manifest)
            if manifest["kind"] == "ScaledObject":
                stored = copy.deepcopy(stored)
                stored["status"] = keda.status(keda.ready())
            return stored

    client = KedaReconciled(keda=True)
    async with running(client) as controller:
        await created(controller, SPEC)
    (status,) = client.statuses
    assert status["pools"]["cpu"]["autoscaler"]["ready"] == "True"
    assert conditions(status)["AutoscalingAvailable"]["reason"] == "KedaReady"


async def test_a_deleted_scaled_object_is_reapplied_and_waits_for_keda_again() -> None:
    client = RecordingClient(keda=True)
    async with running(client) as controller:
        await created(controller, SPEC)
        controller.on_child_event("MODIFIED", as_keda_leaves_it(client, keda.ready()))
        await settle(controller)
        assert conditions(client.statuses[-1])["AutoscalingAvailable"]["reason"] == "KedaReady"
        applied = len(client.applies())
        gone = client.vanish("ScaledObject", "ns", "demo-cpu")
        controller.on_child_event("DELETED", gone)
        await settle(controller)
        assert client.applies()[applied:] == [("apply", "ScaledObject", "demo-cpu")]
        found = conditions(client.statuses[-1])["AutoscalingAvailable"]
        assert found["reason"] == "WaitingForKeda"
