"""The custom and external metrics the HPAs scale on: their names, the recording rules behind
them, and the prometheus-adapter rules that serve those recordings through custom.metrics.k8s.io
(per-pod signals) and external.metrics.k8s.io (the job backlog).

One module for every end of the metrics path, so the ends cannot drift apart:
- `AutoscalingSpec` defaults to QUEUE_DEPTH_METRIC and LATENCY_P95_METRIC, which `build_hpa`
  names as Pods metrics;
- `build_rule_groups` (monitoring.py) records the per-pod series with the rules built here;
- `build_adapter_config` is prometheus-adapter's rules file; examples/monitoring/ ships it,
  generated from this function (tests/autoscaling checks the file against it).

The per-pod recordings carry the labels the ServiceMonitor adds (`rembg_service`, `pool`) plus
the `namespace` and `pod` labels Prometheus' Kubernetes discovery adds; the adapter maps those
two onto the Pod resource, which is what a Pods metric of an HPA is looked up by.

The job backlog is not a per-pod quantity: every replica exports the same fleet-wide XLEN of
the service's job stream. Its recording keeps one series per service (max, not sum, over the
replicas), and the adapter serves it as an External metric that the HPA selects by the
`rembg_service` label inside its own namespace.
"""

from __future__ import annotations

from typing import Any

# No imports from the rest of the package: models.py (the spec defaults) imports this module.
Manifest = dict[str, Any]

# Pods metrics, as the HPA asks for them (GET .../namespaces/NS/pods/*/<name>).
QUEUE_DEPTH_METRIC = "rembg_pending_requests"
LATENCY_P95_METRIC = "rembg_request_duration_seconds_p95"

# Recording rules (one series per pod) the adapter serves under the metric names above.
PENDING_BY_POD_RECORD = "rembg:pending_requests:sum_by_pod"
LATENCY_P95_BY_POD_RECORD = "rembg:request_duration_seconds:p95_by_pod_1m"
# Short, so the HPA sees a latency change within a minute: the autoscaler needs a fast signal,
# the alerts keep their own 5m p95. With the default 30s scrape interval a 1m rate still
# holds two samples.
LATENCY_WINDOW = "1m"

POD_LABELS = "namespace, rembg_service, pool, pod"

# External metric (GET /apis/external.metrics.k8s.io/v1beta1/namespaces/NS/<name>?labelSelector=
# rembg_service=<service>), recorded once per service.
JOBS_BACKLOG_METRIC = "rembg_jobs_backlog"
JOBS_BACKLOG_RECORD = "rembg:jobs_backlog:max"
SERVICE_LABELS = "namespace, rembg_service"


def pending_by_pod_rule(selector: str) -> Manifest:
    """Requests admitted and not yet answered, per pod (summed over the pod's models)."""
    return {
        "record": PENDING_BY_POD_RECORD,
        "expr": f"sum by ({POD_LABELS}) (rembg_pending_requests{{{selector}}})",
    }


def latency_p95_by_pod_rule(selector: str) -> Manifest:
    """p95 request latency per pod over LATENCY_WINDOW; 0 for a pod that answered nothing.

    histogram_quantile of an idle pod is NaN (`>= 0` drops it); the `or` branch then records 0
    for every pod that exports metrics at all. Without it an idle pool would have no latency
    series, and the HPA refuses to scale down while any of its metrics is missing.
    """
    quantile = (
        f"histogram_quantile(0.95, sum by ({POD_LABELS}, le) "
        f"(rate(rembg_request_duration_seconds_bucket{{{selector}}}[{LATENCY_WINDOW}])))"
    )
    idle = f"0 * sum by ({POD_LABELS}) (rembg_pending_requests{{{selector}}})"
    return {"record": LATENCY_P95_BY_POD_RECORD, "expr": f"({quantile} >= 0) or {idle}"}


def jobs_backlog_rule(selector: str) -> Manifest:
    """Unfinished jobs (queued + running) per service: every replica samples the same stream,
    so max() keeps the value once (sum() would multiply it by the replica count)."""
    return {
        "record": JOBS_BACKLOG_RECORD,
        "expr": f"max by ({SERVICE_LABELS}) (rembg_jobs_backlog{{{selector}}})",
    }


def _pods_rule(record: str, metric: str) -> Manifest:
    return {
        "seriesQuery": f'{record}{{namespace!="",pod!=""}}',
        "resources": {
            "overrides": {
                "namespace": {"resource": "namespace"},
                "pod": {"resource": "pod"},
            }
        },
        "name": {"matches": f"^{record}$", "as": metric},
        # One series per pod already; max() only collapses duplicates (e.g. two Prometheus
        # replicas federated into one) without adding them up.
        "metricsQuery": "max(<<.Series>>{<<.LabelMatchers>>}) by (<<.GroupBy>>)",
    }


def _external_rule(record: str, metric: str) -> Manifest:
    return {
        "seriesQuery": f'{record}{{namespace!="",rembg_service!=""}}',
        # Mapping `namespace` keeps the metric namespaced: the adapter adds the HPA's namespace
        # to the query, so an HPA never reads another namespace's backlog.
        "resources": {"overrides": {"namespace": {"resource": "namespace"}}},
        "name": {"matches": f"^{record}$", "as": metric},
        # One series per service already (the HPA's selector names the service); max() only
        # collapses duplicates, as for the Pods metrics.
        "metricsQuery": f"max(<<.Series>>{{<<.LabelMatchers>>}}) by ({SERVICE_LABELS})",
    }


def build_adapter_config() -> Manifest:
    """prometheus-adapter's --config: the two Pods metrics and the External metric the
    operator's HPAs use."""
    return {
        "rules": [
            _pods_rule(PENDING_BY_POD_RECORD, QUEUE_DEPTH_METRIC),
            _pods_rule(LATENCY_P95_BY_POD_RECORD, LATENCY_P95_METRIC),
        ],
        "externalRules": [_external_rule(JOBS_BACKLOG_RECORD, JOBS_BACKLOG_METRIC)],
    }


# ---- files shipped in examples/monitoring/ (generated, checked by tests/autoscaling) ---------

GENERATED_HEADER = (
    "# Generated from rembg_operator/custom_metrics.py by\n"
    "#   python -m rembg_operator.custom_metrics examples/monitoring\n"
    "# Do not edit; a test fails when this file and the module disagree.\n"
)
# Every RembgService's series: for a Prometheus without the Prometheus Operator, where the
# per-service PrometheusRule the operator writes is not loaded.
ALL_SERVICES_SELECTOR = 'rembg_service!=""'


def build_recording_rules_file() -> Manifest:
    return {
        "groups": [
            {
                "name": "rembg.autoscaling",
                "rules": [
                    pending_by_pod_rule(ALL_SERVICES_SELECTOR),
                    latency_p95_by_pod_rule(ALL_SERVICES_SELECTOR),
                    jobs_backlog_rule(ALL_SERVICES_SELECTOR),
                ],
            }
        ]
    }


def build_adapter_chart_values() -> Manifest:
    """Values for the prometheus-community/prometheus-adapter chart: only our rules."""
    config = build_adapter_config()
    return {
        "rules": {"default": False, "custom": config["rules"], "external": config["externalRules"]}
    }


def render_monitoring_examples() -> dict[str, str]:
    """File name -> content of every generated file under examples/monitoring/."""
    import yaml  # noqa: PLC0415 - only the generator needs it, not the operator at run time

    def dump(comment: str, document: Manifest) -> str:
        return GENERATED_HEADER + comment + yaml.safe_dump(document, sort_keys=False, width=100)

    return {
        "prometheus-adapter-rules.yaml": dump(
            "# prometheus-adapter --config: the Pods and External metrics the operator's HPAs\n"
            "# ask for.\n",
            build_adapter_config(),
        ),
        "prometheus-adapter-values.yaml": dump(
            "# Helm values for prometheus-community/prometheus-adapter (the same rules).\n",
            build_adapter_chart_values(),
        ),
        "recording-rules.yaml": dump(
            "# Prometheus rule file with the recordings the adapter reads, for every\n"
            "# RembgService. Not needed with the Prometheus Operator: each RembgService's\n"
            "# PrometheusRule already holds them.\n",
            build_recording_rules_file(),
        ),
    }


def main(argv: list[str]) -> int:
    from pathlib import Path  # noqa: PLC0415 - CLI only

    if len(argv) != 1:
        print("usage: python -m rembg_operator.custom_metrics OUTPUT_DIR")  # noqa: T201
        return 2
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render_monitoring_examples().items():
        (out / name).write_text(text)
    return 0


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
