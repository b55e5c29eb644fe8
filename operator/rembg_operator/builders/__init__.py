"""Pure functions from a typed spec to child manifests: no I/O, no API client (import-linter)."""

from rembg_operator.builders.autoscaling import build_hpa, build_scaled_object
from rembg_operator.builders.availability import build_pdb
from rembg_operator.builders.children import Capabilities, DesiredChildren, build_children
from rembg_operator.builders.meta import ServiceRef
from rembg_operator.builders.monitoring import build_prometheus_rule, build_service_monitor
from rembg_operator.builders.plan import PoolPlan, plan_pools
from rembg_operator.builders.workload import build_deployment, build_service

__all__ = [
    "Capabilities",
    "DesiredChildren",
    "PoolPlan",
    "ServiceRef",
    "build_children",
    "build_deployment",
    "build_hpa",
    "build_pdb",
    "build_prometheus_rule",
    "build_scaled_object",
    "build_service",
    "build_service_monitor",
    "plan_pools",
]
