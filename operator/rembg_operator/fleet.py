"""The reconcile pipeline and the little state it keeps between events.

parse -> build_children (pure) -> kopf.adopt -> server-side apply (kube) -> prune -> status.

Two kinds of work per RembgService, serialised by a per-service lock:
- full: apply every child, prune what is no longer wanted, write status;
- status: recompute status from the Deployments last seen (no child writes).

Child watch events decide which is needed by comparing the child's "essence" (everything
but status and server-managed metadata) with what the operator's own last apply returned:
equal means a status-only change (pods becoming ready), different means someone edited the
child (drift) or deleted it, and a full reconcile puts it back. This keeps a fleet of
hundreds of services from re-applying every child on every pod readiness change.

Pods of the pools are watched too (through a server-side label selector) and kept as
typed PodStates (pod_health): a pod event refreshes status only, which then says per pool
why pods are not ready, and posts a Warning Event once per (pod, reason).

Service creations go first (ServicesFirst): kube-apiserver allocates ClusterIPs one at a
time, so in a burst of new services the Services, not the operator, set the pace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, cast

import kopf
from pydantic import ValidationError

from rembg_operator import metrics
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.builders.children import Skipped, autoscaler_available
from rembg_operator.builders.meta import SERVICE_LABEL
from rembg_operator.config import OperatorConfig
from rembg_operator.kube import ApiError, KubeClient
from rembg_operator.models import RembgServiceSpec, semantic_problems
from rembg_operator.pod_health import PodFinding, PodState, next_change, pool_findings
from rembg_operator.status import Observation, PoolObservation, build_status, now_utc, same_status

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name) of a RembgService
ChildKey = tuple[str, str, str]  # (kind, namespace, name)

OPTIONAL_GROUPS = {
    "monitoring.coreos.com/v1": ("servicemonitors", "prometheusrules"),
    "keda.sh/v1alpha1": ("scaledobjects",),
}
# Annotations controllers write on our children; they are not drift.
CONTROLLER_ANNOTATIONS = frozenset({"deployment.kubernetes.io/revision"})
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
RETRY_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# Warning Events about pods per status refresh: a whole pool failing at once says it in a few.
MAX_POD_EVENTS = 5


class ServicesFirst:
    """Service creations go first, a few at a time; every other write waits while one is queued.

    kube-apiserver allocates a new Service's ClusterIP under one global lock that it holds
    across a request to itself (ipallocator.MetaAllocator creating the IPAddress object), so
    Service creations are serial and each is as slow as the busiest request beside it.
    Measured on 2 cores with 100 new services: alone they take 20-60 ms each, beside the other
    children's applies 300 ms and more, so in a burst every service waited for its Service.
    Applying the 600 children 16 at a time took 20-27 s mixed, 13-16 s with the Services
    first, two at a time (one holding the lock, one ready behind it).
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


class ReconcileError(Exception):
    """Some children could not be applied; the status says which, a retry follows."""


def essence(body: Mapping[str, Any]) -> str:
    """A digest of what a child should look like: no status, no server bookkeeping."""
    meta = body.get("metadata") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in CONTROLLER_ANNOTATIONS
    }
    relevant = {k: v for k, v in body.items() if k not in ("metadata", "status")}
    relevant["@labels"] = meta.get("labels") or {}
    relevant["@annotations"] = annotations
    relevant["@owners"] = meta.get("ownerReferences") or []
    encoded = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def child_key(body: Mapping[str, Any]) -> ChildKey:
    meta = body["metadata"]
    return (str(body.get("kind")), str(meta.get("namespace")), str(meta["name"]))


def _slim_deployment(body: Mapping[str, Any]) -> dict[str, Any]:
    # Only what status needs: a few hundred bytes per Deployment, not the full object.
    meta = body.get("metadata") or {}
    return {
        "metadata": {"generation": meta.get("generation")},
        "spec": {"replicas": (body.get("spec") or {}).get("replicas", 1)},
        "status": body.get("status") or {},
    }


@dataclass(frozen=True)
class PoolTarget:
    """A pool as status sees it: its Deployment and what counts as ready."""

    pool: str
    deployment: str
    required: bool = True
    minimum: int = 0


@dataclass(frozen=True)
class Record:
    """What the last full reconcile learnt; status-only refreshes reuse it."""

    generation: int
    endpoint: str
    models: tuple[str, ...] = ()
    pools: tuple[PoolTarget, ...] = ()
    spec_problems: tuple[str, ...] = ()
    apply_errors: tuple[str, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    monitoring_enabled: bool = True
    autoscaling_enabled: bool = True
    has_gpu_pool: bool = False
    gpu_capacity: int | None = None
    gpu_fallback_active: bool = False
    inventory: tuple[tuple[str, str, str], ...] = ()  # (apiVersion, kind, name)


@dataclass
class _Pending:
    full: bool = False
    status: bool = False
    running_full: bool = False
    task: asyncio.Task[None] | None = None
    deferred: dict[ChildKey, str | None] = field(default_factory=dict)
    failures: int = 0


class Fleet:
    """Every RembgService this operator manages, and the work queued for each."""

    def __init__(self, client: KubeClient, config: OperatorConfig) -> None:
        self.client = client
        self.config = config
        self.owners: dict[Key, dict[str, Any]] = {}
        self.records: dict[Key, Record] = {}
        self.statuses: dict[Key, dict[str, Any]] = {}
        self.essences: dict[ChildKey, str] = {}
        self.deployments: dict[tuple[str, str], dict[str, Any]] = {}
        # Watch events delivered per Deployment: an apply answer is only as new as its send.
        self._deployment_events: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.events_posted: dict[tuple[Key, str], str] = {}
        # Pods of each service's pools, by name; (pod, reason) pairs already posted as Events.
        self.pods: defaultdict[Key, dict[str, PodState]] = defaultdict(dict)
        self.pod_events_posted: dict[Key, set[tuple[str, str]]] = {}
        self._rechecks: dict[Key, asyncio.TimerHandle] = {}
        self._locks: defaultdict[Key, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._pending: dict[Key, _Pending] = {}
        self._slots = asyncio.Semaphore(config.max_concurrent_reconciles)
        self._services_first = ServicesFirst()
        self._last_gpu_capacity: int | None = None

    # -- the parent ------------------------------------------------------------------------

    def remember(self, body: Mapping[str, Any]) -> Key:
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        self.owners[key] = {
            "apiVersion": body["apiVersion"],
            "kind": body["kind"],
            "metadata": {
                k: meta[k]
                for k in ("name", "namespace", "uid", "generation", "labels", "resourceVersion")
                if meta.get(k) is not None
            },
            "spec": dict(body.get("spec") or {}),
        }
        self.statuses[key] = dict(body.get("status") or {})
        metrics.MANAGED_SERVICES.set(len(self.owners))
        return key

    def forget(self, key: Key) -> None:
        self.owners.pop(key, None)
        self.records.pop(key, None)
        self.statuses.pop(key, None)
        for child in [c for c in self.essences if c[1] == key[0] and _belongs(c[2], key[1])]:
            self.essences.pop(child, None)
        for event_key in [k for k in self.events_posted if k[0] == key]:
            self.events_posted.pop(event_key, None)
        self.pods.pop(key, None)
        self.pod_events_posted.pop(key, None)
        recheck = self._rechecks.pop(key, None)
        if recheck is not None:
            recheck.cancel()
        for where in [
            d for d in self._deployment_events if d[0] == key[0] and _belongs(d[1], key[1])
        ]:
            self._deployment_events.pop(where, None)
        pending = self._pending.get(key)
        if pending is None or pending.task is None or pending.task.done():
            self._pending.pop(key, None)
            self._locks.pop(key, None)
        metrics.MANAGED_SERVICES.set(len(self.owners))

    def on_service_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A RembgService was listed, added, changed or deleted: remember it, queue its work.

        A service new to this process (created, or listed at start-up), a new generation
        (the spec changed) or new labels (kopf.adopt copies them to the children) need a
        full reconcile; a status-only change, such as the echo of our own status write,
        needs nothing. A service being deleted is let go: the garbage collector removes
        its children, and repairing them would fight it.
        """
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        if event_type == "DELETED" or meta.get("deletionTimestamp"):
            self.forget(key)
            return
        known = self.owners.get(key)
        self.remember(body)
        if known is None or _identity(known) != _identity(self.owners[key]):
            self.request(key, full=True)

    async def reconcile(self, key: Key) -> None:
        """A full reconcile now, awaited: errors propagate (events use request instead)."""
        async with self._locks[key]:
            await self._full(key)

    # -- children events -------------------------------------------------------------------

    def on_child_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        service = (meta.get("labels") or {}).get(SERVICE_LABEL)
        key = (str(meta.get("namespace")), str(service))
        ck = child_key(body)
        deleted = event_type == "DELETED"
        if ck[0] == "Deployment":
            if deleted:
                self.deployments.pop((ck[1], ck[2]), None)
            elif key in self.owners:
                self.deployments[(ck[1], ck[2])] = _slim_deployment(body)
            if key in self.owners:
                self._deployment_events[(ck[1], ck[2])] += 1
        if key not in self.owners:
            return
        seen = None if deleted else essence(body)
        pending = self._pending.get(key)
        if pending is not None and pending.running_full:
            # Our own apply may not have returned yet: judge once it has.
            pending.deferred[ck] = seen
            return
        self.request(key, full=self._needs_full(ck, seen))

    def on_pod_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A pool's pod changed: keep what the diagnosis reads, refresh status if that changed.

        Kept even before its service is known (the pod listing may come first at start-up);
        the label selector keeps the cache to the pods of the operator's own pools.
        """
        pod = PodState.from_pod(body)
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), pod.service)
        pods = self.pods[key]
        if event_type == "DELETED":
            changed = pods.pop(pod.name, None) is not None
        else:
            changed = pods.get(pod.name) != pod
            pods[pod.name] = pod
        if not pods:
            self.pods.pop(key, None)
        if changed and key in self.owners:
            self.request(key, full=False)

    def _needs_full(self, ck: ChildKey, seen: str | None) -> bool:
        known = self.essences.get(ck)
        if seen is None:
            # Deleted: repair unless we pruned it ourselves (then we forgot it already).
            return known is not None
        return known != seen

    def on_optional_api_changed(self) -> None:
        self.client.forget_cached()
        for key in list(self.owners):
            self.request(key, full=True)

    # -- background work -------------------------------------------------------------------

    def request(self, key: Key, *, full: bool) -> None:
        pending = self._pending.setdefault(key, _Pending())
        if full:
            pending.full = True
        else:
            pending.status = True
        if pending.task is None or pending.task.done():
            pending.task = asyncio.create_task(self._work(key, pending), name=f"rembg:{key}")

    async def _work(self, key: Key, pending: _Pending) -> None:
        while (pending.full or pending.status) and key in self.owners:
            full = pending.full
            pending.full = pending.status = False
            try:
                async with self._locks[key]:
                    if full:
                        await self._full(key)
                    else:
                        await self._refresh_status(key)
                pending.failures = 0
            except Exception as error:  # retried with backoff, logged
                delay = RETRY_DELAYS[min(pending.failures, len(RETRY_DELAYS) - 1)]
                pending.failures += 1
                log.warning("reconcile of %s/%s failed (retry in %ss): %s", *key, delay, error)
                asyncio.get_running_loop().call_later(delay, self._retry, key)
        if key not in self.owners:
            self._pending.pop(key, None)

    def _retry(self, key: Key) -> None:
        if key in self.owners:
            self.request(key, full=True)

    async def resync_forever(self) -> None:
        """Safety net: re-apply every service now and then, spread over the interval."""
        while True:
            keys = list(self.owners)
            gap = self.config.resync_seconds / max(len(keys), 1)
            for key in keys:
                await asyncio.sleep(gap)
                if key in self.owners:
                    self.request(key, full=True)
            if not keys:
                await asyncio.sleep(self.config.resync_seconds)

    # -- the pipeline ----------------------------------------------------------------------

    async def _full(self, key: Key) -> None:
        owner = self.owners.get(key)
        if owner is None:
            return
        pending = self._pending.setdefault(key, _Pending())
        pending.running_full = True
        started = time.perf_counter()
        try:
            async with self._slots:
                result = await self._apply_owner(key, owner)
            metrics.RECONCILES.labels(kind="full", result=result).inc()
        except Exception as error:
            metrics.RECONCILES.labels(kind="full", result="error").inc()
            metrics.RECONCILE_ERRORS.labels(reason=type(error).__name__).inc()
            raise
        finally:
            metrics.RECONCILE_DURATION.observe(time.perf_counter() - started)
            pending.running_full = False
            self._judge_deferred(key, pending)

    def _judge_deferred(self, key: Key, pending: _Pending) -> None:
        # Through request(), not bare flags: a full reconcile awaited through reconcile() has
        # no _work loop behind it, and a child's last status change (a pod turning Ready) that
        # arrived meanwhile would otherwise wait for the next unrelated event.
        deferred, pending.deferred = pending.deferred, {}
        for ck, seen in deferred.items():
            self.request(key, full=self._needs_full(ck, seen))

    async def _apply_owner(self, key: Key, owner: dict[str, Any]) -> str:
        ref = ServiceRef(name=key[1], namespace=key[0])
        generation = int(owner["metadata"].get("generation") or 0)
        spec, problems = parse_spec(owner.get("spec") or {})
        if spec is None or problems:
            await self._report_invalid(key, owner, ref, generation, problems)
            return "invalid"
        capabilities = await self._capabilities(key, spec)
        desired = build_children(ref, spec, capabilities)
        autoscaled = autoscaler_available(spec, capabilities)
        kopf.adopt(desired.manifests, owner=kopf.Body(cast("kopf.RawBody", owner)))
        outcomes = await self._apply_all(desired.manifests)
        errors: list[str] = []
        skipped = list(desired.skipped)
        # Everything wanted stays in the inventory, applied or not: a child that failed to
        # apply this time must never be pruned because of it.
        inventory: list[tuple[str, str, str]] = []
        for manifest, outcome in zip(desired.manifests, outcomes, strict=True):
            identity = (manifest["apiVersion"], manifest["kind"], manifest["metadata"]["name"])
            if isinstance(outcome, ApiError):
                skipped_before = len(skipped)
                problem = await self._apply_error(key, owner, manifest, outcome, skipped)
                if problem:
                    errors.append(problem)
                if len(skipped) == skipped_before:
                    inventory.append(identity)
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                inventory.append(identity)
        errors.extend(await self._prune(key, ref, inventory))
        fallback_active = (
            capabilities.gpu_capacity == 0 and spec.fallback.cpu_pool_when_no_gpu_nodes
        )
        self.records[key] = Record(
            generation=generation,
            endpoint=ref.endpoint,
            models=tuple(spec.models),
            pools=tuple(
                PoolTarget(
                    pool=plan.name,
                    deployment=ref.pool_object_name(plan.name),
                    required=not (plan.is_gpu and fallback_active),
                    minimum=plan.min_replicas if autoscaled else plan.fixed_replicas,
                )
                for plan in desired.plans
            ),
            apply_errors=tuple(errors),
            skipped=tuple(skipped),
            monitoring_enabled=spec.monitoring.enabled,
            autoscaling_enabled=spec.autoscaling.enabled,
            has_gpu_pool=spec.gpu is not None,
            gpu_capacity=capabilities.gpu_capacity,
            gpu_fallback_active=fallback_active and spec.gpu is not None,
            inventory=tuple(inventory),
        )
        new_generation = self.statuses.get(key, {}).get("observedGeneration") != generation
        await self._refresh_status(key)
        await self._post_outcome_events(
            key=key,
            owner=owner,
            generation=generation,
            errors=errors,
            capabilities=capabilities,
            spec=spec,
            new_generation=new_generation,
        )
        if errors:
            raise ReconcileError("; ".join(errors))
        return "ok"

    async def _apply_all(self, manifests: list[dict[str, Any]]) -> list[Any]:
        """Apply concurrently; each outcome (stored object or exception) in manifest order."""
        # A Service creation starts first: queued before any other apply of this reconcile
        # asks for its turn (ServicesFirst).
        order = sorted(range(len(manifests)), key=lambda i: not self._creates(manifests[i]))
        done = await asyncio.gather(
            *(self._apply_one(manifests[i]) for i in order), return_exceptions=True
        )
        by_index = dict(zip(order, done, strict=True))
        return [by_index[i] for i in range(len(manifests))]

    def _creates(self, manifest: Mapping[str, Any]) -> bool:
        """A Service this operator has not seen yet: applying it allocates a ClusterIP."""
        return manifest["kind"] == "Service" and child_key(manifest) not in self.essences

    async def _apply_one(self, manifest: dict[str, Any]) -> dict[str, Any]:
        if self._creates(manifest):
            async with self._services_first.creation():
                return await self._apply_now(manifest)
        await self._services_first.turn()
        return await self._apply_now(manifest)

    async def _apply_now(self, manifest: dict[str, Any]) -> dict[str, Any]:
        _, namespace, name = child_key(manifest)
        events_before = self._deployment_events.get((namespace, name), 0)
        stored = await self.client.apply(manifest)
        self.essences[child_key(stored)] = essence(stored)
        if stored.get("kind") == "Deployment" and (
            self._deployment_events.get((namespace, name), 0) == events_before
        ):
            # Not when a watch event came in meanwhile: it may be newer than this answer (a
            # pod turned Ready after the apply), and the watch delivers every later change,
            # while an older status kept here would stay until the next event, maybe never.
            self.deployments[(namespace, name)] = _slim_deployment(stored)
        return stored

    async def _apply_error(
        self,
        key: Key,
        owner: Mapping[str, Any],
        manifest: dict[str, Any],
        error: ApiError,
        skipped: list[Skipped],
    ) -> str | None:
        """Handle a failed apply: None when it was dealt with, else the problem to report."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        group_version = manifest["apiVersion"]
        if error.not_found and group_version in OPTIONAL_GROUPS:
            # The CRD went away since discovery: report it like a missing CRD, refresh later.
            self.client.forget_cached(f"serves:{group_version}")
            reason = "CrdMissing" if "monitoring" in group_version else "KedaNotInstalled"
            skipped.append(Skipped(kind, name, reason, f"{group_version} is not served"))
            return None
        if error.status == 422 and kind in RECREATABLE:
            # A hand edit added list entries another field manager owns (e.g. a second
            # Service port): apply cannot remove them, so the child is replaced whole.
            try:
                await self.client.delete(group_version, kind, key[0], name)
                await self._apply_one(manifest)
            except ApiError as again:
                return f"{kind} {name}: {again.message}"
            await self._event_once(
                key, owner, "Recreated", f"{kind} {name} recreated: {error.message}", warning=True
            )
            return None
        return f"{kind} {name}: {error.message}"

    async def _prune(
        self, key: Key, ref: ServiceRef, inventory: list[tuple[str, str, str]]
    ) -> list[str]:
        """Delete children that an earlier reconcile applied and this one did not."""
        previous = self.statuses.get(key, {}).get("inventory") or []
        wanted = set(inventory)
        errors: list[str] = []
        for item in previous:
            entry = (item.get("apiVersion", ""), item.get("kind", ""), item.get("name", ""))
            if entry in wanted or not _belongs(entry[2], ref.name):
                continue
            self.essences.pop((entry[1], ref.namespace, entry[2]), None)
            try:
                await self.client.delete(entry[0], entry[1], ref.namespace, entry[2])
            except ApiError as error:
                if error.status != 404:
                    errors.append(f"delete {entry[1]} {entry[2]}: {error.message}")
            except KeyError:
                continue  # a kind this operator version does not know
        return errors

    async def _capabilities(self, key: Key, spec: RembgServiceSpec) -> Capabilities:
        ttl = self.config.discovery_ttl_seconds
        monitoring = spec.monitoring.enabled and await self.client.serves(
            "monitoring.coreos.com/v1", OPTIONAL_GROUPS["monitoring.coreos.com/v1"], ttl
        )
        keda = spec.autoscaling.engine == "keda" and await self.client.serves(
            "keda.sh/v1alpha1", OPTIONAL_GROUPS["keda.sh/v1alpha1"], ttl
        )
        capacity = None
        if spec.gpu is not None:
            capacity = await self.client.gpu_capacity(self.config.gpu_capacity_ttl_seconds)
            self._notice_capacity(key, capacity)
        return Capabilities(prometheus_operator=monitoring, keda=keda, gpu_capacity=capacity)

    def _notice_capacity(self, key: Key, capacity: int | None) -> None:
        """GPU nodes came or went: services with a GPU pool need a fresh look."""
        if capacity == self._last_gpu_capacity:
            return
        first = self._last_gpu_capacity is None
        self._last_gpu_capacity = capacity
        if first:
            return
        for other, record in list(self.records.items()):
            if other != key and record.has_gpu_pool and record.gpu_capacity != capacity:
                self.request(other, full=True)

    async def _report_invalid(
        self,
        key: Key,
        owner: dict[str, Any],
        ref: ServiceRef,
        generation: int,
        problems: list[str],
    ) -> None:
        previous = self.records.get(key) or Record(generation=generation, endpoint=ref.endpoint)
        if not previous.pools:
            previous = replace(previous, pools=_pools_from_status(self.statuses.get(key), ref))
        self.records[key] = replace(
            previous, generation=generation, spec_problems=tuple(problems), apply_errors=()
        )
        metrics.INVALID_SPECS.set(sum(1 for r in self.records.values() if r.spec_problems))
        await self._refresh_status(key)
        await self._event_once(key, owner, "InvalidSpec", "; ".join(problems), warning=True)

    async def _refresh_status(self, key: Key) -> None:
        record = self.records.get(key)
        if record is None:
            self.request(key, full=True)
            return
        now = now_utc()
        pods = list(self.pods.get(key, {}).values())
        findings = {
            target.pool: pool_findings((p for p in pods if p.pool == target.pool), now)
            for target in record.pools
        }
        pools = [
            PoolObservation.from_deployment(
                target.pool,
                self.deployments.get((key[0], target.deployment)),
                required=target.required,
                minimum=target.minimum,
                findings=findings[target.pool],
            )
            for target in record.pools
        ]
        observation = Observation(
            generation=record.generation,
            endpoint=record.endpoint,
            models=record.models,
            pools=pools,
            spec_problems=record.spec_problems,
            apply_errors=record.apply_errors,
            skipped=record.skipped,
            monitoring_enabled=record.monitoring_enabled,
            autoscaling_enabled=record.autoscaling_enabled,
            has_gpu_pool=record.has_gpu_pool,
            gpu_capacity=record.gpu_capacity,
            gpu_fallback_active=record.gpu_fallback_active,
            inventory=[{"apiVersion": a, "kind": k, "name": n} for a, k, n in record.inventory],
        )
        everything = [f for found in findings.values() for f in found]
        self._schedule_recheck(key, next_change(everything))
        previous = self.statuses.get(key)
        status = build_status(observation, previous, now)
        if same_status(previous, status):
            metrics.RECONCILES.labels(kind="status", result="unchanged").inc()
        else:
            await self._services_first.turn()
            await self.client.patch_status(key[0], key[1], merge_patch(previous, status))
            self.statuses[key] = status
            metrics.RECONCILES.labels(kind="status", result="written").inc()
        await self._post_pod_events(key, everything)

    def _schedule_recheck(self, key: Key, delay: float | None) -> None:
        """A status refresh when a finding would change by itself (a probe's grace ends):
        no watch event says that a container has been not ready for too long."""
        before = self._rechecks.pop(key, None)
        if before is not None:
            before.cancel()
        if delay is not None:
            self._rechecks[key] = asyncio.get_running_loop().call_later(
                delay + 1.0, self._recheck, key
            )

    def _recheck(self, key: Key) -> None:
        self._rechecks.pop(key, None)
        if key in self.owners:
            self.request(key, full=False)

    async def _post_pod_events(self, key: Key, findings: list[PodFinding]) -> None:
        """A Warning Event per (pod, reason) the first time a pod fails that way.

        Forgotten once the pod is ready or gone, so a relapse is posted again; kept while the
        pod stays in trouble, so a pull that alternates ErrImagePull and ImagePullBackOff
        posts each once, not on every turn.
        """
        owner = self.owners.get(key)
        if owner is None:
            return
        troubled = {f.pod for f in findings}
        posted = {p for p in self.pod_events_posted.get(key, set()) if p[0] in troubled}
        new = [f for f in findings if not f.starting and (f.pod, f.reason) not in posted]
        posted.update((f.pod, f.reason) for f in new)
        if posted:
            self.pod_events_posted[key] = posted
        else:
            self.pod_events_posted.pop(key, None)
        for finding in new[:MAX_POD_EVENTS]:
            message = f"pool {finding.pool}: {finding.summary()}"
            if finding.state:
                message += f" (state {finding.state})"
            await self._services_first.turn()
            with contextlib.suppress(ApiError):
                await self.client.post_event(
                    owner, warning=True, reason=finding.reason, message=message
                )

    async def _post_outcome_events(
        self,
        *,
        key: Key,
        owner: dict[str, Any],
        generation: int,
        errors: list[str],
        capabilities: Capabilities,
        spec: RembgServiceSpec,
        new_generation: bool,
    ) -> None:
        if errors:
            await self._event_once(key, owner, "ApplyFailed", "; ".join(errors), warning=True)
            return
        if spec.gpu is not None and capabilities.gpu_capacity == 0:
            await self._event_once(
                key,
                owner,
                "NoGpuCapacity",
                "no node has allocatable nvidia.com/gpu; the GPU pool's pods stay Pending",
                warning=True,
            )
        if new_generation:
            await self._event_once(
                key, owner, "Applied", f"generation {generation} applied", warning=False
            )

    async def _event_once(
        self, key: Key, owner: Mapping[str, Any], reason: str, message: str, *, warning: bool
    ) -> None:
        """Post an Event unless the same reason and message was posted for this service."""
        if self.events_posted.get((key, reason)) == message:
            return
        self.events_posted[(key, reason)] = message
        await self._services_first.turn()
        with contextlib.suppress(ApiError):
            # An Event is best effort: failing to post it must not fail the reconcile.
            await self.client.post_event(owner, warning=warning, reason=reason, message=message)


def parse_spec(raw: Mapping[str, Any]) -> tuple[RembgServiceSpec | None, list[str]]:
    """The spec once, typed; problems the schema cannot catch as messages."""
    try:
        spec = RembgServiceSpec.model_validate(raw)
    except ValidationError as error:
        return None, [
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}" for e in error.errors()
        ]
    return spec, semantic_problems(spec)


def merge_patch(previous: Mapping[str, Any] | None, status: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch that also removes keys the new status no longer has."""
    patch: dict[str, Any] = {k: None for k in (previous or {}) if k not in status}
    patch.update(status)
    old_pools = (previous or {}).get("pools") or {}
    pools: dict[str, Any] = {p: None for p in old_pools if p not in status["pools"]}
    for name, pool in status["pools"].items():
        # A pool's own keys that are gone (notReady, once every pod is ready) go too.
        gone = {k: None for k in old_pools.get(name) or {} if k not in pool}
        pools[name] = {**gone, **pool}
    patch["pools"] = pools
    return patch


def _identity(owner: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a RembgService its children depend on: a change needs a full reconcile."""
    meta = owner["metadata"]
    return (meta.get("uid"), meta.get("generation"), meta.get("labels"))


def _belongs(child_name: str, service: str) -> bool:
    return child_name == service or child_name.startswith(f"{service}-")


def _pools_from_status(status: Mapping[str, Any] | None, ref: ServiceRef) -> tuple[PoolTarget, ...]:
    pools = (status or {}).get("pools") or {}
    return tuple(PoolTarget(pool, ref.pool_object_name(pool)) for pool in sorted(pools))
