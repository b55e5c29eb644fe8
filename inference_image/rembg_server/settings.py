"""Every knob of the server, read once from the environment (prefix REMBG_)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from rembg_server.checksums import Digest
from rembg_server.engine import servable_model_names

Provider = Literal["cpu", "cuda", "openvino", "auto"]
OutputFormat = Literal["png", "webp"]

_MIB = 1024 * 1024


class Settings(BaseSettings):
    """Server settings. Each field maps to REMBG_<FIELD_NAME>; see the README table."""

    model_config = SettingsConfigDict(
        env_prefix="REMBG_", extra="ignore", frozen=True, validate_by_name=True
    )

    host: str = "0.0.0.0"  # noqa: S104 - a container listens on all interfaces
    port: int = Field(default=8080, ge=1, le=65535)
    models: Annotated[tuple[str, ...], NoDecode] = ("u2netp",)
    model_dir: Path = Field(
        default=Path("~/.u2net"),
        validation_alias=AliasChoices("REMBG_MODEL_DIR", "U2NET_HOME"),
        description="Directory holding <model>.onnx; rembg's own U2NET_HOME is honoured.",
    )
    model_checksums: dict[str, str] = Field(
        default_factory=dict,
        description="Extra or overriding digests, JSON {name: 'md5:<hex>' | 'sha256:<hex>'}.",
    )
    provider: Provider = "cpu"
    allow_cpu_fallback: bool = False
    threads: int = Field(
        default=0, ge=0, description="onnxruntime intra-op threads per session; 0 = auto"
    )
    inference_workers: int = Field(
        default=0,
        ge=0,
        le=64,
        description="sessions (each run by its own thread) per model; 0 = auto: one, with "
        "all the CPU limit's threads",
    )
    cpu_mem_arena: bool = Field(
        default=True,
        description="onnxruntime CPU arena: ~25-40% faster inference; holds one batch's peak "
        "(~470 MB for u2netp) per session",
    )
    cpu_workers: int = Field(default=0, ge=0, description="decode/encode threads; 0 = CPU limit")
    cpu_workers_nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="niceness added to the decode/encode threads so they never preempt a "
        "parallel inference section; 0 = same priority",
    )
    max_body_bytes: int = Field(default=20 * _MIB, gt=0)
    max_pixels: int = Field(default=40_000_000, gt=0)
    queue_max_requests: int = Field(
        default=0,
        ge=0,
        description="admitted requests at once; 0 = 2 per CPU (one inferring, one in "
        "decode/encode per core keeps the pipeline full; more only adds latency)",
    )
    queue_max_megapixels: float = Field(default=200.0, gt=0)
    request_timeout_seconds: float = Field(default=60.0, gt=0)
    header_timeout_seconds: float = Field(
        default=10.0,
        gt=0,
        description="deadline for a request's headers, from the connection (or the next "
        "request's first byte); past it 408 and the connection closes",
    )
    body_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        description="deadline for the whole body, from the end of the headers; past it 408 and "
        "the connection closes (20 MiB in 60 s needs ~2.8 Mbit/s)",
    )
    max_connections: int = Field(
        default=256,
        ge=1,
        description="connections with a request in progress; 503 beyond, except /livez, "
        "/readyz and /metrics. Bounds buffered uploads to this many REMBG_MAX_BODY_BYTES",
    )
    batch_max_size: int = Field(default=1, ge=1, le=64)
    batch_max_wait_ms: float = Field(default=5.0, ge=0)
    warmup_runs: int = Field(default=2, ge=0)
    warmup_dir: Path | None = None
    png_compress_level: int = Field(
        default=1, ge=0, le=3, description="ISA-L deflate level of PNG output (0-3)"
    )
    webp_quality: int = Field(default=90, ge=1, le=100)
    cache_max_bytes: int = Field(default=0, ge=0, description="result cache size; 0 = off")
    alpha_matting_enabled: bool = False
    liveness_stall_seconds: float = Field(default=120.0, gt=0)
    drain_delay_seconds: float = Field(default=0.0, ge=0)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    canary_interval_seconds: float = Field(
        default=60.0,
        ge=0,
        description="seconds between inference canary runs (canary.py); 0 = no canary",
    )
    canary_min_iou: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="least IoU of the canary's mask against the known one (u2netp reaches "
        "0.998, a broken model <= 0.48)",
    )
    canary_timeout_seconds: float = Field(default=30.0, gt=0)
    canary_unready_after_failures: int = Field(
        default=0,
        ge=0,
        description="consecutive canary failures that turn /readyz to 503; 0 = never",
    )
    fault_error_ratio: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="TEST ONLY: this fraction of removal requests is answered 500 after "
        "admission (alert tests); 0 in production",
    )
    log_format: Literal["json", "text"] = "json"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # --- the asynchronous job path (/v1/jobs), backed by a Redis the user brings -----------
    jobs_enabled: bool = False
    jobs_redis_address: str = Field(default="127.0.0.1:6379", description="host:port")
    jobs_redis_username: str = ""
    jobs_redis_password: SecretStr = SecretStr("")
    jobs_redis_db: int = Field(default=0, ge=0)
    jobs_redis_tls: bool = False
    jobs_key_prefix: str = Field(default="rembg", min_length=1)
    jobs_concurrency: int = Field(
        default=0,
        ge=0,
        description="job workers per process; 0 = auto: inference sessions of all models + 1, "
        "at least 2; never more than REMBG_QUEUE_MAX_REQUESTS - 1",
    )
    jobs_result_ttl_seconds: int = Field(default=86_400, gt=0)
    jobs_max_attempts: int = Field(default=3, ge=1)
    jobs_visibility_timeout_seconds: float = Field(default=30.0, gt=0)
    jobs_max_backlog: int = Field(default=100_000, gt=0)
    jobs_max_batch_items: int = Field(default=500, gt=0)
    jobs_max_batch_bytes: int = Field(default=100 * _MIB, gt=0)
    jobs_webhook_allowed_hosts: Annotated[tuple[str, ...], NoDecode] = ()
    jobs_webhook_secret: SecretStr = SecretStr("")

    @field_validator("models", mode="before")
    @classmethod
    def _split_models(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value

    @field_validator("jobs_webhook_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(host.strip().lower() for host in value.split(",") if host.strip())
        return value

    @field_validator("jobs_redis_address")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        redis_endpoint(value)
        return value

    @field_validator("models")
    @classmethod
    def _known_models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("at least one model is required")
        servable = servable_model_names()
        unknown = [name for name in value if name not in servable]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown}; servable: {sorted(servable)}")
        if len(set(value)) != len(value):
            raise ValueError(f"duplicate model names in {list(value)}")
        return value

    @field_validator("model_dir", "warmup_dir")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("model_checksums")
    @classmethod
    def _valid_digests(cls, value: dict[str, str]) -> dict[str, str]:
        for digest in value.values():
            Digest.parse(digest)
        return value

    @model_validator(mode="after")
    def _coherent_limits(self) -> Settings:
        if self.max_pixels / 1e6 > self.queue_max_megapixels:
            raise ValueError(
                f"max_pixels ({self.max_pixels}) exceeds queue_max_megapixels "
                f"({self.queue_max_megapixels}): such an image could never be admitted"
            )
        if self.jobs_enabled and self.queue_max_requests == 1:
            raise ValueError(
                "jobs need REMBG_QUEUE_MAX_REQUESTS >= 2: job workers leave the synchronous path "
                "at least one slot, so with 1 no job could ever run"
            )
        return self

    @property
    def default_model(self) -> str:
        return self.models[0]

    def resolved_inference_workers(self) -> int:
        return self.inference_workers or 1

    def resolved_threads(self) -> int:
        return self.threads or max(1, cpu_limit() // self.resolved_inference_workers())

    def resolved_queue_max_requests(self) -> int:
        return self.queue_max_requests or 2 * cpu_limit()

    def resolved_cpu_workers(self) -> int:
        return self.cpu_workers or cpu_limit()

    def resolved_jobs_concurrency(self) -> int:
        """Job workers: enough to keep every inference session busy with one job decoding
        while another infers, capped so the synchronous path always keeps one slot."""
        wanted = self.jobs_concurrency or max(
            2, len(self.models) * self.resolved_inference_workers() + 1
        )
        return max(1, min(wanted, self.resolved_queue_max_requests() - 1))


def cpu_limit(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: the cgroup v2 quota if one is set, else its affinity mask."""
    available = len(os.sched_getaffinity(0))
    try:
        quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return available
    if quota == "max":
        return available
    return max(1, min(available, math.ceil(int(quota) / int(period))))


def redis_endpoint(address: str) -> tuple[str, int]:
    """'host:port' (or '[v6]:port') -> (host, port); ValueError names what is wrong."""
    host, separator, port = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not separator or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port")
    return host, int(port)


def describe_error(error: ValidationError) -> str:
    """One line naming each bad setting by its environment variable."""
    parts = []
    for item in error.errors():
        name = str(item["loc"][0]) if item["loc"] else ""
        variable = f"REMBG_{name.upper()}" if name else "settings"
        parts.append(f"{variable}: {item['msg']}")
    return "invalid configuration: " + "; ".join(parts)
