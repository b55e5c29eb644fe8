"""Pure helpers of the pipeline, the API module and the kopf settings (no cluster)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import kopf
import pytest
from rembg_operator.kube import (
    RESOURCES,
    ApiError,
    KubeClient,
    _json_or_none,
    _payload_of,
    build_event,
    gpu_capacity_of,
    resource_path,
)
from rembg_operator.rbac import RULES, build_cluster_role, build_namespaced_roles
from rembg_operator.reconciler import merge_patch, parse_spec
from rembg_operator.settings import Settings
from rembg_operator.startup import configure_kopf
from rembg_operator.state import essence


def test_parse_spec_valid() -> None:
    spec, problems = parse_spec({"cpu": {}})
    assert spec is not None
    assert problems == []


def test_parse_spec_reports_schema_errors_with_paths() -> None:
    spec, problems = parse_spec({"cpu": {"minReplicas": "many"}})
    assert spec is None
    assert problems
    assert problems[0].startswith("cpu.minReplicas")


def test_parse_spec_reports_semantic_problems() -> None:
    spec, problems = parse_spec({"cpu": {}, "models": ["nope"]})
    assert spec is not None
    assert "unknown model(s) nope" in problems[0]


def _deployment(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "demo-cpu",
            "namespace": "ns",
            "labels": {"a": "b"},
            "annotations": {"deployment.kubernetes.io/revision": "1"},
            "resourceVersion": "10",
            "generation": 1,
            "managedFields": [{"manager": "x"}],
        },
        "spec": {"replicas": 1, "template": {"spec": {"containers": [{"image": "a"}]}}},
        "status": {"readyReplicas": 0},
    }
    body.update(changes)
    return body


def test_essence_ignores_status_and_server_bookkeeping() -> None:
    base = essence(_deployment())
    same = _deployment(status={"readyReplicas": 5})
    same["metadata"] = {
        **same["metadata"],  # type: ignore[dict-item]
        "resourceVersion": "99",
        "generation": 7,
        "managedFields": [],
        "annotations": {"deployment.kubernetes.io/revision": "2"},
    }
    assert essence(same) == base


@pytest.mark.parametrize(
    "change",
    [
        {"spec": {"replicas": 1, "template": {"spec": {"containers": [{"image": "evil"}]}}}},
        {"spec": {"replicas": 3, "template": {"spec": {"containers": [{"image": "a"}]}}}},
    ],
)
def test_essence_sees_spec_edits(change: dict[str, object]) -> None:
    assert essence(_deployment(**change)) != essence(_deployment())


def test_essence_sees_label_and_annotation_edits() -> None:
    labelled = _deployment()
    labelled["metadata"] = {**labelled["metadata"], "labels": {"a": "c"}}  # type: ignore[dict-item]
    assert essence(labelled) != essence(_deployment())
    annotated = _deployment()
    annotated["metadata"] = {**annotated["metadata"], "annotations": {"x": "y"}}  # type: ignore[dict-item]
    assert essence(annotated) != essence(_deployment())


def test_merge_patch_removes_vanished_keys_and_pools() -> None:
    previous = {
        "pools": {"gpu": {"readyReplicas": 1}, "cpu": {"readyReplicas": 1}},
        "gpuCapacity": 4,
        "model": "u2netp",
    }
    status = {"pools": {"cpu": {"readyReplicas": 2}}, "model": "u2net"}
    patch = merge_patch(previous, status)
    assert patch["pools"] == {"gpu": None, "cpu": {"readyReplicas": 2}}
    assert patch["gpuCapacity"] is None
    assert patch["model"] == "u2net"


def test_merge_patch_from_nothing() -> None:
    assert merge_patch(None, {"pools": {}, "model": "m"}) == {"pools": {}, "model": "m"}


@pytest.mark.parametrize(
    ("args", "path"),
    [
        (("apps/v1", "Deployment", "ns", "x"), "/apis/apps/v1/namespaces/ns/deployments/x"),
        (("v1", "Service", "ns", "x"), "/api/v1/namespaces/ns/services/x"),
        (("v1", "Node"), "/api/v1/nodes"),
        (
            ("rembg.io/v1alpha1", "RembgService", "ns", "d"),
            "/apis/rembg.io/v1alpha1/namespaces/ns/rembgservices/d",
        ),
        (
            ("monitoring.coreos.com/v1", "PrometheusRule", "ns", "d"),
            "/apis/monitoring.coreos.com/v1/namespaces/ns/prometheusrules/d",
        ),
        (("v1", "Event", "ns"), "/api/v1/namespaces/ns/events"),
    ],
)
def test_resource_path(args: tuple[str, ...], path: str) -> None:
    assert resource_path(*args) == path


def test_resource_path_refuses_unknown_kinds() -> None:
    with pytest.raises(KeyError):
        resource_path("batch/v1", "Job", "ns", "x")


def test_gpu_capacity_of_nodes() -> None:
    nodes: list[dict[str, Any]] = [
        {"status": {"allocatable": {"nvidia.com/gpu": "4"}}},
        {"status": {"allocatable": {"nvidia.com/gpu": "2"}}, "spec": {"unschedulable": True}},
        {"status": {"allocatable": {"cpu": "16"}}},
        {"status": {"allocatable": {"nvidia.com/gpu": 1}}},
        {},
    ]
    assert gpu_capacity_of(nodes) == 5
    assert gpu_capacity_of([]) == 0


def test_api_error() -> None:
    error = ApiError(404, "NotFound", "gone")
    assert error.not_found
    assert "404 NotFound: gone" in str(error)
    assert not ApiError(422, "Invalid", "x").not_found


def test_rbac_covers_every_kind_the_operator_writes() -> None:
    granted = {
        (rule.api_group, resource): set(rule.verbs) for rule in RULES for resource in rule.resources
    }
    for (api_version, _kind), (plural, _namespaced) in RESOURCES.items():
        group = api_version.rsplit("/", 1)[0] if "/" in api_version else ""
        assert (group, plural) in granted, plural
    for key in (
        ("apps", "deployments"),
        ("", "services"),
        ("autoscaling", "horizontalpodautoscalers"),
        ("policy", "poddisruptionbudgets"),
        ("monitoring.coreos.com", "servicemonitors"),
        ("monitoring.coreos.com", "prometheusrules"),
        ("keda.sh", "scaledobjects"),
    ):
        assert {"list", "watch", "create", "patch", "delete"} <= granted[key], key
    assert "patch" in granted[("rembg.io", "rembgservices/status")]
    assert "update" in granted[("rembg.io", "rembgservices/finalizers")]
    assert granted[("", "nodes")] == {"list"}
    assert granted[("", "events")] == {"create"}


def test_rbac_api_groups_never_carry_a_version() -> None:
    # kopf's example RBAC puts "group/version" into apiGroups: invalid. Ours must not.
    for rule in build_cluster_role()["rules"]:
        for group in rule["apiGroups"]:
            assert "/" not in group


def test_namespaced_roles_split_cluster_scoped_rules() -> None:
    role, cluster_role = build_namespaced_roles()
    assert role["kind"] == "Role"
    cluster_resources = {r for rule in cluster_role["rules"] for r in rule["resources"]}
    assert cluster_resources == {"nodes", "namespaces", "customresourcedefinitions"}
    namespaced = {r for rule in role["rules"] for r in rule["resources"]}
    assert "deployments" in namespaced
    assert "nodes" not in namespaced


def test_json_or_none() -> None:
    assert _json_or_none(b"") == {}
    assert _json_or_none(b'{"a": 1}') == {"a": 1}
    assert _json_or_none(b"404 page not found") is None
    assert _json_or_none(b"[1]") is None


def test_payload_of_returns_the_json_object_of_a_2xx_answer() -> None:
    assert _payload_of(200, "OK", b'{"kind": "Deployment"}') == {"kind": "Deployment"}
    assert _payload_of(201, "Created", b"") == {}


def test_payload_of_raises_the_status_reason_and_message_of_an_error() -> None:
    body = b'{"kind": "Status", "reason": "Invalid", "message": "spec.replicas: bad"}'
    with pytest.raises(ApiError) as raised:
        _payload_of(422, "Unprocessable Entity", body)
    assert (raised.value.status, raised.value.reason, raised.value.message) == (
        422,
        "Invalid",
        "spec.replicas: bad",
    )


def test_payload_of_quotes_a_plain_text_error_body() -> None:
    with pytest.raises(ApiError) as raised:
        _payload_of(404, "Not Found", b"404 page not found")
    assert (raised.value.reason, raised.value.message) == ("Not Found", "404 page not found")


def test_payload_of_refuses_a_2xx_body_that_is_not_a_json_object() -> None:
    with pytest.raises(ApiError, match="BadResponse: not JSON"):
        _payload_of(200, "OK", b"[1]")


def _owner() -> dict[str, Any]:
    return {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": "demo", "namespace": "team-a", "uid": "u-1", "resourceVersion": "7"},
    }


def test_build_event_names_its_owner_and_stamps_both_times() -> None:
    now = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    event = build_event(_owner(), warning=True, reason="Degraded", message="oom", now=now)
    assert event == {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "demo.", "namespace": "team-a"},
        "involvedObject": {
            "apiVersion": "rembg.io/v1alpha1",
            "kind": "RembgService",
            "name": "demo",
            "namespace": "team-a",
            "uid": "u-1",
            "resourceVersion": "7",
        },
        "reason": "Degraded",
        "message": "oom",
        "type": "Warning",
        "source": {"component": "rembg-operator"},
        "reportingComponent": "rembg-operator",
        "reportingInstance": "rembg-operator",
        "firstTimestamp": "2024-05-06T07:08:09Z",
        "lastTimestamp": "2024-05-06T07:08:09Z",
        "count": 1,
    }


def test_build_event_is_normal_unless_warning_and_cuts_long_messages() -> None:
    now = datetime(2024, 5, 6, tzinfo=UTC)
    event = build_event(_owner(), warning=False, reason="Ready", message="x" * 2000, now=now)
    assert event["type"] == "Normal"
    assert event["message"] == "x" * 1024


def test_kopf_settings_bound_every_watch_and_skip_the_diff_base() -> None:
    settings = kopf.OperatorSettings()
    configure_kopf(settings, Settings(metrics_port=0, liveness_port=0))
    assert settings.watching.server_timeout == 300
    assert settings.watching.client_timeout == 330
    assert settings.watching.inactivity_timeout == 90
    # kopf asks the diff-base storage on every event; ours answers without copying the body.
    storage = settings.persistence.diffbase_storage
    body = kopf.Body({"metadata": {"name": "x", "annotations": {"a": "b"}}, "spec": {"big": [1]}})
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None


@pytest.mark.anyio
async def test_list_children_reads_an_empty_metadata_list_and_names_each_item() -> None:
    """Regression: kube-apiserver answers an empty PartialObjectMetadataList with
    "items": null, which failed every audit of a namespace with none of some kind."""
    sent: list[dict[str, Any]] = []
    answers: list[dict[str, Any]] = [
        {"items": None},
        {"items": [{"metadata": {"name": "demo-cpu"}}]},
    ]

    async def request(method: str, path: str, **options: Any) -> dict[str, Any]:
        sent.append({"method": method, "path": path, **options})
        return answers.pop(0)

    client = KubeClient(api=None)  # type: ignore[arg-type]  # request() is replaced below
    client.request = request  # type: ignore[method-assign]
    listed = await client.list_children("apps/v1", "Deployment", "ns", "a=b", metadata_only=True)
    assert listed == []
    listed = await client.list_children("apps/v1", "Deployment", "ns", "a=b", metadata_only=False)
    assert listed == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "demo-cpu"}}
    ]
    assert sent[0]["path"] == "/apis/apps/v1/namespaces/ns/deployments"
    assert sent[0]["query"] == [("labelSelector", "a=b")]
    assert "PartialObjectMetadataList" in sent[0]["accept"]
    assert sent[1]["accept"] == "application/json"
    assert sent[0]["resource"] == "DeploymentList"
