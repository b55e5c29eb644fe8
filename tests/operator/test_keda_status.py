"""KEDA's own verdict on each pool's ScaledObject in the RembgService status: per pool in
status.pools.<pool>.autoscaler, and as the AutoscalingAvailable condition; Ready stays about
pods serving."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from rembg_operator import crdgen
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.builders.children import Skipped
from rembg_operator.models import RembgServiceSpec
from rembg_operator.reconciler import merge_patch
from rembg_operator.state import essence, slim_scaled_object
from rembg_operator.status import (
    Observation,
    PoolObservation,
    ScaledObjectObservation,
    build_status,
    conditions_from,
)

from tests.operator import keda_objects as keda

NOW = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC)
READY_DEPLOYMENT = {
    "metadata": {"generation": 1},
    "spec": {"replicas": 1},
    "status": {
        "observedGeneration": 1,
        "readyReplicas": 1,
        "updatedReplicas": 1,
        "availableReplicas": 1,
    },
}


def keda_pool(pool: str, scaled_object: dict[str, Any] | None) -> PoolObservation:
    """A pool whose pods all serve, scaled by the ScaledObject `demo-<pool>` (None: unseen)."""
    name = f"demo-{pool}"
    return PoolObservation.from_deployment(
        pool,
        READY_DEPLOYMENT,
        scaled_object=ScaledObjectObservation.from_scaled_object(name, scaled_object),
    )


def observe(*pools: PoolObservation, engine: str = "keda") -> Observation:
    return Observation(
        generation=2, endpoint="http://demo.ns.svc:80", pools=pools, autoscaling_engine=engine
    )


def autoscaling(observed: Observation) -> dict[str, Any]:
    found = {c["type"]: c for c in conditions_from(observed, [], NOW)}
    ready = found["Ready"]
    # Pods serve in every case here: KEDA's verdict never changes Ready.
    assert (ready["status"], ready["reason"]) == ("True", "AllPoolsReady")
    return found["AutoscalingAvailable"]


def test_a_keda_pool_reports_its_scaled_object_in_kedas_words() -> None:
    observed = observe(keda_pool("cpu", keda.slim(keda.ready(active=True))))
    assert build_status(observed, None, NOW)["pools"]["cpu"]["autoscaler"] == keda.READY_AND_ACTIVE


def test_a_scaled_object_not_ready_carries_kedas_reason_and_message() -> None:
    observed = observe(keda_pool("cpu", keda.slim(keda.check_failed())))
    autoscaler = build_status(observed, None, NOW)["pools"]["cpu"]["autoscaler"]
    assert autoscaler["ready"] == "False"
    assert autoscaler["active"] == "Unknown"
    assert autoscaler["reason"] == "ScaledObjectCheckFailed"
    assert autoscaler["message"] == keda.CHECK_FAILED


def test_a_scaled_object_keda_never_touched_reports_unknown_and_no_hpa() -> None:
    autoscaler = build_status(observe(keda_pool("cpu", None)), None, NOW)["pools"]["cpu"][
        "autoscaler"
    ]
    assert autoscaler == {
        "kind": "ScaledObject",
        "name": "demo-cpu",
        "ready": "Unknown",
        "active": "Unknown",
        "fallback": "Unknown",
        "paused": "Unknown",
    }


def test_hpa_pools_report_no_autoscaler_object_and_stay_created() -> None:
    observed = observe(PoolObservation.from_deployment("cpu", READY_DEPLOYMENT), engine="hpa")
    assert "autoscaler" not in build_status(observed, None, NOW)["pools"]["cpu"]
    condition = autoscaling(observed)
    assert (condition["status"], condition["reason"]) == ("True", "Created")


def test_autoscaling_is_available_once_keda_says_every_scaled_object_is_ready() -> None:
    condition = autoscaling(
        observe(
            keda_pool("gpu", keda.slim(keda.ready(), name="demo-gpu")),
            keda_pool("cpu", keda.slim(keda.ready(active=True))),
        )
    )
    assert (condition["status"], condition["reason"]) == ("True", "KedaReady")
    assert "demo-gpu (pool gpu)" in condition["message"]
    assert "demo-cpu (pool cpu)" in condition["message"]


def test_one_scaled_object_keda_calls_not_ready_makes_autoscaling_unavailable() -> None:
    condition = autoscaling(
        observe(
            keda_pool("gpu", keda.slim(keda.ready(), name="demo-gpu")),
            keda_pool("cpu", keda.slim(keda.check_failed())),
        )
    )
    assert (condition["status"], condition["reason"]) == ("False", "KedaNotReady")
    assert condition["message"] == f"pool cpu: ScaledObject demo-cpu: {keda.CHECK_FAILED}"


def test_a_scaled_object_keda_has_not_judged_is_waiting_for_keda() -> None:
    for unjudged in (None, keda.slim(keda.initialized()), keda.slim([])):
        condition = autoscaling(
            observe(
                keda_pool("gpu", keda.slim(keda.ready(), name="demo-gpu")),
                keda_pool("cpu", unjudged),
            )
        )
        assert (condition["status"], condition["reason"]) == ("Unknown", "WaitingForKeda")
        assert "demo-cpu (pool cpu)" in condition["message"]
        assert "demo-gpu" not in condition["message"]


def test_a_not_ready_verdict_wins_over_one_still_waiting() -> None:
    condition = autoscaling(
        observe(
            keda_pool("gpu", None),
            keda_pool("cpu", keda.slim(keda.check_failed())),
        )
    )
    assert condition["reason"] == "KedaNotReady"


def test_a_verdict_on_an_older_generation_of_the_scaled_object_is_waiting() -> None:
    stale = keda.slim(keda.ready(), generation=3, observed=2)
    assert autoscaling(observe(keda_pool("cpu", stale)))["reason"] == "WaitingForKeda"
    current = keda.slim(keda.ready(), generation=3, observed=3)
    assert autoscaling(observe(keda_pool("cpu", current)))["reason"] == "KedaReady"


def test_keda_not_installed_and_disabled_keep_their_reasons() -> None:
    missing = Observation(
        generation=1,
        endpoint="e",
        pools=[PoolObservation.from_deployment("cpu", READY_DEPLOYMENT)],
        autoscaling_engine="keda",
        skipped=[Skipped("ScaledObject", "demo-cpu", "KedaNotInstalled", "no keda")],
    )
    assert autoscaling(missing)["reason"] == "KedaNotInstalled"
    off = Observation(
        generation=1,
        endpoint="e",
        pools=[PoolObservation.from_deployment("cpu", READY_DEPLOYMENT)],
        autoscaling_engine="keda",
        autoscaling_enabled=False,
    )
    assert autoscaling(off)["reason"] == "Disabled"


def test_the_slim_copy_keeps_what_status_reads_of_a_scaled_object() -> None:
    body = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "demo-cpu", "generation": 4, "managedFields": [{"x": 1}]},
        "spec": {"triggers": [{"type": "prometheus"}]},
        "status": {
            **keda.status(keda.ready()),
            "externalMetricNames": ["s0-prometheus"],
            "observedGeneration": 4,
        },
    }
    assert slim_scaled_object(body) == {
        "name": "demo-cpu",
        "generation": 4,
        "conditions": keda.ready(),
        "hpaName": "keda-demo-cpu",
        "observedGeneration": 4,
    }
    observed = ScaledObjectObservation.from_scaled_object("demo-cpu", slim_scaled_object(body))
    assert (observed.ready, observed.active, observed.hpa) == ("True", "False", "keda-demo-cpu")


def test_the_hpa_keda_reports_is_the_one_the_operator_names() -> None:
    """status.hpaName is KEDA's default (keda-hpa-<name>) unless the ScaledObject names it:
    build_scaled_object does, so the fixtures' keda-<name> is what KEDA reports."""
    spec = RembgServiceSpec.model_validate({"cpu": {}, "autoscaling": {"engine": "keda"}})
    desired = build_children(ServiceRef("demo", "ns"), spec, Capabilities(keda=True))
    (scaled,) = [m for m in desired.manifests if m["kind"] == "ScaledObject"]
    hpa = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["name"]
    assert hpa == keda.status([])["hpaName"] == "keda-demo-cpu"


def test_kedas_own_label_on_a_scaled_object_is_not_an_edit() -> None:
    applied = {
        "apiVersion": "keda.sh/v1alpha1",
        "kind": "ScaledObject",
        "metadata": {"name": "demo-cpu", "labels": {"app.kubernetes.io/managed-by": "x"}},
        "spec": {"minReplicaCount": 1},
    }
    labelled = {
        **applied,
        "metadata": {
            "name": "demo-cpu",
            "labels": {
                "app.kubernetes.io/managed-by": "x",
                "scaledobject.keda.sh/name": "demo-cpu",
            },
        },
        "status": keda.status(keda.ready()),
    }
    assert essence(labelled) == essence(applied)
    relabelled = {**applied, "metadata": {"name": "demo-cpu", "labels": {"team": "y"}}}
    assert essence(relabelled) != essence(applied)


def test_merge_patch_removes_the_autoscalers_message_once_keda_says_ready() -> None:
    before = build_status(observe(keda_pool("cpu", keda.slim(keda.check_failed()))), None, NOW)
    after = build_status(observe(keda_pool("cpu", keda.slim(keda.ready()))), before, NOW)
    patch = merge_patch(before, after)
    autoscaler = patch["pools"]["cpu"]["autoscaler"]
    assert autoscaler["message"] is None
    assert autoscaler["reason"] is None
    assert autoscaler["ready"] == "True"


def test_every_autoscaler_field_status_writes_is_in_the_crd_schema() -> None:
    """The API server prunes status fields its schema does not name."""
    status = build_status(observe(keda_pool("cpu", keda.slim(keda.check_failed()))), None, NOW)
    schema = crdgen.status_schema()["properties"]["pools"]["additionalProperties"]
    autoscaler = schema["properties"]["autoscaler"]
    assert set(status["pools"]["cpu"]["autoscaler"]) <= set(autoscaler["properties"])
    assert {"hpa", "reason", "message"} <= set(autoscaler["properties"])
    assert autoscaler["properties"]["ready"]["enum"] == ["True", "False", "Unknown"]
