"""The job store: the only module that talks to Redis.

Layout (P = REMBG_JOBS_KEY_PREFIX): stream `P:jobs` (field `id`, consumer group `workers`),
hash `P:job:<id>`, `P:input:<id>`, `P:result:<id>`. Every state transition of a job is one Lua
script (jobs/lua/), so it is atomic across replicas; see common.lua for the state machine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from rembg_server.jobs.records import Claim, JobRecord, NewJob
from rembg_server.settings import Settings, redis_endpoint

log = logging.getLogger("rembg_server.jobs")
T = TypeVar("T")

GROUP = "workers"
QUEUED_TTL_SECONDS = 7 * 86_400  # a job nobody ever runs still expires
STALE_CONSUMER_MS = 3_600_000
# Errors that mean "Redis is not there right now" (down, restarting, loading its AOF, a
# replica after a failover), as opposed to a bug in a command.
UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OSError)


class JobStoreUnavailableError(Exception):
    """Redis cannot be reached; the caller answers 503 or backs off."""


@dataclass(frozen=True)
class GaveUp:
    """A claim found the job past its attempts: it is failed now (terminal)."""

    record: JobRecord


@dataclass(frozen=True)
class Sample:
    backlog: int
    oldest_age_seconds: float


@dataclass(frozen=True)
class Cancellation:
    outcome: str  # 'cancelled' (record set), 'deleted' (was terminal) or 'gone' (unknown)
    record: JobRecord | None = None


def _script(name: str) -> str:
    folder = resources.files("rembg_server.jobs") / "lua"
    return (folder / "common.lua").read_text() + "\n" + (folder / f"{name}.lua").read_text()


def connect(settings: Settings) -> Redis:
    host, port = redis_endpoint(settings.jobs_redis_address)
    return Redis(
        host=host,
        port=port,
        db=settings.jobs_redis_db,
        username=settings.jobs_redis_username or None,
        password=settings.jobs_redis_password.get_secret_value() or None,
        ssl=settings.jobs_redis_tls,
        socket_timeout=5.0,
        socket_connect_timeout=2.0,
        # One quick retry heals a connection a restarted Redis closed; more would only make
        # callers wait during an outage instead of answering 503 and backing off.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
        client_name="rembg-server",
    )


class JobStore:
    def __init__(self, settings: Settings, on_health: Callable[[bool], None]) -> None:
        self.settings = settings
        self.prefix = settings.jobs_key_prefix
        self.stream = f"{self.prefix}:jobs"
        self._redis = connect(settings)
        self._on_health = on_health
        self._up: bool | None = None
        self._scripts = {
            name: self._redis.register_script(_script(name))
            for name in ("enqueue", "start", "refresh", "finish", "requeue", "cancel", "sample")
        }

    async def close(self) -> None:
        await self._redis.aclose()

    def keys(self, job_id: str) -> list[str]:
        """The KEYS of every job script: stream, job hash, input, result."""
        p = self.prefix
        return [self.stream, f"{p}:job:{job_id}", f"{p}:input:{job_id}", f"{p}:result:{job_id}"]

    # --- health -------------------------------------------------------------------------------

    async def _call(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Run one Redis operation; unavailability becomes JobStoreUnavailableError, logged once
        per outage, and every call updates the redis_up gauge."""
        try:
            result = await operation()
        except UNAVAILABLE as error:
            self._health(up=False, error=error)
            address = self.settings.jobs_redis_address
            raise JobStoreUnavailableError(f"redis at {address}: {error}") from error
        self._health(up=True)
        return result

    def _health(self, *, up: bool, error: BaseException | None = None) -> None:
        if up != self._up:
            fields = {"address": self.settings.jobs_redis_address}
            if not up:
                log.warning("redis unreachable", extra={"fields": {**fields, "error": str(error)}})
            elif self._up is not None:
                log.info("redis reachable again", extra={"fields": fields})
            self._up = up
        self._on_health(up)

    async def _grouped(self, operation: Callable[[], Awaitable[T]]) -> T:
        """Like _call, for commands that need the consumer group: a Redis that lost its data
        answers NOGROUP (or UNBLOCKED, to a read blocked while the stream vanished), so the
        group is created again and the command retried once."""
        try:
            return await self._call(operation)
        except ResponseError as error:
            if not str(error).startswith(("NOGROUP", "UNBLOCKED")):
                raise
            log.warning("consumer group missing; creating it again", extra={"fields": {}})
            await self.ensure_group()
            return await self._call(operation)

    async def ensure_group(self) -> None:
        async def create() -> None:
            try:
                await self._redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
            except ResponseError as error:
                if not str(error).startswith("BUSYGROUP"):
                    raise

        await self._call(create)

    async def _run(self, name: str, job_id: str, *args: Any) -> Any:
        script = self._scripts[name]
        return await self._call(lambda: script(keys=self.keys(job_id), args=[GROUP, *args]))

    # --- submission and reads -----------------------------------------------------------------

    async def backlog(self) -> int:
        length: int = await self._call(lambda: self._redis.xlen(self.stream))
        return length

    async def add(self, jobs: list[NewJob]) -> None:
        """Write every job of one submission in one MULTI/EXEC: all are stored, or none."""
        ttl = self.settings.jobs_result_ttl_seconds

        async def write() -> None:
            async with self._redis.pipeline(transaction=True) as pipe:
                for job in jobs:
                    keys = self.keys(job.record.id)
                    fields = [part for pair in job.record.fields().items() for part in pair]
                    if job.data is None:  # failed at submission: a record, nothing to run
                        pipe.hset(keys[1], items=fields)
                        pipe.expire(keys[1], ttl)
                        continue
                    args: list[EncodableT] = [
                        GROUP,
                        job.record.id,
                        QUEUED_TTL_SECONDS,
                        job.data,
                        *fields,
                    ]
                    await self._scripts["enqueue"](keys=keys, args=args, client=pipe)
                await pipe.execute()

        await self._call(write)

    async def get(self, job_id: str) -> JobRecord | None:
        raw: dict[Any, Any] = await self._call(lambda: self._redis.hgetall(self.keys(job_id)[1]))
        return JobRecord.from_fields(job_id, raw) if raw else None

    async def get_with_result(self, job_id: str) -> tuple[JobRecord, bytes | None] | None:
        keys = self.keys(job_id)

        async def read() -> list[Any]:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(keys[1])
                pipe.get(keys[3])
                replies: list[Any] = await pipe.execute()
                return replies

        raw, body = await self._call(read)
        return (JobRecord.from_fields(job_id, raw), body) if raw else None

    async def cancel(self, job_id: str) -> Cancellation:
        ttl = self.settings.jobs_result_ttl_seconds
        reply = await self._run("cancel", job_id, time.time(), ttl)
        outcome = reply[0].decode()
        record = _record(job_id, reply[1]) if outcome == "cancelled" else None
        return Cancellation(outcome, record)

    # --- workers ------------------------------------------------------------------------------

    async def claim_new(self, consumer: str, block_seconds: float) -> Claim | GaveUp | None:
        """The next job no worker has seen (waits up to `block_seconds` for one)."""
        streams: dict[Any, Any] = {self.stream: ">"}
        block = max(1, int(block_seconds * 1000))
        reply: Any = await self._grouped(
            lambda: self._redis.xreadgroup(GROUP, consumer, streams, count=1, block=block)
        )
        if not reply:
            return None
        [(_, [(entry, fields)])] = reply
        return await self._start(entry.decode(), fields, consumer, reclaimed="")

    async def reclaim_idle(self, consumer: str, reason: str) -> Claim | GaveUp | None:
        """A job whose worker stopped heart-beating for the visibility timeout, if any."""
        idle_ms = int(self.settings.jobs_visibility_timeout_seconds * 1000)
        reply: Any = await self._grouped(
            lambda: self._redis.xautoclaim(self.stream, GROUP, consumer, idle_ms, "0-0", count=1)
        )
        claimed = reply[1]
        if not claimed:
            return None
        [(entry, fields)] = claimed
        return await self._start(entry.decode(), fields, consumer, reclaimed=reason)

    async def _start(
        self, entry: str, fields: dict[bytes, bytes], consumer: str, reclaimed: str
    ) -> Claim | GaveUp | None:
        job_id = fields.get(b"id", b"").decode()
        if not job_id:  # not one of ours; drop it so it does not come back
            await self._call(lambda: self._redis.xack(self.stream, GROUP, entry))
            return None
        settings = self.settings
        reply = await self._run(
            "start",
            job_id,
            entry,
            consumer,
            time.time(),
            settings.jobs_max_attempts,
            settings.jobs_result_ttl_seconds,
            "1" if reclaimed else "0",
            reclaimed,
        )
        outcome = reply[0].decode()
        if outcome == "failed":
            return GaveUp(_record(job_id, reply[1]))
        if outcome != "running":
            return None
        record = _record(job_id, reply[1])
        data: bytes = reply[2] or b""
        return Claim(record, data, entry, consumer, reclaimed=bool(reclaimed))

    async def refresh(self, claim: Claim) -> str:
        """Extend the claim; 'running', or why the worker must stop (see refresh.lua)."""
        reply = await self._run("refresh", claim.record.id, claim.entry, claim.consumer)
        state: str = reply.decode()
        return state

    async def finish_done(self, claim: Claim, body: bytes, media_type: str) -> JobRecord | None:
        """Store the result and mark the job done; None if it had already ended (first wins)."""
        return await self._finish(claim, "done", media_type=media_type, body=body)

    async def fail(self, claim: Claim, reason: str) -> JobRecord | None:
        """Mark the job failed for good; None if it had already ended."""
        return await self._finish(claim, "failed", reason=reason)

    async def _finish(
        self, claim: Claim, state: str, *, reason: str = "", media_type: str = "", body: bytes = b""
    ) -> JobRecord | None:
        ttl = self.settings.jobs_result_ttl_seconds
        reply = await self._run(
            "finish",
            claim.record.id,
            claim.entry,
            state,
            time.time(),
            ttl,
            reason,
            media_type,
            body,
        )
        return _record(claim.record.id, reply[1]) if reply[0] == b"ok" else None

    async def requeue(self, claim: Claim, reason: str, *, counted: bool) -> JobRecord | None:
        """Back to the queue (state queued), or failed past max attempts; None if lost."""
        settings = self.settings
        reply = await self._run(
            "requeue",
            claim.record.id,
            claim.entry,
            claim.consumer,
            time.time(),
            claim.record.id,
            reason,
            "1" if counted else "0",
            settings.jobs_max_attempts,
            settings.jobs_result_ttl_seconds,
            QUEUED_TTL_SECONDS,
        )
        return None if reply[0] == b"lost" else _record(claim.record.id, reply[1])

    async def sample(self) -> Sample:
        script = self._scripts["sample"]
        length, age_ms = await self._call(
            lambda: script(keys=[self.stream], args=[GROUP, STALE_CONSUMER_MS])
        )
        return Sample(int(length), int(age_ms) / 1000)


def _record(job_id: str, flat: list[bytes]) -> JobRecord:
    """A job from the flat HGETALL list a script returns."""
    return JobRecord.from_fields(job_id, dict(zip(flat[::2], flat[1::2], strict=True)))
