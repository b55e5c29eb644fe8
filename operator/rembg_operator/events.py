"""The Kubernetes Events the operator posts on a RembgService: each one once, best effort."""

from __future__ import annotations

import aiohttp

from rembg_operator.applier import ServicesFirst
from rembg_operator.kube import ApiError, KubeApi
from rembg_operator.pod_health import PodFinding
from rembg_operator.state import ServiceState

# Warning Events about pods per status refresh: a whole pool failing at once says it in a few.
MAX_POD_EVENTS = 5


class EventRecorder:
    def __init__(self, client: KubeApi, services_first: ServicesFirst) -> None:
        self._client = client
        self._services_first = services_first

    async def once(self, state: ServiceState, reason: str, message: str, *, warning: bool) -> None:
        """Post an Event unless the same reason and message was posted for this service."""
        if state.events_posted.get(reason) == message:
            return
        if await self._post(state, reason, message, warning=warning):
            state.events_posted[reason] = message

    async def pod_findings(self, state: ServiceState, findings: list[PodFinding]) -> None:
        """A Warning Event per (pod, reason) the first time a pod fails that way.

        Forgotten once the pod is ready or gone, so a relapse is posted again; kept while the
        pod stays in trouble, so a pull that alternates ErrImagePull and ImagePullBackOff
        posts each once, not on every turn.
        """
        troubled = {f.pod for f in findings}
        posted = {p for p in state.pod_events_posted if p[0] in troubled}
        new = [f for f in findings if not f.starting and (f.pod, f.reason) not in posted]
        # The ones over the cap count as said: a whole pool failing at once says it in a few.
        posted.update((f.pod, f.reason) for f in new[MAX_POD_EVENTS:])
        state.pod_events_posted = posted
        for finding in new[:MAX_POD_EVENTS]:
            message = f"pool {finding.pool}: {finding.summary()}"
            if finding.state:
                message += f" (state {finding.state})"
            if await self._post(state, finding.reason, message, warning=True):
                posted.add((finding.pod, finding.reason))

    async def _post(self, state: ServiceState, reason: str, message: str, *, warning: bool) -> bool:
        """Post it; False when that failed (then it is tried again next time)."""
        await self._services_first.turn()
        try:
            await self._client.post_event(
                state.owner, warning=warning, reason=reason, message=message
            )
        except (ApiError, OSError, TimeoutError, aiohttp.ClientError):
            # An Event is best effort: failing to post it must not fail the reconcile.
            return False
        return True
