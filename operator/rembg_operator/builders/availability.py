"""PodDisruptionBudgets: voluntary evictions (node drains) never take a pool down at once."""

from __future__ import annotations

from rembg_operator.builders.meta import Manifest, ServiceRef, metadata, pool_labels, pool_selector
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.models import RembgServiceSpec


def build_pdb(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> Manifest:
    availability = spec.availability
    budget: Manifest
    if availability.min_available is not None:
        budget = {"minAvailable": availability.min_available}
    else:
        budget = {
            "maxUnavailable": 1
            if availability.max_unavailable is None
            else availability.max_unavailable
        }
    name = ref.pool_object_name(plan.name)
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ref, name, pool_labels(ref, plan.name)),
        "spec": {
            **budget,
            "selector": {"matchLabels": pool_selector(ref, plan.name)},
            # Pods that never became ready may always be evicted: a broken rollout can drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
