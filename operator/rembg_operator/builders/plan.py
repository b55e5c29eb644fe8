"""Which pools run, with what: the spec plus the cluster's GPU capacity, before any manifest."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rembg_operator.models import CpuPoolSpec, GpuPoolSpec, PoolSpec, RembgServiceSpec

PoolName = Literal["gpu", "cpu"]


@dataclass(frozen=True)
class PoolPlan:
    """One pool as it will be deployed, replica bounds resolved."""

    name: PoolName
    pool: PoolSpec
    image: str
    provider: Literal["cuda", "cpu"]
    allow_cpu_fallback: bool
    min_replicas: int
    max_replicas: int
    fixed_replicas: int
    # Replicas added because the GPU pool cannot be scheduled (fallback policy).
    fallback_replicas: int = 0

    @property
    def is_gpu(self) -> bool:
        return self.name == "gpu"


def plan_pools(spec: RembgServiceSpec, *, gpu_capacity: int | None) -> list[PoolPlan]:
    """The pools to deploy.

    gpu_capacity is the allocatable GPU count over all nodes, or None when unknown (the
    operator may lack the right to read nodes); only a known zero triggers the fallback.
    """
    plans: list[PoolPlan] = []
    if spec.gpu is not None:
        plans.append(_gpu_plan(spec, spec.gpu))
    fallback = _fallback_replicas(spec, gpu_capacity)
    if spec.cpu is not None:
        plans.append(_cpu_plan(spec, spec.cpu, fallback))
    elif fallback > 0 and spec.gpu is not None:
        # No CPU pool was asked for: one with default settings stands in for the GPU pool.
        stand_in = CpuPoolSpec(
            replicas=fallback,
            min_replicas=fallback,
            max_replicas=max(spec.gpu.max_replicas, fallback),
        )
        plans.append(_cpu_plan(spec, stand_in, 0, fallback_replicas=fallback))
    return plans


def _fallback_replicas(spec: RembgServiceSpec, gpu_capacity: int | None) -> int:
    """The GPU pool's floor: its minimum when autoscaled, else its pinned replica count."""
    if spec.gpu is None or gpu_capacity != 0 or not spec.fallback.cpu_pool_when_no_gpu_nodes:
        return 0
    if spec.autoscaling.enabled:
        return spec.gpu.min_replicas
    return spec.gpu.fixed_replicas


def _cpu_plan(
    spec: RembgServiceSpec, pool: CpuPoolSpec, extra: int, fallback_replicas: int | None = None
) -> PoolPlan:
    minimum = pool.min_replicas + extra
    return PoolPlan(
        name="cpu",
        pool=pool,
        image=pool.image or spec.image,
        provider="cpu",
        allow_cpu_fallback=False,
        min_replicas=minimum,
        max_replicas=max(pool.max_replicas + extra, minimum, 1),
        fixed_replicas=pool.fixed_replicas + extra,
        fallback_replicas=extra if fallback_replicas is None else fallback_replicas,
    )


def _gpu_plan(spec: RembgServiceSpec, gpu: GpuPoolSpec) -> PoolPlan:
    return PoolPlan(
        name="gpu",
        pool=gpu,
        image=gpu.image or spec.gpu_image,
        provider="cuda",
        allow_cpu_fallback=spec.fallback.allow_cpu_in_gpu_pods,
        min_replicas=gpu.min_replicas,
        max_replicas=max(gpu.max_replicas, gpu.min_replicas, 1),
        fixed_replicas=gpu.fixed_replicas,
    )
