from __future__ import annotations

from typing import Any

import pytest
from rembg_operator import models
from rembg_operator.builders import ServiceRef, build_deployment, build_service, plan_pools
from rembg_operator.builders.plan import PoolPlan
from rembg_operator.builders.workload import (
    require_node_labels,
    termination_grace_seconds,
)
from rembg_operator.models import RembgServiceSpec
from rembg_server.settings import Settings as ServerProcessSettings

from tests.operator.conftest import make_spec


def _plan(spec: RembgServiceSpec, pool: str, gpu_capacity: int | None = 4) -> PoolPlan:
    return next(p for p in plan_pools(spec, gpu_capacity=gpu_capacity) if p.name == pool)


def _deployment(spec: RembgServiceSpec, pool: str, ref: ServiceRef, **kw: Any) -> dict[str, Any]:
    return build_deployment(ref, spec, _plan(spec, pool), manage_replicas=kw.get("manage", False))


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def _env(deployment: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container(deployment)["env"]}


def test_names_namespace_and_labels(ref: ServiceRef) -> None:
    deployment = _deployment(make_spec(cpu={}), "cpu", ref)
    assert deployment["metadata"]["name"] == "demo-cpu"
    assert deployment["metadata"]["namespace"] == "team-a"
    labels = deployment["metadata"]["labels"]
    assert labels["app.kubernetes.io/managed-by"] == "rembg-operator"
    assert labels["app.kubernetes.io/instance"] == "demo"
    assert labels["rembg.io/service"] == "demo"
    assert labels["rembg.io/pool"] == "cpu"


def test_selector_matches_template_labels(ref: ServiceRef) -> None:
    for pool in ("cpu", "gpu"):
        deployment = _deployment(make_spec(cpu={}, gpu={}), pool, ref)
        selector = deployment["spec"]["selector"]["matchLabels"]
        template_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= template_labels.items()
        assert selector["rembg.io/pool"] == pool


def test_user_pod_labels_cannot_override_selector_labels(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"podLabels": {"rembg.io/pool": "evil", "team": "a"}})
    labels = _deployment(spec, "cpu", ref)["spec"]["template"]["metadata"]["labels"]
    assert labels["rembg.io/pool"] == "cpu"
    assert labels["team"] == "a"


def test_probes_cover_warmup_and_use_health_endpoints(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, server={"startupTimeoutSeconds": 300})
    container = _container(_deployment(spec, "cpu", ref))
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert container["livenessProbe"]["httpGet"]["port"] == "http"


def test_drain_prestop_and_grace_period(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, server={"drainSeconds": 15, "requestTimeoutSeconds": 30.5})
    deployment = _deployment(spec, "cpu", ref)
    container = _container(deployment)
    assert container["lifecycle"]["preStop"] == {"sleep": {"seconds": 15}}
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == termination_grace_seconds(spec) == 15 + 31 + 5
    assert grace > 15 + 30.5


def test_no_prestop_without_drain(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, server={"drainSeconds": 0})
    assert "lifecycle" not in _container(_deployment(spec, "cpu", ref))


def test_restricted_security_context(ref: ServiceRef) -> None:
    deployment = _deployment(make_spec(gpu={}), "gpu", ref)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    security = _container(deployment)["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_unset_server_settings_stay_out_of_the_pod_so_the_servers_defaults_apply(
    ref: ServiceRef,
) -> None:
    """Regression: CRD defaults (64 requests, 256 MP, batch 8) were written into every pod,
    overriding the server's own (2 requests per CPU, 200 MP, batch 1); a 2-CPU pod then
    queued 64 1080p requests and was OOMKilled before it answered any 429."""
    spec = make_spec(cpu={"resources": {"limits": {"cpu": "3"}}})
    env = _env(_deployment(spec, "cpu", ref))
    assert env == {
        "REMBG_HOST": "0.0.0.0",
        "REMBG_PORT": "8080",
        "REMBG_MODELS": "u2netp",
        "REMBG_PROVIDER": "cpu",
        "REMBG_ALLOW_CPU_FALLBACK": "false",
    }


def test_an_empty_server_section_leaves_every_tuning_field_unset() -> None:
    spec = make_spec(cpu={}, server={})
    dumped = spec.server.model_dump(exclude={"port", "startup_timeout_seconds", "drain_seconds"})
    tuning = {k: v for k, v in dumped.items() if k not in ("canary", "extra_env")}
    assert tuning
    assert set(tuning.values()) == {None}


def test_the_grace_period_covers_the_servers_default_request_timeout(ref: ServiceRef) -> None:
    spec = make_spec(cpu={})
    assert termination_grace_seconds(spec) == 10 + 60 + 5
    longer = make_spec(cpu={}, server={"requestTimeoutSeconds": 120.5})
    assert termination_grace_seconds(longer) == 10 + 121 + 5


def test_explicit_threads_win(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"resources": {"limits": {"cpu": "8"}}}, server={"threads": 3})
    assert _env(_deployment(spec, "cpu", ref))["REMBG_THREADS"] == "3"


def test_server_settings_become_rembg_env(ref: ServiceRef) -> None:
    spec = make_spec(
        models=["u2net", "u2netp"],
        cpu={},
        server={
            "port": 9000,
            "maxBodyBytes": 2048,
            "maxPixels": 1000,
            "queueMaxRequests": 10,
            "queueMaxMegapixels": 12.5,
            "requestTimeoutSeconds": 20,
            "headerTimeoutSeconds": 5,
            "bodyTimeoutSeconds": 30.5,
            "maxConnections": 100,
            "batchMaxSize": 4,
            "batchMaxWaitMs": 7,
            "warmupRuns": 1,
            "logFormat": "text",
            "alphaMattingEnabled": True,
        },
    )
    env = _env(_deployment(spec, "cpu", ref))
    assert env == {
        "REMBG_HOST": "0.0.0.0",
        "REMBG_PORT": "9000",
        "REMBG_MODELS": "u2net,u2netp",
        "REMBG_PROVIDER": "cpu",
        "REMBG_ALLOW_CPU_FALLBACK": "false",
        "REMBG_MAX_BODY_BYTES": "2048",
        "REMBG_MAX_PIXELS": "1000",
        "REMBG_QUEUE_MAX_REQUESTS": "10",
        "REMBG_QUEUE_MAX_MEGAPIXELS": "12.5",
        "REMBG_REQUEST_TIMEOUT_SECONDS": "20",
        "REMBG_HEADER_TIMEOUT_SECONDS": "5",
        "REMBG_BODY_TIMEOUT_SECONDS": "30.5",
        "REMBG_MAX_CONNECTIONS": "100",
        "REMBG_BATCH_MAX_SIZE": "4",
        "REMBG_BATCH_MAX_WAIT_MS": "7",
        "REMBG_WARMUP_RUNS": "1",
        "REMBG_LOG_FORMAT": "text",
        "REMBG_ALPHA_MATTING_ENABLED": "true",
    }
    assert _container(_deployment(spec, "cpu", ref))["ports"][0]["containerPort"] == 9000


def test_extra_env_overrides_generated(ref: ServiceRef) -> None:
    spec = make_spec(
        cpu={}, server={"extraEnv": [{"name": "REMBG_WARMUP_RUNS", "value": "9"}, {"name": "X"}]}
    )
    env = _env(_deployment(spec, "cpu", ref))
    assert env["REMBG_WARMUP_RUNS"] == "9"
    assert env["X"] == ""
    names = [e["name"] for e in _container(_deployment(spec, "cpu", ref))["env"]]
    assert len(names) == len(set(names))


def test_unset_canary_leaves_the_server_defaults(ref: ServiceRef) -> None:
    env = _env(_deployment(make_spec(cpu={}), "cpu", ref))
    assert not [name for name in env if name.startswith("REMBG_CANARY_")]


def test_canary_settings_become_rembg_env(ref: ServiceRef) -> None:
    canary = {
        "intervalSeconds": 2.5,
        "minIou": 0.9,
        "timeoutSeconds": 10,
        "unreadyAfterFailures": 3,
    }
    env = _env(_deployment(make_spec(cpu={}, server={"canary": canary}), "cpu", ref))
    assert {k: v for k, v in env.items() if k.startswith("REMBG_CANARY_")} == {
        "REMBG_CANARY_INTERVAL_SECONDS": "2.5",
        "REMBG_CANARY_MIN_IOU": "0.9",
        "REMBG_CANARY_TIMEOUT_SECONDS": "10",
        "REMBG_CANARY_UNREADY_AFTER_FAILURES": "3",
    }


def test_only_the_canary_fields_set_are_written(ref: ServiceRef) -> None:
    spec = make_spec(gpu={}, server={"canary": {"intervalSeconds": 0}})
    env = _env(_deployment(spec, "gpu", ref))
    assert {k: v for k, v in env.items() if k.startswith("REMBG_CANARY_")} == {
        "REMBG_CANARY_INTERVAL_SECONDS": "0"
    }


def test_extra_env_overrides_the_canary(ref: ServiceRef) -> None:
    server = {
        "canary": {"minIou": 0.5},
        "extraEnv": [{"name": "REMBG_CANARY_MIN_IOU", "value": "0.7"}],
    }
    env = _env(_deployment(make_spec(cpu={}, server=server), "cpu", ref))
    assert env["REMBG_CANARY_MIN_IOU"] == "0.7"


def test_gpu_pool_provider_fallback_and_image(ref: ServiceRef) -> None:
    spec = make_spec(gpu={}, fallback={"allowCpuInGpuPods": True}, gpuImage="reg/x:cuda")
    deployment = _deployment(spec, "gpu", ref)
    env = _env(deployment)
    assert env["REMBG_PROVIDER"] == "cuda"
    assert env["REMBG_ALLOW_CPU_FALLBACK"] == "true"
    assert _container(deployment)["image"] == "reg/x:cuda"


def test_pool_image_overrides_service_image(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"image": "reg/custom:1"}, image="reg/default:1")
    assert _container(_deployment(spec, "cpu", ref))["image"] == "reg/custom:1"


def test_gpu_pods_request_gpus_tolerate_taint_and_need_gpu_nodes(ref: ServiceRef) -> None:
    spec = make_spec(gpu={"gpuCount": 2})
    deployment = _deployment(spec, "gpu", ref)
    pod = deployment["spec"]["template"]["spec"]
    assert _container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]}
            ]
        }
    ]


def test_cpu_pods_neither_request_nor_tolerate_gpus(ref: ServiceRef) -> None:
    deployment = _deployment(make_spec(cpu={}), "cpu", ref)
    pod = deployment["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in _container(deployment)["resources"].get("limits", {})
    assert "tolerations" not in pod
    assert "affinity" not in pod


def test_gpu_taint_toleration_can_be_turned_off(ref: ServiceRef) -> None:
    spec = make_spec(gpu={"tolerateGpuTaint": False, "gpuNodeSelector": {}})
    pod = _deployment(spec, "gpu", ref)["spec"]["template"]["spec"]
    assert "tolerations" not in pod
    assert "affinity" not in pod


def test_user_scheduling_settings_are_kept(ref: ServiceRef) -> None:
    spec = make_spec(
        cpu={
            "nodeSelector": {"pool": "inference"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml"}],
            "priorityClassName": "high",
            "podAnnotations": {"a": "b"},
        },
        imagePullSecrets=["regcred"],
        serviceAccountName="rembg",
    )
    deployment = _deployment(spec, "cpu", ref)
    pod = deployment["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"pool": "inference"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ml"}]
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["serviceAccountName"] == "rembg"
    assert deployment["spec"]["template"]["metadata"]["annotations"] == {"a": "b"}


def test_node_affinity_is_anded_into_user_terms() -> None:
    user: dict[str, Any] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n"]}]},
                ]
            },
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 1}],
        },
        "podAntiAffinity": {"x": 1},
    }
    merged = require_node_labels(user, {"gpu": "true"})
    terms = merged["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    gpu = {"key": "gpu", "operator": "In", "values": ["true"]}
    assert terms[0]["matchExpressions"] == [
        {"key": "zone", "operator": "In", "values": ["a"]},
        gpu,
    ]
    assert terms[1]["matchExpressions"] == [gpu]
    assert (
        terms[1]["matchFields"]
        == user["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
            "nodeSelectorTerms"
        ][1]["matchFields"]
    )
    assert merged["podAntiAffinity"] == {"x": 1}
    assert merged["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] == [
        {"weight": 1}
    ]
    # The input is not mutated.
    assert (
        len(
            user["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
                "nodeSelectorTerms"
            ][0]["matchExpressions"]
        )
        == 1
    )


def test_no_labels_leaves_affinity_alone() -> None:
    assert require_node_labels({"a": 1}, {}) == {"a": 1}


def test_replicas_only_when_not_autoscaled(ref: ServiceRef) -> None:
    spec = make_spec(cpu={"replicas": 3, "minReplicas": 1, "maxReplicas": 5})
    assert "replicas" not in _deployment(spec, "cpu", ref, manage=False)["spec"]
    assert _deployment(spec, "cpu", ref, manage=True)["spec"]["replicas"] == 3


def test_rollout_strategy_per_pool(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, gpu={})
    cpu = _deployment(spec, "cpu", ref)["spec"]["strategy"]["rollingUpdate"]
    gpu = _deployment(spec, "gpu", ref)["spec"]["strategy"]["rollingUpdate"]
    assert cpu["maxUnavailable"] == 0
    assert gpu == {"maxSurge": 0, "maxUnavailable": 1}


def test_topology_spread(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, availability={"topologySpread": {"topologyKey": "zone", "maxSkew": 2}})
    pod = _deployment(spec, "cpu", ref)["spec"]["template"]["spec"]
    (constraint,) = pod["topologySpreadConstraints"]
    assert constraint["topologyKey"] == "zone"
    assert constraint["maxSkew"] == 2
    assert constraint["labelSelector"]["matchLabels"]["rembg.io/pool"] == "cpu"
    assert constraint["matchLabelKeys"] == ["pod-template-hash"]
    off = make_spec(cpu={}, availability={"topologySpread": {"enabled": False}})
    assert (
        "topologySpreadConstraints" not in _deployment(off, "cpu", ref)["spec"]["template"]["spec"]
    )


def test_service_selects_every_pool(ref: ServiceRef) -> None:
    spec = make_spec(cpu={}, gpu={})
    service = build_service(ref, spec)
    assert service["metadata"]["name"] == "demo"
    selector = service["spec"]["selector"]
    assert "rembg.io/pool" not in selector
    for pool in ("cpu", "gpu"):
        labels = _deployment(spec, pool, ref)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items()
    (port,) = service["spec"]["ports"]
    assert port == {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}


def test_endpoint_url(ref: ServiceRef) -> None:
    assert ref.endpoint == "http://demo.team-a.svc:80"


def test_the_server_defaults_the_operator_relies_on_are_the_servers() -> None:
    """The operator leaves unset settings to the server, but sizes the grace period and the
    canary alert from three of its defaults: they must be the server's, not a copy gone stale."""
    fields = ServerProcessSettings.model_fields
    assert fields["request_timeout_seconds"].default == models.SERVER_REQUEST_TIMEOUT_SECONDS
    assert fields["canary_interval_seconds"].default == models.SERVER_CANARY_INTERVAL_SECONDS
    assert fields["canary_timeout_seconds"].default == models.SERVER_CANARY_TIMEOUT_SECONDS


SERVER_DEFAULT_IN_DESCRIPTION = {
    # operator field: how kubectl explain quotes the server's default
    "max_pixels": lambda v: f"{v}",
    "queue_max_megapixels": lambda v: f"{v:g}",
    "request_timeout_seconds": lambda v: f"{v:g}",
    "header_timeout_seconds": lambda v: f"{v:g}",
    "body_timeout_seconds": lambda v: f"{v:g}",
    "max_connections": lambda v: f"{v}",
    "batch_max_size": lambda v: f"{v}",
    "batch_max_wait_ms": lambda v: f"{v:g}",
    "warmup_runs": lambda v: f"{v}",
    "log_format": lambda v: f"{v}",
    "alpha_matting_enabled": lambda v: "true" if v else "false",
    "max_body_bytes": lambda v: f"{v // 2**20} MiB",
}


@pytest.mark.parametrize("field", sorted(SERVER_DEFAULT_IN_DESCRIPTION))
def test_kubectl_explain_quotes_the_servers_own_default(field: str) -> None:
    """The CRD says what an unset field means; the number must be the server's, not a copy
    gone stale."""
    quoted = SERVER_DEFAULT_IN_DESCRIPTION[field](ServerProcessSettings.model_fields[field].default)
    description = models.ServerSettings.model_fields[field].description or ""
    assert f"the server's default, {quoted} (" in description, description


def test_the_derived_defaults_are_described_as_the_server_derives_them() -> None:
    fields = ServerProcessSettings.model_fields
    assert fields["queue_max_requests"].default == 0  # 0 = derived from the CPU limit
    assert "2 per CPU" in (fields["queue_max_requests"].description or "")
    assert "2 per CPU" in (
        models.ServerSettings.model_fields["queue_max_requests"].description or ""
    )
    assert fields["threads"].default == 0
    assert "CPU limit" in (models.ServerSettings.model_fields["threads"].description or "")
