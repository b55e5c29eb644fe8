"""The Fleet's decisions, driven through a recording stand-in for the one API module.

Behaviour against the real API server is in e2e/; here: which events cause applies, which
only refresh status, and that an invalid spec never touches children.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import kopf
import pytest
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.config import OperatorConfig
from rembg_operator.fleet import Fleet, ReconcileError
from rembg_operator.kube import ApiError
from rembg_operator.models import RembgServiceSpec


class RecordingClient:
    """Answers like the API server would for the calls the Fleet makes, and records them."""

    def __init__(self, *, monitoring: bool = True, gpus: int | None = 4) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.monitoring = monitoring
        self.gpus = gpus
        self.fail_kinds: set[str] = set()

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", manifest["kind"], manifest["metadata"]["name"]))
        if manifest["kind"] in self.fail_kinds:
            raise ApiError(500, "InternalError", "etcd is sad")
        stored = copy.deepcopy(manifest)
        stored["metadata"]["generation"] = 1
        if manifest["kind"] == "Deployment":
            stored["spec"].setdefault("replicas", 1)
            stored["status"] = {"observedGeneration": 1}
        return stored

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        return True

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append(("status", name))
        self.statuses.append(status)

    async def serves(self, group_version: str, plurals: tuple[str, ...], ttl: float) -> bool:
        return self.monitoring and group_version.startswith("monitoring")

    async def gpu_capacity(self, ttl: float) -> int | None:
        return self.gpus

    def forget_cached(self, key: str | None = None) -> None:
        self.calls.append(("forget",))

    async def post_event(
        self, owner: dict[str, Any], *, warning: bool, reason: str, message: str
    ) -> None:
        self.events.append((reason, message))

    def applies(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == "apply"]


def owner(
    spec: dict[str, Any], generation: int = 1, status: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": "demo", "namespace": "ns", "uid": "u-1", "generation": generation},
        "spec": spec,
        "status": status or {},
    }


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def make(client: RecordingClient) -> Fleet:
    return Fleet(client, OperatorConfig(metrics_port=0, liveness_port=0))  # type: ignore[arg-type]


async def _reconciled(
    client: RecordingClient, spec: dict[str, Any]
) -> tuple[Fleet, dict[str, Any]]:
    fleet = make(client)
    key = fleet.remember(owner(spec))
    await fleet.reconcile(key)
    return fleet, owner(spec)


def test_full_reconcile_applies_every_child_and_writes_status() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        await _reconciled(client, {"cpu": {}})

    run(scenario())
    assert sorted(c[1] for c in client.applies()) == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PrometheusRule",
        "Service",
        "ServiceMonitor",
    ]
    (status,) = client.statuses
    assert status["observedGeneration"] == 1
    assert {i["kind"] for i in status["inventory"]} == {c[1] for c in client.applies()}
    assert ("Applied", "generation 1 applied") in client.events


def test_applied_children_are_owned_by_the_service() -> None:
    seen: list[dict[str, Any]] = []

    class Capturing(RecordingClient):
        async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
            seen.append(manifest)
            return await super().apply(manifest)

    run(_reconciled(Capturing(), {"cpu": {}}))
    for manifest in seen:
        (ref,) = manifest["metadata"]["ownerReferences"]
        assert ref["uid"] == "u-1"
        assert ref["controller"] is True


def test_status_only_child_event_does_not_reapply() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        applied = len(client.applies())
        stored = await RecordingClient().apply(_deployment_manifest(fleet))
        stored["status"] = {
            "observedGeneration": 1,
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
        }
        fleet.on_child_event("MODIFIED", stored)
        await _drain(fleet)
        assert len(client.applies()) == applied
        ready = {c["type"]: c for c in client.statuses[-1]["conditions"]}["Ready"]
        assert ready["status"] == "True"

    run(scenario())


def test_child_status_change_during_a_handler_reconcile_reaches_status() -> None:
    """A pod turning Ready while kopf's handler runs the full reconcile (after its status write)
    must still be reported: regression for a RembgService stuck at `cpu 1/2 ready`."""
    fleets: list[Fleet] = []
    ready_deployment: list[dict[str, Any]] = []

    class EventDuringReconcile(RecordingClient):
        async def post_event(
            self, owner: dict[str, Any], *, warning: bool, reason: str, message: str
        ) -> None:
            await super().post_event(owner, warning=warning, reason=reason, message=message)
            if ready_deployment:
                fleets[0].on_child_event("MODIFIED", ready_deployment.pop())

    client = EventDuringReconcile()

    async def scenario() -> None:
        fleet = make(client)
        fleets.append(fleet)
        key = fleet.remember(owner({"cpu": {}}))
        stored = await RecordingClient().apply(_deployment_manifest_for(owner({"cpu": {}})))
        stored["status"] = {
            "observedGeneration": 1,
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
        }
        ready_deployment.append(stored)
        await fleet.reconcile(key)
        assert not ready_deployment, "the event was not delivered mid-reconcile"
        await _drain(fleet)
        ready = {c["type"]: c for c in client.statuses[-1]["conditions"]}["Ready"]
        assert ready["status"] == "True"

    run(scenario())


def test_edited_child_is_reapplied() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        applied = len(client.applies())
        edited = await RecordingClient().apply(_deployment_manifest(fleet))
        edited["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:1"
        fleet.on_child_event("MODIFIED", edited)
        await _drain(fleet)
        assert len(client.applies()) == 2 * applied

    run(scenario())


def test_deleted_child_is_reapplied_but_pruned_one_is_not() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        applied = len(client.applies())
        gone = await RecordingClient().apply(_deployment_manifest(fleet))
        fleet.on_child_event("DELETED", gone)
        await _drain(fleet)
        assert len(client.applies()) == 2 * applied
        stranger = copy.deepcopy(gone)
        stranger["metadata"]["name"] = "demo-gpu"
        fleet.on_child_event("DELETED", stranger)
        await _drain(fleet)
        assert len(client.applies()) == 2 * applied

    run(scenario())


def test_removed_pool_is_pruned() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}, "gpu": {}})
        key = fleet.remember(owner({"cpu": {}}, generation=2, status=client.statuses[-1]))
        await fleet.reconcile(key)

    run(scenario())
    deleted = sorted((c[1], c[2]) for c in client.calls if c[0] == "delete")
    assert deleted == [
        ("Deployment", "demo-gpu"),
        ("HorizontalPodAutoscaler", "demo-gpu"),
        ("PodDisruptionBudget", "demo-gpu"),
    ]


def test_invalid_spec_touches_no_child_and_reports() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        applied = len(client.applies())
        bad = {"cpu": {"resources": {"requests": {"cpu": "4"}, "limits": {"cpu": "2"}}}}
        key = fleet.remember(owner(bad, generation=2, status=client.statuses[-1]))
        await fleet.reconcile(key)
        assert len(client.applies()) == applied
        assert not [c for c in client.calls if c[0] == "delete"]

    run(scenario())
    conditions = {c["type"]: c for c in client.statuses[-1]["conditions"]}
    assert conditions["Degraded"]["reason"] == "InvalidSpec"
    assert conditions["Stalled"]["status"] == "True"
    assert client.statuses[-1]["observedGeneration"] == 2
    assert client.events[-1][0] == "InvalidSpec"
    # The status still describes the running pool.
    assert "cpu" in client.statuses[-1]["pools"]


def test_failed_apply_is_reported_retried_and_never_pruned() -> None:
    client = RecordingClient()
    client.fail_kinds = {"Service"}

    async def scenario() -> None:
        fleet = make(client)
        key = fleet.remember(owner({"cpu": {}}))
        with pytest.raises(ReconcileError, match="etcd is sad"):
            await fleet.reconcile(key)

    run(scenario())
    conditions = {c["type"]: c for c in client.statuses[-1]["conditions"]}
    assert conditions["Degraded"]["reason"] == "ApplyFailed"
    assert "Service" in {i["kind"] for i in client.statuses[-1]["inventory"]}
    assert not [c for c in client.calls if c[0] == "delete"]
    assert client.events[-1][0] == "ApplyFailed"


def test_monitoring_absent_is_skipped_not_failed() -> None:
    client = RecordingClient(monitoring=False)
    run(_reconciled(client, {"cpu": {}}))
    kinds = {c[1] for c in client.applies()}
    assert "ServiceMonitor" not in kinds
    reasons = {c["reason"] for c in client.statuses[-1]["unavailableChildren"]}
    assert reasons == {"CrdMissing"}


def test_unchanged_status_is_not_rewritten() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        writes = len(client.statuses)
        fleet.request(("ns", "demo"), full=False)
        await _drain(fleet)
        assert len(client.statuses) == writes

    run(scenario())


def test_events_for_other_services_are_ignored() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        applied = len(client.applies())
        other = await RecordingClient().apply(_deployment_manifest(fleet))
        other["metadata"]["labels"]["rembg.io/service"] = "someone-else"
        other["metadata"]["name"] = "someone-else-cpu"
        fleet.on_child_event("DELETED", other)
        await _drain(fleet)
        assert len(client.applies()) == applied

    run(scenario())


def _deployment_manifest(fleet: Fleet) -> dict[str, Any]:
    """The Deployment exactly as the Fleet applied it (what the watch then delivers)."""
    return _deployment_manifest_for(fleet.owners[("ns", "demo")])


def _deployment_manifest_for(body: dict[str, Any]) -> dict[str, Any]:
    spec = RembgServiceSpec.model_validate(body["spec"])
    desired = build_children(ServiceRef("demo", "ns"), spec, Capabilities(True, False, 4))
    kopf.adopt(desired.manifests, owner=kopf.Body(body))  # type: ignore[arg-type]
    return next(m for m in desired.manifests if m["kind"] == "Deployment")


async def _drain(fleet: Fleet) -> None:
    for _ in range(50):
        tasks = [p.task for p in fleet._pending.values() if p.task and not p.task.done()]
        if not tasks:
            return
        await asyncio.gather(*tasks)


def test_service_events_reconcile_new_services_and_spec_changes_only() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet = make(client)
        fleet.on_service_event(None, owner({"cpu": {}}))  # listed at start-up: resume
        await _drain(fleet)
        applied = len(client.applies())
        assert applied == 6
        # The echo of our own status write: same generation, nothing to do.
        fleet.on_service_event("MODIFIED", owner({"cpu": {}}, status=client.statuses[-1]))
        await _drain(fleet)
        assert len(client.applies()) == applied
        fleet.on_service_event("MODIFIED", owner({"cpu": {"maxReplicas": 5}}, generation=2))
        await _drain(fleet)
        assert len(client.applies()) == 2 * applied
        # New labels: kopf.adopt copies them to every child.
        labelled = owner({"cpu": {"maxReplicas": 5}}, generation=2)
        labelled["metadata"]["labels"] = {"team": "vision"}
        fleet.on_service_event("MODIFIED", labelled)
        await _drain(fleet)
        assert len(client.applies()) == 3 * applied

    run(scenario())


def test_service_being_deleted_is_let_go_not_repaired() -> None:
    client = RecordingClient()

    async def scenario() -> None:
        fleet = make(client)
        fleet.on_service_event("ADDED", owner({"cpu": {}}))
        await _drain(fleet)
        applied = len(client.applies())
        deleting = owner({"cpu": {}}, generation=2)
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        fleet.on_service_event("MODIFIED", deleting)
        # The garbage collector deletes the children (foreground deletion): no repair.
        fleet.on_child_event("DELETED", _deployment_manifest_for(owner({"cpu": {}})))
        await _drain(fleet)
        assert len(client.applies()) == applied
        assert ("ns", "demo") not in fleet.owners
        fleet.on_service_event("DELETED", deleting)
        assert ("ns", "demo") not in fleet.owners

    run(scenario())


class GatedServiceClient(RecordingClient):
    """Holds every Service apply until released, to see what else runs meanwhile."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()

    async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
        stored = await super().apply(manifest)
        if manifest["kind"] == "Service":
            await self.release.wait()
        return stored


def test_service_creation_goes_before_every_other_write() -> None:
    client = GatedServiceClient()

    async def scenario() -> None:
        fleet = make(client)
        fleet.on_service_event("ADDED", owner({"cpu": {}}))
        for _ in range(20):
            await asyncio.sleep(0)
        # The Service is being created: nothing else has been sent meanwhile.
        assert [c[1] for c in client.applies()] == ["Service"]
        client.release.set()
        await _drain(fleet)
        assert len(client.applies()) == 6
        assert client.statuses

    run(scenario())


def test_existing_service_does_not_hold_up_the_other_children() -> None:
    client = GatedServiceClient()
    client.release.set()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        client.release.clear()
        fleet.request(("ns", "demo"), full=True)
        for _ in range(20):
            await asyncio.sleep(0)
        # Applying a Service that exists allocates nothing: the rest goes alongside.
        assert len(client.applies()) == 12
        client.release.set()
        await _drain(fleet)

    run(scenario())


def test_watch_event_newer_than_an_apply_answer_is_kept() -> None:
    """A pod turning Ready while the Deployment's apply is answered: the event (newer) must
    win over the answer (older), or the status stays at `cpu 0/1 ready` for good."""
    ready: dict[str, Any] = {}
    fleets: list[Fleet] = []

    class ReadyDuringApply(RecordingClient):
        async def apply(self, manifest: dict[str, Any]) -> dict[str, Any]:
            stored = await super().apply(manifest)
            if manifest["kind"] == "Deployment" and ready:
                fleets[0].on_child_event("MODIFIED", ready)
            return stored  # as committed before the pod turned Ready

    client = ReadyDuringApply()

    async def scenario() -> None:
        fleet, _ = await _reconciled(client, {"cpu": {}})
        fleets.append(fleet)
        stored = await RecordingClient().apply(_deployment_manifest(fleet))
        stored["status"] = {
            "observedGeneration": 1,
            "readyReplicas": 1,
            "updatedReplicas": 1,
            "availableReplicas": 1,
        }
        ready.update(stored)
        fleet.request(("ns", "demo"), full=True)
        await _drain(fleet)
        conditions = {c["type"]: c for c in client.statuses[-1]["conditions"]}
        assert conditions["Ready"]["status"] == "True"

    run(scenario())
