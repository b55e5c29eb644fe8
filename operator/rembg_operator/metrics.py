"""The operator's own Prometheus metrics (served by `rembg_operator.__main__` on a port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECONCILES = Counter(
    "rembg_operator_reconciles_total",
    "Reconciles of RembgServices, by kind (full: applies children; status: status only) "
    "and result.",
    ["kind", "result"],
)
RECONCILE_ERRORS = Counter(
    "rembg_operator_reconcile_errors_total",
    "Reconciles that failed and will be retried, by error reason.",
    ["reason"],
)
RECONCILE_DURATION = Histogram(
    "rembg_operator_reconcile_duration_seconds",
    "Wall time of one full reconcile (apply children, prune, write status).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
API_REQUESTS = Counter(
    "rembg_operator_api_requests_total",
    "Requests the operator sent to the Kubernetes API server (watches excluded).",
    ["method", "resource", "code"],
)
API_LATENCY = Histogram(
    "rembg_operator_api_request_duration_seconds",
    "Latency of the operator's API requests.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)
MANAGED_SERVICES = Gauge(
    "rembg_operator_managed_services",
    "RembgServices the operator currently knows.",
)
INVALID_SPECS = Gauge(
    "rembg_operator_invalid_specs",
    "RembgServices whose spec is invalid (Degraded/Stalled, children kept).",
)
AUDITS = Counter(
    "rembg_operator_audits_total",
    "Audits of the children (lists compared with what was applied), by result (ok, failed).",
    ["result"],
)
AUDIT_REPAIRS = Counter(
    "rembg_operator_audit_repairs_total",
    "Children an audit found changed while no watch saw it, by kind and reason (vanished: "
    "deleted; drifted: edited); each is restored by a full reconcile.",
    ["kind", "reason"],
)
