"""Server-side apply of a service's children: their order, and what each failure means.

Service creations go first (ServicesFirst): kube-apiserver allocates ClusterIPs one at a
time, so in a burst of new services the Services, not the operator, set the pace. Each
child ends in one ApplyOutcome: applied, unchanged (its manifest is the one last applied and
the child is as applied: nothing is sent, so an idle fleet makes no writes), skipped (an
optional API is not served), recreated (a hand edit that apply cannot undo), or failed with
the message to report.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from rembg_operator.builders.children import Skipped
from rembg_operator.kube import ApiError, KubeApi
from rembg_operator.state import ServiceState, child_key

OPTIONAL_GROUPS = {
    "monitoring.coreos.com/v1": ("servicemonitors", "prometheusrules"),
    "keda.sh/v1alpha1": ("scaledobjects",),
}
# Children whose replacement costs nothing but a moment; a Deployment is never replaced.
RECREATABLE = frozenset(
    {
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
        "PrometheusRule",
        "ScaledObject",
    }
)


class ServicesFirst:
    """Service creations go first, a few at a time; every other write waits while one is queued.

    kube-apiserver allocates a new Service's ClusterIP under one global lock that it holds
    across a request to itself (ipallocator.MetaAllocator creating the IPAddress object), so
    Service creations are serial and each is as slow as the busiest request beside it: in a
    burst, every service waited for its Service. Two lanes keep one creation holding the lock
    and one ready behind it (the README's operator section has the measurements).
    """

    def __init__(self, lane: int = 2) -> None:
        self._lane = asyncio.Semaphore(lane)
        self._queued = 0
        self._clear = asyncio.Event()
        self._clear.set()

    @contextlib.asynccontextmanager
    async def creation(self) -> AsyncIterator[None]:
        self._queued += 1
        self._clear.clear()
        try:
            async with self._lane:
                yield
        finally:
            self._queued -= 1
            if not self._queued:
                self._clear.set()

    async def turn(self) -> None:
        """Return once no Service creation is queued."""
        await self._clear.wait()


@dataclass(frozen=True)
class Applied:
    stored: dict[str, Any]


@dataclass(frozen=True)
class Unchanged:
    """Applied before exactly so, and untouched since: not sent again."""


@dataclass(frozen=True)
class Unserved:
    """The child's API group went away since discovery: reported like a missing CRD."""

    skipped: Skipped


@dataclass(frozen=True)
class Recreated:
    """Apply could not undo a hand edit, so the child was deleted and applied again."""

    message: str


@dataclass(frozen=True)
class Failed:
    problem: str


ApplyOutcome = Applied | Unchanged | Unserved | Recreated | Failed


class Applier:
    def __init__(self, client: KubeApi) -> None:
        self.client = client
        self.services_first = ServicesFirst()

    async def apply_all(
        self, state: ServiceState, manifests: list[dict[str, Any]]
    ) -> list[ApplyOutcome]:
        """Apply concurrently; one outcome per manifest, in manifest order.

        Errors that are not the API server's answer (a connection refused) propagate: the
        whole reconcile is retried.
        """
        # A Service creation starts first: queued before any other apply of this reconcile
        # asks for its turn.
        order = sorted(range(len(manifests)), key=lambda i: not _creates(state, manifests[i]))
        done = await asyncio.gather(
            *(self._apply_classified(state, manifests[i]) for i in order), return_exceptions=True
        )
        by_index: dict[int, ApplyOutcome] = {}
        for index, outcome in zip(order, done, strict=True):
            if isinstance(outcome, BaseException):
                raise outcome
            by_index[index] = outcome
        return [by_index[i] for i in range(len(manifests))]

    async def _apply_classified(
        self, state: ServiceState, manifest: dict[str, Any]
    ) -> ApplyOutcome:
        if state.unchanged(manifest):
            return Unchanged()
        try:
            return Applied(await self._apply(state, manifest))
        except ApiError as error:
            return await self._classify(state, manifest, error)

    async def _classify(
        self, state: ServiceState, manifest: dict[str, Any], error: ApiError
    ) -> ApplyOutcome:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group_version = manifest["apiVersion"]
        if error.not_found and group_version in OPTIONAL_GROUPS:
            # The CRD went away since discovery: report it like a missing CRD, refresh later.
            self.client.forget_cached(f"serves:{group_version}")
            reason = "CrdMissing" if "monitoring" in group_version else "KedaNotInstalled"
            return Unserved(Skipped(kind, name, reason, f"{group_version} is not served"))
        if error.status == 422 and kind in RECREATABLE:
            # A hand edit added list entries another field manager owns (e.g. a second
            # Service port): apply cannot remove them, so the child is replaced whole.
            try:
                await self.client.delete(group_version, kind, state.key[0], name)
                await self._apply(state, manifest)
            except ApiError as again:
                return Failed(f"{kind} {name}: {again.message}")
            return Recreated(f"{kind} {name} recreated: {error.message}")
        return Failed(f"{kind} {name}: {error.message}")

    async def _apply(self, state: ServiceState, manifest: dict[str, Any]) -> dict[str, Any]:
        if _creates(state, manifest):
            async with self.services_first.creation():
                return await self._apply_now(state, manifest)
        await self.services_first.turn()
        return await self._apply_now(state, manifest)

    async def _apply_now(self, state: ServiceState, manifest: dict[str, Any]) -> dict[str, Any]:
        events_before = state.events_of(manifest)
        stored = await self.client.apply(manifest)
        state.observe_applied(manifest, stored, events_before)
        return stored


def _creates(state: ServiceState, manifest: Mapping[str, Any]) -> bool:
    """A Service this operator has not seen yet: applying it allocates a ClusterIP."""
    return manifest["kind"] == "Service" and child_key(manifest) not in state.children
