"""Operator start-up and shut-down: kopf settings, the API client, the Fleet, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

import kopf
from prometheus_client import start_http_server

from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL, POOL_LABEL
from rembg_operator.config import OperatorConfig
from rembg_operator.fleet import Fleet
from rembg_operator.kube import KubeClient

log = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: kopf builds one, a deep copy of the whole body, on every event of every
    watched resource, for change handlers; this operator has none, and with a burst of
    hundreds of services those copies were a sixth of its CPU (py-spy)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[kopf.FieldSpec] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def configure_kopf(settings: kopf.OperatorSettings, config: OperatorConfig) -> None:
    watching = settings.watching
    # kopf's known failure: a watch stream that silently stops delivering events. Bounded
    # server and client timeouts make every stream reconnect, and the inactivity timeout
    # restarts one that goes quiet in between.
    watching.server_timeout = config.watch_server_timeout_seconds
    watching.client_timeout = config.watch_client_timeout_seconds
    watching.connect_timeout = 30
    watching.inactivity_timeout = config.watch_inactivity_timeout_seconds
    # No kopf state lives on the objects: every handler is an event handler (see handlers).
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.enabled = False  # the Fleet posts the Events users need itself
    settings.networking.request_timeout = 60
    settings.peering.standalone = True


def filter_children(settings: kopf.OperatorSettings, resources: Any) -> None:
    """Server-side label selectors: only our children travel over the watch streams."""
    for group, _version, plural in resources:
        settings.watching.label_selectors[group or "v1", plural] = (
            f"{MANAGED_BY_LABEL}={MANAGED_BY}"
        )


# The pods of the operator's pools (the pod template's labels, builders/workload.py).
POD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{POOL_LABEL}"


def filter_pods(settings: kopf.OperatorSettings) -> None:
    """Server-side: only the pods of our pools travel over the pod watch, not every pod."""
    settings.watching.label_selectors["v1", "pods"] = POD_SELECTOR


async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, resources: Any) -> None:
    config = OperatorConfig()
    configure_kopf(settings, config)
    filter_children(settings, resources)
    filter_pods(settings)
    client = await KubeClient.connect(config.kubeconfig)
    fleet = Fleet(client, config)
    memo.config = config
    memo.client = client
    memo.fleet = fleet
    memo.resync = asyncio.create_task(fleet.resync_forever(), name="rembg:resync")
    if config.metrics_port:
        start_http_server(config.metrics_port, addr=config.bind_address)
        log.info("metrics on %s:%d/metrics", config.bind_address, config.metrics_port)


async def stop(memo: kopf.Memo) -> None:
    task = getattr(memo, "resync", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    client = getattr(memo, "client", None)
    if client is not None:
        await client.close()
