"""The control plane's floor for bench_operator.py: the operator's children, applied without it.

    python bench/operator_floor.py JOB.json RESULT.json

bench_operator.py runs this as a process of its own, as it runs the operator, so its requests
and JSON work never share an event loop (or a core's time slice) with the bench's watches. No
operator runs meanwhile. For every name in the job it

1. creates the RembgService (JOB's create_concurrency at a time: what the bench does for the
   operator), and stamps the moment the creation is answered ("apply" in the bench's
   apply -> all children);
2. at once builds the very children the operator builds from that stored object: the
   operator's own pure builders, `build_children(ServiceRef(name, namespace),
   RembgServiceSpec.model_validate(stored["spec"]), CAPABILITIES)`, the spec read back as
   the API server stored it (CRD defaults filled in, as in the operator's watch events);
3. owns them to the RembgService with `kopf.adopt`, exactly as the reconciler does;
4. server-side applies them through `rembg_operator.kube.KubeClient.apply` (field manager
   rembg-operator, force): every child of a service at once, as one reconcile applies them,
   and `concurrency` services at a time (the operator's max_concurrent_reconciles), on a
   client with the operator's connection pool.

Why real RembgServices: the children then carry the operator's ownerReferences (controller,
blockOwnerDeletion) to objects that exist, so the objects, their sizes and the garbage
collector's graph are the operator's. Children with no ownerReferences would be smaller and
skip the garbage collector's owner tracking; an ownerReference to an owner that does not
exist gets the child deleted by the garbage collector mid-measurement.

What the floor leaves out is what the bench's ratio charges to the operator: the watch event
reaching it, kopf and the work queue, the Services-first ordering (a plain client has none,
so a ratio under 1 means that ordering beats plain concurrency), status writes (the floor's
"Ready" is every Deployment available, not a Ready condition someone wrote), Events and the
prune. A failed apply (429, 5xx, a dropped connection) is retried after APPLY_RETRY_SECONDS
up to APPLY_ATTEMPTS times, as any plain client would; retries are counted in the result.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict, cast

import aiohttp
import kopf
from rembg_operator.builders import Capabilities, ServiceRef, build_children
from rembg_operator.kube import ApiError, KubeClient
from rembg_operator.models import RembgServiceSpec

# What the operator's discovery finds on the bench's cluster: the Prometheus Operator's CRDs,
# no KEDA, no GPU pool asked for.
CAPABILITIES = Capabilities(prometheus_operator=True, keda=False, gpu_capacity=None)
APPLY_ATTEMPTS = 5
APPLY_RETRY_SECONDS = 0.5
RETRIED_STATUSES = frozenset({409, 429, 500, 502, 503, 504})


class Job(TypedDict):
    kubeconfig: str
    namespace: str
    names: list[str]
    spec: dict[str, Any]
    create_concurrency: int
    concurrency: int


class Result(TypedDict):
    started: float  # clock() just before the first creation is sent
    created: dict[str, float]  # name -> clock() when its creation was answered
    applied: dict[str, float]  # name -> clock() when the last of its applies was answered
    retries: int
    failures: list[str]


def clock() -> float:
    """CLOCK_MONOTONIC (Linux): one clock for every process, so stamps compare across them."""
    return time.monotonic()


def rembg_service(name: str, namespace: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "rembg.io/v1alpha1",
        "kind": "RembgService",
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


def children_of(stored: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The manifests the operator's reconcile applies for this stored RembgService (pure)."""
    meta = stored["metadata"]
    ref = ServiceRef(name=meta["name"], namespace=meta["namespace"])
    desired = build_children(ref, RembgServiceSpec.model_validate(stored["spec"]), CAPABILITIES)
    kopf.adopt(desired.manifests, owner=kopf.Body(cast("kopf.RawBody", stored)))
    return desired.manifests


async def run(job: Job) -> Result:
    client = await KubeClient.connect(Path(job["kubeconfig"]))
    namespace = job["namespace"]
    result: Result = {"started": 0.0, "created": {}, "applied": {}, "retries": 0, "failures": []}
    create_limit = asyncio.Semaphore(job["create_concurrency"])
    reconcile_limit = asyncio.Semaphore(job["concurrency"])

    async def apply(manifest: dict[str, Any]) -> None:
        what = f"{manifest['kind']} {manifest['metadata']['name']}"
        for attempt in range(1, APPLY_ATTEMPTS + 1):
            try:
                await client.apply(manifest)
            except (ApiError, aiohttp.ClientError, TimeoutError) as error:
                status = error.status if isinstance(error, ApiError) else None
                if attempt == APPLY_ATTEMPTS or (status and status not in RETRIED_STATUSES):
                    result["failures"].append(f"{what}: {error}")
                    return
                result["retries"] += 1
                await asyncio.sleep(APPLY_RETRY_SECONDS)
            else:
                return

    async def one(name: str) -> None:
        async with create_limit:
            stored = await client.request(
                "POST",
                f"/apis/rembg.io/v1alpha1/namespaces/{namespace}/rembgservices",
                body=rembg_service(name, namespace, job["spec"]),
                resource="RembgService",
            )
            result["created"][name] = clock()
        async with reconcile_limit:
            await asyncio.gather(*(apply(m) for m in children_of(stored)))
            result["applied"][name] = clock()

    try:
        # One request first, so the client has authenticated and holds a connection, as the
        # operator's has by the time services arrive.
        await client.request("GET", "/version", resource="version")
        result["started"] = clock()
        await asyncio.gather(*(one(name) for name in job["names"]))
    finally:
        await client.close()
    return result


def main() -> int:
    job_path, result_path = (Path(arg) for arg in sys.argv[1:3])
    job: Job = json.loads(job_path.read_text())
    result = asyncio.run(run(job))
    result_path.write_text(json.dumps(result))
    for failure in result["failures"]:
        print(f"floor: apply failed for good: {failure}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
