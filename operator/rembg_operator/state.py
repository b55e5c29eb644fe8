"""What the operator remembers about each RembgService between events, in one place.

Everything about one service lives in its ServiceState, found by the service's exact key
(namespace, name); children are matched to it by their service label, never by name, so
forgetting a service is dropping its state, and a service named `demo-cpu` is never
confused with the `demo-cpu` Deployment of a service named `demo`.

A child's "essence" (everything but status and server-managed metadata) is remembered as
the operator's own last apply returned it: a watch event with the same essence is a status
change (pods becoming ready), a different one an edit (drift), and a full reconcile follows
only for the latter.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from rembg_operator.builders.children import Skipped
from rembg_operator.builders.meta import SERVICE_LABEL
from rembg_operator.pod_health import PodState

Key = tuple[str, str]  # (namespace, name) of a RembgService
ChildKey = tuple[str, str, str]  # (kind, namespace, name)

# Annotations and labels controllers write on our children; they are not drift. KEDA labels
# each ScaledObject with its own name (by an update, before its first status write): without
# this, that label alone would take a ScaledObject's first status for an edit.
CONTROLLER_ANNOTATIONS = frozenset({"deployment.kubernetes.io/revision"})
CONTROLLER_LABELS = frozenset({"scaledobject.keda.sh/name"})


def essence(body: Mapping[str, Any], *, replicas: bool = True) -> str:
    """A digest of what a child should look like: no status, no server bookkeeping; without
    spec.replicas when `replicas` is False (an autoscaler owns them)."""
    meta = body.get("metadata") or {}
    annotations = {
        k: v for k, v in (meta.get("annotations") or {}).items() if k not in CONTROLLER_ANNOTATIONS
    }
    relevant = {k: v for k, v in body.items() if k not in ("metadata", "status")}
    if not replicas and isinstance(relevant.get("spec"), Mapping):
        relevant["spec"] = {k: v for k, v in relevant["spec"].items() if k != "replicas"}
    relevant["@labels"] = {
        k: v for k, v in (meta.get("labels") or {}).items() if k not in CONTROLLER_LABELS
    }
    relevant["@annotations"] = annotations
    relevant["@owners"] = meta.get("ownerReferences") or []
    encoded = json.dumps(relevant, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(encoded, digest_size=16).hexdigest()


def child_key(body: Mapping[str, Any]) -> ChildKey:
    meta = body["metadata"]
    return (str(body.get("kind")), str(meta.get("namespace")), str(meta["name"]))


def owner_key(body: Mapping[str, Any]) -> Key | None:
    """The service a child or pod belongs to, from its service label; None without one."""
    meta = body.get("metadata") or {}
    service = (meta.get("labels") or {}).get(SERVICE_LABEL)
    if not service:
        return None
    return (str(meta.get("namespace")), str(service))


def service_key(body: Mapping[str, Any]) -> Key:
    meta = body["metadata"]
    return (str(meta["namespace"]), str(meta["name"]))


def slim_owner(body: Mapping[str, Any]) -> dict[str, Any]:
    """The RembgService as its children and Events need it, without status and managedFields."""
    meta = body["metadata"]
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "generation", "labels", "resourceVersion")
            if meta.get(k) is not None
        },
        "spec": dict(body.get("spec") or {}),
    }


def identity(owner: Mapping[str, Any]) -> tuple[Any, ...]:
    """What of a RembgService its children depend on: a change needs a full reconcile."""
    meta = owner["metadata"]
    return (meta.get("uid"), meta.get("generation"), meta.get("labels"))


def slim_deployment(body: Mapping[str, Any]) -> dict[str, Any]:
    # Only what status needs: a few hundred bytes per Deployment, not the full object.
    meta = body.get("metadata") or {}
    return {
        "metadata": {"generation": meta.get("generation")},
        "spec": {"replicas": (body.get("spec") or {}).get("replicas", 1)},
        "status": body.get("status") or {},
    }


def slim_scaled_object(body: Mapping[str, Any]) -> dict[str, Any]:
    """A KEDA ScaledObject as status reads it: KEDA's conditions and the HPA it made."""
    meta = body.get("metadata") or {}
    status = body.get("status") or {}
    slim: dict[str, Any] = {
        "name": meta.get("name"),
        "generation": meta.get("generation"),
        "conditions": list(status.get("conditions") or []),
        "hpaName": status.get("hpaName"),
    }
    if status.get("observedGeneration") is not None:
        slim["observedGeneration"] = status["observedGeneration"]
    return slim


# The kinds of child whose status the RembgService's status reads, and what is kept of each.
SLIMS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "Deployment": slim_deployment,
    "ScaledObject": slim_scaled_object,
}


@dataclass(frozen=True)
class PoolTarget:
    """A pool as status sees it: its Deployment, what counts as ready, and its ScaledObject
    (None unless KEDA scales the pool)."""

    pool: str
    deployment: str
    required: bool = True
    minimum: int = 0
    scaled_object: str | None = None


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
    autoscaling_engine: str = "hpa"
    has_gpu_pool: bool = False
    gpu_capacity: int | None = None
    gpu_fallback_active: bool = False
    inventory: tuple[tuple[str, str, str], ...] = ()  # (apiVersion, kind, name)


@dataclass
class ServiceState:
    """One RembgService: its last body, what its last reconcile learnt, its children and pods."""

    owner: dict[str, Any]
    status: dict[str, Any] = field(default_factory=dict)
    record: Record | None = None
    # Children by (kind, namespace, name): the essence of each as the operator's last apply
    # answered it; a watch event or a list with another essence means someone changed it.
    children: dict[ChildKey, str] = field(default_factory=dict)
    # Deployments whose replicas an autoscaler sets (their manifest has none): a scale is
    # not an edit.
    scaled_elsewhere: set[ChildKey] = field(default_factory=set)
    # The essence of the manifest last applied, per child, while the child is known to be
    # as applied: a pass whose manifest is the same skips the apply (no write when idle).
    applied: dict[ChildKey, str] = field(default_factory=dict)
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> slim
    scaled_objects: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> slim
    # Watch events delivered per (kind, name) of the kinds in SLIMS: an apply answer is only
    # as new as its send.
    child_events: Counter[tuple[str, str]] = field(default_factory=Counter)
    pods: dict[str, PodState] = field(default_factory=dict)
    events_posted: dict[str, str] = field(default_factory=dict)  # reason -> message
    pod_events_posted: set[tuple[str, str]] = field(default_factory=set)  # (pod, reason)
    # The next run's kind: a full reconcile, else a status refresh.
    wants_full: bool = True
    # Child events that came during a full reconcile: judged once its applies returned.
    reconciling: bool = False
    deferred: dict[ChildKey, Mapping[str, Any] | None] = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return service_key(self.owner)

    def essence_of(self, body: Mapping[str, Any]) -> str:
        return essence(body, replicas=child_key(body) not in self.scaled_elsewhere)

    def saw(self, child: ChildKey, body: Mapping[str, Any] | None) -> bool:
        """A child as a watch or a list shows it (None when it is gone): True when a full
        reconcile must follow. A drifted child is applied again by that pass."""
        known = self.children.get(child)
        if known is None:
            # Never applied (or pruned, or gone already): nothing of ours to repair, unless
            # no pass has run yet (that first pass applies everything anyway).
            return self.record is None
        if body is None:
            self.forget_child(child)
            return True
        if self.essence_of(body) != known:
            self.applied.pop(child, None)
            return True
        return False

    def slims(self, kind: str) -> dict[str, dict[str, Any]] | None:
        """The slim copies kept of one kind of child, by name; None for a kind status
        does not read."""
        if kind == "Deployment":
            return self.deployments
        if kind == "ScaledObject":
            return self.scaled_objects
        return None

    def events_of(self, body: Mapping[str, Any]) -> int:
        """Watch events delivered so far for this child."""
        kind, _, name = child_key(body)
        return self.child_events[(kind, name)]

    def observe_child(self, body: Mapping[str, Any], *, deleted: bool) -> None:
        """A watch event of a child: keep what status reads (Deployments, ScaledObjects)."""
        kind, _, name = child_key(body)
        slims = self.slims(kind)
        if slims is None:
            return
        self.child_events[(kind, name)] += 1
        if deleted:
            slims.pop(name, None)
        else:
            slims[name] = SLIMS[kind](body)

    def observe_applied(
        self, manifest: Mapping[str, Any], stored: Mapping[str, Any], events_before: int
    ) -> None:
        """Our apply of `manifest` returned `stored`; `events_before` counted the child's
        watch events when it was sent."""
        child = child_key(manifest)
        if child[0] == "Deployment" and "replicas" not in (manifest.get("spec") or {}):
            self.scaled_elsewhere.add(child)
        else:
            self.scaled_elsewhere.discard(child)
        self.children[child] = self.essence_of(stored)
        self.applied[child] = essence(manifest)
        kind, _, name = child_key(stored)
        slims = self.slims(kind)
        if slims is not None and self.child_events[(kind, name)] == events_before:
            # Not when a watch event came in meanwhile: it may be newer than this answer (a
            # pod turned Ready after the apply), and the watch delivers every later change,
            # while an older status kept here would stay until the next event, maybe never.
            slims[name] = SLIMS[kind](stored)

    def unchanged(self, manifest: Mapping[str, Any]) -> bool:
        """The manifest is what was last applied, and the child is still as applied."""
        child = child_key(manifest)
        return child in self.children and self.applied.get(child) == essence(manifest)

    def forget_child(self, child: ChildKey) -> None:
        self.children.pop(child, None)
        self.applied.pop(child, None)
        slims = self.slims(child[0])
        if slims is not None:
            slims.pop(child[2], None)


class Services:
    """Every RembgService this operator manages, by key; forget() is the one way to let go."""

    def __init__(self) -> None:
        self._states: dict[Key, ServiceState] = {}
        # Pods listed before their service (the pod listing may come first at start-up).
        self._early_pods: dict[Key, dict[str, PodState]] = {}

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, key: object) -> bool:
        return key in self._states

    def __iter__(self) -> Iterator[ServiceState]:
        return iter(list(self._states.values()))

    def keys(self) -> list[Key]:
        return list(self._states)

    def get(self, key: Key) -> ServiceState | None:
        return self._states.get(key)

    def remember(self, body: Mapping[str, Any]) -> tuple[ServiceState, bool]:
        """Keep the service's latest body; True when its children depend on what changed."""
        key = service_key(body)
        owner = slim_owner(body)
        state = self._states.get(key)
        if state is None or state.owner["metadata"].get("uid") != owner["metadata"].get("uid"):
            # New here, or deleted and created again under the same name: nothing of the old
            # object applies (its Events, children, digests), except the pods seen already.
            pods = self._early_pods.pop(key, {}) if state is None else state.pods
            state = ServiceState(owner=owner, pods=pods, status=dict(body.get("status") or {}))
            self._states[key] = state
            return state, True
        changed = identity(state.owner) != identity(owner)
        state.owner = owner
        # The status is the operator's to write: what it wrote last stands, not a late echo
        # of an earlier write.
        return state, changed

    def forget(self, key: Key) -> None:
        self._states.pop(key, None)
        self._early_pods.pop(key, None)

    def observe_pod(self, key: Key, pod: PodState, *, deleted: bool) -> bool:
        """Keep a pod of a pool; True when what status reads of it changed."""
        state = self._states.get(key)
        pods = state.pods if state is not None else self._early_pods.setdefault(key, {})
        if deleted:
            changed = pods.pop(pod.name, None) is not None
        else:
            changed = pods.get(pod.name) != pod
            pods[pod.name] = pod
        if state is None and not pods:
            self._early_pods.pop(key, None)
        return changed and state is not None
