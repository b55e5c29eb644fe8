"""Children changed while no watch saw it: found by listing, repaired like any change.

A deletion made while a watch was not connected may never arrive as an event (after a
kube-apiserver restart, resumed watches were seen to miss deletions made seconds later, by
kopf and kube-controller-manager alike). So the audit lists the children, names only, every
`interval`, at once when a re-list shows that a watch restarted, and soon again after a
failed attempt (the API server is away, and so are the watches), and treats every child the
operator applied and the list lacks as deleted: client-go's informers deliver those as
"deleted, final state unknown". Every `deep_interval` it lists whole objects and compares
each with what was applied, so an edit no watch delivered is undone too; this replaces a
resync that re-applies everything (and writes while nothing changed).
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
from rembg_operator.state import ChildKey, Key, Services, essence

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
        *,
        interval: float,
        deep_interval: float,
    ) -> None:
        self._client = client
        self._services = services
        self._repair = repair
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
                # Soon, not in `interval`: the first audit that succeeds after an outage is
                # the one that finds what was deleted while nobody watched.
                wait = AUDIT_RETRY_SECONDS
            else:
                metrics.AUDITS.labels(result="ok").inc()
                wait = self._interval
                if deep:
                    last_deep = loop.time()

    async def audit(self, *, deep: bool = False) -> int:
        """List the children of every namespace with services; repair each one that vanished
        (and, deep, each one that differs from what was applied). Returns how many.

        Only children applied before the list was sent count: one applied since may be
        newer than the list.
        """
        repaired = 0
        for namespace, kinds in self._applied_children().items():
            for kind, expected in kinds.items():
                listed = await self._client.list_children(
                    api_version_of(kind), kind, namespace, CHILD_SELECTOR, metadata_only=not deep
                )
                live = {obj["metadata"]["name"]: obj for obj in listed}
                for key, name in expected:
                    repaired += self._compare(key, (kind, namespace, name), live.get(name), deep)
        return repaired

    def _compare(self, key: Key, child: ChildKey, live: dict[str, Any] | None, deep: bool) -> int:
        state = self._services.get(key)
        if state is None or child not in state.children:
            return 0  # forgotten, pruned or re-applied since the list was planned
        if not state.saw(child, _essence_of(live, state.children[child], deep=deep)):
            return 0
        reason = "vanished" if live is None else "drifted"
        log.info("%s %s/%s of %s %s unseen; repairing", *child, key[1], reason)
        metrics.AUDIT_REPAIRS.labels(kind=child[0], reason=reason).inc()
        self._repair(key)
        return 1

    def _applied_children(self) -> dict[str, dict[str, list[tuple[Key, str]]]]:
        """namespace -> kind -> (service, child name) for every child the operator applied."""
        found: dict[str, dict[str, list[tuple[Key, str]]]] = {}
        for state in self._services:
            for kind, namespace, name in state.children:
                found.setdefault(namespace, {}).setdefault(kind, []).append((state.key, name))
        return found


def _essence_of(live: dict[str, Any] | None, applied: str, *, deep: bool) -> str | None:
    """What the list says of a child: gone (None), its essence, or (names only) that it is
    there, which says nothing against what was applied."""
    if live is None:
        return None
    return essence(live) if deep else applied
