"""The fleet dashboard (charts/rembg-operator/files/dashboards/*.json): valid Grafana JSON, every
query valid PromQL (checked by the real promtool), every metric it reads exported by the real
inference server (scraped in-process) or explicitly allow-listed from kube-state-metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram
from rembg_operator import metrics as operator_metrics

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "charts" / "rembg-operator" / "files" / "dashboards").glob("*.json"))

# Metrics that come from kube-state-metrics, not from our server: named here on purpose.
KUBE_STATE_METRICS = frozenset(
    {
        "kube_deployment_status_replicas_available",
        "kube_deployment_spec_replicas",
    }
)
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$namespace": ".*",
    "$service": ".*",
    "$model": ".*",
}
PROMQL_WORDS = frozenset(
    {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
     "unless", "offset", "inf", "nan"}
)  # fmt: skip


def load(path: Path) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets, and the selectors inside label_values()."""
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", var["query"]["query"])
            assert match, f"variable {var['name']}: expected label_values(selector, label)"
            exprs.append(match.group(1))
    return exprs


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords,
    label names (inside {...} or by/on(...) lists), strings, durations or numbers."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    # (?<!...) skips the unit of a number or duration ("5m" in `offset 5m`, "e3" in 1e3).
    for match in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        following = text[match.end() :].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_metric_name_extraction_is_not_fooled() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, device) (rate(a_bucket{x=~"y|z"}[5m]))) '
        "/ on (pod) group_left (label_q) b * 2 + count(c offset 5m)"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}


@pytest.fixture(scope="module", params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_there_is_a_dashboard() -> None:
    assert DASHBOARDS, "charts/rembg-operator/files/dashboards/ holds no dashboard"


def test_dashboard_is_valid_grafana_json(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"]
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels(dashboard):
        grid = panel["gridPos"]
        assert 0 <= grid["x"] < grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        # Every panel and target reads the datasource chosen in the variable, never a fixed uid.
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip()


def test_dashboard_covers_the_fleet(dashboard: dict[str, Any]) -> None:
    used = set().union(*(metric_names(substitute(e)) for e in queries(dashboard)))
    assert {
        "rembg_requests_total",  # request rate
        "rembg_request_duration_seconds_bucket",  # latency percentiles
        "rembg_pending_requests",  # queue depth
        "rembg_pending_megapixels",
        "kube_deployment_status_replicas_available",  # replicas per pool
        "rembg_canary_success",  # the model canary, per pod
        "rembg_canary_last_success_timestamp_seconds",
        "rembg_canary_iou",
    } <= used
    by_device = [e for e in queries(dashboard) if re.search(r"by \([^)]*\bdevice\b", e)]
    assert by_device, "GPU vs CPU: some panel must split by the device label"


def test_series_are_selected_by_the_service_monitor_labels(dashboard: dict[str, Any]) -> None:
    # The operator's ServiceMonitor adds `rembg_service`; `service` (the Kubernetes Service)
    # exists only where the Prometheus Operator scrapes, not with plain pod discovery.
    # kube-state-metrics' Deployment series have neither: they match the pools' names.
    for expr in queries(dashboard):
        assert not re.search(r"(?<![\w])service\s*=~?", expr), expr
        if "$service" in expr:
            selected = ('rembg_service=~"$service"', 'deployment=~"($service)-(cpu|gpu)"')
            assert any(s in expr for s in selected), expr


def test_every_query_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make system-deps` installs the Debian package prometheus"
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, expr in enumerate(queries(dashboard))
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def operator_metric_names() -> set[str]:
    """Sample names of the operator's own metrics (rembg_operator.metrics), by metric type."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names = set()
    for collector in vars(operator_metrics).values():
        if isinstance(collector, Counter | Gauge | Histogram):
            for family in collector.describe():
                names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def test_operator_metric_names_are_read_from_the_operator() -> None:
    names = operator_metric_names()
    assert "rembg_operator_reconciles_total" in names
    assert "rembg_operator_reconcile_duration_seconds_bucket" in names


def test_every_metric_exists(dashboard: dict[str, Any], server_metric_names: set[str]) -> None:
    used = set().union(*(metric_names(substitute(e)) for e in queries(dashboard)))
    ours = {name for name in used if name not in KUBE_STATE_METRICS}
    from_operator = {name for name in ours if name.startswith("rembg_operator_")}
    from_server = ours - from_operator
    assert from_server, "the dashboard must read the inference server's metrics"
    missing = from_server - server_metric_names
    assert not missing, f"not in the inference server's /metrics: {sorted(missing)}"
    missing = from_operator - operator_metric_names()
    assert not missing, f"not among the operator's metrics: {sorted(missing)}"
