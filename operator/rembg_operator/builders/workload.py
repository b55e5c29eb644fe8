"""The Deployment of each pool and the Service in front of all pools."""

from __future__ import annotations

import math
from typing import Any

from rembg_operator.builders.jobs import (
    ADDRESS_ENV,
    PASSWORD_ENV,
    USERNAME_ENV,
    WEBHOOK_SECRET_ENV,
    key_prefix,
)
from rembg_operator.builders.meta import (
    HTTP_PORT_NAME,
    SERVICE_PORT,
    Manifest,
    ServiceRef,
    common_labels,
    metadata,
    pool_labels,
    pool_selector,
    service_selector,
)
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.models import (
    CanarySettings,
    GpuPoolSpec,
    JobsSpec,
    RembgServiceSpec,
    ServerSettings,
)

# The non-root user the inference image (inference_image/Dockerfile) creates.
RUN_AS_USER = 10001
PROBE_PERIOD_SECONDS = 5
# Grace on top of drain + request timeout, for the server's own shutdown.
SHUTDOWN_MARGIN_SECONDS = 5


def build_deployment(
    ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan, *, manage_replicas: bool
) -> Manifest:
    """One pool's Deployment.

    manage_replicas is False while an autoscaler owns spec.replicas: leaving the field out of
    the server-side apply keeps the operator from fighting the HPA/KEDA over it.
    """
    name = ref.pool_object_name(plan.name)
    deployment_spec: Manifest = {
        "selector": {"matchLabels": pool_selector(ref, plan.name)},
        "revisionHistoryLimit": 5,
        "progressDeadlineSeconds": spec.server.startup_timeout_seconds + 60,
        "strategy": _rollout_strategy(plan),
        "template": _pod_template(ref, spec, plan),
    }
    if manage_replicas:
        deployment_spec["replicas"] = plan.fixed_replicas
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(ref, name, pool_labels(ref, plan.name)),
        "spec": deployment_spec,
    }


def _rollout_strategy(plan: PoolPlan) -> Manifest:
    rolling: dict[str, int | str]
    if plan.is_gpu:
        # GPUs are scarce: a surge pod would wait for a free GPU and stall the rollout.
        rolling = {"maxSurge": 0, "maxUnavailable": 1}
    else:
        # CPU capacity is cheap: keep every serving replica until its successor is ready.
        rolling = {"maxSurge": "25%", "maxUnavailable": 0}
    return {"type": "RollingUpdate", "rollingUpdate": rolling}


def _pod_template(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> Manifest:
    pool = plan.pool
    labels = {**pool.pod_labels, **pool_labels(ref, plan.name)}
    pod_spec: Manifest = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_server_container(ref, spec, plan)],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
    }
    _add_scheduling(pod_spec, ref, spec, plan)
    if spec.service_account_name:
        pod_spec["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod_spec["imagePullSecrets"] = [{"name": s} for s in spec.image_pull_secrets]
    if pool.priority_class_name:
        pod_spec["priorityClassName"] = pool.priority_class_name
    template_meta: Manifest = {"labels": labels}
    if pool.pod_annotations:
        template_meta["annotations"] = dict(pool.pod_annotations)
    return {"metadata": template_meta, "spec": pod_spec}


def termination_grace_seconds(spec: RembgServiceSpec) -> int:
    """preStop drain, then the longest request may finish, then the process exits."""
    return (
        spec.server.drain_seconds
        + math.ceil(spec.server.effective_request_timeout_seconds)
        + SHUTDOWN_MARGIN_SECONDS
    )


def _server_container(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> Manifest:
    server = spec.server
    container: Manifest = {
        "name": "server",
        "image": plan.image,
        "imagePullPolicy": spec.image_pull_policy,
        "ports": [{"name": HTTP_PORT_NAME, "containerPort": server.port, "protocol": "TCP"}],
        "env": server_env(ref, spec, plan),
        "resources": _resources(plan),
        "startupProbe": _probe(
            "/readyz",
            period=PROBE_PERIOD_SECONDS,
            failures=math.ceil(server.startup_timeout_seconds / PROBE_PERIOD_SECONDS),
        ),
        "readinessProbe": _probe("/readyz", period=PROBE_PERIOD_SECONDS, failures=2),
        "livenessProbe": _probe("/livez", period=10, failures=3, timeout=5),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # An emptyDir, private to the pod: the root filesystem is read-only.
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108
    }
    if server.drain_seconds > 0:
        # The sleep action needs no shell in the image; endpoints drop the pod meanwhile.
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": server.drain_seconds}}}
    return container


def _probe(path: str, *, period: int, failures: int, timeout: int = 2) -> Manifest:
    return {
        "httpGet": {"path": path, "port": HTTP_PORT_NAME},
        "periodSeconds": period,
        "timeoutSeconds": timeout,
        "failureThreshold": failures,
    }


def server_env(ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan) -> list[Manifest]:
    server = spec.server
    values = {
        "REMBG_HOST": "0.0.0.0",  # noqa: S104 - a pod serves on its own network namespace
        "REMBG_PORT": str(server.port),
        "REMBG_MODELS": ",".join(spec.models),
        "REMBG_PROVIDER": plan.provider,
        "REMBG_ALLOW_CPU_FALLBACK": _bool(plan.allow_cpu_fallback),
    }
    env: dict[str, Manifest] = {name: {"name": name, "value": v} for name, v in values.items()}
    env.update((var["name"], var) for var in tuning_env(server))
    env.update((var["name"], var) for var in canary_env(spec.server.canary))
    env.update((var["name"], var) for var in jobs_env(ref, spec.jobs))
    # Extra variables win over the generated ones: they are the user's explicit override.
    env.update((var.name, {"name": var.name, "value": var.value}) for var in server.extra_env)
    return list(env.values())


def tuning_env(server: ServerSettings) -> list[Manifest]:
    """REMBG_* of the server settings that are set; an unset one keeps the server's default
    (the server derives threads and its queue from the CPU limit it runs under)."""
    values: dict[str, int | float | str | bool | None] = {
        "REMBG_THREADS": server.threads,
        "REMBG_MAX_BODY_BYTES": server.max_body_bytes,
        "REMBG_MAX_PIXELS": server.max_pixels,
        "REMBG_QUEUE_MAX_REQUESTS": server.queue_max_requests,
        "REMBG_QUEUE_MAX_MEGAPIXELS": server.queue_max_megapixels,
        "REMBG_REQUEST_TIMEOUT_SECONDS": server.request_timeout_seconds,
        "REMBG_HEADER_TIMEOUT_SECONDS": server.header_timeout_seconds,
        "REMBG_BODY_TIMEOUT_SECONDS": server.body_timeout_seconds,
        "REMBG_MAX_CONNECTIONS": server.max_connections,
        "REMBG_BATCH_MAX_SIZE": server.batch_max_size,
        "REMBG_BATCH_MAX_WAIT_MS": server.batch_max_wait_ms,
        "REMBG_WARMUP_RUNS": server.warmup_runs,
        "REMBG_LOG_FORMAT": server.log_format,
        "REMBG_ALPHA_MATTING_ENABLED": server.alpha_matting_enabled,
    }
    return [_value(name, _env_text(v)) for name, v in values.items() if v is not None]


def canary_env(canary: CanarySettings) -> list[Manifest]:
    """REMBG_CANARY_* of the fields that are set; an unset one keeps the server's default."""
    values = {
        "REMBG_CANARY_INTERVAL_SECONDS": canary.interval_seconds,
        "REMBG_CANARY_MIN_IOU": canary.min_iou,
        "REMBG_CANARY_TIMEOUT_SECONDS": canary.timeout_seconds,
        "REMBG_CANARY_UNREADY_AFTER_FAILURES": canary.unready_after_failures,
    }
    return [_value(name, _number(v)) for name, v in values.items() if v is not None]


def jobs_env(ref: ServiceRef, jobs: JobsSpec) -> list[Manifest]:
    """REMBG_JOBS_* of an enabled job path (none when disabled, so the pods stay as they were)."""
    if not jobs.enabled:
        return []
    redis = jobs.redis
    secret = redis.secret_name
    assert secret is not None  # JobsSpec refuses `enabled` without it
    env = [
        _value("REMBG_JOBS_ENABLED", "true"),
        # Required: without it a pod would queue jobs on its own loopback and lose them.
        _secret_ref(ADDRESS_ENV, secret, redis.address_key, optional=False),
    ]
    # Optional keys: a Secret without them means "no user" / "no password", not a stuck pod.
    if redis.username_key:
        env.append(_secret_ref(USERNAME_ENV, secret, redis.username_key, optional=True))
    if redis.password_key:
        env.append(_secret_ref(PASSWORD_ENV, secret, redis.password_key, optional=True))
    env += [
        _value("REMBG_JOBS_REDIS_DB", str(redis.database)),
        _value("REMBG_JOBS_REDIS_TLS", _bool(redis.tls)),
        _value("REMBG_JOBS_KEY_PREFIX", key_prefix(ref, jobs)),
        _value("REMBG_JOBS_RESULT_TTL_SECONDS", str(jobs.result_ttl_seconds)),
        _value("REMBG_JOBS_MAX_ATTEMPTS", str(jobs.max_attempts)),
        _value("REMBG_JOBS_VISIBILITY_TIMEOUT_SECONDS", _number(jobs.visibility_timeout_seconds)),
    ]
    if jobs.webhook_allowed_hosts:
        hosts = ",".join(jobs.webhook_allowed_hosts)
        env.append(_value("REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS", hosts))
    if jobs.webhook_secret_key:
        # Named on purpose, so a missing key stops the pod instead of sending unsigned webhooks.
        env.append(_secret_ref(WEBHOOK_SECRET_ENV, secret, jobs.webhook_secret_key, optional=False))
    return env


def _value(name: str, value: str) -> Manifest:
    return {"name": name, "value": value}


def _secret_ref(name: str, secret: str, key: str, *, optional: bool) -> Manifest:
    selector: Manifest = {"name": secret, "key": key}
    if optional:
        selector["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": selector}}


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _env_text(value: int | float | str | bool) -> str:
    if isinstance(value, bool):
        return _bool(value)
    if isinstance(value, float):
        return _number(value)
    return str(value)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _resources(plan: PoolPlan) -> Manifest:
    resources = plan.pool.resources
    limits: dict[str, str] = dict(resources.limits)
    requests: dict[str, str] = dict(resources.requests)
    if isinstance(plan.pool, GpuPoolSpec):
        limits[plan.pool.gpu_resource] = str(plan.pool.gpu_count)
    out: Manifest = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _add_scheduling(
    pod_spec: Manifest, ref: ServiceRef, spec: RembgServiceSpec, plan: PoolPlan
) -> None:
    pool = plan.pool
    tolerations = [t.model_dump(by_alias=True, exclude_none=True) for t in pool.tolerations]
    affinity: dict[str, Any] = dict(pool.affinity or {})
    if isinstance(pool, GpuPoolSpec):
        if pool.tolerate_gpu_taint:
            tolerations.append(
                {"key": pool.gpu_resource, "operator": "Exists", "effect": "NoSchedule"}
            )
        affinity = require_node_labels(affinity, pool.gpu_node_selector)
    if pool.node_selector:
        pod_spec["nodeSelector"] = dict(pool.node_selector)
    if tolerations:
        pod_spec["tolerations"] = tolerations
    if affinity:
        pod_spec["affinity"] = affinity
    spread = spec.availability.topology_spread
    if spread.enabled:
        pod_spec["topologySpreadConstraints"] = [
            {
                "maxSkew": spread.max_skew,
                "topologyKey": spread.topology_key,
                "whenUnsatisfiable": spread.when_unsatisfiable,
                "labelSelector": {"matchLabels": pool_selector(ref, plan.name)},
                # Count only the current ReplicaSet's pods, so rollouts do not skew.
                "matchLabelKeys": ["pod-template-hash"],
            }
        ]


def require_node_labels(affinity: dict[str, Any], labels: dict[str, str]) -> dict[str, Any]:
    """Affinity with `labels` ANDed into every required node selector term (a new dict)."""
    if not labels:
        return affinity
    expressions = [{"key": k, "operator": "In", "values": [v]} for k, v in sorted(labels.items())]
    node_affinity = dict(affinity.get("nodeAffinity") or {})
    required = dict(node_affinity.get("requiredDuringSchedulingIgnoredDuringExecution") or {})
    terms = list(required.get("nodeSelectorTerms") or [{}])
    required["nodeSelectorTerms"] = [
        {**term, "matchExpressions": [*(term.get("matchExpressions") or []), *expressions]}
        for term in terms
    ]
    node_affinity["requiredDuringSchedulingIgnoredDuringExecution"] = required
    return {**affinity, "nodeAffinity": node_affinity}


def build_service(ref: ServiceRef, spec: RembgServiceSpec) -> Manifest:
    """One ClusterIP Service in front of every pool: clients need not know about pools."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ref, ref.name, common_labels(ref)),
        "spec": {
            "type": "ClusterIP",
            "selector": service_selector(ref),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": SERVICE_PORT,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                }
            ],
        },
    }
