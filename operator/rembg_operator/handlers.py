"""kopf registrations: each handler only delegates to the controller (controller.py).

Every handler is an event handler: the controller decides from each event what work it needs
(level-triggered, like a controller-runtime reconciler) and runs it through its work queue,
one pass per service at a time, with its own retries. kopf's change handlers
(on.create/update/resume) are not used: they keep their state in annotations on the
RembgService, which costs one PATCH per change and a deep copy of every event's body, and a
burst of hundreds of services pays for both.

Status is written by the reconciler (a merge patch of the status subresource), not through
kopf's `patch.status`: child watch events update status too, and one writer per service
(the queue runs one pass per key at a time) cannot overwrite a newer status with an older one.
"""

from __future__ import annotations

from typing import Any

import kopf

from rembg_operator import startup as operator_startup
from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL, POOL_LABEL
from rembg_operator.models import API_GROUP, API_VERSION, PLURAL

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
    await operator_startup.start(settings, memo, CHILD_RESOURCES)


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    await operator_startup.stop(memo)


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
async def service_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    # type None is kopf's initial listing: on start-up every service is reconciled (resume).
    memo.controller.on_service_event(type, body)


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
        memo.controller.on_optional_api_changed()


# The pods of our pools (settings.POD_SELECTOR filters the same on the server).
@kopf.on.event(
    "", "v1", "pods", labels={MANAGED_BY_LABEL: MANAGED_BY, POOL_LABEL: kopf.PRESENT}, id="pods"
)
async def pod_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:  # noqa: A002
    # Status only: why the pool's pods are not ready (rembg_operator.pod_health).
    memo.controller.on_pod_event(type, body)


def _register_child_watchers() -> None:
    for group, version, plural in CHILD_RESOURCES:

        @kopf.on.event(group, version, plural, labels=OURS, id=f"child-{plural}")
        async def child_changed(
            type: str | None,  # noqa: A002 - kopf's keyword
            body: kopf.Body,
            memo: kopf.Memo,
            **_: Any,
        ) -> None:
            memo.controller.on_child_event(type, body)


_register_child_watchers()
