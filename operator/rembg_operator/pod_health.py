"""Why a pool's pods are not ready: pod dicts in, typed findings out (pure).

A pod is parsed once, when its watch event arrives (`PodState.from_pod`), into the few
fields the diagnosis needs; `diagnose(pod, now)` then says what keeps it from being ready,
the way `kubectl describe pod` would, from what the kubelet and the scheduler wrote:

- a container waiting: ImagePullBackOff, ErrImagePull, CrashLoopBackOff, ... (its message);
- the last termination when it matters: OOMKilled (also behind a CrashLoopBackOff: the
  cause is the reason, CrashLoopBackOff the state), Error with its exit code;
- the scheduler's verdict: PodScheduled=False, Unschedulable, "0/3 nodes are available: ...";
- running but not ready past the probes' own budget: "not ready: readiness probe failing".

Hard failures (`degraded`) do not heal by waiting; a pod merely starting (ContainerCreating,
warming up within its startup probe) is progress, not a failure. Probe failures themselves
are only Events (Unhealthy), which the operator does not read: the budget the probes allow
(from the pod's own spec) stands in for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rembg_operator.builders.meta import POOL_LABEL, SERVICE_LABEL

# Waiting reasons the kubelet keeps retrying without success: the pod will not become
# ready by waiting, someone has to act (fix the image, the Secret, the memory limit).
HARD_WAITING = (
    "ImagePullBackOff",
    "ErrImagePull",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
)
OOM_KILLED = "OOMKilled"
UNSCHEDULABLE = "Unschedulable"
PROBE_FAILING = "ProbeFailing"
STARTING = "Starting"
# The order a condition picks its reason in when pods fail in different ways: the most
# specific cause first (an OOM explains the CrashLoopBackOff it causes).
DEGRADED_ORDER = (OOM_KILLED, *HARD_WAITING, UNSCHEDULABLE)
# A termination this recent still explains a container that is running but not ready.
RECENT_TERMINATION_SECONDS = 600.0
# Kubernetes' probe defaults (core/v1 Probe).
PROBE_DEFAULTS = {"initialDelaySeconds": 0, "periodSeconds": 10, "failureThreshold": 3}
# Slack on top of the probes' budget: the kubelet runs probes on its own clock.
PROBE_SLACK_SECONDS = 10.0
MESSAGE_LIMIT = 300


@dataclass(frozen=True)
class Termination:
    reason: str
    exit_code: int
    message: str = ""
    finished_at: datetime | None = None

    @classmethod
    def parse(cls, raw: Mapping[str, Any] | None) -> Termination | None:
        if not raw:
            return None
        return cls(
            reason=str(raw.get("reason") or "Terminated"),
            exit_code=int(raw.get("exitCode") or 0),
            message=str(raw.get("message") or "").strip(),
            finished_at=_time(raw.get("finishedAt")),
        )

    def describe(self) -> str:
        return f"{self.reason} (exit code {self.exit_code})"


@dataclass(frozen=True)
class ContainerState:
    """One container's status, with the probe budget its spec allows before it is ready."""

    name: str
    init: bool = False
    ready: bool = False
    started: bool | None = None
    restarts: int = 0
    waiting_reason: str = ""
    waiting_message: str = ""
    running: bool = False
    running_since: datetime | None = None
    terminated: Termination | None = None
    last_terminated: Termination | None = None
    has_startup_probe: bool = False
    # Seconds from start within which not being ready is still warming up.
    grace_seconds: float = PROBE_SLACK_SECONDS
    memory_limit: str = ""

    @classmethod
    def parse(
        cls, raw: Mapping[str, Any], spec: Mapping[str, Any] | None, *, init: bool = False
    ) -> ContainerState:
        state = raw.get("state") or {}
        waiting = state.get("waiting") or {}
        running = state.get("running")
        spec = spec or {}
        startup = spec.get("startupProbe")
        readiness = spec.get("readinessProbe")
        limits = (spec.get("resources") or {}).get("limits") or {}
        return cls(
            name=str(raw.get("name") or ""),
            init=init,
            ready=bool(raw.get("ready")),
            started=raw.get("started"),
            restarts=int(raw.get("restartCount") or 0),
            waiting_reason=str(waiting.get("reason") or ("Waiting" if "waiting" in state else "")),
            waiting_message=str(waiting.get("message") or "").strip(),
            running=running is not None,
            running_since=_time((running or {}).get("startedAt")),
            terminated=Termination.parse(state.get("terminated")),
            last_terminated=Termination.parse((raw.get("lastState") or {}).get("terminated")),
            has_startup_probe=bool(startup),
            grace_seconds=_probe_budget(startup) + _probe_budget(readiness) + PROBE_SLACK_SECONDS,
            memory_limit=str(limits.get("memory") or ""),
        )


@dataclass(frozen=True)
class PodState:
    """What of a pod the diagnosis reads; equal states diagnose the same (at the same time)."""

    name: str
    service: str
    pool: str
    terminating: bool = False
    phase: str = "Pending"
    ready: bool = False
    scheduled: bool | None = None  # None: the scheduler has not said yet
    scheduling_reason: str = ""  # PodScheduled's reason and message when it is False
    scheduling_message: str = ""
    reason: str = ""
    message: str = ""
    containers: tuple[ContainerState, ...] = ()

    @classmethod
    def from_pod(cls, body: Mapping[str, Any]) -> PodState:
        meta = body.get("metadata") or {}
        labels = meta.get("labels") or {}
        spec = body.get("spec") or {}
        status = body.get("status") or {}
        conditions = {str(c.get("type")): c for c in status.get("conditions") or []}
        scheduled = conditions.get("PodScheduled")
        specs = {
            str(c.get("name")): c
            for c in (*spec.get("initContainers", ()), *spec.get("containers", ()))
        }
        containers = tuple(
            ContainerState.parse(raw, specs.get(str(raw.get("name"))), init=init)
            for init, key in ((True, "initContainerStatuses"), (False, "containerStatuses"))
            for raw in status.get(key) or ()
        )
        return cls(
            name=str(meta.get("name") or ""),
            service=str(labels.get(SERVICE_LABEL) or ""),
            pool=str(labels.get(POOL_LABEL) or ""),
            terminating=bool(meta.get("deletionTimestamp")),
            phase=str(status.get("phase") or "Pending"),
            ready=(conditions.get("Ready") or {}).get("status") == "True",
            scheduled=None if scheduled is None else scheduled.get("status") == "True",
            scheduling_reason=str((scheduled or {}).get("reason") or ""),
            scheduling_message=str((scheduled or {}).get("message") or "").strip(),
            reason=str(status.get("reason") or ""),
            message=str(status.get("message") or "").strip(),
            containers=containers,
        )


@dataclass(frozen=True)
class PodFinding:
    """Why one pod is not ready."""

    pod: str
    pool: str
    reason: str
    message: str
    state: str = ""  # the container's state when it differs from the cause (CrashLoopBackOff)
    restarts: int = 0
    degraded: bool = False  # a hard failure: waiting does not fix it
    starting: bool = False  # progress, not a failure
    # Seconds until the same pod, unchanged, would be diagnosed differently (a grace ends).
    changes_in: float | None = None

    def as_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pod": self.pod, "reason": self.reason, "message": self.message}
        if self.state:
            out["state"] = self.state
        if self.restarts:
            out["restarts"] = self.restarts
        return out

    def summary(self) -> str:
        """`pod demo-cpu-abc12: ImagePullBackOff: Back-off pulling image "x"`."""
        return f"pod {self.pod}: {self.reason}: {self.message}"


def diagnose(pod: PodState, now: datetime) -> PodFinding | None:
    """Why this pod is not ready, or None when it is ready (or on its way out)."""
    if pod.terminating or pod.ready:
        return None
    if pod.phase in ("Failed", "Succeeded"):
        return _finding(pod, pod.reason or pod.phase, pod.message or f"pod {pod.phase.lower()}")
    if pod.scheduled is False:
        reason = pod.scheduling_reason or "Pending"
        message = pod.scheduling_message or "not scheduled yet"
        hard = reason == UNSCHEDULABLE
        return _finding(pod, reason, message, degraded=hard, starting=not hard)
    if pod.scheduled is None and not pod.containers:
        return _finding(pod, "Pending", "waiting for the scheduler", starting=True)
    for container in _in_start_order(pod.containers):
        found = _diagnose_container(pod, container, now)
        if found is not None:
            return found
    return _finding(pod, "NotReady", pod.message or "pod not ready", starting=True)


def _in_start_order(containers: Sequence[ContainerState]) -> list[ContainerState]:
    # Init containers run first; a failing one is why the others wait (PodInitializing).
    return [c for c in containers if c.init] + [c for c in containers if not c.init]


def _diagnose_container(
    pod: PodState, container: ContainerState, now: datetime
) -> PodFinding | None:
    if container.ready or (container.init and container.terminated is not None):
        if container.init and container.terminated and container.terminated.exit_code:
            return _terminated(pod, container, container.terminated)
        return None
    last = container.last_terminated
    if container.waiting_reason:
        return _waiting(pod, container, last)
    if container.terminated is not None:
        return _terminated(pod, container, container.terminated)
    if container.running:
        return _running_not_ready(pod, container, now)
    return None


def _waiting(pod: PodState, container: ContainerState, last: Termination | None) -> PodFinding:
    reason = container.waiting_reason
    message = container.waiting_message or reason
    if reason == "CrashLoopBackOff" and last is not None:
        if last.reason == OOM_KILLED:
            return _finding(
                pod,
                OOM_KILLED,
                _oom_message(container, last),
                state=reason,
                restarts=container.restarts,
                degraded=True,
            )
        message = (
            f"container {container.name} exited {last.describe()}{_times(container)}: {message}"
        )
        if last.message:
            message += f"; last output: {last.message}"
    elif reason not in HARD_WAITING:
        return _finding(pod, reason, message, restarts=container.restarts, starting=True)
    return _finding(pod, reason, message, restarts=container.restarts, degraded=True)


def _terminated(pod: PodState, container: ContainerState, ended: Termination) -> PodFinding:
    if ended.reason == OOM_KILLED:
        message = _oom_message(container, ended)
        return _finding(pod, OOM_KILLED, message, restarts=container.restarts, degraded=True)
    message = f"container {container.name} exited {ended.describe()}"
    if ended.message:
        message += f": {ended.message}"
    return _finding(pod, ended.reason, message + _times(container), restarts=container.restarts)


def _running_not_ready(pod: PodState, container: ContainerState, now: datetime) -> PodFinding:
    after_oom = _restarted_after_oom(pod, container, now)
    if after_oom is not None:
        return after_oom
    since = container.running_since or now  # no start time yet: it just started
    running_for = max((now - since).total_seconds(), 0.0)
    probe = "startup" if container.has_startup_probe and not container.started else "readiness"
    if running_for < container.grace_seconds:
        return _probe_not_passed_yet(pod, container, probe, running_for)
    message = (
        f"not ready: {probe} probe failing (container {container.name} running for "
        f"{_duration(running_for)}){_restarts(container)}"
    )
    return _finding(pod, PROBE_FAILING, message, restarts=container.restarts)


def _restarted_after_oom(
    pod: PodState, container: ContainerState, now: datetime
) -> PodFinding | None:
    """An OOM within RECENT_TERMINATION_SECONDS, or None when there was none that recent."""
    last = container.last_terminated
    if last is None or last.reason != OOM_KILLED or last.finished_at is None:
        return None
    ago = (now - last.finished_at).total_seconds()
    if ago >= RECENT_TERMINATION_SECONDS:
        return None
    # Restarted after an OOM and not ready again yet: the OOM is the story.
    return _finding(
        pod,
        OOM_KILLED,
        _oom_message(container, last),
        state="Running",
        restarts=container.restarts,
        degraded=True,
        changes_in=RECENT_TERMINATION_SECONDS - ago,
    )


def _probe_not_passed_yet(
    pod: PodState, container: ContainerState, probe: str, running_for: float
) -> PodFinding:
    """Running for less than the probes' budget: warming up, not failing."""
    # No running time here: a message that changes on every look rewrites the status.
    message = f"container {container.name} started, {probe} probe not passed yet" + (
        _restarts(container)
    )
    return _finding(
        pod,
        STARTING,
        message,
        restarts=container.restarts,
        starting=True,
        changes_in=container.grace_seconds - running_for,
    )


def _oom_message(container: ContainerState, ended: Termination) -> str:
    limit = f" (memory limit {container.memory_limit})" if container.memory_limit else ""
    return (
        f"container {container.name} was OOMKilled{limit}, exit code {ended.exit_code}"
        f"{_times(container)}"
    )


def _times(container: ContainerState) -> str:
    return f", restarted {container.restarts} times" if container.restarts else ""


def _restarts(container: ContainerState) -> str:
    if not container.restarts:
        return ""
    last = container.last_terminated
    tail = f", last {last.describe()}" if last is not None else ""
    return f"; restarted {container.restarts} times{tail}"


def _finding(
    pod: PodState,
    reason: str,
    message: str,
    *,
    state: str = "",
    restarts: int = 0,
    degraded: bool = False,
    starting: bool = False,
    changes_in: float | None = None,
) -> PodFinding:
    if len(message) > MESSAGE_LIMIT:
        message = message[: MESSAGE_LIMIT - 3] + "..."
    return PodFinding(
        pod=pod.name,
        pool=pod.pool,
        reason=reason,
        message=message,
        state=state,
        restarts=restarts,
        degraded=degraded,
        starting=starting,
        changes_in=changes_in,
    )


def pool_findings(pods: Iterable[PodState], now: datetime) -> list[PodFinding]:
    """Every not-ready pod's finding, hard failures first, then failures, then starting."""
    found = [f for f in (diagnose(p, now) for p in pods) if f is not None]
    return sorted(found, key=lambda f: (not f.degraded, f.starting, f.pod))


def degraded_reason(findings: Iterable[PodFinding]) -> str | None:
    """The condition reason for these findings' hard failures (the most specific one)."""
    reasons = {f.reason for f in findings if f.degraded}
    if not reasons:
        return None
    return next((r for r in DEGRADED_ORDER if r in reasons), sorted(reasons)[0])


def next_change(findings: Iterable[PodFinding]) -> float | None:
    """Seconds until the first finding would change by itself (a grace period ends)."""
    times = [f.changes_in for f in findings if f.changes_in is not None]
    return min(times) if times else None


def _probe_budget(probe: Mapping[str, Any] | None) -> float:
    """Seconds a probe may fail before it counts: initial delay + period x threshold."""
    if not probe:
        return 0.0
    value = {k: int(probe.get(k) or default) for k, default in PROBE_DEFAULTS.items()}
    return float(value["initialDelaySeconds"] + value["periodSeconds"] * value["failureThreshold"])


def _duration(seconds: float) -> str:
    whole = int(seconds)
    if whole < 120:
        return f"{whole}s"
    if whole < 7200:
        return f"{whole // 60}m"
    return f"{whole // 3600}h"


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
