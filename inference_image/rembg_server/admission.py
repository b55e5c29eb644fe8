"""Load shedding: a budget of in-flight requests and megapixels for the whole process.

A request holds a ticket from the moment its header is read until its response is built, so
the budget bounds decoded images in memory as well as the inference queue.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Ticket:
    megapixels: float


class AdmissionBudget:
    def __init__(self, max_requests: int, max_megapixels: float) -> None:
        self._max_requests = max_requests
        self._max_megapixels = max_megapixels
        self._lock = threading.Lock()
        self._requests = 0
        self._megapixels = 0.0
        self._seconds_per_request = 1.0  # moving average of admitted request durations

    @property
    def pending(self) -> tuple[int, float]:
        with self._lock:
            return self._requests, self._megapixels

    def full(self) -> bool:
        with self._lock:
            return self._requests >= self._max_requests

    def try_acquire(self, megapixels: float) -> Ticket | None:
        with self._lock:
            if self._requests + 1 > self._max_requests:
                return None
            if self._requests and self._megapixels + megapixels > self._max_megapixels:
                return None
            self._requests += 1
            self._megapixels += megapixels
        return Ticket(megapixels)

    def release(self, ticket: Ticket, seconds: float | None = None) -> None:
        with self._lock:
            self._requests -= 1
            self._megapixels = max(0.0, self._megapixels - ticket.megapixels)
            if seconds is not None:
                self._seconds_per_request += 0.1 * (seconds - self._seconds_per_request)

    def retry_after_seconds(self) -> int:
        """When a slot is likely free again: half an admitted request's recent duration.

        Admitted requests finish in turn, so some slot frees well before a full duration;
        clamped to 1..30 s so a client neither hammers nor gives up.
        """
        with self._lock:
            estimate = self._seconds_per_request / 2
        return min(30, max(1, math.ceil(estimate)))
