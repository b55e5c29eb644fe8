"""Names the job path's pieces share: the Redis key prefix, the stream KEDA reads, and the
variables that carry the connection into the pods (and from there into KEDA's trigger).

Credentials never pass through the operator: the Deployment maps the user's Secret onto these
variables with `secretKeyRef` (workload.py), and KEDA's redis-streams trigger names the same
variables (`addressFromEnv`, ...; autoscaling.py), so one Secret feeds both.
"""

from __future__ import annotations

from rembg_operator.builders.meta import ServiceRef
from rembg_operator.models import JobsSpec

ADDRESS_ENV = "REMBG_JOBS_REDIS_ADDRESS"
USERNAME_ENV = "REMBG_JOBS_REDIS_USERNAME"
PASSWORD_ENV = "REMBG_JOBS_REDIS_PASSWORD"  # noqa: S105 - a variable's name, not a password
WEBHOOK_SECRET_ENV = "REMBG_JOBS_WEBHOOK_SECRET"  # noqa: S105 - a variable's name
# The server's stream of unfinished jobs: entries are deleted at the terminal state, so its
# length is queued + running, the backlog.
STREAM_SUFFIX = "jobs"


def key_prefix(ref: ServiceRef, jobs: JobsSpec) -> str:
    """Every key of this service starts with `<prefix>:`; services may share one Redis."""
    return jobs.key_prefix or f"rembg:{ref.namespace}:{ref.name}"


def stream_name(ref: ServiceRef, jobs: JobsSpec) -> str:
    return f"{key_prefix(ref, jobs)}:{STREAM_SUFFIX}"
