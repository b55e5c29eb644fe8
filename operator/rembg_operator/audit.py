"""Children deleted while no watch saw it: found by listing, repaired like any deletion.

A deletion made while a watch was not connected never arrives as an event (kopf resumes a
watch from its last resource version, or lists again, and neither says what vanished
meanwhile). So the audit lists the children (names only) now and then, at once when a
re-list shows that a watch restarted, and soon again after a failed attempt (the API server
is away, and so are the watches), and treats every child the operator applied and the list
lacks as deleted: client-go's informers deliver those as "deleted, final state unknown".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from rembg_operator import metrics
from rembg_operator.builders.meta import MANAGED_BY, MANAGED_BY_LABEL
from rembg_operator.kube import KubeApi, api_version_of
from rembg_operator.state import Key, Services

log = logging.getLogger(__name__)

CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY}"
# A re-list comes as a burst of events: the audit waits for it to end.
AUDIT_DEBOUNCE_SECONDS = 2.0
AUDIT_RETRY_SECONDS = 2.0


class ChildAudit:
    def __init__(
        self,
        client: KubeApi,
        services: Services,
        repair: Callable[[Key], None],
        interval: float,
    ) -> None:
        self._client = client
        self._services = services
        self._repair = repair
        self._interval = interval
        self._relisted = asyncio.Event()

    def relisted(self) -> None:
        """A watch listed again (it restarted): audit once the listing is over."""
        self._relisted.set()

    async def run_forever(self) -> None:
        wait = self._interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._relisted.wait(), wait)
                await asyncio.sleep(AUDIT_DEBOUNCE_SECONDS)
            self._relisted.clear()
            try:
                await self.audit()
            except Exception as error:  # the API server is away: the watches are too
                metrics.AUDITS.labels(result="failed").inc()
                log.warning("child audit failed (again in %ss): %s", AUDIT_RETRY_SECONDS, error)
                # Soon, not in `interval`: the first audit that succeeds after an outage is
                # the one that finds what was deleted while nobody watched.
                wait = AUDIT_RETRY_SECONDS
            else:
                metrics.AUDITS.labels(result="ok").inc()
                wait = self._interval

    async def audit(self) -> int:
        """List the children of every namespace with services; repair each one that vanished.

        Only children applied before the list was sent count: one applied since may be
        newer than the list. Returns how many vanished.
        """
        vanished = 0
        for namespace, kinds in self._applied_children().items():
            for kind, expected in kinds.items():
                names = await self._client.list_names(
                    api_version_of(kind), kind, namespace, CHILD_SELECTOR
                )
                for key, name in expected:
                    state = self._services.get(key)
                    child = (kind, namespace, name)
                    if name in names or state is None or child not in state.children:
                        continue
                    log.info(
                        "%s %s/%s of %s vanished unseen; repairing", kind, namespace, name, key[1]
                    )
                    metrics.VANISHED_CHILDREN.labels(kind=kind).inc()
                    state.forget_child(child)
                    self._repair(key)
                    vanished += 1
        return vanished

    def _applied_children(self) -> dict[str, dict[str, list[tuple[Key, str]]]]:
        """namespace -> kind -> (service, child name) for every child the operator applied."""
        found: dict[str, dict[str, list[tuple[Key, str]]]] = {}
        for state in self._services:
            for kind, namespace, name in state.children:
                found.setdefault(namespace, {}).setdefault(kind, []).append((state.key, name))
        return found
