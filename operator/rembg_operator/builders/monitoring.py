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
from rembg_operator.models import RembgServiceSpec, effective_scrape_timeout

# Fixed 5m recordings, kept for dashboards and queries outside the operator; the alerts compute
# their own over alerts.rateWindow.
P95_RECORD = "rembg:request_duration_seconds:p95_5m"
ERROR_RATIO_RECORD = "rembg:request_error_ratio:rate5m"
# Per-pod recordings the autoscalers read live in custom_metrics (one place for the adapter too).
PENDING_RECORD = PENDING_BY_POD_RECORD
CUDA_PROVIDER = "CUDAExecutionProvider"
# kube-state-metrics series of a Deployment.
READY = "kube_deployment_status_replicas_ready"
WANTED = "kube_deployment_spec_replicas"
SERVICE_GROUP = "namespace, rembg_service"
POOL_GROUP = f"{SERVICE_GROUP}, pool"
CANARY_GROUP = f"{POOL_GROUP}, pod, model"
# RembgCanaryFailing: a last success older than this many intervals (plus one round's
# timeouts) is stale.
CANARY_STALE_RUNS = 3


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
                    "scrapeTimeout": effective_scrape_timeout(monitoring),
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
    # Over the limit each pod exports: the server sizes its queue from its CPU limit unless
    # queueMaxRequests is set, so the operator does not know the number.
    saturation = (
        f"{PENDING_RECORD}{{{selector}}} / on (namespace, pod) group_left () "
        f"max by (namespace, pod) (rembg_queue_limit_requests{{{selector}}})"
    )
    rules = [
        _service_down(ref, spec, plans),
        _no_ready_replicas(ref, spec, plans),
        _high_error_rate(ref, spec),
        _high_latency(ref, spec),
        {
            "alert": "RembgQueueSaturated",
            "expr": f"{saturation} >= {alerts.queue_saturation_ratio:g}",
            "for": alerts.queue_saturation_for,
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"rembg {ref.namespace}/{ref.name}: queue near its limit",
                "description": (
                    "Pod {{ $labels.pod }} holds {{ $value | humanizePercentage }} of the "
                    "requests it admits at once; it will answer 429 soon. "
                    "The autoscaler is at its maximum or too slow."
                ),
            },
        },
    ]
    if spec.server.canary.enabled:
        rules.append(_canary_failing(ref, spec))
    if any(plan.is_gpu for plan in plans):
        rules.append(_gpu_without_gpu(ref, spec))
    if spec.jobs.enabled:
        rules.extend(_jobs_alerts(ref, spec))
    return rules


def _high_error_rate(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    # Over rateWindow, not the 5m recording: a short window lets the alert end soon after
    # the fault does. Per pool, so a broken pool is not averaged away by a healthy one.
    alerts = spec.monitoring.alerts
    selector = service_series_selector(ref)
    window = alerts.rate_window
    requests = "rembg_requests_total"
    errors = f'sum by ({POOL_GROUP}) (rate({requests}{{{selector},code=~"5.."}}[{window}]))'
    total = f"sum by ({POOL_GROUP}) (rate({requests}{{{selector}}}[{window}]))"
    return {
        "alert": "RembgHighErrorRate",
        "expr": f"{errors} / {total} > {alerts.error_ratio:g}",
        "for": alerts.error_ratio_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: high share of 5xx answers",
            "description": (
                "{{ $value | humanizePercentage }} of the requests to pool {{ $labels.pool }} "
                f"failed over {window} (threshold {alerts.error_ratio:.0%})."
            ),
        },
    }


def _high_latency(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    alerts = spec.monitoring.alerts
    selector = service_series_selector(ref)
    window = alerts.rate_window
    p95 = (
        f"histogram_quantile(0.95, sum by ({POOL_GROUP}, le) "
        f"(rate(rembg_request_duration_seconds_bucket{{{selector}}}[{window}])))"
    )
    return {
        "alert": "RembgHighLatency",
        "expr": f"{p95} > {alerts.latency_p95_seconds:g}",
        "for": alerts.latency_for,
        "labels": {"severity": "warning"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: p95 latency too high",
            "description": (
                "p95 latency of pool {{ $labels.pool }} is {{ $value | humanizeDuration }} "
                f"over {window} (threshold {alerts.latency_p95_seconds:g}s)."
            ),
        },
    }


def _canary_failing(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    """A pod whose canary reports failure, or whose last success is older than a few rounds.

    The second branch catches a canary that stopped running; a pod that never succeeded
    (timestamp 0) is left to the first, so a fresh pod is not flagged before its first run.
    """
    canary = spec.server.canary
    selector = service_series_selector(ref)
    # One round checks every model in turn, each for up to a timeout, then sleeps an interval.
    stale_after = (
        CANARY_STALE_RUNS * canary.effective_interval_seconds
        + len(spec.models) * canary.effective_timeout_seconds
    )
    failed = f"max by ({CANARY_GROUP}) (rembg_canary_success{{{selector}}}) == 0"
    last = (
        f"max by ({CANARY_GROUP}) (rembg_canary_last_success_timestamp_seconds{{{selector}}} > 0)"
    )
    return {
        "alert": "RembgCanaryFailing",
        "expr": f"({failed}) or (time() - {last} > {stale_after:g})",
        "for": spec.monitoring.alerts.canary_failing_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: the model canary fails",
            "description": (
                "The canary of model {{ $labels.model }} on pod {{ $labels.pod }} (pool "
                "{{ $labels.pool }}) fails or has not succeeded for more than "
                f"{stale_after:g}s: the model produces wrong masks (IoU with the known answer "
                "too low), errors or times out. rembg_canary_failures_total says why."
            ),
        },
    }


def _deployments(ref: ServiceRef, plans: list[PoolPlan], metric: str) -> str:
    """A kube-state-metrics series of this service's Deployments, one per Deployment (a second
    kube-state-metrics replica adds nothing)."""
    deployments = "|".join(ref.pool_object_name(plan.name) for plan in plans)
    selector = f'namespace="{ref.namespace}",deployment=~"{deployments}"'
    return f"max by (namespace, deployment) ({metric}{{{selector}}})"


def _with_service(series: str) -> str:
    # Deployments are named `<service>-<pool>` (meta.py) and pool names hold no dash.
    return f'label_replace({series}, "rembg_service", "$1", "deployment", "(.+)-[^-]+")'


def _with_pool(series: str) -> str:
    return f'label_replace({series}, "pool", "$1", "deployment", ".+-([^-]+)")'


def _no_ready_replicas(ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]) -> Manifest:
    # A pool scaled to zero on purpose has spec replicas 0 and does not fire.
    ready = _with_pool(_with_service(_deployments(ref, plans, READY)))
    wanted = _deployments(ref, plans, WANTED)
    return {
        "alert": "RembgNoReadyReplicas",
        "expr": f"({ready} == 0) and on (namespace, deployment) ({wanted} > 0)",
        "for": spec.monitoring.alerts.no_ready_replicas_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: a pool has no ready replica",
            "description": (
                "Deployment {{ $labels.deployment }} (pool {{ $labels.pool }}) has no ready pod."
            ),
        },
    }


def _service_down(ref: ServiceRef, spec: RembgServiceSpec, plans: list[PoolPlan]) -> Manifest:
    # Every pool at zero ready while some pool wants replicas: nothing serves the Service.
    ready = f"sum by ({SERVICE_GROUP}) ({_with_service(_deployments(ref, plans, READY))})"
    wanted = f"sum by ({SERVICE_GROUP}) ({_with_service(_deployments(ref, plans, WANTED))})"
    return {
        "alert": "RembgServiceDown",
        "expr": f"({ready} == 0) and on ({SERVICE_GROUP}) ({wanted} > 0)",
        "for": spec.monitoring.alerts.no_ready_replicas_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: no pool has a ready replica",
            "description": (
                f"Service {ref.name} has no ready pod in any pool: every request fails. "
                "The per-pool alerts of this service say more (RembgNoReadyReplicas, "
                "RembgCanaryFailing, RembgGpuPoolWithoutGpu)."
            ),
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
    return [_jobs_waiting(ref, spec), _jobs_redis_unreachable(ref, spec)]


def _jobs_waiting(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    alerts = spec.monitoring.alerts
    selector = service_series_selector(ref)
    threshold = alerts.jobs_oldest_age_seconds
    return {
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
    }


def _jobs_redis_unreachable(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    selector = service_series_selector(ref)
    return {
        "alert": "RembgJobsRedisUnreachable",
        "expr": (
            f"max by (namespace, rembg_service, pool, pod) (rembg_jobs_redis_up{{{selector}}}) == 0"
        ),
        "for": spec.monitoring.alerts.jobs_redis_down_for,
        "labels": {"severity": "critical"},
        "annotations": {
            "summary": f"rembg {ref.namespace}/{ref.name}: a pod cannot reach Redis",
            "description": (
                "Pod {{ $labels.pod }} has failed every Redis call for the job path: "
                "job submissions answer 503 and its workers take no jobs. Check the "
                f"address in Secret {spec.jobs.redis.secret_name} and the network."
            ),
        },
    }
