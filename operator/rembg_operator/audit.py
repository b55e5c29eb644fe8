"""Children changed while no watch saw it: found by listing, repaired like any change.

A deletion made while a watch was not connected may never arrive as an event (after a
kube-apiserver restart, resumed watches were seen to miss deletions made seconds later, by
kopf and kube-controller-manager alike). So the audit lists the children, names only:
- every `interval`, and at once when a re-list shows that a watch restarted;
- every few seconds from a failed attempt (the API server is away, and so are the watches)
  until a minute after: deletions right after an API server restart reached no watch.
Every child the operator applied and the list lacks is treated as deleted (client-go's
informers deliver those as "deleted, final state unknown"). Every `deep_interval` it lists
whole objects and compares each with what was applied, so an edit no watch delivered is
undone too; this replaces a resync that re-applies everything (and writes while nothing
changed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from rembg_operator import metrics
from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL
from rembg_operator.kube import KubeApi, api_version_of
from rembg_operator.models import API_GROUP, API_VERSION
from rembg_operator.state import ChildKey, Key, Services

log = logging.getLogger(__name__)

CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
# A re-list comes as a burst of events: the audit waits for it to end.
AUDIT_DEBOUNCE_SECONDS = 2.0
AUDIT_RETRY_SECONDS = 2.0
# After a failed audit (an outage), audits come every AUDIT_RETRY_SECONDS for this long.
AUDIT_AFTER_OUTAGE_SECONDS = 60.0
SERVICE_API_VERSION = f"{API_GROUP}/{API_VERSION}"


class ChildAudit:
    def __init__(
        self,
        client: KubeApi,
        services: Services,
        *,
        repair: Callable[[Key], None],
        forget: Callable[[Key], None],
        interval: float,
        deep_interval: float,
    ) -> None:
        self._client = client
        self._services = services
        self._repair = repair
        self._forget = forget
        self._interval = interval
        self._deep_interval = deep_interval
        self._relisted = asyncio.Event()

    def relisted(self) -> None:
        """A watch listed again (it restarted): audit once the listing is over."""
        self._relisted.set()

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        wait = self._interval
        last_deep = loop.time()
        watchful_until = 0.0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relisted.wait(), wait)
                await asyncio.sleep(AUDIT_DEBOUNCE_SECONDS)
            self._relisted.clear()
            deep = loop.time() - last_deep >= self._deep_interval
            try:
                await self.audit(deep=deep)
            except Exception as error:  # the API server is away: the watches are too
                metrics.AUDITS.labels(result="failed").inc()
                log.warning("child audit failed (again in %ss): %s", AUDIT_RETRY_SECONDS, error)
                # The watches resume as the API server comes back, and what is deleted in
                # the first seconds after may reach none of them: audit often until then.
                watchful_until = loop.time() + AUDIT_AFTER_OUTAGE_SECONDS
                wait = AUDIT_RETRY_SECONDS
            else:
                metrics.AUDITS.labels(result="ok").inc()
                wait = AUDIT_RETRY_SECONDS if loop.time() < watchful_until else self._interval
                if deep:
                    last_deep = loop.time()

    async def audit(self, *, deep: bool = False) -> int:
        """List the services and children of every namespace with services; forget each
        service that is gone, repair each child that vanished (and, deep, each one that
        differs from what was applied). Returns how many children were repaired.

        A child applied again (or a service busy in a pass) since the list was planned is
        left alone: it may be newer than the list.
        """
        repaired = 0
        for namespace, kinds in self._applied_children().items():
            await self._forget_gone_services(namespace)
            for kind, expected in kinds.items():
                listed = await self._client.list_children(
                    api_version_of(kind), kind, namespace, CHILD_SELECTOR, metadata_only=not deep
                )
                live = {obj["metadata"]["name"]: obj for obj in listed}
                for key, name, applied in expected:
                    child = (kind, namespace, name)
                    repaired += self._compare(key, child, applied, live.get(name), deep=deep)
        return repaired

    async def _forget_gone_services(self, namespace: str) -> None:
        """A RembgService deleted while no watch saw it is let go, as its DELETED event
        would have: its children are the garbage collector's, and repairing them fights it."""
        listed = await self._client.list_children(
            SERVICE_API_VERSION, "RembgService", namespace, "", metadata_only=True
        )
        uids = {obj["metadata"]["name"]: obj["metadata"].get("uid") for obj in listed}
        for state in self._services:
            key = state.key
            if key[0] == namespace and uids.get(key[1]) != state.owner["metadata"].get("uid"):
                log.info("RembgService %s/%s is gone; forgetting it", *key)
                self._forget(key)

    def _compare(
        self,
        key: Key,
        child: ChildKey,
        applied: str,
        live: dict[str, Any] | None,
        *,
        deep: bool,
    ) -> int:
        state = self._services.get(key)
        if state is None or state.reconciling or state.children.get(child) != applied:
            return 0  # forgotten, busy, or applied again since the list was planned
        if live is not None and not deep:
            return 0  # there, and a names-only list says nothing more
        if not state.saw(child, live):
            return 0
        reason = "vanished" if live is None else "drifted"
        log.info("%s %s/%s of %s %s unseen; repairing", *child, key[1], reason)
        metrics.AUDIT_REPAIRS.labels(kind=child[0], reason=reason).inc()
        self._repair(key)
        return 1

    def _applied_children(self) -> dict[str, dict[str, list[tuple[Key, str, str]]]]:
        """namespace -> kind -> (service, child name, essence as applied) for every child
        the operator applied; a namespace with services but no children yet is there too."""
        found: dict[str, dict[str, list[tuple[Key, str, str]]]] = {}
        for state in self._services:
            kinds = found.setdefault(state.key[0], {})
            for (kind, _, name), applied in state.children.items():
                kinds.setdefault(kind, []).append((state.key, name, applied))
        return found
