"""A recording stand-in for the API module and a running controller, for the controller tests.

Behaviour against the real API server is in e2e/; these drive the controller through its
events and its work queue, as kopf does, and read what it sent.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from typing import Any, cast

import kopf
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.controller import Controller
from rembg_operator.kube import ApiError, KubeApi
from rembg_operator.models import RembgServiceSpec
from rembg_operator.settings import Settings

SETTLE_TIMEOUT_SECONDS = 10.0


class RecordingClient:
    """Answers like the API server would for the calls the controller makes, and records them.

    It keeps the children it stored, so a list answers what exists and a test deletes a child
    behind the controller's back with `vanish`.
    """

    def __init__(
        self, *, monitoring: bool = True, gpus: int | None = 4, keda: bool = False
    ) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.statuses: list[dict[str, Any]] = []
        self.events: list[tuple[str, str]] = []
        self.monitoring = monitoring
        self.keda = keda
        self.gpus = gpus
        self.fail_kinds: set[str] = set()
        self.stored: dict[tuple[str, str, str], dict[str, Any]] = {}

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        self.calls.append(("apply", manifest["kind"], meta["name"]))
        if manifest["kind"] in self.fail_kinds:
            raise ApiError(500, "InternalError", "etcd is sad")
        stored = copy.deepcopy(dict(manifest))
        stored["metadata"]["generation"] = 1
        if manifest["kind"] == "Deployment":
            stored["spec"].setdefault("replicas", 1)
            stored["status"] = {"observedGeneration": 1}
        self.stored[(manifest["kind"], meta.get("namespace", ""), meta["name"])] = stored
        return stored

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        return self.stored.pop((kind, namespace, name), None) is not None

    async def list_children(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        label_selector: str,
        *,
        metadata_only: bool,
    ) -> list[dict[str, Any]]:
        self.calls.append(("list", kind, namespace, "metadata" if metadata_only else "objects"))
        found = [
            copy.deepcopy(o)
            for (k, ns, _), o in self.stored.items()
            if (k, ns) == (kind, namespace)
        ]
        if metadata_only:
            return [
                {"apiVersion": o["apiVersion"], "kind": kind, "metadata": o["metadata"]}
                for o in found
            ]
        return found

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.calls.append(("status", name))
        self.statuses.append(dict(status))

    async def serves(self, group_version: str, plurals: tuple[str, ...], ttl: float) -> bool:
        if group_version.startswith("keda"):
            return self.keda
        return self.monitoring and group_version.startswith("monitoring")

    async def gpu_capacity(self, ttl: float) -> int | None:
        return self.gpus

    def forget_cached(self, key: str | None = None) -> None:
        self.calls.append(("forget",))

    async def post_event(
        self, owner: Mapping[str, Any], *, warning: bool, reason: str, message: str
    ) -> None:
        self.events.append((reason, message))

    def applies(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == "apply"]

    def deletes(self) -> list[tuple[str, ...]]:
        return [c for c in self.calls if c[0] == "delete"]

    def edit(self, kind: str, name: str, change: Callable[[dict[str, Any]], None]) -> None:
        """Edit a stored child as a user would, with no watch event."""
        change(self.stored[(kind, "ns", name)])

    def vanish(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        """Delete a child as a user would, with no watch event (the watch was not connected)."""
        return self.stored.pop((kind, namespace, name))


class ListsFail(RecordingClient):
    """The API server away for the audit's first `times` lists (connection refused)."""

    def __init__(self, *, times: int) -> None:
        super().__init__()
        self.failures_left = times

    async def list_children(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        label_selector: str,
        *,
        metadata_only: bool,
    ) -> list[dict[str, Any]]:
        if self.failures_left:
            self.failures_left -= 1
            raise ConnectionRefusedError("connect: connection refused")
        return await super().list_children(
            api_version, kind, namespace, label_selector, metadata_only=metadata_only
        )


def owner(
    spec: Mapping[str, Any],
    generation: int = 1,
    status: Mapping[str, Any] | None = None,
    *,
    name: str = "demo",
) -> dict[str, Any]:
    return {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": name, "namespace": "ns", "uid": f"u-{name}", "generation": generation},
        "spec": dict(spec),
        "status": dict(status or {}),
    }


def settings(**overrides: Any) -> Settings:
    # Status writes at once unless a test asks otherwise: settle() waits for queued keys,
    # not for delayed ones.
    return Settings(
        metrics_port=0, liveness_port=0, **{"status_coalesce_seconds": 0.0, **overrides}
    )


@asynccontextmanager
async def running(client: KubeApi, **overrides: Any) -> AsyncIterator[Controller]:
    """A controller with its workers, resync and audit running, stopped on exit."""
    controller = Controller(client, settings(**overrides))
    task = asyncio.create_task(controller.run())
    try:
        yield controller
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


async def settle(controller: Controller) -> None:
    """Until no key is queued or running (delayed retries and rechecks do not count)."""
    await until(lambda: not controller.queue.busy)


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(SETTLE_TIMEOUT_SECONDS):
        while True:
            # A few loop turns first: the event just sent may not have reached a worker yet.
            for _ in range(5):
                await asyncio.sleep(0)
            if condition():
                return
            await asyncio.sleep(0.005)


async def created(controller: Controller, spec: Mapping[str, Any], *, name: str = "demo") -> None:
    """A RembgService created (in the fake API server too, where the audit lists it) and its
    first full reconcile done."""
    body = owner(spec, name=name)
    if isinstance(controller.client, RecordingClient):
        controller.client.stored[("RembgService", "ns", name)] = copy.deepcopy(body)
    controller.on_service_event("ADDED", body)
    await settle(controller)


def ready_deployment(body: Mapping[str, Any]) -> dict[str, Any]:
    """The pool's Deployment as stored, with every replica ready (what the watch delivers)."""
    stored = copy.deepcopy(deployment_manifest_for(body))
    stored["metadata"]["generation"] = 1
    stored["spec"].setdefault("replicas", 1)
    stored["status"] = {
        "observedGeneration": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
    }
    return stored


def deployment_manifest_for(body: Mapping[str, Any]) -> dict[str, Any]:
    """The Deployment exactly as the controller applies it for this RembgService body."""
    meta = body["metadata"]
    spec = RembgServiceSpec.model_validate(body["spec"])
    desired = build_children(
        ServiceRef(meta["name"], meta["namespace"]), spec, Capabilities(True, False, 4)
    )
    kopf.adopt(desired.manifests, owner=kopf.Body(cast("kopf.RawBody", copy.deepcopy(dict(body)))))
    return next(m for m in desired.manifests if m["kind"] == "Deployment")


def stored_child(client: RecordingClient, kind: str, name: str) -> dict[str, Any]:
    """A child as the fake API server stored it (what a watch event carries)."""
    return copy.deepcopy(client.stored[(kind, "ns", name)])


def conditions(status: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}
