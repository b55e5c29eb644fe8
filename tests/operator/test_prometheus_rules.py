"""Every generated recording rule and alert, checked and unit-tested by the real promtool.

Each alert gets series that must fire it and series that must not (below threshold, too
short for its `for`, another service's series, a pool scaled to zero on purpose), and the
alerts on rates are shown to end within their rateWindow once the fault does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rembg_operator.builders import ServiceRef, plan_pools
from rembg_operator.builders.monitoring import build_prometheus_rule, build_rule_groups
from rembg_operator.models import RembgServiceSpec

from tests.operator.conftest import make_spec

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make system-deps` installs Debian's prometheus"
)

REF = ServiceRef(name="demo", namespace="team-a")
SPEC = make_spec(
    cpu={},
    gpu={},
    monitoring={
        "alerts": {
            "errorRatio": 0.05,
            "errorRatioFor": "5m",
            "latencyP95Seconds": 5,
            "latencyFor": "10m",
            "queueSaturationRatio": 0.8,
            "queueSaturationFor": "5m",
            "noReadyReplicasFor": "5m",
            "gpuFallbackFor": "5m",
            "canaryFailingFor": "5m",
        }
    },
)
SERVICE = 'namespace="team-a",rembg_service="demo"'
OTHER = 'namespace="team-a",rembg_service="other"'


def _rules(spec: RembgServiceSpec = SPEC) -> list[dict[str, Any]]:
    return build_rule_groups(REF, spec, plan_pools(spec, gpu_capacity=4))


def _rule_by_name(spec: RembgServiceSpec = SPEC) -> dict[str, dict[str, Any]]:
    return {r.get("alert") or r["record"]: r for g in _rules(spec) for r in g["rules"]}


def _annotations(alert: str, spec: RembgServiceSpec = SPEC, **values: str) -> dict[str, str]:
    """The alert's annotation templates with Go template expressions replaced by values."""
    rule = next(r for g in _rules(spec) for r in g["rules"] if r.get("alert") == alert)
    rendered = {}
    for key, template_text in rule["annotations"].items():
        text = template_text
        for template, value in values.items():
            text = text.replace(template, value)
        assert "{{" not in text, f"unrendered template in {alert}.{key}: {text}"
        rendered[key] = text
    return rendered


def _run(tmp_path: Path, tests: list[dict[str, Any]], spec: RembgServiceSpec = SPEC) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _rules(spec)}))
    unit = tmp_path / "unit.yaml"
    unit.write_text(
        yaml.safe_dump({"rule_files": [rules.name], "evaluation_interval": "1m", "tests": tests})
    )
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", unit.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _rules()}))
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_prometheus_rule_object_wraps_the_same_groups() -> None:
    plans = plan_pools(SPEC, gpu_capacity=4)
    rule = build_prometheus_rule(REF, SPEC, plans)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _rules()


def test_extra_labels_for_prometheus_selection() -> None:
    spec = make_spec(cpu={}, monitoring={"labels": {"release": "kube-prometheus-stack"}})
    rule = build_prometheus_rule(REF, spec, plan_pools(spec, gpu_capacity=None))
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_no_gpu_alert_without_a_gpu_pool() -> None:
    spec = make_spec(cpu={})
    alerts = {r.get("alert") for g in _rules(spec) for r in g["rules"]}
    assert "RembgGpuPoolWithoutGpu" not in alerts
    assert {"RembgNoReadyReplicas", "RembgHighErrorRate", "RembgHighLatency"} <= alerts


def _requests(
    labels: str,
    ok_per_min: int,
    errors_per_min: int,
    minutes: int = 30,
    pool: str = "cpu",
    errors: str | None = None,
) -> list[Any]:
    """Counters of 200 and 500 answers; `errors` overrides the 500 series' values."""
    series = f'rembg_requests_total{{{labels},pool="{pool}",pod="{pool}1",model="u2netp"'
    return [
        {"series": f'{series},code="200"}}', "values": f"0+{ok_per_min}x{minutes}"},
        {"series": f'{series},code="500"}}', "values": errors or f"0+{errors_per_min}x{minutes}"},
    ]


def test_error_ratio_recording_and_alert(tmp_path: Path) -> None:
    firing = {
        "interval": "1m",
        "input_series": _requests(SERVICE, 90, 10),
        "promql_exp_test": [],
        "promql_expr_test": [
            {
                "expr": "rembg:request_error_ratio:rate5m",
                "eval_time": "10m",
                "exp_samples": [
                    {"labels": f"rembg:request_error_ratio:rate5m{{{SERVICE}}}", "value": 0.1}
                ],
            }
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "RembgHighErrorRate", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "RembgHighErrorRate",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                        },
                        "exp_annotations": _annotations(
                            "RembgHighErrorRate",
                            **{
                                "{{ $value | humanizePercentage }}": "10%",
                                "{{ $labels.pool }}": "cpu",
                            },
                        ),
                    }
                ],
            },
        ],
    }
    firing.pop("promql_exp_test")
    quiet = {
        "interval": "1m",
        "input_series": _requests(SERVICE, 99, 1),
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "RembgHighErrorRate", "exp_alerts": []}
        ],
    }
    other_service = {
        "interval": "1m",
        "input_series": _requests(OTHER, 0, 10),
        "alert_rule_test": [
            {"eval_time": "20m", "alertname": "RembgHighErrorRate", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [firing, quiet, other_service])


def test_error_ratio_alert_is_per_pool(tmp_path: Path) -> None:
    # The GPU pool fails half its few requests; the busy CPU pool none. The service-wide ratio
    # (the 5m recording) stays below 5%, the GPU pool's alert fires.
    case = {
        "interval": "1m",
        "input_series": [
            *_requests(SERVICE, 10, 10, pool="gpu"),
            *_requests(SERVICE, 1000, 0, pool="cpu"),
        ],
        "promql_expr_test": [
            {
                "expr": "rembg:request_error_ratio:rate5m > bool 0.05",
                "eval_time": "10m",
                "exp_samples": [{"labels": f"{{{SERVICE}}}", "value": 0}],
            }
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "RembgHighErrorRate",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "gpu",
                        },
                        "exp_annotations": _annotations(
                            "RembgHighErrorRate",
                            **{
                                "{{ $value | humanizePercentage }}": "50%",
                                "{{ $labels.pool }}": "gpu",
                            },
                        ),
                    }
                ],
            }
        ],
    }
    _run(tmp_path, [case])


SHORT_WINDOW = make_spec(
    cpu={},
    monitoring={
        "scrapeInterval": "30s",
        "alerts": {"rateWindow": "2m", "errorRatioFor": "1m", "latencyFor": "1m"},
    },
)


def test_error_alert_ends_within_the_rate_window(tmp_path: Path) -> None:
    # 30% of the answers fail until 10m, none after. Over a 2m window the alert has ended by
    # 13m, while the 5m recording (for dashboards) still reads above the threshold.
    case = {
        "interval": "1m",
        "input_series": _requests(SERVICE, 70, 30, errors="0+30x10 300x20"),
        "promql_expr_test": [
            {
                "expr": "rembg:request_error_ratio:rate5m > bool 0.05",
                "eval_time": "13m",
                "exp_samples": [{"labels": f"{{{SERVICE}}}", "value": 1}],
            }
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "RembgHighErrorRate",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                        },
                        "exp_annotations": _annotations(
                            "RembgHighErrorRate",
                            SHORT_WINDOW,
                            **{
                                "{{ $value | humanizePercentage }}": "30%",
                                "{{ $labels.pool }}": "cpu",
                            },
                        ),
                    }
                ],
            },
            {"eval_time": "13m", "alertname": "RembgHighErrorRate", "exp_alerts": []},
        ],
    }
    _run(tmp_path, [case], SHORT_WINDOW)


def test_rate_window_sets_the_alert_expressions() -> None:
    rules = {name: rule["expr"] for name, rule in _rule_by_name(SHORT_WINDOW).items()}
    assert "[2m]" in rules["RembgHighErrorRate"]
    assert "[2m]" in rules["RembgHighLatency"]
    assert "[5m]" not in rules["RembgHighErrorRate"] + rules["RembgHighLatency"]
    # The 5m recordings stay as they were: other queries read them.
    assert "[5m]" in rules["rembg:request_error_ratio:rate5m"]
    assert "[5m]" in rules["rembg:request_duration_seconds:p95_5m"]


def _latency(labels: str, bucket_rates: dict[str, int], minutes: int = 40) -> list[Any]:
    """Cumulative buckets from per-bucket request rates (per minute)."""
    series = []
    cumulative = 0
    for le in ("1", "5", "10", "+Inf"):
        cumulative += bucket_rates.get(le, 0)
        name = (
            f'rembg_request_duration_seconds_bucket{{{labels},pool="cpu",pod="p1",'
            f'model="u2netp",device="cpu",le="{le}"}}'
        )
        series.append({"series": name, "values": f"0+{cumulative}x{minutes}"})
    return series


def test_latency_recording_and_alert(tmp_path: Path) -> None:
    # Every request lands in (5, 10]: p95 interpolates to 5 + 5 * 0.95 = 9.75 s.
    slow = _latency(SERVICE, {"10": 60})
    labels = {"severity": "warning", "namespace": "team-a", "rembg_service": "demo", "pool": "cpu"}
    firing = {
        "interval": "1m",
        "input_series": slow,
        "promql_expr_test": [
            {
                "expr": "rembg:request_duration_seconds:p95_5m",
                "eval_time": "10m",
                "exp_samples": [
                    {
                        "labels": f'rembg:request_duration_seconds:p95_5m{{{SERVICE},pool="cpu"}}',
                        "value": 9.75,
                    }
                ],
            }
        ],
        "alert_rule_test": [
            # Above threshold since ~1m, but `for` is 10m.
            {"eval_time": "8m", "alertname": "RembgHighLatency", "exp_alerts": []},
            {
                "eval_time": "20m",
                "alertname": "RembgHighLatency",
                "exp_alerts": [
                    {
                        "exp_labels": labels,
                        "exp_annotations": _annotations(
                            "RembgHighLatency",
                            **{
                                "{{ $labels.pool }}": "cpu",
                                "{{ $value | humanizeDuration }}": "9.75s",
                            },
                        ),
                    }
                ],
            },
        ],
    }
    fast = {
        "interval": "1m",
        "input_series": _latency(SERVICE, {"1": 60}),
        "alert_rule_test": [
            {"eval_time": "30m", "alertname": "RembgHighLatency", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [firing, fast])


def test_latency_alert_ends_within_the_rate_window(tmp_path: Path) -> None:
    # Every request takes (5, 10] s until 10m, under 1 s after. Over a 2m window the alert has
    # ended by 13m; the 5m recording still reads above 5 s.
    slow_then_fast = "0+60x10 660+60x19"
    fast_later = "0x10 60+60x19"
    buckets = {"1": fast_later, "5": fast_later, "10": slow_then_fast, "+Inf": slow_then_fast}
    series = f'rembg_request_duration_seconds_bucket{{{SERVICE},pool="cpu",pod="p1",model="u2netp"'
    case = {
        "interval": "1m",
        "input_series": [
            {"series": f'{series},le="{le}"}}', "values": values} for le, values in buckets.items()
        ],
        "promql_expr_test": [
            {
                "expr": "rembg:request_duration_seconds:p95_5m > bool 5",
                "eval_time": "13m",
                "exp_samples": [{"labels": f'{{{SERVICE},pool="cpu"}}', "value": 1}],
            }
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "RembgHighLatency",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                        },
                        "exp_annotations": _annotations(
                            "RembgHighLatency",
                            SHORT_WINDOW,
                            **{
                                "{{ $labels.pool }}": "cpu",
                                "{{ $value | humanizeDuration }}": "9.75s",
                            },
                        ),
                    }
                ],
            },
            {"eval_time": "13m", "alertname": "RembgHighLatency", "exp_alerts": []},
        ],
    }
    _run(tmp_path, [case], SHORT_WINDOW)


def _pending(labels: str, pod: str, values: str) -> dict[str, str]:
    return {
        "series": f'rembg_pending_requests{{{labels},pool="cpu",pod="{pod}",model="u2netp",'
        'device="cpu"}',
        "values": values,
    }


def _pending_record(pod: str) -> str:
    return f'rembg:pending_requests:sum_by_pod{{{SERVICE},pool="cpu",pod="{pod}"}}'


def _limit(labels: str, pod: str, values: str) -> dict[str, str]:
    # The admission limit each pod exports; the operator does not know it (the server sizes
    # its queue from the CPU limit unless queueMaxRequests is set).
    return {
        "series": f'rembg_queue_limit_requests{{{labels},pool="cpu",pod="{pod}"}}',
        "values": values,
    }


def test_queue_saturation(tmp_path: Path) -> None:
    # Against each pod's own limit, at 80%: p1 (60 of 64) fires after 5m; p2 (50 of 64)
    # never; p3 (4 of 4, a small pod on the server's default) fires; a 3-minute spike never.
    firing = {
        "interval": "1m",
        "input_series": [
            _pending(SERVICE, "p1", "60x20"),
            _pending(SERVICE, "p2", "50x20"),
            _pending(SERVICE, "p3", "4x20"),
            _limit(SERVICE, "p1", "64x20"),
            _limit(SERVICE, "p2", "64x20"),
            _limit(SERVICE, "p3", "4x20"),
        ],
        "promql_expr_test": [
            {
                "expr": "rembg:pending_requests:sum_by_pod",
                "eval_time": "1m",
                "exp_samples": [
                    {"labels": _pending_record("p1"), "value": 60},
                    {"labels": _pending_record("p2"), "value": 50},
                    {"labels": _pending_record("p3"), "value": 4},
                ],
            }
        ],
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "RembgQueueSaturated",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                            "pod": "p1",
                        },
                        "exp_annotations": _annotations(
                            "RembgQueueSaturated",
                            **{
                                "{{ $labels.pod }}": "p1",
                                "{{ $value | humanizePercentage }}": "93.75%",
                            },
                        ),
                    },
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                            "pod": "p3",
                        },
                        "exp_annotations": _annotations(
                            "RembgQueueSaturated",
                            **{
                                "{{ $labels.pod }}": "p3",
                                "{{ $value | humanizePercentage }}": "100%",
                            },
                        ),
                    },
                ],
            }
        ],
    }
    spike = {
        "interval": "1m",
        "input_series": [
            _pending(SERVICE, "p1", "0 0 60 60 60 0 0 0 0 0 0 0"),
            _limit(SERVICE, "p1", "64x12"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "RembgQueueSaturated", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "RembgQueueSaturated", "exp_alerts": []},
        ],
    }
    _run(tmp_path, [firing, spike])


def _deployment_series(
    name: str, ready: str, spec_replicas: str, instance: str = "ksm-0"
) -> list[dict[str, str]]:
    labels = (
        f'namespace="team-a",deployment="{name}",job="kube-state-metrics",instance="{instance}"'
    )
    return [
        {"series": f"kube_deployment_status_replicas_ready{{{labels}}}", "values": ready},
        {"series": f"kube_deployment_spec_replicas{{{labels}}}", "values": spec_replicas},
    ]


def _no_ready(pool: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "severity": "critical",
            "namespace": "team-a",
            "rembg_service": "demo",
            "pool": pool,
            "deployment": f"demo-{pool}",
        },
        "exp_annotations": _annotations(
            "RembgNoReadyReplicas",
            **{"{{ $labels.deployment }}": f"demo-{pool}", "{{ $labels.pool }}": pool},
        ),
    }


SERVICE_DOWN = {
    "exp_labels": {"severity": "critical", "namespace": "team-a", "rembg_service": "demo"},
    "exp_annotations": _annotations("RembgServiceDown"),
}


def test_no_ready_replicas(tmp_path: Path) -> None:
    firing = {
        "interval": "1m",
        "input_series": [
            *_deployment_series("demo-gpu", "0x20", "2x20"),
            # A second kube-state-metrics replica reports the same Deployment: still one alert.
            *_deployment_series("demo-gpu", "0x20", "2x20", instance="ksm-1"),
            *_deployment_series("demo-cpu", "2x20", "2x20"),
            # Another service's Deployment with the same shape must not fire for demo.
            *_deployment_series("demox-cpu", "0x20", "2x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "RembgNoReadyReplicas", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "RembgNoReadyReplicas",
                "exp_alerts": [_no_ready("gpu")],
            },
            # One pool still serves: the service is not down.
            {"eval_time": "10m", "alertname": "RembgServiceDown", "exp_alerts": []},
        ],
    }
    scaled_to_zero = {
        "interval": "1m",
        "input_series": _deployment_series("demo-gpu", "0x20", "0x20"),
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "RembgNoReadyReplicas", "exp_alerts": []},
            {"eval_time": "15m", "alertname": "RembgServiceDown", "exp_alerts": []},
        ],
    }
    _run(tmp_path, [firing, scaled_to_zero])


def test_service_down_when_every_pool_has_no_ready_replica(tmp_path: Path) -> None:
    all_down = {
        "interval": "1m",
        "input_series": [
            *_deployment_series("demo-gpu", "0x20", "2x20"),
            *_deployment_series("demo-cpu", "0x20", "1x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "RembgServiceDown", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "RembgServiceDown", "exp_alerts": [SERVICE_DOWN]},
            # The per-pool alerts fire too (Alertmanager's inhibition keeps them quiet).
            {
                "eval_time": "10m",
                "alertname": "RembgNoReadyReplicas",
                "exp_alerts": [_no_ready("cpu"), _no_ready("gpu")],
            },
        ],
    }
    # The GPU pool is scaled to zero on purpose; the only pool that wants pods has none ready.
    only_wanted_pool_down = {
        "interval": "1m",
        "input_series": [
            *_deployment_series("demo-gpu", "0x20", "0x20"),
            *_deployment_series("demo-cpu", "0x20", "3x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "RembgServiceDown", "exp_alerts": [SERVICE_DOWN]},
            {
                "eval_time": "10m",
                "alertname": "RembgNoReadyReplicas",
                "exp_alerts": [_no_ready("cpu")],
            },
        ],
    }
    # Down for 10 minutes, then one pod ready: resolved at the next evaluation.
    recovers = {
        "interval": "1m",
        "input_series": _deployment_series("demo-cpu", "0x10 1x10", "1x20"),
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "RembgServiceDown", "exp_alerts": [SERVICE_DOWN]},
            {"eval_time": "11m", "alertname": "RembgServiceDown", "exp_alerts": []},
            {"eval_time": "11m", "alertname": "RembgNoReadyReplicas", "exp_alerts": []},
        ],
    }
    other_service_down = {
        "interval": "1m",
        "input_series": [
            *_deployment_series("demox-cpu", "0x20", "2x20"),
            *_deployment_series("other-cpu", "0x20", "2x20"),
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "RembgServiceDown", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [all_down, only_wanted_pool_down, recovers, other_service_down])


def _model_info(pool: str, pod: str, provider: str) -> dict[str, str]:
    return {
        "series": f'rembg_model_info{{{SERVICE},pool="{pool}",pod="{pod}",model="u2netp",'
        f'device="{"cuda" if provider.startswith("CUDA") else "cpu"}",provider="{provider}"}}',
        "values": "1x20",
    }


def test_gpu_pool_without_gpu(tmp_path: Path) -> None:
    firing = {
        "interval": "1m",
        "input_series": [
            _model_info("gpu", "g1", "CPUExecutionProvider"),
            _model_info("gpu", "g2", "CUDAExecutionProvider"),
            _model_info("cpu", "c1", "CPUExecutionProvider"),
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "RembgGpuPoolWithoutGpu", "exp_alerts": []},
            {
                "eval_time": "10m",
                "alertname": "RembgGpuPoolWithoutGpu",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "gpu",
                            "pod": "g1",
                        },
                        "exp_annotations": _annotations(
                            "RembgGpuPoolWithoutGpu", **{"{{ $labels.pod }}": "g1"}
                        ),
                    }
                ],
            },
        ],
    }
    healthy = {
        "interval": "1m",
        "input_series": [
            _model_info("gpu", "g2", "CUDAExecutionProvider"),
            _model_info("cpu", "c1", "CPUExecutionProvider"),
        ],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "RembgGpuPoolWithoutGpu", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [firing, healthy])


def _canary(labels: str, pod: str, success: str | None, last_success: str) -> list[Any]:
    series = [
        {
            "series": f'rembg_canary_last_success_timestamp_seconds{{{labels},pool="cpu",'
            f'pod="{pod}",model="u2netp"}}',
            "values": last_success,
        }
    ]
    if success is not None:
        series.append(
            {
                "series": f'rembg_canary_success{{{labels},pool="cpu",pod="{pod}",model="u2netp"}}',
                "values": success,
            }
        )
    return series


def _canary_alert(pod: str) -> dict[str, Any]:
    return {
        "exp_labels": {
            "severity": "critical",
            "namespace": "team-a",
            "rembg_service": "demo",
            "pool": "cpu",
            "pod": pod,
            "model": "u2netp",
        },
        "exp_annotations": _annotations(
            "RembgCanaryFailing",
            **{
                "{{ $labels.model }}": "u2netp",
                "{{ $labels.pod }}": pod,
                "{{ $labels.pool }}": "cpu",
            },
        ),
    }


# The canary runs every minute in these series (the default interval); a healthy pod's last
# success is the current time (promtool's clock starts at 0).
HEALTHY_CANARY = "0+60x20"


def test_canary_failure_fires_after_its_for_and_ends_on_success(tmp_path: Path) -> None:
    failing = {
        "interval": "1m",
        "input_series": [
            # c1 fails from 2m to 11m, then succeeds again.
            *_canary(SERVICE, "c1", "1 1 0x9 1x9", "0 60 60x9 660+60x9"),
            *_canary(SERVICE, "c2", "1x20", HEALTHY_CANARY),
        ],
        "alert_rule_test": [
            {"eval_time": "6m", "alertname": "RembgCanaryFailing", "exp_alerts": []},
            {
                "eval_time": "8m",
                "alertname": "RembgCanaryFailing",
                "exp_alerts": [_canary_alert("c1")],
            },
            {"eval_time": "12m", "alertname": "RembgCanaryFailing", "exp_alerts": []},
        ],
    }
    blip = {
        "interval": "1m",
        "input_series": [*_canary(SERVICE, "c1", "1 0 0 1x17", "0 0 0 180+60x17")],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": "RembgCanaryFailing", "exp_alerts": []},
            {"eval_time": "10m", "alertname": "RembgCanaryFailing", "exp_alerts": []},
        ],
    }
    other_service = {
        "interval": "1m",
        "input_series": [*_canary(OTHER, "x1", "0x20", "0x20")],
        "alert_rule_test": [
            {"eval_time": "15m", "alertname": "RembgCanaryFailing", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [failing, blip, other_service])


def test_canary_that_stopped_succeeding_fires(tmp_path: Path) -> None:
    # c1's gauge still says 1, but its last success was at 3m: stale after 3 intervals + one
    # timeout (210 s), so pending from 7m and firing from 12m. A pod whose canary never ran (no
    # success gauge, timestamp 0) is not flagged.
    stale = {
        "interval": "1m",
        "input_series": [
            *_canary(SERVICE, "c1", "1x20", "0+60x3 180x16"),
            *_canary(SERVICE, "fresh", None, "0x20"),
            *_canary(SERVICE, "c2", "1x20", HEALTHY_CANARY),
        ],
        "alert_rule_test": [
            {"eval_time": "11m", "alertname": "RembgCanaryFailing", "exp_alerts": []},
            {
                "eval_time": "13m",
                "alertname": "RembgCanaryFailing",
                "exp_alerts": [_canary_alert("c1")],
            },
        ],
    }
    _run(tmp_path, [stale])


def test_canary_staleness_follows_its_interval_timeout_and_models() -> None:
    # 3 intervals, plus one timeout per model (a round checks the models one after another).
    canary = {"intervalSeconds": 10, "timeoutSeconds": 5}
    spec = make_spec(cpu={}, models=["u2netp", "u2net"], server={"canary": canary})
    assert _rule_by_name(spec)["RembgCanaryFailing"]["expr"].endswith("> 40)")
    assert _rule_by_name()["RembgCanaryFailing"]["expr"].endswith("> 210)")


def test_no_canary_alert_when_the_canary_is_off() -> None:
    spec = make_spec(cpu={}, server={"canary": {"intervalSeconds": 0}})
    assert "RembgCanaryFailing" not in _rule_by_name(spec)


def test_every_alert_has_a_severity_and_service_labels_in_its_expression() -> None:
    spec = make_spec(cpu={}, gpu={}, jobs={"enabled": True, "redis": {"secretName": "r"}})
    alerts = [r for g in _rules(spec) for r in g["rules"] if "alert" in r]
    assert len(alerts) == 9
    for alert in alerts:
        assert alert["labels"]["severity"] in {"critical", "warning"}, alert["alert"]
        assert "rembg_service" in alert["expr"], alert["alert"]


def test_a_wrong_expectation_fails(tmp_path: Path) -> None:
    """The harness itself can fail: expecting an alert on healthy series is caught."""
    wrong = {
        "interval": "1m",
        "input_series": _requests(SERVICE, 100, 0),
        "alert_rule_test": [
            {
                "eval_time": "10m",
                "alertname": "RembgHighErrorRate",
                "exp_alerts": [{"exp_labels": {"severity": "critical"}}],
            }
        ],
    }
    with pytest.raises(AssertionError, match="FAILED"):
        _run(tmp_path, [wrong])


# ---- the job path (spec.jobs) ----------------------------------------------------------------

JOBS_SPEC = make_spec(
    cpu={},
    jobs={"enabled": True, "redis": {"secretName": "redis-credentials"}},
    monitoring={
        "alerts": {"jobsOldestAgeSeconds": 600, "jobsOldestAgeFor": "2m", "jobsRedisDownFor": "5m"}
    },
)


def _jobs_rules() -> list[dict[str, Any]]:
    return build_rule_groups(REF, JOBS_SPEC, plan_pools(JOBS_SPEC, gpu_capacity=None))


def test_jobs_add_one_recording_and_two_alerts_only_when_enabled() -> None:
    def names(spec: RembgServiceSpec) -> set[str]:
        groups = build_rule_groups(REF, spec, plan_pools(spec, gpu_capacity=None))
        return {r.get("record") or r["alert"] for g in groups for r in g["rules"]}

    off = names(make_spec(cpu={}))
    on = names(JOBS_SPEC)
    assert on - off == {"rembg:jobs_backlog:max", "RembgJobsWaiting", "RembgJobsRedisUnreachable"}
    assert off <= on


def test_promtool_checks_the_jobs_rules(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _jobs_rules()}))
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 13 rules found" in result.stdout


def _job_gauge(name: str, labels: str, pod: str, values: str) -> dict[str, str]:
    return {"series": f'{name}{{{labels},pool="cpu",pod="{pod}"}}', "values": values}


def test_jobs_backlog_is_recorded_once_per_service(tmp_path: Path) -> None:
    # Every replica exports the same fleet-wide XLEN: the recording keeps it once (max), and a
    # replica that sampled a moment earlier does not add to it.
    case = {
        "interval": "1m",
        "input_series": [
            _job_gauge("rembg_jobs_backlog", SERVICE, "p1", "40x5"),
            _job_gauge("rembg_jobs_backlog", SERVICE, "p2", "38x5"),
            _job_gauge("rembg_jobs_backlog", OTHER, "p9", "900x5"),
        ],
        "promql_expr_test": [
            {
                "expr": f"rembg:jobs_backlog:max{{{SERVICE}}}",
                "eval_time": "2m",
                "exp_samples": [{"labels": f"rembg:jobs_backlog:max{{{SERVICE}}}", "value": 40}],
            }
        ],
    }
    _run(tmp_path, [case], JOBS_SPEC)


def test_jobs_waiting(tmp_path: Path) -> None:
    # The oldest queued job ages a minute per minute from 0: above 600 s from 11m on, firing
    # after `for` 2m (13m). Both replicas report it; the alert is one per service.
    ageing = "0+60x20"
    firing = {
        "interval": "1m",
        "input_series": [
            _job_gauge("rembg_jobs_oldest_age_seconds", SERVICE, "p1", ageing),
            _job_gauge("rembg_jobs_oldest_age_seconds", SERVICE, "p2", ageing),
        ],
        "alert_rule_test": [
            {"eval_time": "12m", "alertname": "RembgJobsWaiting", "exp_alerts": []},
            {
                "eval_time": "14m",
                "alertname": "RembgJobsWaiting",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "warning",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                        },
                        "exp_annotations": _annotations(
                            "RembgJobsWaiting",
                            JOBS_SPEC,
                            **{"{{ $value | humanizeDuration }}": "14m 0s"},
                        ),
                    }
                ],
            },
        ],
    }
    # Jobs picked up within 5 minutes: the age saws up and back, never reaching the threshold.
    draining = {
        "interval": "1m",
        "input_series": [
            _job_gauge(
                "rembg_jobs_oldest_age_seconds", SERVICE, "p1", "0 60 120 180 240 0 60 120 0 0 0"
            ),
            # Another service's stuck queue is its own alert, not demo's.
            _job_gauge("rembg_jobs_oldest_age_seconds", OTHER, "p9", "0+600x10"),
        ],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "RembgJobsWaiting", "exp_alerts": []}
        ],
    }
    _run(tmp_path, [firing, draining], JOBS_SPEC)


def test_jobs_redis_unreachable(tmp_path: Path) -> None:
    firing = {
        "interval": "1m",
        "input_series": [
            _job_gauge("rembg_jobs_redis_up", SERVICE, "p1", "1 1 0 0 0 0 0 0 0 0 0 0"),
            _job_gauge("rembg_jobs_redis_up", SERVICE, "p2", "1x11"),
        ],
        "alert_rule_test": [
            # Down since 2m: not yet at 6m (`for` 5m), firing at 8m, for p1 only.
            {"eval_time": "6m", "alertname": "RembgJobsRedisUnreachable", "exp_alerts": []},
            {
                "eval_time": "8m",
                "alertname": "RembgJobsRedisUnreachable",
                "exp_alerts": [
                    {
                        "exp_labels": {
                            "severity": "critical",
                            "namespace": "team-a",
                            "rembg_service": "demo",
                            "pool": "cpu",
                            "pod": "p1",
                        },
                        "exp_annotations": _annotations(
                            "RembgJobsRedisUnreachable", JOBS_SPEC, **{"{{ $labels.pod }}": "p1"}
                        ),
                    }
                ],
            },
        ],
    }
    blip = {
        "interval": "1m",
        # A 3-minute outage (a Redis failover) is not worth a page.
        "input_series": [
            _job_gauge("rembg_jobs_redis_up", SERVICE, "p1", "1 0 0 0 1 1 1 1 1 1 1 1"),
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": "RembgJobsRedisUnreachable", "exp_alerts": []},
            {"eval_time": "11m", "alertname": "RembgJobsRedisUnreachable", "exp_alerts": []},
        ],
    }
    _run(tmp_path, [firing, blip], JOBS_SPEC)
