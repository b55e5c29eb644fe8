"""Typed job records: what a job hash in Redis holds, and the JSON the API answers with."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal, cast

from rembg_server.params import RemoveParams

JobState = Literal["queued", "running", "done", "failed", "cancelled"]
TERMINAL_STATES: frozenset[str] = frozenset({"done", "failed", "cancelled"})
STATES: frozenset[str] = frozenset({"queued", "running", *TERMINAL_STATES})
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex


@dataclass(frozen=True)
class JobRecord:
    """One job hash (`<prefix>:job:<id>`), decoded."""

    id: str
    state: JobState
    model: str
    options: str  # RemoveParams as JSON
    created_at: float
    updated_at: float
    attempts: int = 0
    reason: str = ""
    media_type: str = ""
    webhook: str = ""
    ref: str = ""
    batch: str = ""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    def params(self) -> RemoveParams:
        return RemoveParams.model_validate_json(self.options)

    def with_state(self, state: JobState, reason: str = "") -> JobRecord:
        return replace(self, state=state, reason=reason)

    def fields(self) -> dict[str, str]:
        """The hash fields as Redis stores them."""
        return {
            "state": self.state,
            "model": self.model,
            "options": self.options,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "attempts": str(self.attempts),
            "reason": self.reason,
            "media_type": self.media_type,
            "webhook": self.webhook,
            "ref": self.ref,
            "batch": self.batch,
        }

    @classmethod
    def from_fields(cls, job_id: str, raw: Mapping[bytes, bytes]) -> JobRecord:
        fields = {key.decode(): value.decode() for key, value in raw.items()}
        state = fields.get("state", "")
        if state not in STATES:
            raise ValueError(f"job {job_id} has no valid state: {state!r}")
        return cls(
            id=job_id,
            state=cast(JobState, state),
            model=fields.get("model", ""),
            options=fields.get("options", "{}"),
            created_at=float(fields.get("created_at", "0")),
            updated_at=float(fields.get("updated_at", "0")),
            attempts=int(fields.get("attempts", "0")),
            reason=fields.get("reason", ""),
            media_type=fields.get("media_type", ""),
            webhook=fields.get("webhook", ""),
            ref=fields.get("ref", ""),
            batch=fields.get("batch", ""),
        )

    def status(self) -> dict[str, Any]:
        """The body of GET /v1/jobs/{id} (and of webhook calls)."""
        body: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "model": self.model,
            "attempts": self.attempts,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.ref:
            body["ref"] = self.ref
        if self.batch:
            body["batch"] = self.batch
        if self.state == "done":
            body["result_url"] = result_url(self.id)
            body["media_type"] = self.media_type
        return body

    def accepted(self) -> dict[str, Any]:
        """The body of a 202 for a single-image submission."""
        return {
            "id": self.id,
            "state": self.state,
            "status_url": status_url(self.id),
            "result_url": result_url(self.id),
        }

    def summary(self) -> dict[str, Any]:
        """One entry of a batch submission's answer."""
        body: dict[str, Any] = {"id": self.id, "ref": self.ref or None, "state": self.state}
        if self.reason:
            body["reason"] = self.reason
        return body


def status_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}"


def result_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/result"


@dataclass(frozen=True)
class NewJob:
    """A job to write at submission: queued with its input, or failed at once (no input)."""

    record: JobRecord
    data: bytes | None = None


@dataclass(frozen=True)
class Claim:
    """A job this worker (consumer) holds through its stream entry."""

    record: JobRecord
    data: bytes
    entry: str
    consumer: str
    reclaimed: bool  # taken over from a worker that stopped heart-beating
