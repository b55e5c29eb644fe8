"""examples/argocd/health.lua, executed in Lua 5.1 (as Argo CD's gopher-lua runs it).

Two sources of RembgService objects: hand-written ones covering every branch, and objects
captured from real e2e runs (tests/chart/fixtures/<health>-*.yaml, written by
e2e/test_chart_install.py with REMBG_CAPTURE_FIXTURES=1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures"
HEALTH_STATES = ("healthy", "progressing", "degraded")


def rembgservice(generation: int = 2, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": "demo", "namespace": "default", "generation": generation},
        "spec": {"model": "u2netp"},
    }
    if status is not None:
        obj["status"] = status
    return obj


def cond(kind: str, status: str, reason: str = "Reason", message: str = "") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def status(*conditions: dict[str, str], observed: int = 2) -> dict[str, Any]:
    return {"observedGeneration": observed, "conditions": list(conditions)}


CASES = [
    pytest.param(rembgservice(status=None), "Progressing", "observe", id="no-status"),
    pytest.param(
        rembgservice(status={"conditions": [cond("Ready", "True")]}),
        "Progressing",
        "generation 2",
        id="no-observed-generation",
    ),
    pytest.param(
        rembgservice(generation=3, status=status(cond("Ready", "True"))),
        "Progressing",
        "generation 3",
        id="stale-ready",
    ),
    pytest.param(
        rembgservice(generation=3, status=status(cond("Degraded", "True", message="old"))),
        "Progressing",
        "generation 3",
        id="stale-degraded-is-not-trusted",
    ),
    pytest.param(
        rembgservice(
            status=status(
                cond("Ready", "True", message="2/2 replicas ready"),
                cond("Progressing", "False"),
                cond("Degraded", "False"),
            )
        ),
        "Healthy",
        "2/2 replicas ready",
        id="ready",
    ),
    pytest.param(
        rembgservice(status=status(cond("Ready", "True", reason="Available", message=""))),
        "Healthy",
        "Available",
        id="ready-reason-when-no-message",
    ),
    pytest.param(
        rembgservice(
            status=status(
                cond("Ready", "False", message="0/2 ready"),
                cond("Progressing", "True", message="rolling out gpu pool"),
            )
        ),
        "Progressing",
        "rolling out gpu pool",
        id="rolling-out",
    ),
    pytest.param(
        rembgservice(
            status=status(cond("Ready", "True"), cond("Progressing", "True", message="scaling"))
        ),
        "Progressing",
        "scaling",
        id="ready-but-rolling",
    ),
    pytest.param(
        rembgservice(
            status=status(
                cond("Ready", "True"),
                cond("Degraded", "True", message="PrometheusRule: Forbidden"),
            )
        ),
        "Degraded",
        "PrometheusRule: Forbidden",
        id="degraded-wins-over-ready",
    ),
    pytest.param(
        rembgservice(
            status=status(
                cond("Ready", "False"),
                cond("Progressing", "True"),
                cond("Stalled", "True", message="min > max in gpu pool"),
            )
        ),
        "Degraded",
        "min > max in gpu pool",
        id="stalled",
    ),
    pytest.param(
        rembgservice(status=status(cond("Degraded", "Unknown"), cond("Ready", "Unknown"))),
        "Progressing",
        "Reason",
        id="unknown-is-not-true",
    ),
    pytest.param(
        rembgservice(status=status()),
        "Progressing",
        "Waiting for the Ready condition",
        id="no-conditions-yet",
    ),
    pytest.param(
        rembgservice(status={"observedGeneration": 2}),
        "Progressing",
        "Waiting for the Ready condition",
        id="conditions-missing",
    ),
]


@pytest.mark.parametrize(("obj", "expected", "message_part"), CASES)
def test_health_of_hand_written_objects(
    argocd_health: Any, obj: dict[str, Any], expected: str, message_part: str
) -> None:
    health, message = argocd_health(obj)
    assert health == expected
    assert message_part in message


def captured() -> list[Path]:
    return sorted(FIXTURES.glob("*.yaml"))


@pytest.mark.parametrize("path", captured(), ids=lambda p: p.stem)
def test_health_of_objects_captured_from_e2e(argocd_health: Any, path: Path) -> None:
    expected = path.stem.split("-", 1)[0]
    assert expected in HEALTH_STATES, f"fixture name must start with a health state: {path.name}"
    obj = yaml.safe_load(path.read_text())
    assert obj["kind"] == "RembgService"
    assert obj["status"]["conditions"], "captured objects carry the operator's real conditions"
    health, _ = argocd_health(obj)
    assert health.lower() == expected


def test_every_health_state_has_a_captured_object() -> None:
    states = {p.stem.split("-", 1)[0] for p in captured()}
    assert states >= set(HEALTH_STATES), (
        f"missing captured RembgServices for {set(HEALTH_STATES) - states}: run "
        "REMBG_CAPTURE_FIXTURES=1 pytest e2e/test_chart_install.py"
    )
