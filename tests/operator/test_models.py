from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError
from rembg_operator.models import (
    CpuPoolSpec,
    RembgServiceSpec,
    Resources,
    effective_scrape_timeout,
    parse_duration,
    parse_quantity,
    semantic_problems,
)

from tests.operator.conftest import make_spec


def test_ten_line_manifest_gets_production_defaults() -> None:
    spec = make_spec(cpu={"minReplicas": 1, "maxReplicas": 4})
    assert spec.models == ["u2netp"]
    assert spec.gpu is None
    assert spec.cpu is not None
    assert spec.cpu.resources.limits["cpu"] == "2"
    assert spec.autoscaling.engine == "hpa"
    assert spec.monitoring.enabled
    assert spec.availability.pdb_enabled


def test_camel_case_aliases_and_snake_case_attributes() -> None:
    spec = make_spec(
        gpu={"gpuCount": 2, "minReplicas": 0}, server={"batchMaxSize": 16, "warmupRuns": 0}
    )
    assert spec.gpu is not None
    assert spec.gpu.gpu_count == 2
    assert spec.gpu.min_replicas == 0
    assert spec.server.batch_max_size == 16
    assert spec.server.warmup_runs == 0


def test_unknown_fields_are_refused() -> None:
    with pytest.raises(ValidationError, match="gpuCuont"):
        make_spec(gpu={"gpuCuont": 2})


@pytest.mark.parametrize("value", [1, 2, "500m", "1.5", "2Gi", "100Mi", "1e3", "0.5"])
def test_quantities_accept_ints_and_strings(value: object) -> None:
    resources = Resources.model_validate({"limits": {"cpu": value}})
    assert resources.limits["cpu"] == str(value)


@pytest.mark.parametrize("value", ["abc", "1.5 cores", "-1", "2GB"])
def test_quantities_reject_nonsense(value: str) -> None:
    with pytest.raises(ValidationError):
        Resources.model_validate({"limits": {"cpu": value}})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1", Decimal(1)),
        ("500m", Decimal("0.5")),
        ("2.5", Decimal("2.5")),
        ("1Gi", Decimal(2**30)),
        ("1G", Decimal(10**9)),
        ("100Mi", Decimal(100 * 2**20)),
        ("1e3", Decimal(1000)),
        ("250u", Decimal("0.00025")),
    ],
)
def test_parse_quantity(text: str, expected: Decimal) -> None:
    assert parse_quantity(text) == expected


def test_parse_quantity_rejects_unknown_suffix() -> None:
    with pytest.raises(ValueError, match="quantity"):
        parse_quantity("3Xi")


def test_fixed_replicas_defaults_to_min() -> None:
    assert CpuPoolSpec(min_replicas=3, max_replicas=5).fixed_replicas == 3
    assert CpuPoolSpec(replicas=4, min_replicas=3, max_replicas=5).fixed_replicas == 4


def test_valid_spec_has_no_semantic_problems() -> None:
    assert semantic_problems(make_spec(cpu={}, gpu={})) == []


def test_unknown_model_is_a_semantic_problem() -> None:
    problems = semantic_problems(make_spec(models=["u2netp", "no-such-model"], cpu={}))
    assert len(problems) == 1
    assert "no-such-model" in problems[0]


def test_request_above_limit_is_a_semantic_problem() -> None:
    spec = make_spec(cpu={"resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1500m"}}})
    problems = semantic_problems(spec)
    assert problems == ["cpu.resources: cpu request 2 is above its limit 1500m"]


def test_memory_request_above_limit_in_binary_units() -> None:
    spec = make_spec(
        gpu={"resources": {"requests": {"memory": "3Gi"}, "limits": {"memory": "3000Mi"}}}
    )
    assert any("memory request 3Gi" in p for p in semantic_problems(spec))


def test_request_without_limit_is_fine() -> None:
    spec = make_spec(cpu={"resources": {"requests": {"cpu": "8"}}})
    assert semantic_problems(spec) == []


def test_batch_larger_than_queue_is_a_semantic_problem() -> None:
    spec = make_spec(cpu={}, server={"batchMaxSize": 32, "queueMaxRequests": 16})
    assert any("batchMaxSize" in p for p in semantic_problems(spec))


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", Decimal(30)),
        ("1m30s", Decimal(90)),
        ("500ms", Decimal("0.5")),
        ("2h", Decimal(7200)),
    ],
)
def test_parse_duration(text: str, seconds: Decimal) -> None:
    assert parse_duration(text) == seconds


def test_parse_duration_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        parse_duration("5 minutes")


def test_rate_window_shorter_than_two_scrapes_is_a_semantic_problem() -> None:
    monitoring = {"scrapeInterval": "30s", "alerts": {"rateWindow": "45s"}}
    problems = semantic_problems(make_spec(cpu={}, monitoring=monitoring))
    assert any("rateWindow (45s)" in p and "scrapeInterval (30s)" in p for p in problems)


def test_rate_window_of_two_scrapes_is_fine() -> None:
    monitoring = {"scrapeInterval": "5s", "alerts": {"rateWindow": "10s"}}
    assert semantic_problems(make_spec(cpu={}, monitoring=monitoring)) == []


def test_scrape_timeout_above_the_interval_is_a_semantic_problem() -> None:
    monitoring = {"scrapeInterval": "5s", "scrapeTimeout": "6s", "alerts": {"rateWindow": "1m"}}
    problems = semantic_problems(make_spec(cpu={}, monitoring=monitoring))
    assert any("scrapeTimeout (6s)" in p and "scrapeInterval (5s)" in p for p in problems)


@pytest.mark.parametrize(
    ("monitoring", "timeout"),
    [
        ({}, "10s"),
        ({"scrapeInterval": "5s", "alerts": {"rateWindow": "1m"}}, "5s"),
        ({"scrapeInterval": "1m"}, "10s"),
        ({"scrapeInterval": "1m", "scrapeTimeout": "30s"}, "30s"),
    ],
)
def test_unset_scrape_timeout_is_10s_capped_at_the_interval(
    monitoring: dict[str, object], timeout: str
) -> None:
    spec = make_spec(cpu={}, monitoring=monitoring)
    assert semantic_problems(spec) == []
    assert effective_scrape_timeout(spec.monitoring) == timeout


def test_canary_defaults_are_the_servers() -> None:
    canary = make_spec(cpu={}).server.canary
    assert canary.model_dump() == {
        "interval_seconds": None,
        "min_iou": None,
        "timeout_seconds": None,
        "unready_after_failures": None,
    }
    assert canary.enabled
    assert (canary.effective_interval_seconds, canary.effective_timeout_seconds) == (60, 30)


def test_canary_interval_zero_disables_it() -> None:
    assert not make_spec(cpu={}, server={"canary": {"intervalSeconds": 0}}).server.canary.enabled


@pytest.mark.parametrize(
    "canary",
    [
        {"minIou": 0},
        {"minIou": 1.5},
        {"intervalSeconds": -1},
        {"timeoutSeconds": 0},
        {"unreadyAfterFailures": -1},
        {"unknown": 1},
    ],
)
def test_canary_rejects_out_of_range_values(canary: dict[str, float]) -> None:
    with pytest.raises(ValidationError):
        make_spec(cpu={}, server={"canary": canary})


def test_models_pattern_is_enforced() -> None:
    with pytest.raises(ValidationError):
        make_spec(models=["U2NET!"], cpu={})


def test_models_must_not_be_empty() -> None:
    with pytest.raises(ValidationError):
        make_spec(models=[], cpu={})


def test_spec_is_immutable() -> None:
    spec = RembgServiceSpec()
    with pytest.raises(ValidationError):
        spec.image = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "pool",
    [
        {"minReplicas": 5, "maxReplicas": 2},
        {"replicas": 9, "minReplicas": 1, "maxReplicas": 4},
        {"replicas": 0, "minReplicas": 1, "maxReplicas": 4},
    ],
)
def test_replica_bounds_mirror_the_cel_rules(pool: dict[str, int]) -> None:
    with pytest.raises(ValidationError, match="Replicas"):
        make_spec(cpu=pool)
