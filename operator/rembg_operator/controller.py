"""Watch events in, reconciles out: which work each event needs, queued per RembgService.

kopf is the event source (handlers.py); every event maps to the key of the RembgService it
concerns (a child or pod by its service label) and to the kind of work it needs:
- full: a service new to this process, a new generation or labels, a child edited (its
  essence differs from what the operator applied) or deleted, a retry after a failure;
- status: a child or pod change that is readiness only.
A work queue (workqueue.py) runs one pass per service at a time, with retries and backoff,
and spreads a full resync of every service over `resync_seconds`.

A deletion made while a watch was not connected never arrives as an event: the audit
(audit.py) finds those.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from rembg_operator import metrics
from rembg_operator.audit import ChildAudit
from rembg_operator.kube import KubeApi
from rembg_operator.pod_health import PodState
from rembg_operator.reconciler import OwnerGoneError, Reconciler
from rembg_operator.settings import Settings
from rembg_operator.state import (
    Key,
    Services,
    ServiceState,
    child_key,
    owner_key,
    service_key,
)
from rembg_operator.workqueue import WorkQueue

log = logging.getLogger(__name__)


class ReconcileError(Exception):
    """Some children could not be applied; the status says which, a retry follows."""


class Controller:
    """Every RembgService this operator manages, and the work queued for each."""

    def __init__(self, client: KubeApi, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        self.services = Services()
        self.queue: WorkQueue[Key] = WorkQueue()
        self.reconciler = Reconciler(client, settings)
        self.auditor = ChildAudit(
            client,
            self.services,
            repair=self._repair,
            forget=self.forget,
            interval=settings.audit_seconds,
            deep_interval=settings.resync_seconds,
        )
        self._last_gpu_capacity: int | None = None

    async def run(self) -> None:
        """Workers, the resync and the audit, until cancelled."""
        async with asyncio.TaskGroup() as group:
            group.create_task(
                self.queue.run(self.settings.max_concurrent_reconciles, self._process)
            )
            group.create_task(
                self.queue.spread(self.services.keys, self.settings.resync_seconds, self._repair)
            )
            group.create_task(self.auditor.run_forever())

    # -- events ----------------------------------------------------------------------------

    def on_service_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A RembgService was listed, added, changed or deleted: remember it, queue its work.

        A service new to this process (created, or listed at start-up), a new generation
        (the spec changed) or new labels (kopf.adopt copies them to the children) need a
        full reconcile; a status-only change, such as the echo of our own status write,
        needs nothing. A service being deleted is let go: the garbage collector removes
        its children, and repairing them would fight it.
        """
        key = service_key(body)
        if event_type == "DELETED" or body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return
        known = key in self.services
        _, changed = self.services.remember(body)
        metrics.MANAGED_SERVICES.set(len(self.services))
        if changed:
            self.request(key, full=True)
        elif known and event_type is None:
            self.auditor.relisted()  # a known service listed again: its watch restarted

    def on_child_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = owner_key(body)
        state = self.services.get(key) if key is not None else None
        if state is None:
            return
        deleted = event_type == "DELETED"
        state.observe_child(body, deleted=deleted)
        if event_type is None:
            self.auditor.relisted()
        child = child_key(body)
        seen = None if deleted else body
        if state.reconciling:
            # Our own apply may not have returned yet: judge once it has.
            state.deferred[child] = seen
            return
        self.request(state.key, full=state.saw(child, seen))

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A pool's pod changed: keep what the diagnosis reads, refresh status if that changed.

        Kept even before its service is known (the pod listing may come first at start-up);
        the label selector keeps the cache to the pods of the operator's own pools.
        """
        pod = PodState.from_pod(body)
        key = (str((body.get("metadata") or {}).get("namespace")), pod.service)
        if self.services.observe_pod(key, pod, deleted=event_type == "DELETED"):
            self.request(key, full=False)

    def on_optional_api_changed(self) -> None:
        self.client.forget_cached()
        for state in self.services:
            self.request(state.key, full=True)

    def request(self, key: Key, *, full: bool) -> None:
        state = self.services.get(key)
        if state is None:
            return
        state.wants_full = state.wants_full or full
        if full:
            self.queue.add(key)
        else:
            # Readiness changes come in bursts (a pod's phases, then its Deployment's
            # counters): one status write for the burst, not one per event.
            self.queue.add_after(key, self.settings.status_coalesce_seconds)

    def _repair(self, key: Key) -> None:
        self.request(key, full=True)

    def forget(self, key: Key) -> None:
        self.services.forget(key)
        self.queue.discard(key)
        metrics.MANAGED_SERVICES.set(len(self.services))
        self._count_invalid()

    def _count_invalid(self) -> None:
        metrics.INVALID_SPECS.set(
            sum(1 for s in self.services if s.record and s.record.spec_problems)
        )

    # -- work ------------------------------------------------------------------------------

    async def _process(self, key: Key) -> None:
        state = self.services.get(key)
        if state is None:
            return  # deleted since it was queued
        full = state.wants_full or state.record is None
        state.wants_full = False
        try:
            if full:
                await self._full(state)
            else:
                self._recheck(key, await self.reconciler.refresh_status(state))
        except OwnerGoneError:
            # Deleted while no watch said so: let it go, as a DELETED event would have.
            log.info("RembgService %s/%s is gone; forgetting it", *key)
            self.forget(key)
        except Exception:
            if key not in self.services:
                return  # forgotten meanwhile: nothing to retry
            state.wants_full = True  # the retry is a full pass
            raise

    async def _full(self, state: ServiceState) -> None:
        state.reconciling = True
        started = time.perf_counter()
        try:
            outcome = await self.reconciler.reconcile(state)
        except Exception as error:
            metrics.RECONCILES.labels(kind="full", result="error").inc()
            metrics.RECONCILE_ERRORS.labels(reason=type(error).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
            state.reconciling = False
            self._judge_deferred(state)
        if state.record is not None and state.record.has_gpu_pool:
            self._notice_capacity(state.key, outcome.gpu_capacity)
        self._count_invalid()
        self._recheck(state.key, outcome.recheck_after)
        if outcome.result == "failed":
            metrics.RECONCILES.labels(kind="full", result="error").inc()
            metrics.RECONCILE_ERRORS.labels(reason=ReconcileError.__name__).inc()
            raise ReconcileError("; ".join(outcome.errors))
        metrics.RECONCILES.labels(kind="full", result=outcome.result).inc()

    def _judge_deferred(self, state: ServiceState) -> None:
        deferred, state.deferred = state.deferred, {}
        for child, seen in deferred.items():
            self.request(state.key, full=state.saw(child, seen))

    def _recheck(self, key: Key, after: float | None) -> None:
        if after is not None and key in self.services:
            self.queue.add_after(key, after + 1.0)

    def _notice_capacity(self, key: Key, capacity: int | None) -> None:
        """GPU nodes came or went: services with a GPU pool need a fresh look."""
        if capacity == self._last_gpu_capacity:
            return
        first = self._last_gpu_capacity is None
        self._last_gpu_capacity = capacity
        if first:
            return
        for other in self.services:
            record = other.record
            stale = record is not None and record.has_gpu_pool and record.gpu_capacity != capacity
            if other.key != key and stale:
                self.request(other.key, full=True)
