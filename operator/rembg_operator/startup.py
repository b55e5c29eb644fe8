"""Operator start-up and shut-down: kopf settings, the API client, the controller, metrics."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Iterable
from typing import Any

import kopf
from prometheus_client import start_http_server

from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL, POOL_LABEL
from rembg_operator.controller import Controller
from rembg_operator.kube import KubeClient
from rembg_operator.settings import Settings

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


def configure_kopf(kopf_settings: kopf.OperatorSettings, settings: Settings) -> None:
    watching = kopf_settings.watching
    # kopf's known failure: a watch stream that silently stops delivering events. Bounded
    # server and client timeouts make every stream reconnect, and the inactivity timeout
    # restarts one that goes quiet in between.
    watching.server_timeout = settings.watch_server_timeout_seconds
    watching.client_timeout = settings.watch_client_timeout_seconds
    watching.connect_timeout = 30
    watching.inactivity_timeout = settings.watch_inactivity_timeout_seconds
    # No kopf state lives on the objects: every handler is an event handler (see handlers).
    kopf_settings.persistence.diffbase_storage = NoDiffBase()
    kopf_settings.posting.enabled = False  # the controller posts the Events users need itself
    kopf_settings.networking.request_timeout = 60
    kopf_settings.peering.standalone = True


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


async def start(kopf_settings: kopf.OperatorSettings, memo: kopf.Memo, resources: Any) -> None:
    settings = Settings()
    configure_kopf(kopf_settings, settings)
    filter_children(kopf_settings, resources)
    filter_pods(kopf_settings)
    client = await KubeClient.connect(settings.kubeconfig)
    controller = Controller(client, settings)
    memo.settings = settings
    memo.client = client
    memo.controller = controller
    memo.controller_task = asyncio.create_task(controller.run(), name="rembg:controller")
    memo.controller_task.add_done_callback(_exit_if_failed)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, addr=settings.bind_address)
        log.info("metrics on %s:%d/metrics", settings.bind_address, settings.metrics_port)


def _exit_if_failed(task: asyncio.Task[None]) -> None:
    """The workers are gone: the watches would fill a queue nobody works off while liveness
    stays green. Stop the process instead, so its supervisor starts a fresh one."""
    if task.cancelled() or task.exception() is None:
        return
    log.critical("the controller stopped: %r; exiting", task.exception())
    os.kill(os.getpid(), signal.SIGTERM)


async def stop(memo: kopf.Memo) -> None:
    task = getattr(memo, "controller_task", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    client = getattr(memo, "client", None)
    if client is not None:
        await client.close()
