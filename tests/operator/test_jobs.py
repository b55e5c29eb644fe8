"""spec.jobs: the job path's settings, the pods' REMBG_JOBS_* env (credentials only through
secretKeyRef), the backlog signal of each autoscaler, and nothing at all while it is off."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.models import RembgServiceSpec, semantic_problems

from tests.operator.conftest import make_spec

ALL = Capabilities(prometheus_operator=True, keda=True, gpu_capacity=4)
# Children rendered before spec.jobs existed (same specs as below); a service without `jobs`
# must still render exactly these bytes, so upgrading the operator rolls no pod.
GOLDEN = Path(__file__).parent / "data" / "children_without_jobs.json"
GOLDEN_SPECS: dict[str, dict[str, Any]] = {
    "two-pools-hpa": {"cpu": {}, "gpu": {}},
    "cpu-keda": {"cpu": {"minReplicas": 1, "maxReplicas": 8}, "autoscaling": {"engine": "keda"}},
}
REDIS = {"secretName": "redis-credentials"}


def _jobs_spec(jobs: dict[str, Any] | None = None, **raw: Any) -> RembgServiceSpec:
    raw.setdefault("cpu", {})
    return make_spec(jobs={"enabled": True, "redis": REDIS, **(jobs or {})}, **raw)


def _children(ref: ServiceRef, spec: RembgServiceSpec) -> list[dict[str, Any]]:
    return build_children(ref, spec, ALL).manifests


def _one(manifests: list[dict[str, Any]], kind: str, name: str = "demo-cpu") -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def _env(ref: ServiceRef, spec: RembgServiceSpec) -> list[dict[str, Any]]:
    deployment = _one(_children(ref, spec), "Deployment")
    env: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


def _jobs_env(ref: ServiceRef, spec: RembgServiceSpec) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in _env(ref, spec) if e["name"].startswith("REMBG_JOBS_")}


def _secret(name: str, key: str, *, optional: bool = False) -> dict[str, Any]:
    selector: dict[str, Any] = {"name": "redis-credentials", "key": key}
    if optional:
        selector["optional"] = True
    return {"name": name, "valueFrom": {"secretKeyRef": selector}}


# ---- off: nothing changes ---------------------------------------------------------------------


def test_without_jobs_children_are_byte_identical_to_before(ref: ServiceRef) -> None:
    golden = json.loads(GOLDEN.read_text())
    assert set(golden) == set(GOLDEN_SPECS)
    for name, raw in GOLDEN_SPECS.items():
        rendered = json.dumps(_children(ref, make_spec(**raw)), indent=1)
        assert rendered == json.dumps(golden[name], indent=1), name


@pytest.mark.parametrize("engine", ["hpa", "keda"])
def test_disabled_jobs_with_settings_render_nothing(ref: ServiceRef, engine: str) -> None:
    settings = {
        "enabled": False,
        "redis": {**REDIS, "usernameKey": "user", "tls": True, "database": 3},
        "keyPrefix": "shared",
        "targetBacklogPerReplica": 5,
        "webhookAllowedHosts": ["hooks.example.com"],
    }
    plain = make_spec(cpu={}, gpu={}, autoscaling={"engine": engine})
    configured = make_spec(cpu={}, gpu={}, autoscaling={"engine": engine}, jobs=settings)
    assert _children(ref, configured) == _children(ref, plain)


# ---- the spec ---------------------------------------------------------------------------------


def test_defaults_follow_the_contract() -> None:
    jobs = make_spec(cpu={}).jobs
    assert not jobs.enabled
    assert jobs.redis.secret_name is None
    assert jobs.redis.address_key == "address"
    assert jobs.redis.password_key == "password"
    assert jobs.redis.username_key is None
    assert (jobs.redis.database, jobs.redis.tls) == (0, False)
    assert jobs.key_prefix is None
    assert (jobs.result_ttl_seconds, jobs.max_attempts) == (86400, 3)
    assert jobs.visibility_timeout_seconds == 30
    assert jobs.target_backlog_per_replica == 20
    assert jobs.webhook_allowed_hosts == []


def test_result_ttl_is_spelled_as_in_the_contract() -> None:
    assert _jobs_spec({"resultTTLSeconds": 600}).jobs.result_ttl_seconds == 600
    with pytest.raises(ValidationError, match="resultTtlSeconds"):
        _jobs_spec({"resultTtlSeconds": 600})


def test_enabled_without_a_secret_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"jobs\.redis\.secretName is required"):
        make_spec(cpu={}, jobs={"enabled": True})


@pytest.mark.parametrize(
    "jobs",
    [
        {"resultTTLSeconds": 59},
        {"resultTTLSeconds": 31 * 86400},
        {"maxAttempts": 0},
        {"maxAttempts": 101},
        {"visibilityTimeoutSeconds": 2.5},
        {"visibilityTimeoutSeconds": 3601},
        {"targetBacklogPerReplica": 0},
        {"targetBacklogPerReplica": 100_001},
        {"redis": {**REDIS, "database": -1}},
        {"redis": {**REDIS, "database": 1024}},
        {"redis": {"secretName": "Not_A_Name"}},
        {"redis": {**REDIS, "addressKey": ""}},
        {"redis": {**REDIS, "passwordKey": "a key"}},
        {"keyPrefix": ":leading-colon"},
        {"keyPrefix": "with space"},
        {"webhookAllowedHosts": ["a.example,b.example"]},
        {"webhookAllowedHosts": ["https://hooks.example.com"]},
        {"webhookAllowedHosts": ["*"]},
        {"webhookSecretKey": ""},
    ],
)
def test_out_of_bounds_settings_are_refused(jobs: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        _jobs_spec(jobs)


def test_webhook_hosts_accept_host_port_and_wildcard_domain() -> None:
    hosts = ["hooks.example.com", "hooks.example.com:8443", "*.example.org", "10.0.0.7"]
    assert _jobs_spec({"webhookAllowedHosts": hosts}).jobs.webhook_allowed_hosts == hosts


def test_a_jobs_spec_has_no_semantic_problems() -> None:
    assert semantic_problems(_jobs_spec()) == []


# ---- the pods ---------------------------------------------------------------------------------


def test_enabled_jobs_env_reads_credentials_only_from_the_secret(ref: ServiceRef) -> None:
    env = _jobs_env(ref, _jobs_spec())
    assert list(env.values()) == [
        {"name": "REMBG_JOBS_ENABLED", "value": "true"},
        # The address is required: a missing key keeps the pod from starting, loudly.
        _secret("REMBG_JOBS_REDIS_ADDRESS", "address"),
        _secret("REMBG_JOBS_REDIS_PASSWORD", "password", optional=True),
        {"name": "REMBG_JOBS_REDIS_DB", "value": "0"},
        {"name": "REMBG_JOBS_REDIS_TLS", "value": "false"},
        {"name": "REMBG_JOBS_KEY_PREFIX", "value": "rembg:team-a:demo"},
        {"name": "REMBG_JOBS_RESULT_TTL_SECONDS", "value": "86400"},
        {"name": "REMBG_JOBS_MAX_ATTEMPTS", "value": "3"},
        {"name": "REMBG_JOBS_VISIBILITY_TIMEOUT_SECONDS", "value": "30"},
    ]


def test_every_setting_reaches_its_variable(ref: ServiceRef) -> None:
    spec = _jobs_spec(
        {
            "redis": {
                **REDIS,
                "addressKey": "host-port",
                "usernameKey": "user",
                "passwordKey": "secret",
                "database": 7,
                "tls": True,
            },
            "keyPrefix": "catalog",
            "resultTTLSeconds": 3600,
            "maxAttempts": 5,
            "visibilityTimeoutSeconds": 12.5,
            "webhookAllowedHosts": ["hooks.example.com", "*.example.org:8443"],
            "webhookSecretKey": "hmac",
        }
    )
    env = _jobs_env(ref, spec)
    assert env["REMBG_JOBS_REDIS_ADDRESS"] == _secret("REMBG_JOBS_REDIS_ADDRESS", "host-port")
    assert env["REMBG_JOBS_REDIS_USERNAME"] == _secret(
        "REMBG_JOBS_REDIS_USERNAME", "user", optional=True
    )
    assert env["REMBG_JOBS_REDIS_PASSWORD"] == _secret(
        "REMBG_JOBS_REDIS_PASSWORD", "secret", optional=True
    )
    # A key named on purpose must exist: a typo stops the pod instead of signing nothing.
    assert env["REMBG_JOBS_WEBHOOK_SECRET"] == _secret("REMBG_JOBS_WEBHOOK_SECRET", "hmac")
    values = {name: e.get("value") for name, e in env.items()}
    assert values["REMBG_JOBS_REDIS_DB"] == "7"
    assert values["REMBG_JOBS_REDIS_TLS"] == "true"
    assert values["REMBG_JOBS_KEY_PREFIX"] == "catalog"
    assert values["REMBG_JOBS_RESULT_TTL_SECONDS"] == "3600"
    assert values["REMBG_JOBS_MAX_ATTEMPTS"] == "5"
    assert values["REMBG_JOBS_VISIBILITY_TIMEOUT_SECONDS"] == "12.5"
    assert values["REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS"] == "hooks.example.com,*.example.org:8443"


def test_an_empty_password_key_reads_no_password(ref: ServiceRef) -> None:
    env = _jobs_env(ref, _jobs_spec({"redis": {**REDIS, "passwordKey": ""}}))
    assert "REMBG_JOBS_REDIS_PASSWORD" not in env
    assert "REMBG_JOBS_REDIS_USERNAME" not in env


def test_no_secret_value_is_ever_inlined(ref: ServiceRef) -> None:
    spec = _jobs_spec({"redis": {**REDIS, "usernameKey": "user"}, "webhookSecretKey": "hmac"})
    for name in (
        "REMBG_JOBS_REDIS_ADDRESS",
        "REMBG_JOBS_REDIS_USERNAME",
        "REMBG_JOBS_REDIS_PASSWORD",
        "REMBG_JOBS_WEBHOOK_SECRET",
    ):
        entry = _jobs_env(ref, spec)[name]
        assert "value" not in entry
        assert entry["valueFrom"]["secretKeyRef"]["name"] == "redis-credentials"


def test_both_pools_get_the_same_jobs_env(ref: ServiceRef) -> None:
    manifests = _children(ref, _jobs_spec(gpu={}))
    envs = [
        [e for e in m["spec"]["template"]["spec"]["containers"][0]["env"] if "JOBS" in e["name"]]
        for m in manifests
        if m["kind"] == "Deployment"
    ]
    assert len(envs) == 2
    assert envs[0] == envs[1]


def test_extra_env_still_wins_and_names_stay_unique(ref: ServiceRef) -> None:
    spec = _jobs_spec(
        server={"extraEnv": [{"name": "REMBG_JOBS_MAX_ATTEMPTS", "value": "9"}]},
    )
    env = _env(ref, spec)
    names = [e["name"] for e in env]
    assert len(names) == len(set(names))
    assert {"name": "REMBG_JOBS_MAX_ATTEMPTS", "value": "9"} in env


# ---- the autoscalers --------------------------------------------------------------------------


def test_hpa_adds_the_backlog_as_an_external_metric(ref: ServiceRef) -> None:
    spec = _jobs_spec({"targetBacklogPerReplica": 25}, gpu={})
    manifests = _children(ref, spec)
    for pool in ("demo-cpu", "demo-gpu"):
        metrics = _one(manifests, "HorizontalPodAutoscaler", pool)["spec"]["metrics"]
        assert [m["type"] for m in metrics] == ["Pods", "Pods", "External"]
        assert metrics[2]["external"] == {
            "metric": {
                "name": "rembg_jobs_backlog",
                "selector": {"matchLabels": {"rembg_service": "demo"}},
            },
            "target": {"type": "AverageValue", "averageValue": "25"},
        }


def _trigger(ref: ServiceRef, spec: RembgServiceSpec) -> dict[str, Any]:
    scaled = _one(_children(ref, spec), "ScaledObject")
    triggers = {t["name"]: t for t in scaled["spec"]["triggers"]}
    assert set(triggers) == {"queue-depth", "latency-p95", "jobs-backlog"}
    return triggers["jobs-backlog"]


def test_keda_scales_on_the_stream_length(ref: ServiceRef) -> None:
    spec = _jobs_spec({"targetBacklogPerReplica": 10}, autoscaling={"engine": "keda"})
    trigger = _trigger(ref, spec)
    assert trigger["type"] == "redis-streams"
    assert trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "addressFromEnv": "REMBG_JOBS_REDIS_ADDRESS",
        "passwordFromEnv": "REMBG_JOBS_REDIS_PASSWORD",
        "stream": "rembg:team-a:demo:jobs",
        "streamLength": "10",
        "databaseIndex": "0",
        "enableTLS": "false",
    }
    # No consumerGroup: with one, KEDA counts XPENDING (running jobs only) instead of XLEN.
    assert "consumerGroup" not in trigger["metadata"]


def test_keda_trigger_follows_the_connection_settings(ref: ServiceRef) -> None:
    redis = {**REDIS, "usernameKey": "user", "passwordKey": "", "database": 4, "tls": True}
    spec = _jobs_spec({"redis": redis, "keyPrefix": "shop"}, autoscaling={"engine": "keda"})
    metadata = _trigger(ref, spec)["metadata"]
    assert metadata["usernameFromEnv"] == "REMBG_JOBS_REDIS_USERNAME"
    assert "passwordFromEnv" not in metadata
    assert (metadata["databaseIndex"], metadata["enableTLS"]) == ("4", "true")
    assert metadata["stream"] == "shop:jobs"


def test_keda_reads_only_variables_the_pods_define(ref: ServiceRef) -> None:
    redis = {**REDIS, "usernameKey": "user"}
    spec = _jobs_spec({"redis": redis}, autoscaling={"engine": "keda"})
    metadata = _trigger(ref, spec)["metadata"]
    # KEDA resolves *FromEnv from the scale target's container, and trigger metadata is a map of
    # strings in KEDA's CRD.
    assert all(isinstance(v, str) for v in metadata.values())
    defined = {e["name"] for e in _env(ref, spec)}
    from_env = {v for k, v in metadata.items() if k.endswith("FromEnv")}
    assert from_env == {
        "REMBG_JOBS_REDIS_ADDRESS",
        "REMBG_JOBS_REDIS_USERNAME",
        "REMBG_JOBS_REDIS_PASSWORD",
    }
    assert from_env <= defined


def test_stream_and_pod_prefix_agree(ref: ServiceRef) -> None:
    spec = _jobs_spec(autoscaling={"engine": "keda"})
    prefix = _jobs_env(ref, spec)["REMBG_JOBS_KEY_PREFIX"]["value"]
    assert _trigger(ref, spec)["metadata"]["stream"] == f"{prefix}:jobs"
