"""Status from what was observed: conditions kstatus, Argo CD and `kubectl wait` understand.

Pure: callers hand in the observation and the previous conditions (to keep
lastTransitionTime when a condition's status does not change) and the current time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from rembg_operator.builders.children import Skipped
from rembg_operator.models import GPU_RESOURCE
from rembg_operator.pod_health import PodFinding, degraded_reason

Condition = dict[str, Any]

READY = "Ready"
PROGRESSING = "Progressing"
DEGRADED = "Degraded"
RECONCILING = "Reconciling"
STALLED = "Stalled"
MONITORING = "MonitoringAvailable"
AUTOSCALING = "AutoscalingAvailable"
GPU_CAPACITY = "GpuCapacityAvailable"
PODS_NOT_READY = "PodsNotReady"
# Pods named per pool in status.pools.<pool>.notReady, and per pool in condition messages:
# a 100-pod pool in trouble must not make a 100-entry status.
MAX_REPORTED_PODS = 5
MAX_PODS_IN_MESSAGE = 3


@dataclass(frozen=True)
class ScaledObjectObservation:
    """A pool's KEDA ScaledObject as last seen: KEDA's own conditions, each "True", "False"
    or "Unknown" (Unknown too while KEDA has set none: not running, or not there yet)."""

    name: str
    ready: str = "Unknown"
    # KEDA's reason and message of its Ready condition.
    reason: str = ""
    message: str = ""
    # The scaler is active: its triggers see load (informational, not a health signal).
    active: str = "Unknown"
    fallback: str = "Unknown"
    paused: str = "Unknown"
    hpa: str | None = None  # status.hpaName: the HPA KEDA created
    # False while KEDA says it has not seen the ScaledObject's newest generation: its
    # conditions are then about an older spec.
    current: bool = True

    @classmethod
    def from_scaled_object(
        cls, name: str, scaled_object: Mapping[str, Any] | None
    ) -> ScaledObjectObservation:
        """From the slim copy the state keeps (state.slim_scaled_object); None: not seen."""
        if scaled_object is None:
            return cls(name=name)
        by_type = {
            c.get("type"): c for c in scaled_object.get("conditions") or [] if isinstance(c, dict)
        }

        def status_of(kind: str) -> str:
            value = str((by_type.get(kind) or {}).get("status") or "Unknown")
            return value if value in ("True", "False") else "Unknown"

        ready = by_type.get("Ready") or {}
        observed = scaled_object.get("observedGeneration")
        generation = scaled_object.get("generation")
        return cls(
            name=name,
            ready=status_of("Ready"),
            reason=str(ready.get("reason") or ""),
            message=str(ready.get("message") or ""),
            active=status_of("Active"),
            fallback=status_of("Fallback"),
            paused=status_of("Paused"),
            hpa=scaled_object.get("hpaName") or None,
            current=observed is None or generation is None or int(observed) >= int(generation),
        )

    @property
    def ready_now(self) -> bool:
        return self.current and self.ready == "True"

    @property
    def failing(self) -> bool:
        return self.current and self.ready == "False"

    def explained(self) -> str:
        return self.message or self.reason or "not ready"

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": "ScaledObject",
            "name": self.name,
            "ready": self.ready,
            "active": self.active,
            "fallback": self.fallback,
            "paused": self.paused,
        }
        if self.hpa:
            out["hpa"] = self.hpa
        if self.ready != "True":
            # Why not, in KEDA's words (absent while KEDA has said nothing).
            if self.reason:
                out["reason"] = self.reason
            if self.message:
                out["message"] = self.message
        return out


@dataclass(frozen=True)
class PoolObservation:
    """One pool's Deployment as last seen (absent: exists=False), and its ScaledObject when
    KEDA scales it."""

    pool: str
    exists: bool = False
    generation: int = 0
    observed_generation: int = 0
    desired: int = 0
    ready: int = 0
    updated: int = 0
    available: int = 0
    deadline_exceeded: bool = False
    # False when the pool is not needed for Ready (a GPU pool covered by the CPU fallback).
    required: bool = True
    # Why the pool's pods are not ready (pod_health), hard failures first.
    findings: tuple[PodFinding, ...] = ()
    scaled_object: ScaledObjectObservation | None = None

    @classmethod
    def from_deployment(
        cls,
        pool: str,
        deployment: Mapping[str, Any] | None,
        *,
        required: bool = True,
        minimum: int = 0,
        findings: Sequence[PodFinding] = (),
        scaled_object: ScaledObjectObservation | None = None,
    ) -> PoolObservation:
        """minimum: replicas the pool must reach (the autoscaler's floor), even before the
        autoscaler has raised the Deployment's own replica count to it."""
        if deployment is None:
            return cls(
                pool=pool,
                required=required,
                desired=minimum,
                findings=tuple(findings),
                scaled_object=scaled_object,
            )
        status = deployment.get("status") or {}
        spec = deployment.get("spec") or {}
        conditions = status.get("conditions") or []
        deadline = any(
            c.get("type") == "Progressing" and c.get("reason") == "ProgressDeadlineExceeded"
            for c in conditions
        )
        return cls(
            pool=pool,
            exists=True,
            generation=int(deployment.get("metadata", {}).get("generation") or 0),
            observed_generation=int(status.get("observedGeneration") or 0),
            desired=max(int(spec.get("replicas", 1)), minimum),
            ready=int(status.get("readyReplicas") or 0),
            updated=int(status.get("updatedReplicas") or 0),
            available=int(status.get("availableReplicas") or 0),
            deadline_exceeded=deadline,
            required=required,
            findings=tuple(findings),
            scaled_object=scaled_object,
        )

    @property
    def rolled_out(self) -> bool:
        """The controller saw the newest spec and every replica runs it, available."""
        return (
            self.exists
            and self.observed_generation >= self.generation
            and self.updated >= self.desired
            and self.available >= self.desired
            and self.ready >= self.desired
        )

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "desiredReplicas": self.desired,
            "readyReplicas": self.ready,
            "updatedReplicas": self.updated,
            "availableReplicas": self.available,
        }
        if self.findings:
            out["notReadyPods"] = len(self.findings)
            out["notReady"] = [f.as_status() for f in self.findings[:MAX_REPORTED_PODS]]
        if self.scaled_object is not None:
            out["autoscaler"] = self.scaled_object.as_status()
        return out

    def replicas(self) -> str:
        return f"{self.ready}/{self.desired} ready"

    def explained(self) -> str:
        """`cpu: 0/1 ready; pod demo-cpu-abc12: ImagePullBackOff: Back-off pulling image "x"`."""
        return "; ".join([f"{self.pool}: {self.replicas()}", *_pod_summaries(self.findings)])

    @property
    def failing(self) -> bool:
        """Some pod is not ready for a reason other than still starting."""
        return any(not f.starting for f in self.findings)


def _pod_summaries(findings: Sequence[PodFinding]) -> list[str]:
    shown = [f.summary() for f in findings[:MAX_PODS_IN_MESSAGE]]
    if len(findings) > MAX_PODS_IN_MESSAGE:
        shown.append(f"and {len(findings) - MAX_PODS_IN_MESSAGE} more pod(s) not ready")
    return shown


@dataclass(frozen=True)
class Observation:
    """Everything the status is computed from."""

    generation: int
    endpoint: str
    models: Sequence[str] = ()
    pools: Sequence[PoolObservation] = ()
    spec_problems: Sequence[str] = ()
    apply_errors: Sequence[str] = ()
    skipped: Sequence[Skipped] = ()
    monitoring_enabled: bool = True
    autoscaling_enabled: bool = True
    autoscaling_engine: str = "hpa"
    has_gpu_pool: bool = False
    gpu_capacity: int | None = None
    gpu_fallback_active: bool = False
    inventory: Sequence[Mapping[str, str]] = field(default_factory=list)


def now_utc() -> datetime:
    return datetime.now(tz=UTC)


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def conditions_from(
    observed: Observation, previous: Sequence[Mapping[str, Any]], now: datetime
) -> list[Condition]:
    """All conditions, each with reason, message and observedGeneration."""
    raw = [
        *_lifecycle_conditions(observed),
        _monitoring_condition(observed),
        _autoscaling_condition(observed),
    ]
    if observed.has_gpu_pool:
        raw.append(_gpu_condition(observed))
    return [_stamp(c, observed.generation, previous, now) for c in raw]


def _condition(kind: str, value: bool | None, reason: str, message: str) -> Condition:
    status = "Unknown" if value is None else ("True" if value else "False")
    return {"type": kind, "status": status, "reason": reason, "message": message}


def _stamp(
    condition: Condition, generation: int, previous: Sequence[Mapping[str, Any]], now: datetime
) -> Condition:
    before = next((c for c in previous if c.get("type") == condition["type"]), None)
    unchanged = before is not None and before.get("status") == condition["status"]
    transition = before.get("lastTransitionTime") if unchanged and before else None
    return {
        **condition,
        "observedGeneration": generation,
        "lastTransitionTime": transition or _timestamp(now),
    }


def _lifecycle_conditions(observed: Observation) -> list[Condition]:
    """Ready, Progressing, Degraded, Reconciling, Stalled: one consistent story."""
    if observed.spec_problems:
        message = "spec not applied, previous children kept: " + "; ".join(observed.spec_problems)
        return [
            _condition(READY, False, "InvalidSpec", message),
            _condition(PROGRESSING, False, "InvalidSpec", message),
            _condition(DEGRADED, True, "InvalidSpec", message),
            _condition(RECONCILING, False, "InvalidSpec", message),
            _condition(STALLED, True, "InvalidSpec", message),
        ]
    if observed.apply_errors:
        message = "; ".join(observed.apply_errors)
        return [
            _condition(READY, False, "ApplyFailed", message),
            _condition(PROGRESSING, True, "ApplyFailed", "retrying: " + message),
            _condition(DEGRADED, True, "ApplyFailed", message),
            _condition(RECONCILING, True, "ApplyFailed", "retrying: " + message),
            _condition(STALLED, False, "ApplyFailed", "the operator retries"),
        ]
    return _rollout_conditions(observed)


def _rollout_conditions(observed: Observation) -> list[Condition]:
    required = [p for p in observed.pools if p.required]
    stalled = [p for p in observed.pools if p.deadline_exceeded and not p.rolled_out]
    pending = [p for p in required if not p.rolled_out]
    replicas = ", ".join(f"{p.pool} {p.ready}/{p.desired} ready" for p in observed.pools)
    ready = not pending and not stalled
    if ready:
        ready_cond = _condition(READY, True, "AllPoolsReady", f"{replicas}; {observed.endpoint}")
        progressing = _condition(PROGRESSING, False, "RolloutComplete", replicas)
        reconciling = _condition(RECONCILING, False, "RolloutComplete", replicas)
    elif any(p.findings for p in pending):
        # Say why, the way `kubectl describe pod` would, so nobody has to.
        reason = PODS_NOT_READY if any(p.failing for p in pending) else "RolloutInProgress"
        message = "; ".join(p.explained() for p in pending)
        ready_cond = _condition(READY, False, reason, message)
        # Argo CD shows Progressing's message while nothing is Degraded: the same story.
        progressing = _condition(PROGRESSING, True, "RolloutInProgress", message)
        reconciling = _condition(RECONCILING, True, "RolloutInProgress", replicas)
    else:
        waiting = ", ".join(p.pool for p in pending) or ", ".join(p.pool for p in stalled)
        ready_cond = _condition(
            READY, False, "RolloutInProgress", f"waiting for {waiting}: {replicas}"
        )
        progressing = _condition(PROGRESSING, True, "RolloutInProgress", replicas)
        reconciling = _condition(RECONCILING, True, "RolloutInProgress", replicas)
    degraded = _degraded(observed, stalled)
    if stalled:
        names = ", ".join(p.pool for p in stalled)
        message = f"rollout of pool(s) {names} exceeded its progress deadline"
        stalled_cond = _condition(STALLED, True, "ProgressDeadlineExceeded", message)
        progressing = _condition(PROGRESSING, False, "ProgressDeadlineExceeded", message)
        reconciling = _condition(RECONCILING, False, "ProgressDeadlineExceeded", message)
    else:
        stalled_cond = _condition(STALLED, False, "NotStalled", "the spec is realisable")
    return [ready_cond, progressing, degraded, reconciling, stalled_cond]


def _degraded(observed: Observation, stalled: Sequence[PoolObservation]) -> Condition:
    if observed.has_gpu_pool and observed.gpu_capacity == 0:
        message = _no_gpu_message(observed)
        return _condition(DEGRADED, True, "NoGpuCapacity", message)
    hard = [f for p in observed.pools for f in p.findings if f.degraded]
    reason = degraded_reason(hard)
    if reason is not None:
        by_pool = [
            "; ".join([f"{p.pool}: {p.replicas()}", *_pod_summaries(failing)])
            for p in observed.pools
            if (failing := [f for f in p.findings if f.degraded])
        ]
        return _condition(DEGRADED, True, reason, "; ".join(by_pool))
    if stalled:
        names = ", ".join(p.pool for p in stalled)
        return _condition(DEGRADED, True, "ProgressDeadlineExceeded", f"pool(s) {names} stalled")
    return _condition(DEGRADED, False, "AsExpected", "no known problem")


def _no_gpu_message(observed: Observation) -> str:
    message = (
        f"no node has allocatable {GPU_RESOURCE}: the GPU pool's pods stay Pending "
        "(install the NVIDIA device plugin or add GPU nodes)"
    )
    if observed.gpu_fallback_active:
        message += "; the CPU pool carries the GPU pool's minimum (fallback policy)"
    return message


def _monitoring_condition(observed: Observation) -> Condition:
    if not observed.monitoring_enabled:
        return _condition(MONITORING, False, "Disabled", "spec.monitoring.enabled is false")
    missing = [s for s in observed.skipped if s.reason == "CrdMissing"]
    if missing:
        kinds = ", ".join(sorted({s.kind for s in missing}))
        return _condition(
            MONITORING,
            False,
            "CrdMissing",
            f"{kinds} not created: monitoring.coreos.com/v1 is not served by this cluster",
        )
    return _condition(MONITORING, True, "Created", "ServiceMonitor and PrometheusRule applied")


def _autoscaling_condition(observed: Observation) -> Condition:
    """Whether the pools' autoscalers work; with KEDA, in KEDA's own words.

    Ready does not depend on this, by design: Ready says the pools serve (their pods are
    ready), which holds while KEDA is down or a trigger is misconfigured; the pools then stay
    at their current replica count. A broken autoscaler is reported here, like monitoring in
    MonitoringAvailable, and neither Argo CD's health (health.lua) nor `kubectl wait
    --for=condition=Ready` turns on it.
    """
    if not observed.autoscaling_enabled:
        return _condition(AUTOSCALING, False, "Disabled", "pools run at a fixed replica count")
    missing = [s for s in observed.skipped if s.reason == "KedaNotInstalled"]
    if missing:
        return _condition(AUTOSCALING, False, "KedaNotInstalled", missing[0].message)
    if observed.autoscaling_engine == "keda":
        return _keda_condition(observed)
    return _condition(AUTOSCALING, True, "Created", "an autoscaler per pool")


def _keda_condition(observed: Observation) -> Condition:
    """True once KEDA says Ready for every pool's ScaledObject; a Ready=False wins over one
    KEDA has not judged yet (it says what is wrong)."""
    scaled = [(p.pool, p.scaled_object) for p in observed.pools if p.scaled_object is not None]
    failing = [
        f"pool {pool}: ScaledObject {so.name}: {so.explained()}"
        for pool, so in scaled
        if so.failing
    ]
    if failing:
        return _condition(AUTOSCALING, False, "KedaNotReady", "; ".join(failing))
    waiting = [f"{so.name} (pool {pool})" for pool, so in scaled if not so.ready_now]
    if waiting or not scaled:
        names = ", ".join(waiting) or "none observed"
        return _condition(
            AUTOSCALING,
            None,
            "WaitingForKeda",
            f"KEDA has not reported Ready for ScaledObject {names} yet "
            "(is the KEDA operator running?)",
        )
    names = ", ".join(f"{so.name} (pool {pool})" for pool, so in scaled)
    return _condition(AUTOSCALING, True, "KedaReady", f"KEDA reports Ready: {names}")


def _gpu_condition(observed: Observation) -> Condition:
    if observed.gpu_capacity is None:
        return _condition(GPU_CAPACITY, None, "Unknown", "nodes could not be read")
    if observed.gpu_capacity == 0:
        return _condition(GPU_CAPACITY, False, "NoGpuNodes", _no_gpu_message(observed))
    return _condition(
        GPU_CAPACITY,
        True,
        "GpuNodesFound",
        f"{observed.gpu_capacity} allocatable {GPU_RESOURCE} in the cluster",
    )


def build_status(
    observed: Observation, previous: Mapping[str, Any] | None, now: datetime
) -> dict[str, Any]:
    """The whole .status; previous is the current .status (for transition times)."""
    previous_conditions = (previous or {}).get("conditions") or []
    pools = {p.pool: p.as_status() for p in observed.pools}
    status: dict[str, Any] = {
        "observedGeneration": observed.generation,
        "conditions": conditions_from(observed, previous_conditions, now),
        "pools": pools,
        "gpuReplicas": _ratio(pools.get("gpu")),
        "cpuReplicas": _ratio(pools.get("cpu")),
        "model": ",".join(observed.models),
        "endpoint": observed.endpoint,
        "unavailableChildren": [s.as_status() for s in observed.skipped],
        "inventory": [dict(i) for i in observed.inventory],
    }
    if observed.gpu_capacity is not None:
        status["gpuCapacity"] = observed.gpu_capacity
    return status


def _ratio(pool: Mapping[str, Any] | None) -> str:
    if pool is None:
        return "-"
    return f"{pool['readyReplicas']}/{pool['desiredReplicas']}"


def same_status(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    """Equal apart from lastTransitionTime (which _stamp keeps for unchanged conditions)."""
    return _without_times(a) == _without_times(b)


def _without_times(status: Mapping[str, Any] | None) -> dict[str, Any]:
    if not status:
        return {}
    out = dict(status)
    out["conditions"] = [
        {k: v for k, v in c.items() if k != "lastTransitionTime"}
        for c in status.get("conditions") or []
    ]
    return out
