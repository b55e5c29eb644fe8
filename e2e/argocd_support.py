"""What the Argo CD e2e watches: every Application's sync and health, and the RembgService's
Ready condition, sampled together twice a second by a background thread (straight from the API
server: kubectl's start-up and discovery take seconds on a loaded machine), so a test can ask
what was seen in which order and print each transition's time."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import yaml
from rembg_devcluster import DevCluster
from rembg_devcluster.argocd import NAMESPACE, AppState, app_state

from e2e.operator_support import condition


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    apps: dict[str, AppState]
    service: dict[str, Any] | None  # the RembgService, None while absent

    def app(self, name: str) -> AppState | None:
        return self.apps.get(name)

    @property
    def ready(self) -> str | None:
        return condition(self.service, "Ready").get("status") if self.service else None


def _summary(state: AppState | None) -> str:
    if state is None:
        return "absent"
    return f"{state.sync}/{state.health} (operation {state.operation})"


@dataclass
class Timeline:
    cluster: DevCluster
    service_namespace: str
    service_name: str
    every_seconds: float = 0.5
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    _client: httpx.Client | None = None

    def start(self) -> None:
        config = yaml.safe_load(self.cluster.kubeconfig.read_text())
        token = config["users"][0]["user"]["token"]
        context = ssl.create_default_context(cadata=self.cluster.ca_pem.decode())
        self._client = httpx.Client(
            base_url=self.cluster.server,
            verify=context,
            headers={"Authorization": f"Bearer {token}"},
            timeout=10,
        )
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self._client is not None:
            self._client.close()

    def _get(self, path: str) -> dict[str, Any] | None:
        assert self._client is not None
        response = self._client.get(path)
        if response.status_code == 404:
            return None
        response.raise_for_status()
        parsed: dict[str, Any] = response.json()
        return parsed

    def _sample(self) -> Sample | None:
        listing = self._get(f"/apis/argoproj.io/v1alpha1/namespaces/{NAMESPACE}/applications")
        if listing is None:
            return None
        apps = {item["metadata"]["name"]: app_state(item) for item in listing["items"]}
        service = self._get(
            f"/apis/rembg.io/v1alpha1/namespaces/{self.service_namespace}"
            f"/rembgservices/{self.service_name}"
        )
        return Sample(time.monotonic(), apps, service)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sample = self._sample()
            except (httpx.HTTPError, ValueError):  # a slow or refused answer: the next tick
                sample = None
            if sample is not None:
                with self._lock:
                    self.samples.append(sample)
            self._stop.wait(self.every_seconds)

    def since(self, start: float) -> list[Sample]:
        with self._lock:
            return [s for s in self.samples if s.at >= start]

    def wait_for(
        self,
        what: str,
        start: float,
        timeout: float,
        holds: Callable[[Sample], bool],
        describe: Callable[[], str] = lambda: "",
    ) -> Sample:
        """The first sample at or after start where holds(sample); AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            for sample in self.since(start):
                if holds(sample):
                    return sample
            if time.monotonic() > deadline:
                samples = self.since(start)
                last = samples[-1] if samples else None
                raise AssertionError(
                    f"timed out after {timeout:.0f}s waiting for {what}; last sample: {last}\n"
                    f"{describe()}"
                )
            time.sleep(0.5)

    def transitions(self, start: float, *names: str) -> list[str]:
        """Each change of the named Applications (and of the RembgService's Ready) since start,
        as 't+12.3s name: Synced/Healthy' lines."""
        lines: list[str] = []
        last: dict[str, str] = {}
        for sample in self.since(start):
            seen = {name: _summary(sample.app(name)) for name in names}
            seen["RembgService Ready"] = str(sample.ready) if sample.service else "absent"
            for key, value in seen.items():
                if last.get(key) != value:
                    lines.append(f"t+{sample.at - start:6.1f}s {key}: {value}")
                    last[key] = value
        return lines
