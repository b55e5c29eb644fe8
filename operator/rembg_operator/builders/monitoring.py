"""PrometheusRule (recording rules and alerts) and ServiceMonitor of one RembgService.

The ServiceMonitor relabels every scraped series with `rembg_service` and `pool` (from the
pod labels), so the rules below select one service's series without guessing at pod names.
"""

from __future__ import annotations

from rembg_operator.builders.meta import (
    HTTP_PORT_NAME,
    POOL_LABEL,
    SERVICE_LABEL,
    Manifest,
    ServiceRef,
    common_labels,
    metadata,
    service_selector,
)
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.custom_metrics import (
    PENDING_BY_POD_RECORD,
    jobs_backlog_rule,
    latency_p95_by_pod_rule,
    pending_by_pod_rule,
)
from rembg_operator.models import RembgServiceSpec

P95_RECORD = "rembg:request_duration_seconds:p95_5m"
ERROR_RATIO_RECORD = "rembg:request_error_ratio:rate5m"
# Per-pod recordings the autoscalers read live in custom_metrics (one place for the adapter too).
PENDING_RECORD = PENDING_BY_POD_RECORD
CUDA_PROVIDER = "CUDAExecutionProvider"


def _prometheus_label(kubernetes_label: str) -> str:
    """How Prometheus' Kubernetes discovery spells a pod label in __meta_ labels."""
    return "".join(c if c.isalnum() else "_" for c in kubernetes_label)


def service_series_selector(ref: ServiceRef) -> str:
    return f'namespace="{ref.namespace}",rembg_service="{ref.name}"'


def build_service_monitor(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    monitoring = spec.monitoring
    relabelings = [
        {
            "sourceLabels": [f"__meta_kubernetes_pod_label_{_prometheus_label(label)}"],
            "targetLabel": target,
            "action": "replace",
        }
        for label, target in ((SERVICE_LABEL, "rembg_service"), (POOL_LABEL, "pool"))
    ]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": metadata(ref, ref.name, {**monitoring.labels, **common_labels(ref)}),
        "spec": {
            "selector": {"matchLabels": service_selector(ref)},
            "namespaceSelector": {"matchNames": [ref.namespace]},
            "endpoints": [
                {
                    "port": HTTP_PORT_NAME,
                    "path": "/metrics",
                    "interval": monitoring.scrape_interval,
                    "scrapeTimeout": monitoring.scrape_timeout,
                    "relabelings": relabelings,
                }
            ],
        },
    }


def build_rule_groups(
    ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]
) -> list[Manifest]:
    """The rule groups, in Prometheus' own format (promtool reads the same structure)."""
    return [
        {
            "name": f"rembg.{ref.namespace}.{ref.name}.recording",
            "rules": _recording_rules(ref, spec),
        },
        {"name": f"rembg.{ref.namespace}.{ref.name}.alerts", "rules": _alerts(ref, spec, plans)},
    ]


def build_prometheus_rule(
    ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]
) -> Manifest:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": metadata(ref, ref.name, {**spec.monitoring.labels, **common_labels(ref)}),
        "spec": {"groups": build_rule_groups(ref, spec, plans)},
    }


def _recording_rules(ref: ServiceRef, spec: RembgServiceSpec) -> list[Manifest]:
    selector = service_series_selector(ref)
    by = "namespace, rembg_service"
    rules = [
        {
            "record": P95_RECORD,
            "expr": (
                f"histogram_quantile(0.95, sum by ({by}, pool, le) "
                f"(rate(rembg_request_duration_seconds_bucket{{{selector}}}[5m])))"
            ),
        },
        {
            "record": ERROR_RATIO_RECORD,
            "expr": (
                f'sum by ({by}) (rate(rembg_requests_total{{{selector},code=~"5.."}}[5m]))'
                f" / sum by ({by}) (rate(rembg_requests_total{{{selector}}}[5m]))"
            ),
        },
        pending_by_pod_rule(selector),
        latency_p95_by_pod_rule(selector),
    ]
    if spec.jobs.enabled:
        rules.append(jobs_backlog_rule(selector))
    return rules


def _alerts(ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]) -> list[Manifest]:
    alerts = spec.monitoring.alerts
    selector = service_series_selector(ref)
    saturated_at = spec.server.queue_max_requests * alerts.queue_saturation_ratio
    rules = [
        _no_ready_replicas(ref, spec, plans),
        {
            "alert": "RembgHighErrorRate",
            "expr": f"{ERROR_RATIO_RECORD}{{{selector}}} > {alerts.error_ratio:g}",
            "for": alerts.error_ratio_for,
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: high share of 5xx answers",
                "description": (
                    "{{ $value | humanizePercentage }} of requests failed over 5m "
                    f"(threshold {alerts.error_ratio:.0%})."
                ),
            },
        },
        {
            "alert": "RembgHighLatency",
            "expr": f"{P95_RECORD}{{{selector}}} > {alerts.latency_p95_seconds:g}",
            "for": alerts.latency_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: p95 latency too high",
                "description": (
                    "p95 latency of pool {{ $labels.pool }} is {{ $value | humanizeDuration }} "
                    f"(threshold {alerts.latency_p95_seconds:g}s)."
                ),
            },
        },
        {
            "alert": "RembgQueueSaturated",
            "expr": f"{PENDING_RECORD}{{{selector}}} >= {saturated_at:g}",
            "for": alerts.queue_saturation_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: queue near its limit",
                "description": (
                    "Pod {{ $labels.pod }} holds {{ $value }} pending requests of "
                    f"{spec.server.queue_max_requests}; it will answer 429 soon. "
                    "The autoscaler is at its maximum or too slow."
                ),
            },
        },
    ]
    if any(plan.is_gpu for plan in plans):
        rules.append(_gpu_without_gpu(ref, spec))
    if spec.jobs.enabled:
        rules.extend(_jobs_alerts(ref, spec))
    return rules


def _no_ready_replicas(ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]) -> Manifest:
    # kube-state-metrics series of this service's Deployments; a pool scaled to zero on
    # purpose has spec replicas 0 and does not fire.
    deployments = "|".join(ref.pool_object_name(plan.name) for plan in plans)
    selector = f'namespace="{ref.namespace}",deployment=~"{deployments}"'
    return {
        "alert": "RembgNoReadyReplicas",
        "expr": (
            f"(kube_deployment_status_replicas_ready{{{selector}}} == 0)"
            f" and on (namespace, deployment) (kube_deployment_spec_replicas{{{selector}}} > 0)"
        ),
        "for": spec.monitoring.alerts.no_ready_replicas_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: a pool has no ready replica",
            "description": "Deployment {{ $labels.deployment }} has no ready pod.",
        },
    }


def _gpu_without_gpu(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    selector = f'{service_series_selector(ref)},pool="gpu",provider!="{CUDA_PROVIDER}"'
    return {
        "alert": "RembgGpuPoolWithoutGpu",
        "expr": (
            f"max by (namespace, rembg_service, pool, pod) (rembg_model_info{{{selector}}}) == 1"
        ),
        "for": spec.monitoring.alerts.gpu_fallback_for,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: GPU pool serves without CUDA",
            "description": (
                "Pod {{ $labels.pod }} of the GPU pool serves with a CPU execution provider: "
                "it holds a GPU and is many times slower. Check the CUDA libraries and driver."
            ),
        },
    }


def _jobs_alerts(ref: ServiceRef, spec: RembgServiceSpec) -> list[Manifest]:
    alerts = spec.monitoring.alerts
    selector = service_series_selector(ref)
    threshold = alerts.jobs_oldest_age_seconds
    return [
        {
            "alert": "RembgJobsWaiting",
            # Every replica samples the same oldest job: one alert per service, not per pod.
            "expr": (
                f"max by (namespace, rembg_service) "
                f"(rembg_jobs_oldest_age_seconds{{{selector}}}) > {threshold:g}"
            ),
            "for": alerts.jobs_oldest_age_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: queued jobs are not picked up",
                "description": (
                    "The oldest queued job has waited {{ $value | humanizeDuration }} "
                    f"(threshold {threshold:g}s). The pools are at their maximum, too slow to "
                    "scale, or their job workers are stuck."
                ),
            },
        },
        {
            "alert": "RembgJobsRedisUnreachable",
            "expr": (
                "max by (namespace, rembg_service, pool, pod) "
                f"(rembg_jobs_redis_up{{{selector}}}) == 0"
            ),
            "for": alerts.jobs_redis_down_for,
            "labels": {"severity": "critical"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: a pod cannot reach Redis",
                "description": (
                    "Pod {{ $labels.pod }} has failed every Redis call for the job path: "
                    "job submissions answer 503 and its workers take no jobs. Check the "
                    f"address in Secret {spec.jobs.redis.secret_name} and the network."
                ),
            },
        },
    ]
