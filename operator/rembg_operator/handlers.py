"""kopf registrations: each handler only delegates to the Fleet (rembg_operator.fleet).

Status is written by the Fleet (a merge patch of the status subresource), not through
kopf's `patch.status`: child watch events update status too, and one writer per service,
serialised by a lock, cannot overwrite a newer status with an older one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from rembg_operator import settings as operator_settings
from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL
from rembg_operator.fleet import Fleet, ReconcileError
from rembg_operator.kube import ApiError
from rembg_operator.models import API_GROUP, API_VERSION, PLURAL

log = logging.getLogger(__name__)

RETRY_SECONDS = 5
OURS = {MANAGED_BY_LABEL: MANAGED_BY}
# Every kind of child, watched so that edits and deletions are repaired at once.
CHILD_RESOURCES = (
    ("apps", "v1", "deployments"),
    ("", "v1", "services"),
    ("autoscaling", "v2", "horizontalpodautoscalers"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("monitoring.coreos.com", "v1", "servicemonitors"),
    ("monitoring.coreos.com", "v1", "prometheusrules"),
    ("keda.sh", "v1alpha1", "scaledobjects"),
)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    await operator_settings.start(settings, memo, CHILD_RESOURCES)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await operator_settings.stop(memo)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL, backoff=RETRY_SECONDS)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL, backoff=RETRY_SECONDS)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL, backoff=RETRY_SECONDS)
async def reconcile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    fleet: Fleet = memo.fleet
    key = fleet.remember(body)
    try:
        await fleet.reconcile(key)
    except (ReconcileError, ApiError) as error:
        raise kopf.TemporaryError(str(error), delay=RETRY_SECONDS) from error


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def track_service(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    fleet: Fleet = memo.fleet
    if type == "DELETED":
        fleet.forget((body.metadata.namespace or "", body.metadata.name or ""))
    else:
        fleet.remember(body)


OPTIONAL_CRDS = frozenset(
    {
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
        "scaledobjects.keda.sh",
    }
)


@kopf.on.event(
    "apiextensions.k8s.io",
    "v1",
    "customresourcedefinitions",
    when=lambda name, **_: name in OPTIONAL_CRDS,
)
async def optional_api_changed(type: str | None, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    # Monitoring or KEDA installed (or removed) after the services: re-apply them all now
    # rather than at the next resync. type None is kopf's initial listing: nothing changed.
    if type is not None:
        memo.fleet.on_optional_api_changed()


def _register_child_watchers() -> None:
    for group, version, plural in CHILD_RESOURCES:

        @kopf.on.event(group, version, plural, labels=OURS, id=f"child-{plural}")
        async def child_changed(
            type: str | None,  # noqa: A002 - kopf's keyword
            body: kopf.Body,
            memo: kopf.Memo,
            **_: Any,
        ) -> None:
            memo.fleet.on_child_event(type, body)


_register_child_watchers()


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
