"""The one module that talks to the Kubernetes API server.

Raw REST through kubernetes_asyncio's authenticated aiohttp session: server-side apply
(field manager "rembg-operator", force) for children, merge patches for status, discovery
of optional APIs, node capacity, Events. Responses stay plain dicts: no model classes, which
keeps a 500-object reconcile storm cheap in CPU and memory.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from rembg_operator import metrics
from rembg_operator.models import API_GROUP, API_VERSION, GPU_RESOURCE, PLURAL, parse_quantity

FIELD_MANAGER = "rembg-operator"
REQUEST_TIMEOUT_SECONDS = 30.0
# Lists that need names only ask for metadata: a list of Deployments is a few kB, not MBs.
METADATA_ONLY = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"

# apiVersion, kind -> plural, namespaced. Only the kinds the operator touches.
RESOURCES: dict[tuple[str, str], tuple[str, bool]] = {
    ("apps/v1", "Deployment"): ("deployments", True),
    ("v1", "Service"): ("services", True),
    ("v1", "Event"): ("events", True),
    ("v1", "Node"): ("nodes", False),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("horizontalpodautoscalers", True),
    ("policy/v1", "PodDisruptionBudget"): ("poddisruptionbudgets", True),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ("servicemonitors", True),
    ("monitoring.coreos.com/v1", "PrometheusRule"): ("prometheusrules", True),
    ("keda.sh/v1alpha1", "ScaledObject"): ("scaledobjects", True),
    (f"{API_GROUP}/{API_VERSION}", "RembgService"): (PLURAL, True),
}


class ApiError(Exception):
    """A non-2xx answer of the API server, with its Status message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def not_found(self) -> bool:
        return self.status == 404


def api_version_of(kind: str) -> str:
    """The apiVersion the operator uses for a kind it knows."""
    for api_version, known in RESOURCES:
        if known == kind:
            return api_version
    raise KeyError(kind)


def resource_path(
    api_version: str, kind: str, namespace: str | None = None, name: str | None = None
) -> str:
    plural, namespaced = RESOURCES[(api_version, kind)]
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    if namespaced and namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return f"{base}/{name}" if name else base


class KubeApi(Protocol):
    """What the reconciler needs of the API server; KubeClient is the real one, tests fake it."""

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]: ...

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool: ...

    async def list_children(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        label_selector: str,
        *,
        metadata_only: bool,
    ) -> list[dict[str, Any]]: ...

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    async def serves(self, group_version: str, plurals: tuple[str, ...], ttl: float) -> bool: ...

    async def gpu_capacity(self, ttl: float) -> int | None: ...

    def forget_cached(self, key: str | None = None) -> None: ...

    async def post_event(
        self, owner: Mapping[str, Any], *, warning: bool, reason: str, message: str
    ) -> None: ...


@dataclass
class _Cached:
    value: Any
    expires: float


class KubeClient:
    """Authenticated API access; create with `await KubeClient.connect()`."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self._api = api
        self._cache: dict[str, _Cached] = {}
        self._cache_lock = asyncio.Lock()

    @classmethod
    async def connect(cls, kubeconfig: Path | None = None, pool_size: int = 64) -> KubeClient:
        configuration = k8s_client.Configuration()
        if kubeconfig is not None:
            await k8s_config.load_kube_config(
                config_file=str(kubeconfig), client_configuration=configuration
            )
        else:
            try:
                k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                    client_configuration=configuration
                )
            except k8s_config.ConfigException:
                await k8s_config.load_kube_config(client_configuration=configuration)
        configuration.connection_pool_maxsize = pool_size
        return cls(k8s_client.ApiClient(configuration=configuration))

    async def close(self) -> None:
        await self._api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        resource: str = "",
    ) -> dict[str, Any]:
        started = time.perf_counter()
        code = "error"
        try:
            response = await self._api.call_api(
                path,
                method,
                query_params=query or [],
                header_params={"Content-Type": content_type, "Accept": accept},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=REQUEST_TIMEOUT_SECONDS,
            )
            async with response:
                code = str(response.status)
                raw = await response.read()
            return _payload_of(response.status, response.reason, raw)
        finally:
            metrics.API_REQUESTS.labels(method=method, resource=resource, code=code).inc()
            metrics.API_LATENCY.labels(method=method).observe(time.perf_counter() - started)

    # -- children ------------------------------------------------------------------------

    async def apply(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Server-side apply; returns the object as stored (with its status)."""
        meta = manifest["metadata"]
        api_version, kind = manifest["apiVersion"], manifest["kind"]
        return await self.request(
            "PATCH",
            resource_path(api_version, kind, meta.get("namespace"), meta["name"]),
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            body=manifest,
            content_type="application/apply-patch+yaml",
            resource=kind,
        )

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete (background propagation); False when it was already gone."""
        try:
            await self.request(
                "DELETE",
                resource_path(api_version, kind, namespace, name),
                body={"propagationPolicy": "Background"},
                resource=kind,
            )
        except ApiError as error:
            if error.not_found:
                return False
            raise
        return True

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request(
                "GET", resource_path(api_version, kind, namespace, name), resource=kind
            )
        except ApiError as error:
            if error.not_found:
                return None
            raise

    async def list_children(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        label_selector: str,
        *,
        metadata_only: bool,
    ) -> list[dict[str, Any]]:
        """The objects of a kind in a namespace that match the selector, each with its
        apiVersion and kind (list items carry neither); metadata only if asked."""
        found = await self.request(
            "GET",
            resource_path(api_version, kind, namespace),
            query=[("labelSelector", label_selector)],
            accept=METADATA_ONLY if metadata_only else "application/json",
            resource=f"{kind}List",  # the audit's lists, apart from the reconciles' requests
        )
        # An empty PartialObjectMetadataList comes with "items": null.
        return [
            {**item, "apiVersion": api_version, "kind": kind} for item in found.get("items") or []
        ]

    async def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """JSON merge patch of the status subresource (None values delete keys)."""
        path = resource_path(f"{API_GROUP}/{API_VERSION}", "RembgService", namespace, name)
        await self.request(
            "PATCH",
            f"{path}/status",
            body={"status": dict(status)},
            content_type="application/merge-patch+json",
            resource="RembgService/status",
        )

    # -- discovery and capacity (cached: every reconcile asks) ----------------------------

    async def _cached(self, key: str, ttl: float, load: Any) -> Any:
        async with self._cache_lock:
            entry = self._cache.get(key)
            if entry is not None and entry.expires > time.monotonic():
                return entry.value
            value = await load()
            self._cache[key] = _Cached(value, time.monotonic() + ttl)
            return value

    def forget_cached(self, key: str | None = None) -> None:
        if key is None:
            self._cache.clear()
        else:
            self._cache.pop(key, None)

    async def serves(self, group_version: str, plurals: tuple[str, ...], ttl: float) -> bool:
        """Whether the API server serves every named resource of group_version."""

        async def load() -> bool:
            try:
                found = await self.request("GET", f"/apis/{group_version}", resource="discovery")
            except ApiError as error:
                if error.status in (403, 404, 503):
                    return False
                raise
            names = {r.get("name") for r in found.get("resources", [])}
            return all(p in names for p in plurals)

        return bool(await self._cached(f"serves:{group_version}", ttl, load))

    async def gpu_capacity(self, ttl: float) -> int | None:
        """Allocatable GPUs over schedulable nodes; None when nodes cannot be read."""

        async def load() -> int | None:
            try:
                nodes = await self.request("GET", "/api/v1/nodes", resource="Node")
            except ApiError as error:
                if error.status == 403:
                    return None
                raise
            return gpu_capacity_of(nodes.get("items", []))

        value = await self._cached("gpu-capacity", ttl, load)
        return None if value is None else int(value)

    # -- events --------------------------------------------------------------------------

    async def post_event(
        self, owner: Mapping[str, Any], *, warning: bool, reason: str, message: str
    ) -> None:
        now = datetime.now(tz=UTC)
        event = build_event(owner, warning=warning, reason=reason, message=message, now=now)
        await self.request(
            "POST",
            resource_path("v1", "Event", owner["metadata"]["namespace"]),
            body=event,
            resource="Event",
        )


def build_event(
    owner: Mapping[str, Any], *, warning: bool, reason: str, message: str, now: datetime
) -> dict[str, Any]:
    """A core/v1 Event about owner, to POST once (count 1, both timestamps now; pure)."""
    meta = owner["metadata"]
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta.get("uid"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "reason": reason,
        "message": message[:1024],
        "type": "Warning" if warning else "Normal",
        "source": {"component": FIELD_MANAGER},
        "reportingComponent": FIELD_MANAGER,
        "reportingInstance": FIELD_MANAGER,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


def _payload_of(status: int, reason: str | None, raw: bytes) -> dict[str, Any]:
    """The JSON object of a response; ApiError for a non-2xx status or a body not a JSON object."""
    payload = _json_or_none(raw)
    if status >= 300:
        # Not every error is a Status object: an unserved group answers plain text.
        error = payload or {}
        raise ApiError(
            status,
            str(error.get("reason") or reason),
            str(error.get("message") or raw[:500].decode(errors="replace")),
        )
    if payload is None:
        raise ApiError(status, "BadResponse", f"not JSON: {raw[:200]!r}")
    return payload


def _json_or_none(raw: bytes) -> dict[str, Any] | None:
    if not raw:
        return {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def gpu_capacity_of(nodes: Sequence[Mapping[str, Any]]) -> int:
    """Sum of allocatable GPUs of the nodes that accept pods (pure)."""
    total = 0
    for node in nodes:
        if (node.get("spec") or {}).get("unschedulable"):
            continue
        allocatable = (node.get("status") or {}).get("allocatable") or {}
        value = allocatable.get(GPU_RESOURCE)
        if value is not None:
            total += int(parse_quantity(str(value)))
    return total
