"""Alert timing for the monitoring e2e: when an alert fired in Prometheus and reached its
Alertmanager receiver, and when both saw it end."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from rembg_devcluster.monitoring import MonitoringStack, WebhookSink


def _matches(labels: Mapping[str, str], wanted: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in wanted.items())


@dataclass(frozen=True)
class Fired:
    """Seconds from the fault's start to the alert going pending (Prometheus' own activeAt: its
    expression first held), to this test seeing it firing, and to its delivery."""

    labels: dict[str, str]
    pending: float
    in_prometheus: float
    delivered: float | None  # None: not delivered (inhibited)
    receiver: str | None


def wall_to_monotonic(timestamp: str) -> float:
    """An RFC 3339 time from Prometheus or the API server on this process' monotonic clock."""
    wall = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
    return wall - time.time() + time.monotonic()


@dataclass(frozen=True)
class Resolved:
    """Seconds from the fault's end to the alert's end in Prometheus, and to the resolved
    notification."""

    in_prometheus: float
    delivered: float


@dataclass
class AlertWatch:
    stack: MonitoringStack
    sink: WebhookSink

    def _prometheus(self, name: str, labels: Mapping[str, str], state: str) -> list[dict[str, Any]]:
        return [
            a
            for a in self.stack.prometheus.alerts()
            if a["labels"].get("alertname") == name
            and _matches(a["labels"], labels)
            and a["state"] == state
        ]

    def _active(self, name: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return self._prometheus(name, labels, "firing") + self._prometheus(name, labels, "pending")

    def _delivered(self, name: str, labels: Mapping[str, str], status: str, since: float) -> Any:
        for delivery in self.sink.deliveries():
            if (
                delivery.at >= since
                and delivery.status == status
                and delivery.labels.get("alertname") == name
                and _matches(delivery.labels, labels)
            ):
                return delivery
        return None

    def fired(
        self,
        name: str,
        labels: Mapping[str, str],
        since: float,
        timeout: float,
        *,
        delivered: bool = True,
    ) -> Fired:
        """Waits until the alert fires in Prometheus and, unless delivered=False (inhibited),
        reaches a receiver."""
        deadline = time.monotonic() + timeout
        in_prometheus: float | None = None
        firing: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if in_prometheus is None and (found := self._prometheus(name, labels, "firing")):
                in_prometheus, firing = time.monotonic() - since, found[0]
            delivery = self._delivered(name, labels, "firing", since)
            if in_prometheus is not None and (delivery is not None or not delivered):
                return Fired(
                    firing["labels"],
                    wall_to_monotonic(firing["activeAt"]) - since,
                    in_prometheus,
                    None if delivery is None else delivery.at - since,
                    None if delivery is None else delivery.receiver,
                )
            time.sleep(1)
        seen = [(a["labels"].get("alertname"), a["state"]) for a in self.stack.prometheus.alerts()]
        raise AssertionError(
            f"{name} {dict(labels)} did not fire within {timeout:.0f}s "
            f"(in Prometheus after: {in_prometheus}); Prometheus alerts: {seen}"
        )

    def resolved(
        self, name: str, labels: Mapping[str, str], since: float, timeout: float
    ) -> Resolved:
        deadline = time.monotonic() + timeout
        in_prometheus: float | None = None
        while time.monotonic() < deadline:
            if in_prometheus is None and not self._active(name, labels):
                in_prometheus = time.monotonic() - since
            delivery = self._delivered(name, labels, "resolved", since)
            if in_prometheus is not None and delivery is not None:
                return Resolved(in_prometheus, delivery.at - since)
            time.sleep(1)
        raise AssertionError(
            f"{name} {dict(labels)} not resolved within {timeout:.0f}s "
            f"(gone from Prometheus after: {in_prometheus})"
        )

    def gone(self, name: str, labels: Mapping[str, str], since: float, timeout: float) -> float:
        """Seconds from since until Prometheus holds no pending or firing such alert (for an
        inhibited alert, whose resolution nobody is told)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._active(name, labels):
                return time.monotonic() - since
            time.sleep(1)
        raise AssertionError(f"{name} {dict(labels)} still active after {timeout:.0f}s")

    def ever_delivered(self, name: str, labels: Mapping[str, str]) -> bool:
        return self._delivered(name, labels, "firing", since=0.0) is not None


def report(name: str, fired: Fired, resolved: Resolved | None) -> str:
    labels = {
        k: fired.labels[k] for k in ("namespace", "rembg_service", "pool") if k in fired.labels
    }
    delivered = (
        f"delivered to {fired.receiver} after {fired.delivered:.1f}s"
        if fired.delivered is not None
        else "not delivered (inhibited)"
    )
    line = (
        f"{name} {labels}: pending after {fired.pending:.1f}s, firing after "
        f"{fired.in_prometheus:.1f}s, {delivered}"
    )
    if resolved is not None:
        line += (
            f"; resolved {resolved.in_prometheus:.1f}s after the fault ended, "
            f"resolution delivered after {resolved.delivered:.1f}s"
        )
    return line
