"""The model registry: which models are loaded, their sessions and queues, and their health.

It knows nothing of requests: the image pipeline and the warmup ask it for a model by name,
the dataplane for the reasons a model cannot serve.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from rembg_server.batcher import BatchWorker, Job
from rembg_server.engine import Heartbeat, LoadRequest, MaskModel, ModelLoadError, load_model
from rembg_server.metrics import ServerMetrics
from rembg_server.settings import Settings

log = logging.getLogger("rembg_server")


@dataclass
class ServedModel:
    """One model name: its sessions (one per worker) and the queue they share."""

    model: MaskModel
    queue: asyncio.Queue[Job]
    workers: list[BatchWorker]

    def submit(self, payload: Any, *, observed: bool = True) -> Job:
        job = Job(payload, asyncio.get_running_loop().create_future(), observed=observed)
        self.queue.put_nowait(job)
        return job

    def idle(self) -> bool:
        """Nothing queued and no model call in flight."""
        return self.queue.empty() and not any(worker.busy() for worker in self.workers)


class ModelRegistry:
    """Loads every configured model once, starts its workers, and reports what failed."""

    def __init__(self, settings: Settings, metrics: ServerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models: dict[str, ServedModel] = {}
        self.failures: dict[str, str] = {}

    def __contains__(self, name: object) -> bool:
        return name in self.models

    def __getitem__(self, name: str) -> ServedModel:
        return self.models[name]

    def names(self) -> list[str]:
        return list(self.models)

    def device_of(self, name: str) -> str:
        served = self.models.get(name)
        if served is not None:
            return served.model.device
        return "cuda" if self.settings.provider == "cuda" else "cpu"

    async def load_all(self) -> None:
        """Load and verify every configured model; one that fails is recorded, not raised."""
        for name in self.settings.models:
            try:
                sessions = await asyncio.to_thread(load_model, self._load_request(name))
            except ModelLoadError as error:
                self.failures[name] = str(error)
                reason = {"reason": str(error)}
                log.error("model not servable", extra={"fields": reason})  # noqa: TRY400
                continue
            self._start(sessions)

    def not_servable(self) -> list[str]:
        return [f"{name}: not servable: {reason}" for name, reason in self.failures.items()]

    def liveness(self) -> tuple[bool, list[str]]:
        reasons = []
        for name, served in self.models.items():
            for index, worker in enumerate(served.workers):
                if not worker.alive():
                    stalled = worker.heartbeat.stalled_for()
                    reasons.append(
                        f"{name}: inference worker {index} dead or stuck for {stalled:.0f}s"
                    )
        return not reasons, reasons

    async def stop(self) -> None:
        for served in self.models.values():
            for worker in served.workers:
                await worker.stop()

    def _load_request(self, name: str) -> LoadRequest:
        settings = self.settings
        return LoadRequest(
            name=name,
            model_dir=settings.model_dir,
            checksums=settings.model_checksums,
            provider=settings.provider,
            allow_cpu_fallback=settings.allow_cpu_fallback,
            threads=settings.resolved_threads(),
            batch_max_size=settings.batch_max_size,
            sessions=settings.resolved_inference_workers(),
            cpu_arena=settings.cpu_mem_arena,
        )

    def _start(self, sessions: list[MaskModel]) -> None:
        model = sessions[0]
        labels = (model.name, model.device)

        def observe(size: int, seconds: float, waits: list[float]) -> None:
            self.metrics.batch_size.labels(*labels).observe(size)
            self.metrics.inference_duration.labels(*labels).observe(seconds)
            for wait in waits:
                self.metrics.queue_duration.labels(*labels).observe(wait)

        queue: asyncio.Queue[Job] = asyncio.Queue()
        workers = [
            BatchWorker(
                session,
                queue,
                max_size=self.settings.batch_max_size,
                max_wait_seconds=self.settings.batch_max_wait_ms / 1000,
                heartbeat=Heartbeat(self.settings.liveness_stall_seconds),
                observe=observe,
            )
            for session in sessions
        ]
        for worker in workers:
            worker.start()
        self.models[model.name] = ServedModel(model, queue, workers)
        self.metrics.model_info.labels(*labels, model.provider).set(1)
        self.metrics.declare(*labels)
        loaded = {"model": model.name, "provider": model.provider, "sessions": len(sessions)}
        log.info("model loaded", extra={"fields": loaded})
