from __future__ import annotations

import pytest
from rembg_operator.builders import (
    ServiceRef,
    build_hpa,
    build_pdb,
    build_scaled_object,
    plan_pools,
)
from rembg_operator.builders.autoscaling import quantity
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.models import RembgServiceSpec

from tests.operator.conftest import make_spec


def _plan(spec: RembgServiceSpec, pool: str) -> PoolPlan:
    return next(p for p in plan_pools(spec, gpu_capacity=8) if p.name == pool)


@pytest.mark.parametrize(
    ("value", "text"), [(4, "4"), (4.0, "4"), (2.5, "2500m"), (0.1, "100m"), (1.25, "1250m")]
)
def test_quantity(value: float, text: str) -> None:
    assert quantity(value) == text


def test_hpa_targets_the_pool_deployment(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"minReplicas": 2, "maxReplicas": 7})
    hpa = build_hpa(ref, spec, _plan(spec, "cpu"))
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["metadata"]["name"] == "demo-cpu"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "demo-cpu",
    }
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 7


def test_hpa_pods_metrics_for_queue_depth_and_latency(ref: ServiceRef) -> None:
    spec = make_spec(
        cpu={}, autoscaling={"targetQueueDepthPerPod": 6, "targetLatencyP95Seconds": 1.5}
    )
    metrics = build_hpa(ref, spec, _plan(spec, "cpu"))["spec"]["metrics"]
    assert [m["type"] for m in metrics] == ["Pods", "Pods"]
    assert metrics[0]["pods"]["metric"]["name"] == "rembg_pending_requests"
    assert metrics[0]["pods"]["target"] == {"type": "AverageValue", "averageValue": "6"}
    assert metrics[1]["pods"]["metric"]["name"] == "rembg_request_duration_seconds_p95"
    assert metrics[1]["pods"]["target"]["averageValue"] == "1500m"


def test_hpa_without_latency_target(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, autoscaling={"targetLatencyP95Seconds": None})
    metrics = build_hpa(ref, spec, _plan(spec, "cpu"))["spec"]["metrics"]
    assert len(metrics) == 1


def test_hpa_behaviour_stabilisation(ref: ServiceRef) -> None:
    spec = make_spec(
        cpu={},
        autoscaling={
            "scaleUp": {
                "stabilizationWindowSeconds": 30,
                "maxPercent": 200,
                "maxPods": 5,
                "periodSeconds": 20,
            },
            "scaleDown": {"stabilizationWindowSeconds": 600, "maxPercent": 10, "maxPods": 1},
        },
    )
    behavior = build_hpa(ref, spec, _plan(spec, "cpu"))["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 30
    assert behavior["scaleUp"]["selectPolicy"] == "Max"
    assert behavior["scaleUp"]["policies"] == [
        {"type": "Percent", "value": 200, "periodSeconds": 20},
        {"type": "Pods", "value": 5, "periodSeconds": 20},
    ]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    assert behavior["scaleDown"]["selectPolicy"] == "Min"
    assert behavior["scaleDown"]["policies"][0]["periodSeconds"] == 60


def test_default_behaviour_scales_up_fast_and_down_slowly(ref: ServiceRef) -> None:
    spec = make_spec(cpu={})
    behavior = build_hpa(ref, spec, _plan(spec, "cpu"))["spec"]["behavior"]
    assert behavior["scaleUp"]["stabilizationWindowSeconds"] == 0
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_hpa_min_is_at_least_one(ref: ServiceRef) -> None:
    spec = make_spec(gpu={"minReplicas": 0, "maxReplicas": 2})
    assert build_hpa(ref, spec, _plan(spec, "gpu"))["spec"]["minReplicas"] == 1


def test_scaled_object(ref: ServiceRef) -> None:
    spec = make_spec(
        gpu={"minReplicas": 0, "maxReplicas": 3},
        autoscaling={
            "engine": "keda",
            "targetQueueDepthPerPod": 3,
            "targetLatencyP95Seconds": 2,
            "keda": {"prometheusAddress": "http://prom:9090", "pollingIntervalSeconds": 5},
        },
    )
    scaled = build_scaled_object(ref, spec, _plan(spec, "gpu"))
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["kind"] == "ScaledObject"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "demo-gpu"
    assert scaled["spec"]["minReplicaCount"] == 0
    assert scaled["spec"]["maxReplicaCount"] == 3
    assert scaled["spec"]["pollingInterval"] == 5
    queue, latency = scaled["spec"]["triggers"]
    assert queue["type"] == latency["type"] == "prometheus"
    assert queue["metricType"] == "AverageValue"
    assert latency["metricType"] == "Value"
    assert queue["metadata"]["serverAddress"] == "http://prom:9090"
    assert queue["metadata"]["threshold"] == "3"
    selector = 'namespace="team-a",rembg_service="demo",pool="gpu"'
    assert queue["metadata"]["query"] == f"sum(rembg_pending_requests{{{selector}}})"
    assert selector in latency["metadata"]["query"]
    assert "histogram_quantile(0.95" in latency["metadata"]["query"]
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300


@pytest.mark.parametrize(
    ("availability", "budget"),
    [
        ({}, {"maxUnavailable": 1}),
        ({"maxUnavailable": 2}, {"maxUnavailable": 2}),
        ({"maxUnavailable": "25%"}, {"maxUnavailable": "25%"}),
        ({"minAvailable": 1}, {"minAvailable": 1}),
        ({"minAvailable": "50%"}, {"minAvailable": "50%"}),
    ],
)
def test_pdb_budget(
    ref: ServiceRef, availability: dict[str, object], budget: dict[str, object]
) -> None:
    spec = make_spec(cpu={}, availability=availability)
    pdb = build_pdb(ref, spec, _plan(spec, "cpu"))
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["metadata"]["name"] == "demo-cpu"
    assert {
        k: v for k, v in pdb["spec"].items() if k in ("minAvailable", "maxUnavailable")
    } == budget
    assert pdb["spec"]["selector"]["matchLabels"]["rembg.io/pool"] == "cpu"
    assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
