"""KEDA ScaledObject status as KEDA writes it (v2 scaledobject_controller), for the tests."""

from __future__ import annotations

from typing import Any

# What the RembgService reports for pool cpu once KEDA says Ready and Active.
READY_AND_ACTIVE = {
    "kind": "ScaledObject",
    "name": "demo-cpu",
    "ready": "True",
    "active": "True",
    "fallback": "False",
    "paused": "False",
    "hpa": "keda-demo-cpu",
}
READY_MESSAGE = "ScaledObject is defined correctly and is ready for scaling"
CHECK_FAILED = (
    "failed to ensure HPA is correctly created for ScaledObject: "
    "error parsing prometheus metadata: no serverAddress given"
)


def condition(kind: str, status: str, reason: str = "", message: str = "") -> dict[str, str]:
    out = {"type": kind, "status": status}
    if reason:
        out["reason"] = reason
    if message:
        out["message"] = message
    return out


def initialized() -> list[dict[str, str]]:
    """What KEDA writes first: every condition Unknown, before its first verdict."""
    return [condition(k, "Unknown") for k in ("Ready", "Active", "Fallback", "Paused")]


def ready(*, active: bool = False) -> list[dict[str, str]]:
    if active:
        activity = condition(
            "Active", "True", "ScalerActive", "Scaling is performed because triggers are active"
        )
    else:
        activity = condition(
            "Active",
            "False",
            "ScalerNotActive",
            "Scaling is not performed because triggers are not active",
        )
    return [
        condition("Ready", "True", "ScaledObjectReady", READY_MESSAGE),
        activity,
        condition("Fallback", "False", "NoFallbackFound", "No fallbacks are active on this object"),
        condition("Paused", "False"),
    ]


def check_failed() -> list[dict[str, str]]:
    return [
        condition("Ready", "False", "ScaledObjectCheckFailed", CHECK_FAILED),
        condition("Active", "Unknown", "UnknownState", "ScaledObject check failed"),
        condition("Fallback", "False", "NoFallbackFound", "No fallbacks are active on this object"),
        condition("Paused", "False"),
    ]


def status(conditions: list[dict[str, str]], *, name: str = "demo-cpu") -> dict[str, Any]:
    """status of the ScaledObject `name`; the HPA name is the one build_scaled_object asks for
    in spec.advanced.horizontalPodAutoscalerConfig.name."""
    return {"hpaName": f"keda-{name}", "conditions": conditions}


def slim(
    conditions: list[dict[str, str]] | None,
    *,
    name: str = "demo-cpu",
    generation: int = 1,
    observed: int | None = None,
) -> dict[str, Any]:
    """A ScaledObject as the state keeps it (state.slim_scaled_object)."""
    out: dict[str, Any] = {
        "name": name,
        "generation": generation,
        "conditions": conditions or [],
        "hpaName": f"keda-{name}" if conditions else None,
    }
    if observed is not None:
        out["observedGeneration"] = observed
    return out
