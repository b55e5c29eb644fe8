"""Operator settings: environment (REMBG_OPERATOR_*) first, command-line flags on top."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _split(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """How the operator runs; every field is also an environment variable."""

    model_config = SettingsConfigDict(env_prefix="REMBG_OPERATOR_", frozen=True)

    namespaces: Annotated[list[str], NoDecode, BeforeValidator(_split)] = Field(
        default_factory=list,
        description="Namespaces to watch (comma-separated); empty means cluster-wide.",
    )
    kubeconfig: Path | None = Field(
        default=None, description="Kubeconfig file; default: in-cluster, then $KUBECONFIG."
    )
    liveness_port: int = Field(default=8080, ge=0, description="kopf liveness port; 0 = off.")
    metrics_port: int = Field(default=8081, ge=0, description="Prometheus metrics port; 0 = off.")
    bind_address: str = Field(default="0.0.0.0", description="Address of both HTTP servers.")  # noqa: S104
    log_format: Literal["json", "text"] = Field(default="json", description="Log format.")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(default="INFO")
    resync_seconds: float = Field(
        default=600.0,
        gt=0,
        description=(
            "Safety net: a full pass of every RembgService (it sends only what differs) and "
            "a list of whole children compared with what was applied, this often."
        ),
    )
    audit_seconds: float = Field(
        default=30.0,
        gt=0,
        description=(
            "List the children this often and repair any that vanished while no watch saw it "
            "(also at once after a watch re-list)."
        ),
    )
    status_coalesce_seconds: float = Field(
        default=1.0,
        ge=0,
        description=(
            "Readiness events within this long of the first become one status write (0 = "
            "one per event)."
        ),
    )
    discovery_ttl_seconds: float = Field(
        default=30.0, gt=0, description="How long optional-API discovery answers are reused."
    )
    gpu_capacity_ttl_seconds: float = Field(
        default=10.0, gt=0, description="How long the node GPU capacity is reused."
    )
    watch_server_timeout_seconds: int = Field(
        default=300, gt=0, description="Server-side watch timeout (kopf's silent-watch guard)."
    )
    watch_client_timeout_seconds: int = Field(
        default=330, gt=0, description="Client-side watch timeout, above the server's."
    )
    watch_inactivity_timeout_seconds: float = Field(
        default=90.0, gt=0, description="Restart a watch stream silent for this long."
    )
    max_concurrent_reconciles: int = Field(
        default=32, ge=1, description="Work-queue workers: passes (full or status) at once."
    )

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces
