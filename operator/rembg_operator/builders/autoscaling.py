"""Autoscalers per pool: an autoscaling/v2 HPA (default) or a KEDA ScaledObject.

With spec.jobs enabled each pool also scales on the job backlog (queued + running jobs of the
whole service): an External metric for the HPA, a redis-streams trigger for KEDA. Both pools of
one service read the same fleet-wide backlog, so each aims at targetBacklogPerReplica per
replica of its own.
"""

from __future__ import annotations

from rembg_operator.builders.jobs import ADDRESS_ENV, PASSWORD_ENV, USERNAME_ENV, stream_name
from rembg_operator.builders.meta import Manifest, ServiceRef, metadata, pool_labels
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.custom_metrics import JOBS_BACKLOG_METRIC
from rembg_operator.models import AutoscalingSpec, JobsSpec, RembgServiceSpec, ScalingRules


def quantity(value: float) -> str:
    """A float as an exact Kubernetes quantity ("4", "2500m")."""
    milli = round(value * 1000)
    return str(milli // 1000) if milli % 1000 == 0 else f"{milli}m"


def build_behavior(autoscaling: AutoscalingSpec) -> Manifest:
    return {
        "scaleUp": _rules(autoscaling.scale_up, select="Max"),
        # Min: the more conservative of the two policies wins when shrinking.
        "scaleDown": _rules(autoscaling.scale_down, select="Min"),
    }


def _rules(rules: ScalingRules, *, select: str) -> Manifest:
    return {
        "stabilizationWindowSeconds": rules.stabilization_window_seconds,
        "selectPolicy": select,
        "policies": [
            {"type": "Percent", "value": rules.max_percent, "periodSeconds": rules.period_seconds},
            {"type": "Pods", "value": rules.max_pods, "periodSeconds": rules.period_seconds},
        ],
    }


def _pods_metric(metric: str, target: float) -> Manifest:
    return {
        "type": "Pods",
        "pods": {
            "metric": {"name": metric},
            "target": {"type": "AverageValue", "averageValue": quantity(target)},
        },
    }


def _jobs_backlog_metric(ref: ServiceRef, jobs: JobsSpec) -> Manifest:
    """The service's backlog from external.metrics.k8s.io (prometheus-adapter externalRules,
    namespaced to the HPA's namespace); AverageValue divides it by the pool's replicas."""
    return {
        "type": "External",
        "external": {
            "metric": {
                "name": JOBS_BACKLOG_METRIC,
                "selector": {"matchLabels": {"rembg_service": ref.name}},
            },
            "target": {
                "type": "AverageValue",
                "averageValue": quantity(jobs.target_backlog_per_replica),
            },
        },
    }


def build_hpa(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> Manifest:
    """HPA on per-pod queue depth (and p95 latency), as served by prometheus-adapter, plus the
    job backlog when the job path is on."""
    autoscaling = spec.autoscaling
    name = ref.pool_object_name(plan.name)
    metrics = [_pods_metric(autoscaling.queue_depth_metric, autoscaling.target_queue_depth_per_pod)]
    if autoscaling.target_latency_p95_seconds is not None:
        metrics.append(
            _pods_metric(autoscaling.latency_metric, autoscaling.target_latency_p95_seconds)
        )
    if spec.jobs.enabled:
        metrics.append(_jobs_backlog_metric(ref, spec.jobs))
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(ref, name, pool_labels(ref, plan.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": max(plan.min_replicas, 1),
            "maxReplicas": plan.max_replicas,
            "metrics": metrics,
            "behavior": build_behavior(autoscaling),
        },
    }


def pool_series_selector(ref: ServiceRef, pool: str) -> str:
    """PromQL label matchers of one pool's series (labels set by the ServiceMonitor)."""
    return f'namespace="{ref.namespace}",rembg_service="{ref.name}",pool="{pool}"'


def _queue_depth_trigger(autoscaling: AutoscalingSpec, selector: str) -> Manifest:
    return {
        "type": "prometheus",
        "name": "queue-depth",
        # AverageValue: KEDA divides the fleet total by the replica count.
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": autoscaling.keda.prometheus_address,
            "query": f"sum(rembg_pending_requests{{{selector}}})",
            "threshold": quantity(autoscaling.target_queue_depth_per_pod),
        },
    }


def _latency_p95_trigger(autoscaling: AutoscalingSpec, selector: str, target: float) -> Manifest:
    return {
        "type": "prometheus",
        "name": "latency-p95",
        # Value: a latency does not shrink by dividing it across replicas.
        "metricType": "Value",
        "metadata": {
            "serverAddress": autoscaling.keda.prometheus_address,
            "query": (
                "histogram_quantile(0.95, sum by (le) "
                f"(rate(rembg_request_duration_seconds_bucket{{{selector}}}[2m])))"
            ),
            "threshold": quantity(target),
        },
    }


def _keda_triggers(ref: ServiceRef, spec: RembgServiceSpec, pool: str) -> list[Manifest]:
    """The HPA's signals as KEDA triggers, in the same order as build_hpa's metrics."""
    autoscaling = spec.autoscaling
    selector = pool_series_selector(ref, pool)
    triggers = [_queue_depth_trigger(autoscaling, selector)]
    if autoscaling.target_latency_p95_seconds is not None:
        triggers.append(
            _latency_p95_trigger(autoscaling, selector, autoscaling.target_latency_p95_seconds)
        )
    if spec.jobs.enabled:
        triggers.append(_redis_streams_trigger(ref, spec.jobs))
    return triggers


def build_scaled_object(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> Manifest:
    """KEDA ScaledObject with prometheus triggers on the same signals as the HPA."""
    autoscaling = spec.autoscaling
    keda = autoscaling.keda
    name = ref.pool_object_name(plan.name)
    return {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": metadata(ref, name, pool_labels(ref, plan.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicaCount": plan.min_replicas,
            "maxReplicaCount": plan.max_replicas,
            "pollingInterval": keda.polling_interval_seconds,
            "cooldownPeriod": keda.cooldown_period_seconds,
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "name": f"keda-{name}",
                    "behavior": build_behavior(autoscaling),
                }
            },
            "triggers": _keda_triggers(ref, spec, plan.name),
        },
    }


def _redis_streams_trigger(ref: ServiceRef, jobs: JobsSpec) -> Manifest:
    """KEDA's redis-streams scaler on the length of the service's job stream.

    KEDA's scaler has three modes: XPENDING of a consumer group (`consumerGroup` set, the
    default then), the group's lag (`consumerGroup` + `lagCount`) and XLEN (no `consumerGroup`).
    The server XDELs an entry when its job reaches a terminal state, so XLEN = queued + running
    = every unfinished job: the signal we want per replica. XPENDING counts only running jobs
    (bounded by the workers already there, so it cannot ask for more), and the lag only
    queued ones (and Redis cannot compute it once entries were deleted). Hence no
    `consumerGroup` here, on purpose.

    Connection settings come from the scale target's own env (resolved by KEDA from the same
    Secret the pods read); a `*FromEnv` naming an unset variable is skipped by KEDA.
    """
    redis = jobs.redis
    trigger_metadata = {
        "addressFromEnv": ADDRESS_ENV,
        "stream": stream_name(ref, jobs),
        "streamLength": str(jobs.target_backlog_per_replica),
        "databaseIndex": str(redis.database),
        "enableTLS": "true" if redis.tls else "false",
    }
    if redis.username_key:
        trigger_metadata["usernameFromEnv"] = USERNAME_ENV
    if redis.password_key:
        trigger_metadata["passwordFromEnv"] = PASSWORD_ENV
    return {
        "type": "redis-streams",
        "name": "jobs-backlog",
        # AverageValue: KEDA divides the stream length by the replica count.
        "metricType": "AverageValue",
        "metadata": trigger_metadata,
    }
