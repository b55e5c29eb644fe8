"""Names and labels every child shares."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rembg_operator.models import API_GROUP

MANAGED_BY = "rembg-operator"
APP_NAME = "rembg-server"
SERVICE_LABEL = f"{API_GROUP}/service"
POOL_LABEL = f"{API_GROUP}/pool"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
HTTP_PORT_NAME = "http"
SERVICE_PORT = 80

Manifest = dict[str, Any]


@dataclass(frozen=True)
class ServiceRef:
    """Which RembgService the children belong to."""

    name: str
    namespace: str

    def pool_object_name(self, pool: str) -> str:
        return f"{self.name}-{pool}"

    def may_own(self, child_name: str) -> bool:
        """A name one of this service's children can have (never enough to say it does)."""
        return child_name == self.name or child_name.startswith(f"{self.name}-")

    @property
    def endpoint(self) -> str:
        return f"http://{self.name}.{self.namespace}.svc:{SERVICE_PORT}"


def common_labels(ref: ServiceRef) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": APP_NAME,
        "app.kubernetes.io/instance": ref.name,
        "app.kubernetes.io/component": "inference",
        "app.kubernetes.io/part-of": "rembg-fleet",
        MANAGED_BY_LABEL: MANAGED_BY,
        SERVICE_LABEL: ref.name,
    }


def service_selector(ref: ServiceRef) -> dict[str, str]:
    """Selects the pods of every pool of one RembgService."""
    return {"app.kubernetes.io/name": APP_NAME, "app.kubernetes.io/instance": ref.name}


def pool_selector(ref: ServiceRef, pool: str) -> dict[str, str]:
    """Selects the pods of one pool; immutable once a Deployment exists."""
    return {**service_selector(ref), POOL_LABEL: pool}


def pool_labels(ref: ServiceRef, pool: str) -> dict[str, str]:
    return {**common_labels(ref), POOL_LABEL: pool}


def metadata(
    ref: ServiceRef, name: str, labels: dict[str, str], annotations: dict[str, str] | None = None
) -> Manifest:
    meta: Manifest = {"name": name, "namespace": ref.namespace, "labels": dict(labels)}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta
