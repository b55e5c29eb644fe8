"""One source for the metric names (HPA <-> adapter <-> recording rules), the shipped example
files, and the KWOK pod -> real server mapping of rembg_devcluster.metrics_stack (pure parts)."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from rembg_devcluster.metrics_stack import (
    ADAPTER_NAMESPACE,
    ADAPTER_SERVICE,
    PodRef,
    PodServerMap,
    build_apiservice_manifests,
    build_file_sd,
    build_prometheus_config,
    parse_quantity,
    pods_from_listing,
    rule_groups_from_listing,
)
from rembg_operator.builders import ServiceRef, plan_pools
from rembg_operator.builders.autoscaling import build_hpa
from rembg_operator.builders.monitoring import build_rule_groups
from rembg_operator.custom_metrics import (
    JOBS_BACKLOG_METRIC,
    LATENCY_P95_METRIC,
    QUEUE_DEPTH_METRIC,
    build_adapter_config,
    render_monitoring_examples,
)
from rembg_operator.models import RembgServiceSpec
from rembg_server.metrics import ServerMetrics

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "monitoring"
REF = ServiceRef(name="demo", namespace="team-a")
POOL = ("team-a", "demo", "cpu")


JOBS_SPEC = RembgServiceSpec.model_validate(
    {"cpu": {}, "jobs": {"enabled": True, "redis": {"secretName": "redis-credentials"}}}
)


def _served_metrics(kind: str) -> dict[str, str]:
    """Metric name the adapter serves under `rules` or `externalRules` -> the series it reads."""
    return {r["name"]["as"]: r["seriesQuery"].split("{")[0] for r in build_adapter_config()[kind]}


def _asked_metrics(hpa: dict[str, Any], kind: str) -> set[str]:
    key = kind.lower()
    return {m[key]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == kind}


def test_hpa_asks_only_for_metrics_the_adapter_serves() -> None:
    for spec in (RembgServiceSpec.model_validate({"cpu": {}}), JOBS_SPEC):
        (plan,) = plan_pools(spec, gpu_capacity=None)
        hpa = build_hpa(REF, spec, plan)
        asked = _asked_metrics(hpa, "Pods")
        assert asked == {QUEUE_DEPTH_METRIC, LATENCY_P95_METRIC}
        assert asked == set(_served_metrics("rules"))
    (plan,) = plan_pools(JOBS_SPEC, gpu_capacity=None)
    asked_external = _asked_metrics(build_hpa(REF, JOBS_SPEC, plan), "External")
    assert asked_external == {JOBS_BACKLOG_METRIC} == set(_served_metrics("externalRules"))


def test_external_metric_selector_names_labels_the_recording_keeps() -> None:
    (plan,) = plan_pools(JOBS_SPEC, gpu_capacity=None)
    (external,) = [m for m in build_hpa(REF, JOBS_SPEC, plan)["spec"]["metrics"] if "external" in m]
    selector = external["external"]["metric"]["selector"]["matchLabels"]
    groups = build_rule_groups(REF, JOBS_SPEC, plan_pools(JOBS_SPEC, gpu_capacity=None))
    records = {r["record"]: r for g in groups for r in g["rules"] if "record" in r}
    backlog = records["rembg:jobs_backlog:max"]
    assert set(selector) == {"rembg_service"}
    assert "by (namespace, rembg_service)" in backlog["expr"]
    (rule,) = build_adapter_config()["externalRules"]
    # Namespaced: the adapter adds the HPA's namespace, so no HPA reads another namespace.
    assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}}}


def test_adapter_reads_only_series_the_operator_records() -> None:
    groups = build_rule_groups(REF, JOBS_SPEC, plan_pools(JOBS_SPEC, gpu_capacity=None))
    recorded = {r["record"] for g in groups for r in g["rules"] if "record" in r}
    for kind in ("rules", "externalRules"):
        assert set(_served_metrics(kind).values()) <= recorded


@pytest.mark.parametrize("name", sorted(render_monitoring_examples()))
def test_example_file_is_generated_from_the_module(name: str) -> None:
    path = EXAMPLES / name
    assert path.read_text() == render_monitoring_examples()[name], (
        f"{path} is stale: run `python -m rembg_operator.custom_metrics examples/monitoring`"
    )


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_example_recording_rules_pass_promtool_check() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(EXAMPLES / "recording-rules.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 3 rules found" in result.stdout


def _pod(name: str, *, phase: str = "Running", created: str = "2026-01-01T00:00:00Z") -> Any:
    return {
        "metadata": {
            "name": name,
            "namespace": "team-a",
            "creationTimestamp": created,
            "labels": {"rembg.io/service": "demo", "rembg.io/pool": "cpu"},
        },
        "status": {"phase": phase},
    }


def test_pods_from_listing_keeps_running_labelled_pods_oldest_first() -> None:
    terminating = _pod("gone")
    terminating["metadata"]["deletionTimestamp"] = "2026-01-01T00:01:00Z"
    unlabelled = _pod("stranger")
    unlabelled["metadata"]["labels"] = {}
    listing = {
        "items": [
            _pod("b", created="2026-01-01T00:00:05Z"),
            _pod("a", created="2026-01-01T00:00:09Z"),
            _pod("pending", phase="Pending"),
            terminating,
            unlabelled,
        ]
    }
    assert [p.name for p in pods_from_listing(listing)] == ["b", "a"]


def _ref(name: str, service: str = "demo") -> PodRef:
    return PodRef("team-a", name, service, "cpu")


def test_mapping_is_sticky_and_fills_the_least_used_server() -> None:
    mapping = PodServerMap({POOL: ["s0", "s1", "s2"]})
    first = mapping.update([_ref("a"), _ref("b")])
    assert first == {_ref("a"): "s0", _ref("b"): "s1"}
    # a goes away: b keeps its server, the new pod takes the free s0 (lowest least-used).
    second = mapping.update([_ref("b"), _ref("c")])
    assert second == {_ref("b"): "s1", _ref("c"): "s0"}
    assert mapping.servers_of("team-a", "demo", "cpu") == ["s0", "s1"]


def test_more_pods_than_servers_share_round_robin() -> None:
    mapping = PodServerMap({POOL: ["s0", "s1"]})
    assigned = mapping.update([_ref(n) for n in "abcde"])
    assert [assigned[_ref(n)] for n in "abcde"] == ["s0", "s1", "s0", "s1", "s0"]


def test_pools_never_share_servers_and_unknown_pools_are_ignored() -> None:
    mapping = PodServerMap({POOL: ["s0"], ("team-a", "other", "cpu"): ["t0"]})
    assigned = mapping.update([_ref("a"), _ref("x", "other"), _ref("y", "unmapped")])
    assert assigned == {_ref("a"): "s0", _ref("x", "other"): "t0"}


def test_file_sd_labels_each_target_as_kubernetes_discovery_would() -> None:
    groups = build_file_sd({_ref("b"): "127.0.0.1:9", _ref("a"): "127.0.0.1:9"})
    assert groups == [
        {
            "targets": ["127.0.0.1:9"],
            "labels": {"namespace": "team-a", "pod": pod, "rembg_service": "demo", "pool": "cpu"},
        }
        for pod in ("a", "b")
    ]


def test_real_pods_are_discovered_and_labelled_as_the_service_monitor_labels_them(
    tmp_path: Path,
) -> None:
    """Relabelling run by hand on the labels Kubernetes discovery gives a pod target."""
    config = build_prometheus_config(
        tmp_path / "t.json", "r/*.yaml", pod_discovery_kubeconfig=tmp_path / "kubeconfig"
    )
    (scrape,) = config["scrape_configs"]
    assert scrape["kubernetes_sd_configs"] == [
        {"role": "pod", "kubeconfig_file": str(tmp_path / "kubeconfig")}
    ]
    assert "file_sd_configs" not in scrape
    target = {
        "__meta_kubernetes_namespace": "team-a",
        "__meta_kubernetes_pod_name": "demo-cpu-1",
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_container_port_name": "http",
        "__meta_kubernetes_pod_label_rembg_io_service": "demo",
        "__meta_kubernetes_pod_label_rembg_io_pool": "cpu",
    }
    assert _relabel(scrape["relabel_configs"], target) == {
        "namespace": "team-a",
        "pod": "demo-cpu-1",
        "rembg_service": "demo",
        "pool": "cpu",
    }
    for dropped in (
        {"__meta_kubernetes_pod_container_port_name": "metrics"},
        {"__meta_kubernetes_pod_phase": "Pending"},
        {"__meta_kubernetes_pod_label_rembg_io_service": ""},
    ):
        assert _relabel(scrape["relabel_configs"], {**target, **dropped}) is None


def _relabel(rules: list[dict[str, Any]], labels: dict[str, str]) -> dict[str, str] | None:
    """The keep and replace actions of Prometheus' relabelling (anchored regexes)."""
    out = dict(labels)
    for rule in rules:
        value = ";".join(labels.get(name, "") for name in rule["source_labels"])
        if rule.get("action") == "keep":
            if not re.fullmatch(rule["regex"], value):
                return None
        else:
            out[rule["target_label"]] = value
    return {k: v for k, v in out.items() if not k.startswith("__")}


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_prometheus_config_passes_promtool(tmp_path: Path) -> None:
    (tmp_path / "targets.json").write_text("[]")
    config = build_prometheus_config(tmp_path / "targets.json", str(tmp_path / "rules/*.yaml"))
    (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(
        ["promtool", "check", "config", str(tmp_path / "prometheus.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_groups_from_prometheus_rule_objects() -> None:
    listing = {
        "items": [
            {"metadata": {"name": "b"}, "spec": {"groups": [{"name": "gb", "rules": []}]}},
            {"metadata": {"name": "a"}, "spec": {"groups": [{"name": "ga", "rules": []}]}},
            {"metadata": {"name": "empty"}, "spec": {}},
        ]
    }
    assert [g["name"] for g in rule_groups_from_listing(listing)] == ["ga", "gb"]


def test_apiservices_point_at_the_adapter_with_its_ca() -> None:
    manifests = build_apiservice_manifests(6443, b"PEM")
    service = next(m for m in manifests if m["kind"] == "Service")
    assert service["spec"] == {
        "type": "ExternalName",
        "externalName": "localhost",
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
    }
    apiservices = [m for m in manifests if m["kind"] == "APIService"]
    assert [
        (a["metadata"]["name"], a["spec"]["group"], a["spec"]["versionPriority"])
        for a in apiservices
    ] == [
        ("v1beta1.custom.metrics.k8s.io", "custom.metrics.k8s.io", 100),
        ("v1beta2.custom.metrics.k8s.io", "custom.metrics.k8s.io", 200),
        ("v1beta1.external.metrics.k8s.io", "external.metrics.k8s.io", 100),
    ]
    for apiservice in apiservices:
        spec = apiservice["spec"]
        assert spec["service"] == {
            "name": ADAPTER_SERVICE,
            "namespace": ADAPTER_NAMESPACE,
            "port": 6443,
        }
        assert base64.b64decode(spec["caBundle"]) == b"PEM"
        assert "insecureSkipTLSVerify" not in spec


@pytest.mark.parametrize(
    ("text", "value"), [("2", 2.0), ("1500m", 1.5), ("250u", 0.00025), ("3k", 3000.0)]
)
def test_parse_quantity(text: str, value: float) -> None:
    assert parse_quantity(text) == pytest.approx(value)


def test_an_idle_server_exports_the_signals_at_zero() -> None:
    """Before its first request a server must already report queue depth 0 and an empty
    latency histogram: with no series at all the HPA cannot compute and never scales down."""
    registry = CollectorRegistry()
    ServerMetrics(registry).declare("u2netp", "cpu")
    labels = {"model": "u2netp", "device": "cpu"}
    assert registry.get_sample_value("rembg_pending_requests", labels) == 0
    assert registry.get_sample_value("rembg_request_duration_seconds_count", labels) == 0
