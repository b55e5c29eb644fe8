"""The RembgService spec as typed models: parsed once at the boundary, read everywhere else.

Field names are snake_case in Python and camelCase in the CRD (the alias). Every field
has a description because the CRD schema, and so `kubectl explain`, is generated from
these models (`python -m rembg_operator.crdgen`). Defaults are chosen so that a ten-line
manifest naming one pool gives a production-shaped fleet.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, JsonValue, model_validator
from pydantic.alias_generators import to_camel

from rembg_operator.custom_metrics import LATENCY_P95_METRIC, QUEUE_DEPTH_METRIC

API_GROUP = "rembg.io"
API_VERSION = "v1alpha1"
KIND = "RembgService"
PLURAL = "rembgservices"
SINGULAR = "rembgservice"
SHORT_NAMES = ("rbs",)

GPU_RESOURCE = "nvidia.com/gpu"
GPU_NODE_LABEL = "nvidia.com/gpu.present"

# The model names the rembg library (2.0.86) can load, and u2netp-int8, the quality-gated
# int8 u2netp the server image builds (rembg_server.quality); the image ships a subset.
KNOWN_MODELS = frozenset(
    {
        "u2netp-int8",
        "u2net",
        "u2netp",
        "u2net_human_seg",
        "u2net_cloth_seg",
        "silueta",
        "isnet-general-use",
        "isnet-anime",
        "sam",
        "birefnet-general",
        "birefnet-general-lite",
        "birefnet-general-fp16",
        "birefnet-portrait",
        "birefnet-dis",
        "birefnet-hrsod",
        "birefnet-cod",
        "birefnet-massive",
        "bria-rmbg",
    }
)

QUANTITY_PATTERN = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[numkMGTPE]|[KMGTPE]i)?$"
DURATION_PATTERN = r"^([0-9]+(ms|s|m|h|d|w|y))+$"
LABEL_KEY_PATTERN = r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
# A Secret's name (DNS subdomain) and the keys of its data map (core/v1 rules); patterns, not
# secrets (hence the S105 waivers).
SECRET_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"  # noqa: S105
SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"  # noqa: S105
OPTIONAL_SECRET_KEY_PATTERN = r"^[-._a-zA-Z0-9]*$"  # noqa: S105
# `host`, `host:port` or `*.domain`, as the server's webhook allow-list matches them; no commas
# (the list travels as one comma-separated variable).
WEBHOOK_HOST_PATTERN = r"^(\*\.)?[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?(:[0-9]{1,5})?$"
KEY_PREFIX_PATTERN = r"^[A-Za-z0-9][-A-Za-z0-9_.:]*$"


def _quantity_to_str(value: object) -> object:
    # YAML gives `cpu: 2` as an int and `cpu: "500m"` as a string; keep one type.
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return str(value)
    return value


Quantity = Annotated[
    str,
    # The CRD accepts both `2` and "2"; crdgen turns this into x-kubernetes-int-or-string.
    Field(pattern=QUANTITY_PATTERN, json_schema_extra={"x-kubernetes-int-or-string": True}),
    BeforeValidator(_quantity_to_str),
]
Duration = Annotated[str, Field(pattern=DURATION_PATTERN)]

_QUANTITY_SUFFIX = {
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "": Decimal(1),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}
_QUANTITY_RE = re.compile(r"^([+]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: str) -> Decimal:
    """A Kubernetes resource quantity as a Decimal in base units (cores, bytes, devices)."""
    match = _QUANTITY_RE.match(value.strip())
    if not match or match.group(2) not in _QUANTITY_SUFFIX:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    try:
        return Decimal(match.group(1)) * _QUANTITY_SUFFIX[match.group(2)]
    except InvalidOperation as error:
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from error


_DURATION_UNIT_SECONDS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    "d": Decimal(86400),
    "w": Decimal(7 * 86400),
    "y": Decimal(365 * 86400),
}
_DURATION_PART_RE = re.compile(r"([0-9]+)(ms|s|m|h|d|w|y)")


def parse_duration(value: str) -> Decimal:
    """A Prometheus duration (DURATION_PATTERN, e.g. "1m30s") in seconds."""
    if not re.fullmatch(DURATION_PATTERN, value):
        raise ValueError(f"not a Prometheus duration: {value!r}")
    return sum(
        (Decimal(n) * _DURATION_UNIT_SECONDS[unit] for n, unit in _DURATION_PART_RE.findall(value)),
        Decimal(0),
    )


class SpecModel(BaseModel):
    """Base: camelCase in YAML, snake_case in Python, unknown fields refused."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )


class Toleration(SpecModel):
    """A pod toleration, as in core/v1."""

    key: str | None = Field(default=None, description="Taint key the toleration applies to.")
    operator: Literal["Exists", "Equal"] = Field(
        default="Equal", description="Exists matches any value; Equal matches `value`."
    )
    value: str | None = Field(default=None, description="Taint value to match with Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to match; empty matches every effect."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated before eviction."
    )


class Resources(SpecModel):
    """Compute resources of one inference container, as in core/v1 ResourceRequirements."""

    requests: dict[str, Quantity] = Field(
        default_factory=dict,
        description="Minimum resources the scheduler reserves, e.g. {cpu: 1, memory: 1Gi}.",
    )
    limits: dict[str, Quantity] = Field(
        default_factory=dict,
        description=(
            "Maximum resources. The server sizes its onnxruntime threads and admission queue "
            "from the CPU limit (its cgroup quota) unless server.threads / "
            "server.queueMaxRequests are set."
        ),
    )


def _default_cpu_resources() -> Resources:
    return Resources(
        requests={"cpu": "1", "memory": "1Gi"},
        limits={"cpu": "2", "memory": "2Gi"},
    )


def _default_gpu_resources() -> Resources:
    return Resources(
        requests={"cpu": "2", "memory": "4Gi"},
        limits={"cpu": "4", "memory": "8Gi"},
    )


_POOL_REPLICA_RULES: list[JsonValue] = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must be less than or equal to maxReplicas",
    },
    {
        "rule": "!has(self.replicas) || (self.replicas >= self.minReplicas"
        " && self.replicas <= self.maxReplicas)",
        "message": "replicas must lie between minReplicas and maxReplicas",
    },
]


class PoolSpec(SpecModel):
    """Settings shared by the GPU and the CPU pool: one Deployment each."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _POOL_REPLICA_RULES})

    replicas: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Fixed replica count, used when autoscaling is disabled. Defaults to minReplicas."
        ),
    )
    min_replicas: int = Field(
        default=1, ge=0, description="Lower bound of the autoscaler (and of the PDB's reach)."
    )
    max_replicas: int = Field(default=4, ge=1, description="Upper bound of the autoscaler.")
    image: str | None = Field(
        default=None, description="Image of this pool; defaults to the service-level image."
    )
    resources: Resources = Field(
        default_factory=_default_cpu_resources,
        description="Requests and limits of the inference container.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Extra tolerations for the pods."
    )
    affinity: dict[str, Any] | None = Field(
        default=None,
        description="Pod affinity/anti-affinity/node affinity, as in core/v1 Affinity.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    priority_class_name: str | None = Field(default=None, description="PriorityClass of the pods.")
    pod_annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the pods."
    )
    pod_labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on the pods."
    )

    @property
    def fixed_replicas(self) -> int:
        return self.min_replicas if self.replicas is None else self.replicas

    @model_validator(mode="after")
    def _replicas_within_bounds(self) -> PoolSpec:
        # The CRD's CEL rules say the same; this guards specs that bypassed them.
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must be less than or equal to maxReplicas")
        if self.replicas is not None and not (
            self.min_replicas <= self.replicas <= self.max_replicas
        ):
            raise ValueError("replicas must lie between minReplicas and maxReplicas")
        return self


class CpuPoolSpec(PoolSpec):
    """The CPU pool: onnxruntime's CPU execution provider."""


class GpuPoolSpec(PoolSpec):
    """The GPU pool: onnxruntime's CUDA execution provider on nodes with NVIDIA GPUs."""

    resources: Resources = Field(
        default_factory=_default_gpu_resources,
        description="Requests and limits of the inference container (GPUs come from gpuCount).",
    )
    max_replicas: int = Field(default=2, ge=1, description="Upper bound of the autoscaler.")
    gpu_count: int = Field(
        default=1, ge=1, le=16, description="GPUs per pod, requested as the gpuResource limit."
    )
    gpu_resource: str = Field(
        default=GPU_RESOURCE, description="Extended resource name of the GPU device plugin."
    )
    gpu_node_selector: dict[str, str] = Field(
        default_factory=lambda: {GPU_NODE_LABEL: "true"},
        description=(
            "Node labels that mark GPU nodes (required node affinity); the default is the "
            "label NVIDIA's GPU feature discovery sets. An empty map relies on the resource only."
        ),
    )
    tolerate_gpu_taint: bool = Field(
        default=True,
        description="Add the usual toleration for the `nvidia.com/gpu` taint (any value).",
    )


class ScalingRules(SpecModel):
    """One direction of the HPA behaviour: how fast replicas may change."""

    stabilization_window_seconds: int = Field(
        ge=0, le=3600, description="Window over which the most conservative recommendation wins."
    )
    max_percent: int = Field(ge=1, description="Largest change per period, in percent.")
    max_pods: int = Field(ge=1, description="Largest change per period, in pods.")
    period_seconds: int = Field(
        default=60, ge=1, le=1800, description="Length of one policy period."
    )


class KedaSettings(SpecModel):
    """Settings used only when the engine is `keda`."""

    prometheus_address: str = Field(
        default="http://prometheus-operated.monitoring.svc:9090",
        description="Prometheus the KEDA prometheus triggers query.",
    )
    polling_interval_seconds: int = Field(
        default=15, ge=1, description="How often KEDA evaluates the triggers."
    )
    cooldown_period_seconds: int = Field(
        default=300, ge=0, description="Wait after the last active trigger before scaling to min."
    )


class AutoscalingSpec(SpecModel):
    """How the pools scale between minReplicas and maxReplicas."""

    enabled: bool = Field(
        default=True, description="Create an autoscaler per pool; false pins `replicas`."
    )
    engine: Literal["hpa", "keda"] = Field(
        default="hpa",
        description=(
            "hpa: autoscaling/v2 with Pods metrics served by prometheus-adapter; "
            "keda: a KEDA ScaledObject with prometheus triggers."
        ),
    )
    target_queue_depth_per_pod: float = Field(
        default=4.0,
        gt=0,
        description="Target average of queued plus running requests per pod.",
    )
    target_latency_p95_seconds: float | None = Field(
        default=2.0,
        gt=0,
        description="Target p95 request latency; unset scales on queue depth only.",
    )
    queue_depth_metric: str = Field(
        default=QUEUE_DEPTH_METRIC,
        description="Pods metric (per pod) carrying the queue depth.",
    )
    latency_metric: str = Field(
        default=LATENCY_P95_METRIC,
        description="Pods metric (per pod) carrying the p95 latency, from prometheus-adapter.",
    )
    scale_up: ScalingRules = Field(
        default_factory=lambda: ScalingRules(
            stabilization_window_seconds=0, max_percent=100, max_pods=4, period_seconds=15
        ),
        description="Scale-up behaviour: react fast.",
    )
    scale_down: ScalingRules = Field(
        default_factory=lambda: ScalingRules(
            stabilization_window_seconds=300, max_percent=50, max_pods=2, period_seconds=60
        ),
        description="Scale-down behaviour: slow, so warm replicas are not thrown away.",
    )
    keda: KedaSettings = Field(
        default_factory=KedaSettings, description="KEDA specifics (engine keda)."
    )


class EnvVar(SpecModel):
    """An extra environment variable for the inference container."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name.")
    value: str = Field(default="", description="Variable value.")


# The server's own defaults of the canary (inference_image/rembg_server/settings.py). The operator
# writes a REMBG_CANARY_* variable only for a field that is set; the alerts need the effective
# interval and timeout, so these two are repeated here.
SERVER_CANARY_INTERVAL_SECONDS = 60.0
SERVER_CANARY_TIMEOUT_SECONDS = 30.0


class CanarySettings(SpecModel):
    """The server's canary: a known image run through each model on a timer, its mask compared
    with the known answer (IoU). Unset fields keep the server's own defaults."""

    interval_seconds: float | None = Field(
        default=None,
        ge=0,
        le=86400,
        description=(
            "Seconds between canary runs (REMBG_CANARY_INTERVAL_SECONDS); 0 disables the "
            "canary and its alert. Unset: the server's default, 60."
        ),
    )
    min_iou: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description=(
            "Smallest IoU of the canary's mask with the known answer that counts as a success "
            "(REMBG_CANARY_MIN_IOU). Unset: the server's default."
        ),
    )
    timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description=(
            "A canary run longer than this fails (REMBG_CANARY_TIMEOUT_SECONDS). Unset: the "
            "server's default, 30."
        ),
    )
    unready_after_failures: int | None = Field(
        default=None,
        ge=0,
        le=1000,
        description=(
            "Consecutive canary failures after which the pod reports not ready, so the Service "
            "stops sending it traffic (REMBG_CANARY_UNREADY_AFTER_FAILURES). Unset or 0: "
            "readiness is not affected (the server's default)."
        ),
    )

    @property
    def enabled(self) -> bool:
        return self.effective_interval_seconds > 0

    @property
    def effective_interval_seconds(self) -> float:
        if self.interval_seconds is None:
            return SERVER_CANARY_INTERVAL_SECONDS
        return self.interval_seconds

    @property
    def effective_timeout_seconds(self) -> float:
        if self.timeout_seconds is None:
            return SERVER_CANARY_TIMEOUT_SECONDS
        return self.timeout_seconds


# The server's own defaults that the operator's other children depend on: the grace period
# covers the longest request. A unit test checks these against the server's settings.
SERVER_REQUEST_TIMEOUT_SECONDS = 60.0


def _server_default(env: str, default: str) -> str:
    return f"Unset: the server's default, {default} ({env} is left out of the pod)."


class ServerSettings(SpecModel):
    """Inference server settings, passed to the pods as REMBG_* environment variables.

    A field left unset stays out of the pod environment, so the server's own default (one
    source, in the server, with the tuning it was benchmarked with) applies.
    """

    port: int = Field(default=8080, ge=1024, le=65535, description="Container port (REMBG_PORT).")
    threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="onnxruntime intra-op threads (REMBG_THREADS). "
        + _server_default("REMBG_THREADS", "the pod's CPU limit (its cgroup quota)"),
    )
    max_body_bytes: int | None = Field(
        default=None,
        ge=1024,
        description="Largest request body. " + _server_default("REMBG_MAX_BODY_BYTES", "20 MiB"),
    )
    max_pixels: int | None = Field(
        default=None,
        ge=1,
        description="Largest decoded image. " + _server_default("REMBG_MAX_PIXELS", "40000000"),
    )
    queue_max_requests: int | None = Field(
        default=None,
        ge=1,
        description="Requests admitted at once before 429. "
        + _server_default("REMBG_QUEUE_MAX_REQUESTS", "2 per CPU of the pod's limit"),
    )
    queue_max_megapixels: float | None = Field(
        default=None,
        gt=0,
        description="Megapixels admitted at once before 429. "
        + _server_default("REMBG_QUEUE_MAX_MEGAPIXELS", "200"),
    )
    request_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Per-request deadline; the pods' grace period covers it. "
        + _server_default("REMBG_REQUEST_TIMEOUT_SECONDS", f"{SERVER_REQUEST_TIMEOUT_SECONDS:g}"),
    )
    header_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=600,
        description="Deadline for a request's headers; past it 408 and the connection closes. "
        + _server_default("REMBG_HEADER_TIMEOUT_SECONDS", "10"),
    )
    body_timeout_seconds: float | None = Field(
        default=None,
        gt=0,
        le=3600,
        description="Deadline for a request's whole body; past it 408. "
        + _server_default("REMBG_BODY_TIMEOUT_SECONDS", "60"),
    )
    max_connections: int | None = Field(
        default=None,
        ge=1,
        le=65536,
        description="Connections with a request in progress; 503 beyond (probes exempt). "
        + _server_default("REMBG_MAX_CONNECTIONS", "256"),
    )
    batch_max_size: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Largest micro-batch. " + _server_default("REMBG_BATCH_MAX_SIZE", "1"),
    )
    batch_max_wait_ms: int | None = Field(
        default=None,
        ge=0,
        le=10_000,
        description="Longest wait to fill a micro-batch. "
        + _server_default("REMBG_BATCH_MAX_WAIT_MS", "5"),
    )
    warmup_runs: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Inferences before /readyz. " + _server_default("REMBG_WARMUP_RUNS", "2"),
    )
    log_format: Literal["json", "text"] | None = Field(
        default=None,
        description="Server log format. " + _server_default("REMBG_LOG_FORMAT", "json"),
    )
    alpha_matting_enabled: bool | None = Field(
        default=None,
        description="Allow the (slow) alpha matting option. "
        + _server_default("REMBG_ALPHA_MATTING_ENABLED", "false"),
    )

    @property
    def effective_request_timeout_seconds(self) -> float:
        if self.request_timeout_seconds is None:
            return SERVER_REQUEST_TIMEOUT_SECONDS
        return self.request_timeout_seconds

    startup_timeout_seconds: int = Field(
        default=600,
        ge=10,
        le=3600,
        description="Time the startupProbe allows for model load and warmup.",
    )
    drain_seconds: int = Field(
        default=10,
        ge=0,
        le=300,
        description=(
            "preStop sleep so endpoints drop the pod before SIGTERM; the grace period adds "
            "the request timeout on top so in-flight requests finish."
        ),
    )
    canary: CanarySettings = Field(
        default_factory=CanarySettings,
        description="The model canary (REMBG_CANARY_*); alert RembgCanaryFailing.",
    )
    extra_env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment variables (escape hatch)."
    )


class AlertThresholds(SpecModel):
    """Thresholds and `for` durations of the generated PrometheusRule."""

    error_ratio: float = Field(
        default=0.05,
        gt=0,
        le=1,
        description="5xx share of a pool's requests that fires RembgHighErrorRate.",
    )
    error_ratio_for: Duration = Field(default="5m", description="`for` of RembgHighErrorRate.")
    rate_window: Duration = Field(
        default="5m",
        description=(
            "Window of the rate() behind RembgHighErrorRate and RembgHighLatency: how long they "
            "take to see a fault start and end. At least twice monitoring.scrapeInterval."
        ),
    )
    latency_p95_seconds: float = Field(
        default=5.0, gt=0, description="p95 latency that fires RembgHighLatency."
    )
    latency_for: Duration = Field(default="10m", description="`for` of RembgHighLatency.")
    queue_saturation_ratio: float = Field(
        default=0.8,
        gt=0,
        le=1,
        description=(
            "Pending requests / the pod's admission limit (rembg_queue_limit_requests) "
            "that fires RembgQueueSaturated."
        ),
    )
    queue_saturation_for: Duration = Field(
        default="5m", description="`for` of RembgQueueSaturated."
    )
    no_ready_replicas_for: Duration = Field(
        default="5m", description="`for` of RembgNoReadyReplicas and RembgServiceDown."
    )
    canary_failing_for: Duration = Field(
        default="5m", description="`for` of RembgCanaryFailing (only with the canary on)."
    )
    gpu_fallback_for: Duration = Field(default="5m", description="`for` of RembgGpuPoolWithoutGpu.")
    jobs_oldest_age_seconds: float = Field(
        default=600.0,
        gt=0,
        le=7 * 86400,
        description=(
            "Age of the oldest job no worker has picked up that fires RembgJobsWaiting "
            "(only with jobs.enabled)."
        ),
    )
    jobs_oldest_age_for: Duration = Field(default="2m", description="`for` of RembgJobsWaiting.")
    jobs_redis_down_for: Duration = Field(
        default="5m", description="`for` of RembgJobsRedisUnreachable (only with jobs.enabled)."
    )


class MonitoringSpec(SpecModel):
    """PrometheusRule and ServiceMonitor (created only where monitoring.coreos.com exists)."""

    enabled: bool = Field(default=True, description="Create the PrometheusRule/ServiceMonitor.")
    scrape_interval: Duration = Field(default="30s", description="ServiceMonitor scrape interval.")
    scrape_timeout: Duration | None = Field(
        default=None,
        description=(
            "ServiceMonitor scrape timeout; unset: 10s, or scrapeInterval where that is shorter "
            "(the Prometheus Operator drops a ServiceMonitor whose timeout exceeds its interval)."
        ),
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Extra labels so a Prometheus selects them, e.g. {release: kube-prometheus}.",
    )
    alerts: AlertThresholds = Field(
        default_factory=AlertThresholds, description="Alert thresholds."
    )


class TopologySpread(SpecModel):
    """Spread pods of a pool across a topology domain."""

    enabled: bool = Field(default=True, description="Add a topologySpreadConstraint per pool.")
    topology_key: str = Field(
        default="kubernetes.io/hostname", description="Node label that defines the domains."
    )
    max_skew: int = Field(default=1, ge=1, description="Largest allowed imbalance.")
    when_unsatisfiable: Literal["ScheduleAnyway", "DoNotSchedule"] = Field(
        default="ScheduleAnyway", description="Soft (ScheduleAnyway) or hard constraint."
    )


IntOrPercent = Annotated[
    int | str,
    Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
]


class AvailabilitySpec(SpecModel):
    """Disruption budget and spreading."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.minAvailable) && has(self.maxUnavailable))",
                    "message": "set at most one of minAvailable and maxUnavailable",
                }
            ]
        }
    )

    pdb_enabled: bool = Field(
        default=True, description="Create a PodDisruptionBudget per pool with 2+ replicas."
    )
    min_available: IntOrPercent | None = Field(
        default=None, description="PDB minAvailable (number or percent)."
    )
    max_unavailable: IntOrPercent | None = Field(
        default=None, description="PDB maxUnavailable (number or percent); default 1."
    )
    topology_spread: TopologySpread = Field(
        default_factory=TopologySpread, description="Topology spread constraints."
    )


class FallbackSpec(SpecModel):
    """What happens when GPUs are missing."""

    allow_cpu_in_gpu_pods: bool = Field(
        default=False,
        description=(
            "GPU pods start on the CPU provider when CUDA is unusable "
            "(REMBG_ALLOW_CPU_FALLBACK); the RembgGpuPoolWithoutGpu alert still fires."
        ),
    )
    cpu_pool_when_no_gpu_nodes: bool = Field(
        default=False,
        description=(
            "When no node has allocatable GPUs, add the GPU pool's minReplicas to the CPU "
            "pool (creating a CPU pool with defaults if there is none)."
        ),
    )


class JobsRedis(SpecModel):
    """Where the job path's Redis (or Valkey) is: keys of a Secret the user brings.

    The operator never reads the Secret: the pods get its keys through `secretKeyRef`, and
    KEDA's redis-streams trigger reads them from the pods' environment.
    """

    secret_name: str | None = Field(
        default=None,
        max_length=253,
        pattern=SECRET_NAME_PATTERN,
        description=(
            "Secret in the RembgService's namespace holding the connection; required when "
            "jobs.enabled is true."
        ),
    )
    address_key: str = Field(
        default="address",
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description="Key holding host:port (REMBG_JOBS_REDIS_ADDRESS); it must exist.",
    )
    password_key: str | None = Field(
        default="password",
        max_length=253,
        pattern=OPTIONAL_SECRET_KEY_PATTERN,
        description=(
            "Key holding the password (REMBG_JOBS_REDIS_PASSWORD); the key may be absent from "
            'the Secret (no password). "" never reads a password.'
        ),
    )
    username_key: str | None = Field(
        default=None,
        max_length=253,
        pattern=OPTIONAL_SECRET_KEY_PATTERN,
        description=(
            "Key holding the ACL user (REMBG_JOBS_REDIS_USERNAME); may be absent from the "
            'Secret. Unset or "" = the default user.'
        ),
    )
    database: int = Field(
        default=0, ge=0, le=1023, description="Database index (REMBG_JOBS_REDIS_DB)."
    )
    tls: bool = Field(default=False, description="Connect with TLS (REMBG_JOBS_REDIS_TLS).")


_JOBS_RULES: list[JsonValue] = [
    {
        "rule": "!self.enabled || (has(self.redis) && has(self.redis.secretName)"
        " && self.redis.secretName != '')",
        "message": "jobs.redis.secretName is required when jobs.enabled is true",
    },
]


class JobsSpec(SpecModel):
    """The asynchronous job API (/v1/jobs) backed by the user's Redis, and its autoscaling."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": _JOBS_RULES})

    enabled: bool = Field(
        default=False,
        description=(
            "Serve /v1/jobs and run job workers in every pod (REMBG_JOBS_ENABLED); the "
            "autoscalers then also scale on the backlog."
        ),
    )
    redis: JobsRedis = Field(
        default_factory=JobsRedis, description="The Redis or Valkey holding jobs and results."
    )
    key_prefix: str | None = Field(
        default=None,
        max_length=200,
        pattern=KEY_PREFIX_PATTERN,
        description=(
            "Prefix of every Redis key (REMBG_JOBS_KEY_PREFIX); default "
            "rembg:<namespace>:<name>, so services can share one Redis."
        ),
    )
    result_ttl_seconds: int = Field(
        default=86400,
        alias="resultTTLSeconds",
        ge=60,
        le=30 * 86400,
        description="Finished jobs and their results expire after this many seconds.",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        le=100,
        description="A job failing transiently this many times ends failed with its reason.",
    )
    visibility_timeout_seconds: float = Field(
        default=30.0,
        ge=3,
        le=3600,
        description=(
            "A claimed job whose worker stops heart-beating this long is retried elsewhere "
            "(workers refresh their claim every third of it)."
        ),
    )
    target_backlog_per_replica: int = Field(
        default=20,
        ge=1,
        le=100_000,
        description=(
            "Autoscaling target: unfinished jobs (queued plus running) per replica of each "
            "pool (KEDA redis-streams streamLength, or the HPA's rembg_jobs_backlog)."
        ),
    )
    webhook_allowed_hosts: list[Annotated[str, Field(pattern=WEBHOOK_HOST_PATTERN)]] = Field(
        default_factory=list,
        max_length=64,
        description=(
            "Hosts completion webhooks may call: host, host:port or *.domain "
            "(REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS); empty = webhooks off."
        ),
    )
    webhook_secret_key: str | None = Field(
        default=None,
        max_length=253,
        pattern=SECRET_KEY_PATTERN,
        description=(
            "Key of redis.secretName holding the HMAC key that signs webhook bodies "
            "(REMBG_JOBS_WEBHOOK_SECRET); it must exist. Unset = unsigned."
        ),
    )

    @model_validator(mode="after")
    def _secret_when_enabled(self) -> JobsSpec:
        # The CRD's CEL rule says the same; this guards specs that bypassed it.
        if self.enabled and not self.redis.secret_name:
            raise ValueError("jobs.redis.secretName is required when jobs.enabled is true")
        return self


class RembgServiceSpec(SpecModel):
    """A fleet of rembg background-removal inference servers."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.gpu) || has(self.cpu)",
                    "message": "at least one pool (gpu or cpu) is required",
                },
            ]
        }
    )

    models: list[Annotated[str, Field(pattern=MODEL_NAME_PATTERN)]] = Field(
        default_factory=lambda: ["u2netp"],
        min_length=1,
        max_length=8,
        description="Models every pod loads (REMBG_MODELS); the first is the default.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    image: str = Field(
        default="ghcr.io/rembg-fleet/server:0.1.0",
        min_length=1,
        description="Inference server image of the CPU pool.",
    )
    gpu_image: str = Field(
        default="ghcr.io/rembg-fleet/server:0.1.0-cuda",
        min_length=1,
        description="Inference server image of the GPU pool (with the CUDA provider).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy of the inference images."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Names of Secrets for pulling the images."
    )
    service_account_name: str | None = Field(
        default=None, description="ServiceAccount of the pods; default the namespace's default."
    )
    gpu: GpuPoolSpec | None = Field(default=None, description="The GPU pool; omit for none.")
    cpu: CpuPoolSpec | None = Field(default=None, description="The CPU pool; omit for none.")
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Autoscaling of both pools."
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings, description="Inference server settings (REMBG_* env)."
    )
    monitoring: MonitoringSpec = Field(
        default_factory=MonitoringSpec, description="Prometheus rules and scraping."
    )
    availability: AvailabilitySpec = Field(
        default_factory=AvailabilitySpec, description="PDBs and topology spread."
    )
    fallback: FallbackSpec = Field(
        default_factory=FallbackSpec, description="GPU to CPU fallback policy."
    )
    jobs: JobsSpec = Field(
        default_factory=JobsSpec,
        description="Asynchronous job API backed by Redis (off unless jobs.enabled).",
    )


def semantic_problems(spec: RembgServiceSpec) -> list[str]:
    """Problems the CRD schema cannot express; any one means the spec is not applied."""
    problems: list[str] = []
    unknown = [m for m in spec.models if m not in KNOWN_MODELS]
    if unknown:
        problems.append(
            f"unknown model(s) {', '.join(unknown)}; known: {', '.join(sorted(KNOWN_MODELS))}"
        )
    for pool_name, pool in (("gpu", spec.gpu), ("cpu", spec.cpu)):
        if pool is not None:
            problems.extend(_resource_problems(pool_name, pool.resources))
    batch, queue = spec.server.batch_max_size, spec.server.queue_max_requests
    if batch is not None and queue is not None and batch > queue:
        problems.append(
            f"server.batchMaxSize ({spec.server.batch_max_size}) exceeds "
            f"server.queueMaxRequests ({spec.server.queue_max_requests}): batches can never fill"
        )
    problems.extend(_monitoring_problems(spec.monitoring))
    return problems


DEFAULT_SCRAPE_TIMEOUT = "10s"


def effective_scrape_timeout(monitoring: MonitoringSpec) -> str:
    """The timeout the ServiceMonitor gets: the spec's, else 10s capped at the interval."""
    if monitoring.scrape_timeout is not None:
        return monitoring.scrape_timeout
    interval = monitoring.scrape_interval
    if parse_duration(interval) < parse_duration(DEFAULT_SCRAPE_TIMEOUT):
        return interval
    return DEFAULT_SCRAPE_TIMEOUT


def _monitoring_problems(monitoring: MonitoringSpec) -> list[str]:
    problems = []
    # rate() needs two samples inside its window, or the alerts built on it never fire.
    window, interval = monitoring.alerts.rate_window, monitoring.scrape_interval
    if parse_duration(window) < 2 * parse_duration(interval):
        problems.append(
            f"monitoring.alerts.rateWindow ({window}) is shorter than twice "
            f"monitoring.scrapeInterval ({interval}): rate() would see "
            "fewer than two samples and RembgHighErrorRate/RembgHighLatency would never fire"
        )
    timeout = monitoring.scrape_timeout
    if timeout is not None and parse_duration(timeout) > parse_duration(interval):
        problems.append(
            f"monitoring.scrapeTimeout ({timeout}) exceeds monitoring.scrapeInterval "
            f"({interval}): the Prometheus Operator would drop the ServiceMonitor"
        )
    return problems


def _resource_problems(pool_name: str, resources: Resources) -> list[str]:
    problems = []
    for resource, request in resources.requests.items():
        limit = resources.limits.get(resource)
        if limit is not None and parse_quantity(limit) < parse_quantity(request):
            problems.append(
                f"{pool_name}.resources: {resource} request {request} is above its limit {limit}"
            )
    return problems
