"""The controller's decisions: which events cause applies, which only refresh status, that an
invalid spec never touches children, and that no deleted child goes unrepaired."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
from rembg_operator import audit as audit_module
from rembg_operator.builders.meta import SERVICE_LABEL
from rembg_operator.controller import Controller
from rembg_operator.kube import ApiError

from tests.operator.controller_support import (
    ListsFail,
    RecordingClient,
    conditions,
    created,
    deployment_manifest_for,
    owner,
    ready_deployment,
    running,
    settle,
    stored_child,
    until,
)

pytestmark = pytest.mark.anyio

CHILD_KINDS = [
    "Deployment",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PrometheusRule",
    "Service",
    "ServiceMonitor",
]


async def test_full_reconcile_applies_every_child_and_writes_status() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
    assert sorted(c[1] for c in client.applies()) == CHILD_KINDS
    (status,) = client.statuses
    assert status["observedGeneration"] == 1
    assert {i["kind"] for i in status["inventory"]} == set(CHILD_KINDS)
    assert ("Applied", "generation 1 applied") in client.events


async def test_applied_children_are_owned_by_the_service() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
    children = [o for (kind, _, _), o in client.stored.items() if kind != "RembgService"]
    assert len(children) == len(CHILD_KINDS)
    for stored in children:
        (ref,) = stored["metadata"]["ownerReferences"]
        assert ref["uid"] == "u-demo"
        assert ref["controller"] is True


async def test_status_only_child_event_does_not_reapply() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        controller.on_child_event("MODIFIED", ready_deployment(owner({"cpu": {}})))
        await settle(controller)
        assert len(client.applies()) == applied
        assert conditions(client.statuses[-1])["Ready"]["status"] == "True"


async def test_child_status_change_during_a_full_reconcile_reaches_status() -> None:
    """A pod turning Ready while the full reconcile runs (after its status write) must still
    be reported: regression for a RembgService stuck at `cpu 1/2 ready`."""
    pending = [ready_deployment(owner({"cpu": {}}))]
    controllers: list[Controller] = []

    class EventDuringReconcile(RecordingClient):
        async def post_event(self, owner: Any, *, warning: bool, reason: str, message: str) -> None:
            await super().post_event(owner, warning=warning, reason=reason, message=message)
            if pending:
                controllers[0].on_child_event("MODIFIED", pending.pop())

    client = EventDuringReconcile()
    async with running(client) as controller:
        controllers.append(controller)
        await created(controller, {"cpu": {}})
        assert not pending, "the event was not delivered mid-reconcile"
        await settle(controller)
        assert conditions(client.statuses[-1])["Ready"]["status"] == "True"


async def test_edited_child_is_reapplied() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        edited = stored_child(client, "Deployment", "demo-cpu")
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
        controller.on_child_event("MODIFIED", edited)
        await settle(controller)
        # Only the edited child is applied again: the others are as applied.
        assert client.applies()[applied:] == [("apply", "Deployment", "demo-cpu")]


async def test_deleted_child_is_reapplied_but_pruned_one_is_not() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        gone = stored_child(client, "Deployment", "demo-cpu")
        controller.on_child_event("DELETED", gone)
        await settle(controller)
        assert client.applies()[applied:] == [("apply", "Deployment", "demo-cpu")]
        stranger = copy.deepcopy(gone)
        stranger["metadata"]["name"] = "demo-gpu"
        controller.on_child_event("DELETED", stranger)
        await settle(controller)
        assert len(client.applies()) == applied + 1


async def test_forgetting_a_service_keeps_a_service_whose_name_it_prefixes() -> None:
    """Regression: forgetting `demo` dropped what was known of `demo-cpu`'s children (matched
    by name prefix), so a later deletion of `demo-cpu`'s Deployment was never repaired."""
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}}, name="demo")
        await created(controller, {"cpu": {}}, name="demo-cpu")
        controller.on_service_event("DELETED", owner({"cpu": {}}, name="demo"))
        applied = len(client.applies())
        controller.on_child_event("DELETED", stored_child(client, "Deployment", "demo-cpu-cpu"))
        await settle(controller)
        assert client.applies()[applied:] == [("apply", "Deployment", "demo-cpu-cpu")]


async def test_children_deleted_while_no_watch_saw_it_are_found_and_repaired() -> None:
    """Regression: children deleted while the watches reconnected were never restored (no
    event), and status kept saying Ready. The audit lists them and repairs what is gone."""
    client = RecordingClient()
    async with running(client, audit_seconds=0.2) as controller:
        await created(controller, {"cpu": {}})
        controller.on_child_event("MODIFIED", ready_deployment(owner({"cpu": {}})))
        await settle(controller)
        applied = len(client.applies())
        for kind, name in (
            ("Deployment", "demo-cpu"),
            ("Service", "demo"),
            ("HorizontalPodAutoscaler", "demo-cpu"),
        ):
            client.vanish(kind, "ns", name)
        await until(lambda: ("Deployment", "ns", "demo-cpu") in client.stored)
        await settle(controller)
        repaired = {(c[1], c[2]) for c in client.applies()[applied:]}
        assert {("Deployment", "demo-cpu"), ("Service", "demo")} <= repaired
        assert ("HorizontalPodAutoscaler", "demo-cpu") in repaired
        # Until its pods are ready again, the restored Deployment is not Ready.
        assert conditions(client.statuses[-1])["Ready"]["status"] == "False"


async def test_a_relist_of_a_known_service_audits_at_once() -> None:
    client = RecordingClient()
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})
        client.vanish("PodDisruptionBudget", "ns", "demo-cpu")
        lists = len([c for c in client.calls if c[0] == "list"])
        controller.on_service_event(None, owner({"cpu": {}}, status=client.statuses[-1]))
        await until(lambda: ("PodDisruptionBudget", "ns", "demo-cpu") in client.stored)
        assert len([c for c in client.calls if c[0] == "list"]) > lists


async def test_the_audit_leaves_children_that_exist_alone() -> None:
    client = RecordingClient()
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        assert await controller.auditor.audit() == 0
        await settle(controller)
        assert len(client.applies()) == applied
        assert {c[1] for c in client.calls if c[0] == "list"} == {*CHILD_KINDS, "RembgService"}
        assert {c[3] for c in client.calls if c[0] == "list"} == {"metadata"}
        # A deep audit compares whole objects: as applied, nothing to do either.
        assert await controller.auditor.audit(deep=True) == 0
        await settle(controller)
        assert len(client.applies()) == applied


async def test_removed_pool_is_pruned() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}, "gpu": {}})
        controller.on_service_event(
            "MODIFIED", owner({"cpu": {}}, generation=2, status=client.statuses[-1])
        )
        await settle(controller)
    deleted = sorted((c[1], c[2]) for c in client.deletes())
    assert deleted == [
        ("Deployment", "demo-gpu"),
        ("HorizontalPodAutoscaler", "demo-gpu"),
        ("PodDisruptionBudget", "demo-gpu"),
    ]


async def test_invalid_spec_touches_no_child_and_reports() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        bad = {"cpu": {"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}}}
        controller.on_service_event(
            "MODIFIED", owner(bad, generation=2, status=client.statuses[-1])
        )
        await settle(controller)
        assert len(client.applies()) == applied
        assert not client.deletes()
    found = conditions(client.statuses[-1])
    assert found["Degraded"]["reason"] == "InvalidSpec"
    assert found["Stalled"]["status"] == "True"
    assert client.statuses[-1]["observedGeneration"] == 2
    assert client.events[-1][0] == "InvalidSpec"
    # The status still describes the running pool.
    assert "cpu" in client.statuses[-1]["pools"]


async def test_failed_apply_is_reported_retried_and_never_pruned() -> None:
    client = RecordingClient()
    client.fail_kinds = {"Service"}
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        assert controller.queue.failures(("ns", "demo")) == 1
        found = conditions(client.statuses[-1])
        assert found["Degraded"]["reason"] == "ApplyFailed"
        assert "Service" in {i["kind"] for i in client.statuses[-1]["inventory"]}
        assert not client.deletes()
        assert client.events[-1][0] == "ApplyFailed"
        # The retry (after the first backoff delay) applies again; it succeeds once etcd does.
        client.fail_kinds = set()
        services = len([c for c in client.applies() if c[1] == "Service"])
        await until(lambda: len([c for c in client.applies() if c[1] == "Service"]) > services)
        await settle(controller)
        assert controller.queue.failures(("ns", "demo")) == 0
        assert "Degraded" not in {
            t for t, c in conditions(client.statuses[-1]).items() if c["status"] == "True"
        }


async def test_monitoring_absent_is_skipped_not_failed() -> None:
    client = RecordingClient(monitoring=False)
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
    kinds = {c[1] for c in client.applies()}
    assert "ServiceMonitor" not in kinds
    reasons = {c["reason"] for c in client.statuses[-1]["unavailableChildren"]}
    assert reasons == {"CrdMissing"}


async def test_unchanged_status_is_not_rewritten() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        writes = len(client.statuses)
        controller.request(("ns", "demo"), full=False)
        await settle(controller)
        assert len(client.statuses) == writes


async def test_events_for_other_services_are_ignored() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        other = stored_child(client, "Deployment", "demo-cpu")
        other["metadata"]["labels"][SERVICE_LABEL] = "someone-else"
        other["metadata"]["name"] = "someone-else-cpu"
        controller.on_child_event("DELETED", other)
        await settle(controller)
        assert len(client.applies()) == applied


async def test_service_events_reconcile_new_services_and_spec_changes_only() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        controller.on_service_event(None, owner({"cpu": {}}))  # listed at start-up: resume
        await settle(controller)
        applied = len(client.applies())
        assert applied == len(CHILD_KINDS)
        # The echo of our own status write: same generation, nothing to do.
        controller.on_service_event("MODIFIED", owner({"cpu": {}}, status=client.statuses[-1]))
        await settle(controller)
        assert len(client.applies()) == applied
        controller.on_service_event("MODIFIED", owner({"cpu": {"maxReplicas": 5}}, generation=2))
        await settle(controller)
        # The new generation changes the HPA only: only it is applied.
        assert client.applies()[applied:] == [("apply", "HorizontalPodAutoscaler", "demo-cpu")]
        # New labels: kopf.adopt copies them to every child.
        labelled = owner({"cpu": {"maxReplicas": 5}}, generation=2)
        labelled["metadata"]["labels"] = {"team": "vision"}
        controller.on_service_event("MODIFIED", labelled)
        await settle(controller)
        assert len(client.applies()) == 2 * applied + 1


async def test_service_being_deleted_is_let_go_not_repaired() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        deleting = owner({"cpu": {}}, generation=2)
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        controller.on_service_event("MODIFIED", deleting)
        # The garbage collector deletes the children (foreground deletion): no repair.
        controller.on_child_event("DELETED", deployment_manifest_for(owner({"cpu": {}})))
        await settle(controller)
        assert len(client.applies()) == applied
        assert ("ns", "demo") not in controller.services
        controller.on_service_event("DELETED", deleting)
        assert ("ns", "demo") not in controller.services


class GatedServiceClient(RecordingClient):
    """Holds every Service apply until released, to see what else runs meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def apply(self, manifest: Any) -> dict[str, Any]:
        stored = await super().apply(manifest)
        if manifest["kind"] == "Service":
            await self.release.wait()
        return stored


async def test_service_creation_goes_before_every_other_write() -> None:
    client = GatedServiceClient()
    async with running(client) as controller:
        controller.on_service_event("ADDED", owner({"cpu": {}}))
        await until(lambda: bool(client.applies()))
        for _ in range(20):
            await asyncio.sleep(0)
        # The Service is being created: nothing else has been sent meanwhile.
        assert [c[1] for c in client.applies()] == ["Service"]
        client.release.set()
        await settle(controller)
        assert len(client.applies()) == len(CHILD_KINDS)
        assert client.statuses


async def test_existing_service_does_not_hold_up_the_other_children() -> None:
    client = GatedServiceClient()
    client.release.set()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        client.release.clear()
        labelled = owner({"cpu": {}})
        labelled["metadata"]["labels"] = {"team": "vision"}  # every child changes
        controller.on_service_event("MODIFIED", labelled)
        # Applying a Service that exists allocates nothing: the rest goes alongside.
        await until(lambda: len(client.applies()) == 2 * len(CHILD_KINDS))
        client.release.set()
        await settle(controller)


async def test_watch_event_newer_than_an_apply_answer_is_kept() -> None:
    """A pod turning Ready while the Deployment's apply is answered: the event (newer) must
    win over the answer (older), or the status stays at `cpu 0/1 ready` for good."""
    ready: list[dict[str, Any]] = []
    controllers: list[Controller] = []

    class ReadyDuringApply(RecordingClient):
        async def apply(self, manifest: Any) -> dict[str, Any]:
            stored = await super().apply(manifest)
            if manifest["kind"] == "Deployment" and ready:
                controllers[0].on_child_event("MODIFIED", ready.pop())
            return stored  # as committed before the pod turned Ready

    client = ReadyDuringApply()
    async with running(client) as controller:
        controllers.append(controller)
        await created(controller, {"cpu": {}})
        ready.append(ready_deployment(owner({"cpu": {}})))
        # A hand edit, so that the next pass applies the Deployment again.
        edited = stored_child(client, "Deployment", "demo-cpu")
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
        controller.on_child_event("MODIFIED", edited)
        await settle(controller)
        assert not ready
        assert conditions(client.statuses[-1])["Ready"]["status"] == "True"


async def test_one_pass_per_service_at_a_time_and_none_lost() -> None:
    """Events during a pass run one more pass after it, never a second one beside it."""
    overlapping: list[bool] = []
    inside = asyncio.Event()
    release = asyncio.Event()

    class Slow(RecordingClient):
        running_now = 0

        async def patch_status(self, namespace: str, name: str, status: Any) -> None:
            Slow.running_now += 1
            overlapping.append(Slow.running_now > 1)
            inside.set()
            await release.wait()
            await super().patch_status(namespace, name, status)
            Slow.running_now -= 1

    client = Slow()
    async with running(client) as controller:
        controller.on_service_event("ADDED", owner({"cpu": {}}))
        await inside.wait()
        for generation in (2, 3, 4):
            controller.on_service_event(
                "MODIFIED", owner({"cpu": {"maxReplicas": 3 + generation}}, generation=generation)
            )
        release.set()
        await settle(controller)
    assert not any(overlapping)
    # The first pass, then one more for the three changes that came during it (the last
    # one's HPA is all that differs).
    assert len(client.applies()) == len(CHILD_KINDS) + 1
    assert client.applies()[-1] == ("apply", "HorizontalPodAutoscaler", "demo-cpu")
    assert client.statuses[-1]["observedGeneration"] == 4


async def test_an_audit_that_fails_is_retried_soon_and_the_controller_keeps_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(audit_module, "AUDIT_RETRY_SECONDS", 0.05)
    client = ListsFail(times=3)
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})
        client.vanish("Service", "ns", "demo")
        controller.on_service_event(None, owner({"cpu": {}}, status=client.statuses[-1]))
        await until(lambda: ("Service", "ns", "demo") in client.stored)
        assert not client.failures_left
        # Still serving events after the failed audits.
        applied = len(client.applies())
        controller.on_child_event("DELETED", stored_child(client, "Deployment", "demo-cpu"))
        await until(lambda: ("apply", "Deployment", "demo-cpu") in client.applies()[applied:])
        await settle(controller)


async def test_a_deep_audit_undoes_an_edit_no_watch_delivered() -> None:
    client = RecordingClient()
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})

        def scale_by_hand(deployment: dict[str, Any]) -> None:
            deployment["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"

        client.edit("Deployment", "demo-cpu", scale_by_hand)
        assert await controller.auditor.audit() == 0  # names only: it is there
        applied = len(client.applies())
        assert await controller.auditor.audit(deep=True) == 1
        await settle(controller)
        # Only the edited child is applied again; the others are as applied.
        assert client.applies()[applied:] == [("apply", "Deployment", "demo-cpu")]
        image = client.stored[("Deployment", "ns", "demo-cpu")]["spec"]["template"]["spec"][
            "containers"
        ][0]["image"]
        assert image != "evil:1"


async def test_an_unchanged_pass_sends_no_write() -> None:
    """Steady state: a resync (or any full pass) of a fleet nobody changed writes nothing."""
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}, "gpu": {}})
        controller.on_child_event("MODIFIED", ready_deployment(owner({"cpu": {}, "gpu": {}})))
        await settle(controller)
        calls = len(client.calls)
        events = len(client.events)
        for _ in range(3):
            controller.request(("ns", "demo"), full=True)
            await settle(controller)
        assert client.calls[calls:] == []
        assert len(client.events) == events


async def test_a_spec_change_applies_only_the_children_it_changes() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}, "gpu": {}})
        applied = len(client.applies())
        status = client.statuses[-1]
        controller.on_service_event(
            "MODIFIED", owner({"cpu": {"maxReplicas": 7}, "gpu": {}}, generation=2, status=status)
        )
        await settle(controller)
        assert sorted(c[1:] for c in client.applies()[applied:]) == [
            ("HorizontalPodAutoscaler", "demo-cpu"),
        ]


async def test_a_service_deleted_while_no_watch_saw_it_is_let_go_not_fought() -> None:
    """Regression (review): a RembgService deleted during an outage stayed known, and each
    child the garbage collector removed was applied again, forever."""
    client = RecordingClient()
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})
        client.vanish("RembgService", "ns", "demo")
        await controller.auditor.audit()
        assert ("ns", "demo") not in controller.services
        applied = len(client.applies())
        controller.on_child_event("DELETED", stored_child(client, "Deployment", "demo-cpu"))
        await settle(controller)
        assert len(client.applies()) == applied


async def test_a_status_write_answered_404_forgets_the_service() -> None:
    class Gone(RecordingClient):
        async def patch_status(self, namespace: str, name: str, status: Any) -> None:
            raise ApiError(404, "NotFound", f'rembgservices.rembg.io "{name}" not found')

    client = Gone()
    async with running(client) as controller:
        controller.on_service_event("ADDED", owner({"cpu": {}}))
        await until(lambda: ("ns", "demo") not in controller.services)
        await settle(controller)
        assert not controller.queue.delayed(("ns", "demo"))  # no retry of a gone service


async def test_a_scale_by_the_autoscaler_is_not_an_edit() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        applied = len(client.applies())
        scaled = stored_child(client, "Deployment", "demo-cpu")
        scaled["spec"]["replicas"] = 3
        controller.on_child_event("MODIFIED", scaled)
        await settle(controller)
        assert len(client.applies()) == applied


async def test_a_hand_scale_of_a_fixed_pool_is_undone() -> None:
    client = RecordingClient()
    spec = {"cpu": {"minReplicas": 2, "maxReplicas": 2}, "autoscaling": {"enabled": False}}
    async with running(client) as controller:
        await created(controller, spec)
        applied = len(client.applies())
        scaled = stored_child(client, "Deployment", "demo-cpu")
        assert "replicas" in deployment_manifest_for(owner(spec))["spec"]
        scaled["spec"]["replicas"] = 5
        controller.on_child_event("MODIFIED", scaled)
        await settle(controller)
        assert client.applies()[applied:] == [("apply", "Deployment", "demo-cpu")]


async def test_a_prune_that_fails_is_kept_and_retried() -> None:
    class DeleteFails(RecordingClient):
        failures = 1

        async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
            if DeleteFails.failures and kind == "Deployment":
                DeleteFails.failures -= 1
                self.calls.append(("delete", kind, name))
                raise ApiError(500, "InternalError", "etcd is sad")
            return await super().delete(api_version, kind, namespace, name)

    client = DeleteFails()
    async with running(client) as controller:
        await created(controller, {"cpu": {}, "gpu": {}})
        controller.on_service_event(
            "MODIFIED", owner({"cpu": {}}, generation=2, status=client.statuses[-1])
        )
        await settle(controller)
        inventory = {(i["kind"], i["name"]) for i in client.statuses[-1]["inventory"]}
        assert ("Deployment", "demo-gpu") in inventory  # still to delete
        await until(lambda: ("Deployment", "ns", "demo-gpu") not in client.stored)
        await settle(controller)
    deletes = [c for c in client.deletes() if c[1:] == ("Deployment", "demo-gpu")]
    assert len(deletes) == 2
    inventory = {(i["kind"], i["name"]) for i in client.statuses[-1]["inventory"]}
    assert ("Deployment", "demo-gpu") not in inventory


async def test_a_service_created_again_under_its_name_starts_afresh() -> None:
    client = RecordingClient()
    async with running(client) as controller:
        await created(controller, {"cpu": {}})
        again = owner({"cpu": {}})
        again["metadata"]["uid"] = "u-demo-2"
        controller.on_service_event("ADDED", again)  # its DELETED event was missed
        await settle(controller)
    applied = [c for c in client.events if c[0] == "Applied"]
    assert len(applied) == 2  # one per object, though both were generation 1
    owners = {
        o["metadata"]["ownerReferences"][0]["uid"]
        for (k, _, _), o in client.stored.items()
        if k != "RembgService"
    }
    assert owners == {"u-demo-2"}


async def test_after_an_outage_the_audit_stays_watchful_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Deletions made in the first seconds after the API server returns reached no watch:
    the audit runs every few seconds for a while after a failed one, not every interval."""
    monkeypatch.setattr(audit_module, "AUDIT_RETRY_SECONDS", 0.05)
    client = ListsFail(times=1)
    async with running(client, audit_seconds=3600) as controller:
        await created(controller, {"cpu": {}})
        controller.on_service_event(None, owner({"cpu": {}}, status=client.statuses[-1]))
        await until(lambda: not client.failures_left)
        await asyncio.sleep(0.2)  # a few good audits after the failed one
        client.vanish("HorizontalPodAutoscaler", "ns", "demo-cpu")
        await until(lambda: ("HorizontalPodAutoscaler", "ns", "demo-cpu") in client.stored)
