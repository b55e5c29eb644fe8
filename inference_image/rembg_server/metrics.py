"""The metric names the operator's autoscalers and alerts read (listed in the README).

Every metric lives in an injected CollectorRegistry, so tests get a fresh one per app.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LABELS = ("model", "device")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "rembg_requests",
            "Removal requests answered, by HTTP status code; 499 (nginx's code, never sent) is a "
            "client that hung up first, during its upload or while queued.",
            [*LABELS, "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "rembg_request_duration_seconds",
            "Time from request start to response, for removal requests.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "rembg_queue_duration_seconds",
            "Time a preprocessed image waited for its inference batch.",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_duration = Histogram(
            "rembg_inference_duration_seconds",
            "Time of one onnxruntime call (one batch).",
            LABELS,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_size = Histogram(
            "rembg_batch_size",
            "Images per inference call.",
            LABELS,
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.pending_requests = Gauge(
            "rembg_pending_requests",
            "Admitted removal requests not yet answered (queued or in work).",
            LABELS,
            registry=registry,
        )
        self.pending_megapixels = Gauge(
            "rembg_pending_megapixels",
            "Megapixels of admitted removal requests not yet answered.",
            LABELS,
            registry=registry,
        )
        self.queue_limit_requests = Gauge(
            "rembg_queue_limit_requests",
            "Removal requests admitted at once before 429 (REMBG_QUEUE_MAX_REQUESTS, resolved): "
            "the denominator of queue saturation.",
            registry=registry,
        )
        self.warmup_seconds = Gauge(
            "rembg_warmup_seconds",
            "Time spent warming each model before readiness.",
            LABELS,
            registry=registry,
        )
        self.model_info = Gauge(
            "rembg_model_info",
            "Loaded model and its active onnxruntime execution provider (value 1).",
            [*LABELS, "provider"],
            registry=registry,
        )
        self.ready = Gauge(
            "rembg_ready",
            "1 when the model is loaded, verified, warmed up and the server is not draining.",
            LABELS,
            registry=registry,
        )
        self.stage_cpu = Counter(
            "rembg_stage_cpu_seconds",
            "CPU time of the image pipeline's stages off the inference thread (decode, "
            "preprocess, postprocess, compose, encode), summed over removal requests.",
            [*LABELS, "stage"],
            registry=registry,
        )
        self.http_refused = Counter(
            "rembg_http_refused",
            "Requests cut before routing, by reason: header_timeout (headers not complete "
            "within REMBG_HEADER_TIMEOUT_SECONDS; 408 and closed), over_capacity (503: "
            "REMBG_MAX_CONNECTIONS connections already busy). Not in rembg_requests_total.",
            ["reason"],
            registry=registry,
        )
        for reason in ("header_timeout", "over_capacity"):
            self.http_refused.labels(reason)  # at zero from the start, for increase()

    def declare(self, model: str, device: str) -> None:
        """Exports a model's series from the start, at zero: an idle pod must report a queue
        depth of 0 (not no series at all), or the HPA cannot compute and never scales down."""
        for metric in (
            self.request_duration,
            self.queue_duration,
            self.inference_duration,
            self.batch_size,
            self.pending_requests,
            self.pending_megapixels,
        ):
            metric.labels(model, device)


class CanaryMetrics:
    """The inference canary's series (canary.py), by model; registered when it is enabled."""

    def __init__(self, registry: CollectorRegistry, reasons: tuple[str, ...]) -> None:
        self.reasons = reasons
        self.success = Gauge(
            "rembg_canary_success",
            "1 when the last canary run of the model passed, 0 when it failed.",
            ["model"],
            registry=registry,
        )
        self.last_success = Gauge(
            "rembg_canary_last_success_timestamp_seconds",
            "Unix time of the model's last passing canary run.",
            ["model"],
            registry=registry,
        )
        self.duration = Histogram(
            "rembg_canary_duration_seconds",
            "Time of one canary run: decode, inference, compose, encode and the check.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.failures = Counter(
            "rembg_canary_failures",
            "Failed canary runs, by reason: iou, decode, no_alpha, timeout, error.",
            ["model", "reason"],
            registry=registry,
        )
        self.iou = Gauge(
            "rembg_canary_iou",
            "IoU of the last canary mask against the known mask (0 when none was produced).",
            ["model"],
            registry=registry,
        )

    def declare(self, model: str) -> None:
        """Failure counters at zero from the start, so increase() sees the first failure."""
        self.duration.labels(model)
        for reason in self.reasons:
            self.failures.labels(model, reason)


# Jobs wait in a queue for seconds to hours: these buckets reach a day.
JOB_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0)


class JobMetrics:
    """The job path's series (only registered when REMBG_JOBS_ENABLED)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.submitted = Counter(
            "rembg_jobs_submitted", "Jobs accepted by POST /v1/jobs.", ["model"], registry=registry
        )
        self.finished = Counter(
            "rembg_jobs_finished",
            "Jobs that reached a terminal state (done, failed, cancelled) in this process.",
            ["model", "state"],
            registry=registry,
        )
        self.retries = Counter(
            "rembg_jobs_retries",
            "Job attempts retried: after a worker stopped heart-beating (visibility_timeout) "
            "or after a transient error (error).",
            ["model", "reason"],
            registry=registry,
        )
        self.running = Gauge(
            "rembg_jobs_running", "Jobs running in this process.", ["model"], registry=registry
        )
        self.backlog = Gauge(
            "rembg_jobs_backlog",
            "Unfinished jobs (queued + running) in the shared stream, fleet-wide; sampled "
            "every 5 s.",
            registry=registry,
        )
        self.oldest_age = Gauge(
            "rembg_jobs_oldest_age_seconds",
            "Age of the oldest job no worker has picked up yet (0 when none).",
            registry=registry,
        )
        self.redis_up = Gauge(
            "rembg_jobs_redis_up", "1 when the last Redis call succeeded.", registry=registry
        )
        self.duration = Histogram(
            "rembg_job_duration_seconds",
            "Time from submission to a terminal state.",
            ["model"],
            buckets=JOB_BUCKETS,
            registry=registry,
        )

    def declare(self, model: str) -> None:
        """Series at zero from the start, like ServerMetrics.declare."""
        self.submitted.labels(model)
        self.running.labels(model)
        self.duration.labels(model)
