"""Every child of one RembgService, given what the cluster offers."""

from __future__ import annotations

from dataclasses import dataclass, field

from rembg_operator.builders.autoscaling import build_hpa, build_scaled_object
from rembg_operator.builders.availability import build_pdb
from rembg_operator.builders.meta import Manifest, ServiceRef
from rembg_operator.builders.monitoring import build_prometheus_rule, build_service_monitor
from rembg_operator.builders.plan import PoolPlan, plan_pools
from rembg_operator.builders.workload import build_deployment, build_service
from rembg_operator.models import RembgServiceSpec


@dataclass(frozen=True)
class Capabilities:
    """Optional APIs found by discovery, and the cluster's GPU capacity."""

    prometheus_operator: bool = False
    keda: bool = False
    # Allocatable GPUs over all nodes; None when unknown.
    gpu_capacity: int | None = None


@dataclass(frozen=True)
class Skipped:
    """A child that is wanted but cannot exist in this cluster."""

    kind: str
    name: str
    reason: str
    message: str

    def as_status(self) -> dict[str, str]:
        return {
            "kind": self.kind,
            "name": self.name,
            "reason": self.reason,
            "message": self.message,
        }


@dataclass(frozen=True)
class DesiredChildren:
    manifests: list[Manifest]
    plans: list[PoolPlan]
    skipped: list[Skipped] = field(default_factory=list)


def build_children(
    ref: ServiceRef, spec: RembgServiceSpec, capabilities: Capabilities
) -> DesiredChildren:
    plans = plan_pools(spec, gpu_capacity=capabilities.gpu_capacity)
    manifests: list[Manifest] = []
    skipped: list[Skipped] = []
    autoscaled = autoscaler_available(spec, capabilities)
    for plan in plans:
        manifests.append(build_deployment(ref, spec, plan, manage_replicas=not autoscaled))
    manifests.append(build_service(ref, spec))
    for plan in plans:
        manifests.extend(_pool_extras(ref, spec, plan, autoscaled=autoscaled))
    if spec.autoscaling.enabled and not autoscaled:
        skipped.extend(
            Skipped(
                "ScaledObject",
                ref.pool_object_name(plan.name),
                "KedaNotInstalled",
                "autoscaling.engine is keda but keda.sh/v1alpha1 ScaledObject is not served; "
                "the pool runs at its fixed replica count",
            )
            for plan in plans
        )
    if spec.monitoring.enabled:
        if capabilities.prometheus_operator:
            manifests.append(build_service_monitor(ref, spec))
            manifests.append(build_prometheus_rule(ref, spec, plans))
        else:
            message = "monitoring.coreos.com/v1 is not served (Prometheus Operator CRDs missing)"
            skipped.append(Skipped("ServiceMonitor", ref.name, "CrdMissing", message))
            skipped.append(Skipped("PrometheusRule", ref.name, "CrdMissing", message))
    return DesiredChildren(manifests=manifests, plans=plans, skipped=skipped)


def autoscaler_available(spec: RembgServiceSpec, capabilities: Capabilities) -> bool:
    if not spec.autoscaling.enabled:
        return False
    return spec.autoscaling.engine == "hpa" or capabilities.keda


def _pool_extras(
    ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan, *, autoscaled: bool
) -> list[Manifest]:
    extras: list[Manifest] = []
    if autoscaled:
        builder = build_hpa if spec.autoscaling.engine == "hpa" else build_scaled_object
        extras.append(builder(ref, spec, plan))
    if spec.availability.pdb_enabled:
        extras.append(build_pdb(ref, spec, plan))
    return extras
