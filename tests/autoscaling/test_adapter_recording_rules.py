"""The recording rules prometheus-adapter reads, unit-tested by the real promtool.

The rules come from the operator's own PrometheusRule builder (the groups it applies for a
RembgService with the job path on, so every recording is there), and the set of records under
test is derived from the adapter config (custom and external rules), so a rule the adapter
starts reading without a test here fails `test_every_adapter_record_is_tested`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rembg_operator.builders import ServiceRef, plan_pools
from rembg_operator.builders.monitoring import build_rule_groups
from rembg_operator.custom_metrics import (
    JOBS_BACKLOG_RECORD,
    LATENCY_P95_BY_POD_RECORD,
    PENDING_BY_POD_RECORD,
    build_adapter_config,
)
from rembg_operator.models import RembgServiceSpec

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make system-deps` installs Debian's prometheus"
)

REF = ServiceRef(name="demo", namespace="team-a")
SPEC = RembgServiceSpec.model_validate(
    {"cpu": {}, "jobs": {"enabled": True, "redis": {"secretName": "redis-credentials"}}}
)
SERVICE = 'namespace="team-a",rembg_service="demo"'
OTHER = 'namespace="team-a",rembg_service="other"'
TESTED_RECORDS = {PENDING_BY_POD_RECORD, LATENCY_P95_BY_POD_RECORD, JOBS_BACKLOG_RECORD}


def adapter_records() -> set[str]:
    """Series names the adapter's rules query (the part of seriesQuery before the braces)."""
    config = build_adapter_config()
    rules = [*config["rules"], *config["externalRules"]]
    return {re.sub(r"\{.*", "", rule["seriesQuery"]) for rule in rules}


def _run(tmp_path: Path, tests: list[dict[str, Any]]) -> None:
    groups = build_rule_groups(REF, SPEC, plan_pools(SPEC, gpu_capacity=None))
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
    unit = {"rule_files": ["rules.yaml"], "evaluation_interval": "15s", "tests": tests}
    (tmp_path / "unit.yaml").write_text(yaml.safe_dump(unit))
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "unit.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _series(name: str, labels: str, pod: str, extra: str, values: str) -> dict[str, str]:
    return {
        "series": f'{name}{{{labels},pool="cpu",pod="{pod}",device="cpu"{extra}}}',
        "values": values,
    }


def _pending(labels: str, pod: str, model: str, values: str) -> dict[str, str]:
    return _series("rembg_pending_requests", labels, pod, f',model="{model}"', values)


def _buckets(labels: str, pod: str, per_step: dict[str, int], steps: int) -> list[dict[str, str]]:
    """Cumulative latency buckets growing by per_step[le] requests every 15s step."""
    series, cumulative = [], 0
    for le in ("0.05", "0.1", "0.25", "+Inf"):
        cumulative += per_step.get(le, 0)
        extra = f',model="u2netp",le="{le}"'
        values = f"0+{cumulative}x{steps}"
        series.append(_series("rembg_request_duration_seconds_bucket", labels, pod, extra, values))
    return series


def _record(name: str, pod: str) -> str:
    return f'{name}{{{SERVICE},pool="cpu",pod="{pod}"}}'


def test_every_adapter_record_is_tested() -> None:
    assert adapter_records() == TESTED_RECORDS


def test_pending_by_pod_sums_models_per_pod_and_keeps_services_apart(tmp_path: Path) -> None:
    case = {
        "interval": "15s",
        "input_series": [
            _pending(SERVICE, "p1", "u2netp", "3x8"),
            _pending(SERVICE, "p1", "isnet", "2x8"),
            _pending(SERVICE, "p2", "u2netp", "0x8"),
            _pending(OTHER, "p9", "u2netp", "40x8"),
        ],
        "promql_expr_test": [
            {
                "expr": f"{PENDING_BY_POD_RECORD}{{{SERVICE}}}",
                "eval_time": "1m",
                "exp_samples": [
                    {"labels": _record(PENDING_BY_POD_RECORD, "p1"), "value": 5},
                    {"labels": _record(PENDING_BY_POD_RECORD, "p2"), "value": 0},
                ],
            }
        ],
    }
    _run(tmp_path, [case])


def test_latency_p95_by_pod_per_pod_and_zero_when_idle(tmp_path: Path) -> None:
    # p1: every request in (0.1, 0.25]: p95 = 0.1 + 0.15 * 0.95 = 0.2425 s.
    # p2: no request at all (counters flat): no p95, recorded as 0 so the HPA can scale down.
    # p3 (another service) is not in this service's recording.
    busy = _buckets(SERVICE, "p1", {"0.25": 20}, steps=12)
    idle = _buckets(SERVICE, "p2", {}, steps=12)
    other = _buckets(OTHER, "p3", {"0.05": 20}, steps=12)
    pending = [_pending(SERVICE, pod, "u2netp", "0x12") for pod in ("p1", "p2")]
    case = {
        "interval": "15s",
        "input_series": busy + idle + other + pending,
        "promql_expr_test": [
            {
                "expr": f"{LATENCY_P95_BY_POD_RECORD}{{{SERVICE}}}",
                "eval_time": "2m",
                "exp_samples": [
                    {"labels": _record(LATENCY_P95_BY_POD_RECORD, "p1"), "value": 0.2425},
                    {"labels": _record(LATENCY_P95_BY_POD_RECORD, "p2"), "value": 0},
                ],
            }
        ],
    }
    _run(tmp_path, [case])


def test_latency_p95_by_pod_falls_to_zero_a_window_after_the_load(tmp_path: Path) -> None:
    # Requests until 1m, then none: at 1m30s the 1m window still holds the load, at 2m30s
    # it holds none, and the recording reads 0 (not NaN, not absent).
    steps = "0 20 40 60 80 80 80 80 80 80 80 80"
    series = [
        _series(
            "rembg_request_duration_seconds_bucket", SERVICE, "p1", f',model="u2netp",le="{le}"', v
        )
        for le, v in (("0.05", "0x11"), ("0.1", "0x11"), ("0.25", steps), ("+Inf", steps))
    ]
    case = {
        "interval": "15s",
        "input_series": [*series, _pending(SERVICE, "p1", "u2netp", "0x11")],
        "promql_expr_test": [
            {
                "expr": f"{LATENCY_P95_BY_POD_RECORD}{{{SERVICE}}} > 0",
                "eval_time": "1m",
                "exp_samples": [
                    {"labels": _record(LATENCY_P95_BY_POD_RECORD, "p1"), "value": 0.2425}
                ],
            },
            {
                "expr": f"{LATENCY_P95_BY_POD_RECORD}{{{SERVICE}}}",
                "eval_time": "2m30s",
                "exp_samples": [{"labels": _record(LATENCY_P95_BY_POD_RECORD, "p1"), "value": 0}],
            },
        ],
    }
    _run(tmp_path, [case])


def _backlog(labels: str, pod: str, values: str) -> dict[str, str]:
    return {"series": f'rembg_jobs_backlog{{{labels},pool="cpu",pod="{pod}"}}', "values": values}


def test_jobs_backlog_is_one_series_per_service_labelled_for_the_external_rule(
    tmp_path: Path,
) -> None:
    # The External metric is looked up by namespace (the adapter adds the HPA's) and by the
    # HPA's selector rembg_service=<name>: the recording carries exactly those two labels, one
    # series per service, the backlog once however many replicas export it (p3 sampled the
    # stream later than the others), and never another service's backlog.
    case = {
        "interval": "15s",
        "input_series": [
            _backlog(SERVICE, "p1", "0 12 30 30 30 30 30 30"),
            _backlog(SERVICE, "p2", "0 12 30 30 30 30 30 30"),
            _backlog(SERVICE, "p3", "0 0 30 30 30 30 30 30"),
            _backlog(OTHER, "p9", "7x8"),
        ],
        "promql_expr_test": [
            {
                "expr": JOBS_BACKLOG_RECORD,
                "eval_time": "1m",
                "exp_samples": [{"labels": f"{JOBS_BACKLOG_RECORD}{{{SERVICE}}}", "value": 30}],
            },
            {
                # Before p3's first sample of the full stream: still the max, not a sum.
                "expr": JOBS_BACKLOG_RECORD,
                "eval_time": "15s",
                "exp_samples": [{"labels": f"{JOBS_BACKLOG_RECORD}{{{SERVICE}}}", "value": 12}],
            },
        ],
    }
    _run(tmp_path, [case])
