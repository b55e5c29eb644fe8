from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from rembg_operator.builders import Capabilities, ServiceRef, build_children, plan_pools
from rembg_operator.models import RembgServiceSpec, semantic_problems

from tests.operator.conftest import make_spec

ALL = Capabilities(prometheus_operator=True, keda=True, gpu_capacity=4)


def _kinds(manifests: list[dict[str, Any]]) -> Counter[str]:
    return Counter(m["kind"] for m in manifests)


def test_two_pools_with_everything(ref: ServiceRef) -> None:
    desired = build_children(ref, make_spec(cpu={}, gpu={}), ALL)
    assert _kinds(desired.manifests) == {
        "Deployment": 2,
        "Service": 1,
        "HorizontalPodAutoscaler": 2,
        "PodDisruptionBudget": 2,
        "ServiceMonitor": 1,
        "PrometheusRule": 1,
    }
    assert desired.skipped == []
    names = {(m["kind"], m["metadata"]["name"]) for m in desired.manifests}
    assert ("Deployment", "demo-gpu") in names
    assert ("Service", "demo") in names


def test_every_child_is_labelled_and_namespaced(ref: ServiceRef) -> None:
    for manifest in build_children(ref, make_spec(cpu={}, gpu={}), ALL).manifests:
        assert manifest["metadata"]["namespace"] == "team-a"
        labels = manifest["metadata"]["labels"]
        assert labels["app.kubernetes.io/managed-by"] == "rembg-operator"
        assert labels["rembg.io/service"] == "demo"


def test_autoscaled_deployments_leave_replicas_to_the_hpa(ref: ServiceRef) -> None:
    desired = build_children(ref, make_spec(cpu={"replicas": 2}), ALL)
    (deployment,) = [m for m in desired.manifests if m["kind"] == "Deployment"]
    assert "replicas" not in deployment["spec"]


def test_autoscaling_disabled_pins_replicas(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"replicas": 2, "maxReplicas": 3}, autoscaling={"enabled": False})
    desired = build_children(ref, spec, ALL)
    kinds = _kinds(desired.manifests)
    assert "HorizontalPodAutoscaler" not in kinds
    assert "ScaledObject" not in kinds
    (deployment,) = [m for m in desired.manifests if m["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2


def test_keda_engine(ref: ServiceRef) -> None:
    desired = build_children(ref, make_spec(cpu={}, autoscaling={"engine": "keda"}), ALL)
    assert _kinds(desired.manifests)["ScaledObject"] == 1
    assert "HorizontalPodAutoscaler" not in _kinds(desired.manifests)


def test_keda_missing_pins_replicas_and_says_so(ref: ServiceRef) -> None:
    caps = Capabilities(prometheus_operator=True, keda=False)
    spec = make_spec(cpu={"minReplicas": 2, "maxReplicas": 4}, autoscaling={"engine": "keda"})
    desired = build_children(ref, spec, caps)
    assert "ScaledObject" not in _kinds(desired.manifests)
    (deployment,) = [m for m in desired.manifests if m["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2
    assert [(s.kind, s.reason) for s in desired.skipped] == [("ScaledObject", "KedaNotInstalled")]


def test_monitoring_crds_missing(ref: ServiceRef) -> None:
    caps = Capabilities(prometheus_operator=False, keda=False, gpu_capacity=1)
    desired = build_children(ref, make_spec(cpu={}), caps)
    kinds = _kinds(desired.manifests)
    assert "ServiceMonitor" not in kinds
    assert "PrometheusRule" not in kinds
    assert kinds["Deployment"] == 1
    assert {(s.kind, s.reason) for s in desired.skipped} == {
        ("ServiceMonitor", "CrdMissing"),
        ("PrometheusRule", "CrdMissing"),
    }


def test_monitoring_disabled_is_not_reported_missing(ref: ServiceRef) -> None:
    caps = Capabilities(prometheus_operator=False)
    desired = build_children(ref, make_spec(cpu={}, monitoring={"enabled": False}), caps)
    assert desired.skipped == []
    assert "ServiceMonitor" not in _kinds(desired.manifests)


def test_pdb_disabled(ref: ServiceRef) -> None:
    desired = build_children(ref, make_spec(cpu={}, availability={"pdbEnabled": False}), ALL)
    assert "PodDisruptionBudget" not in _kinds(desired.manifests)


@pytest.mark.parametrize("capacity", [None, 1, 8])
def test_no_fallback_while_gpus_exist_or_unknown(capacity: int | None) -> None:
    spec = make_spec(
        gpu={"minReplicas": 2, "maxReplicas": 3}, fallback={"cpuPoolWhenNoGpuNodes": True}
    )
    plans = plan_pools(spec, gpu_capacity=capacity)
    assert [p.name for p in plans] == ["gpu"]


def test_fallback_creates_a_cpu_pool_when_no_gpu_nodes() -> None:
    spec = make_spec(
        gpu={"minReplicas": 2, "maxReplicas": 3}, fallback={"cpuPoolWhenNoGpuNodes": True}
    )
    gpu, cpu = plan_pools(spec, gpu_capacity=0)
    assert gpu.name == "gpu"
    assert cpu.name == "cpu"
    assert cpu.min_replicas == 2
    assert cpu.max_replicas == 3
    assert cpu.fallback_replicas == 2
    assert cpu.provider == "cpu"


def test_fallback_grows_an_existing_cpu_pool() -> None:
    spec = make_spec(
        gpu={"minReplicas": 2},
        cpu={"minReplicas": 1, "maxReplicas": 4},
        fallback={"cpuPoolWhenNoGpuNodes": True},
    )
    _, cpu = plan_pools(spec, gpu_capacity=0)
    assert cpu.min_replicas == 3
    assert cpu.max_replicas == 6
    assert cpu.fixed_replicas == 3


def test_fallback_off_by_default() -> None:
    spec = make_spec(gpu={"minReplicas": 2})
    assert [p.name for p in plan_pools(spec, gpu_capacity=0)] == ["gpu"]


def test_hpa_follows_fallback_bounds(ref: ServiceRef) -> None:
    spec = make_spec(
        gpu={"minReplicas": 1},
        cpu={"minReplicas": 1, "maxReplicas": 2},
        fallback={"cpuPoolWhenNoGpuNodes": True},
    )
    desired = build_children(ref, spec, Capabilities(gpu_capacity=0))
    hpa = next(
        m
        for m in desired.manifests
        if m["kind"] == "HorizontalPodAutoscaler" and m["metadata"]["name"] == "demo-cpu"
    )
    assert hpa["spec"]["minReplicas"] == 2
    assert hpa["spec"]["maxReplicas"] == 3


def test_examples_build(ref: ServiceRef) -> None:
    examples = sorted((Path(__file__).parents[2] / "examples").glob("*.yaml"))
    found = 0
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "RembgService":
                continue
            spec = RembgServiceSpec.model_validate(doc["spec"])
            assert semantic_problems(spec) == [], path
            assert build_children(ref, spec, ALL).manifests, path
            found += 1
    assert found >= 2


def test_fallback_uses_pinned_gpu_replicas_without_autoscaling() -> None:
    spec = make_spec(
        gpu={"replicas": 2, "minReplicas": 1, "maxReplicas": 2},
        autoscaling={"enabled": False},
        fallback={"cpuPoolWhenNoGpuNodes": True},
    )
    _, cpu = plan_pools(spec, gpu_capacity=0)
    assert cpu.fixed_replicas == 2
    desired = build_children(ServiceRef("demo", "ns"), spec, Capabilities(gpu_capacity=0))
    deployment = next(m for m in desired.manifests if m["metadata"]["name"] == "demo-cpu")
    assert deployment["spec"]["replicas"] == 2
