"""The monitoring stack's manifests (pure): upstream manifests moved and re-imaged, the
Prometheus resource's selectors, the Alertmanager endpoint, and the test routing of the
Alertmanager example."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from rembg_devcluster.kube import load_manifests
from rembg_devcluster.monitoring import (
    SELECTOR_LABELS,
    MonitoringImages,
    build_alertmanager_endpoint,
    build_kube_state_metrics_manifests,
    build_operator_manifests,
    build_prometheus,
    in_namespace,
    route_to_sink,
)

REPO = Path(__file__).resolve().parents[2]
IMAGES = MonitoringImages(
    operator="localhost/rembg-fleet/prometheus-operator:v0.85.0",
    prometheus="localhost/rembg-fleet/prometheus:v3.15.1",
    reloader="localhost/rembg-fleet/prometheus-config-reloader:v0.85.0",
    kube_state_metrics="localhost/rembg-fleet/kube-state-metrics:v2.18.0",
)


def _deployment(name: str, args: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "template": {"spec": {"containers": [{"name": name, "image": "x", "args": args}]}}
        },
    }


# The shapes of the upstream files build-binaries.sh copies (trimmed).
OPERATOR_UPSTREAM = [
    {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "prometheus-operator", "namespace": "default"},
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "prometheus-operator"},
        "subjects": [
            {"kind": "ServiceAccount", "name": "prometheus-operator", "namespace": "default"}
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "prometheus-operator"},
    },
    _deployment("prometheus-operator", ["--kubelet-service=kube-system/kubelet"]),
    {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {
            "name": "prometheus-operator",
            "namespace": "default",
            "labels": {"app": "po"},
        },
    },
]
KSM_UPSTREAM = [
    _deployment("kube-state-metrics", []),
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": "kube-state-metrics",
            "namespace": "kube-system",
            "labels": {"app.kubernetes.io/name": "kube-state-metrics"},
        },
    },
]


def test_upstream_manifests_move_to_the_namespace_with_their_binding_subjects() -> None:
    moved = in_namespace(OPERATOR_UPSTREAM, "monitoring")
    namespaced = [m for m in moved if m["kind"] not in {"ClusterRole", "ClusterRoleBinding"}]
    assert {m["metadata"]["namespace"] for m in namespaced} == {"monitoring"}
    binding = next(m for m in moved if m["kind"] == "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "monitoring"
    assert "namespace" not in next(m for m in moved if m["kind"] == "ClusterRole")["metadata"]
    assert OPERATOR_UPSTREAM[0]["metadata"]["namespace"] == "default", "the input is untouched"


def test_the_operator_runs_our_images_in_every_namespace_without_the_kubelet_service() -> None:
    manifests = build_operator_manifests(OPERATOR_UPSTREAM, IMAGES)
    deployment = next(m for m in manifests if m["kind"] == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == IMAGES.operator
    assert container["imagePullPolicy"] == "Never"
    assert f"--prometheus-config-reloader={IMAGES.reloader}" in container["args"]
    assert not any(a.startswith(("--kubelet-service", "--namespaces")) for a in container["args"])
    monitor = next(m for m in manifests if m["kind"] == "ServiceMonitor")
    assert monitor["metadata"]["labels"] == {"app": "po", **SELECTOR_LABELS}


def test_kube_state_metrics_gets_a_selected_service_monitor_honouring_its_labels() -> None:
    manifests = build_kube_state_metrics_manifests(KSM_UPSTREAM, IMAGES, "5s")
    monitor = manifests[-1]
    assert monitor["kind"] == "ServiceMonitor"
    assert SELECTOR_LABELS.items() <= monitor["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    # Its series name the objects' namespaces: the target's own must not overwrite them.
    assert endpoint == {"port": "http-metrics", "honorLabels": True, "interval": "5s"}
    deployment = manifests[0]
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == (
        IMAGES.kube_state_metrics
    )


def test_prometheus_selects_by_release_label_in_every_namespace() -> None:
    prometheus = build_prometheus(IMAGES, "5s", "5s")["spec"]
    for kind in ("serviceMonitor", "rule"):
        assert prometheus[f"{kind}Selector"] == {"matchLabels": SELECTOR_LABELS}
        assert prometheus[f"{kind}NamespaceSelector"] == {}, "{} is every namespace"
    assert prometheus["version"] == "v3.15.1"
    assert prometheus["imagePullPolicy"] == "Never"
    assert prometheus["securityContext"]["runAsNonRoot"] is True
    assert prometheus["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (alertmanager,) = prometheus["alerting"]["alertmanagers"]
    assert alertmanager["name"] == "alertmanager"


def test_the_alertmanager_service_points_at_the_host_address() -> None:
    service, endpoints = build_alertmanager_endpoint("10.213.0.1", 9093)
    assert "selector" not in service["spec"], "a selector would make the controller own it"
    assert (
        endpoints["metadata"]["labels"]["kubernetes.io/service-name"] == service["metadata"]["name"]
    )
    assert endpoints["endpoints"] == [{"addresses": ["10.213.0.1"], "conditions": {"ready": True}}]
    assert endpoints["ports"] == [{"name": "web", "port": 9093, "protocol": "TCP"}]


def test_route_to_sink_changes_only_urls_and_timings_of_the_example() -> None:
    example = yaml.safe_load((REPO / "examples" / "monitoring" / "alertmanager.yaml").read_text())
    routed = route_to_sink(example, "http://127.0.0.1:1234", "2s", "5s")
    assert [w["url"] for r in routed["receivers"] for w in r["webhook_configs"]] == [
        f"http://127.0.0.1:1234/{r['name']}" for r in example["receivers"]
    ]
    assert routed["route"]["group_wait"] == "2s"
    assert routed["route"]["group_interval"] == "5s"
    assert routed["inhibit_rules"] == example["inhibit_rules"]
    assert routed["route"]["routes"] == example["route"]["routes"]
    assert example["route"]["group_wait"] == "30s", "the example itself is untouched"


def test_manifests_with_a_bare_equals_sign_load_as_kubernetes_reads_them() -> None:
    # The Prometheus Operator's CRDs list "=" in an enum; plain PyYAML refuses it.
    (doc,) = load_manifests("kind: X\nenum:\n  - =\n  - '!='\n---\n")
    assert doc["enum"] == ["=", "!="]
    with pytest.raises(yaml.constructor.ConstructorError):
        list(yaml.safe_load_all("enum:\n  - =\n"))
