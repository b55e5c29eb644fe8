"""Real processes for server tests: `python -m rembg_server` under uvicorn, and redis-server.

Shared by the process tests and the job-path tests; both start the real binaries on free ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REDIS_SERVER = "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(condition: Callable[[], bool], attempts: int = 600, what: str = "condition") -> None:
    """Poll a bounded number of times, 0.1 s apart (not a timing assertion)."""
    for _ in range(attempts):
        if condition():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} never happened")


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
        )

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """SIGKILL: no drain, no cleanup, exactly what an OOM kill or a node loss does."""
        self.process.kill()
        self.process.wait()


def start_server(
    model_dir: Path, tmp_path: Path, *, wait_ready: bool = True, **env: str
) -> ServerProcess:
    port = free_port()
    log = tmp_path / f"server-{port}.log"
    environment = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "U2NET_HOME": str(model_dir),
        "REMBG_HOST": "127.0.0.1",
        "REMBG_PORT": str(port),
        "REMBG_WARMUP_RUNS": "1",
        "REMBG_LOG_FORMAT": "json",
        **env,
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "rembg_server"], env=environment, stdout=out, stderr=out
        )
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log)
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: ServerProcess) -> None:
    wait_for(lambda: _readyz(server) == 200, what="readiness")


def wait_until_listening(server: ServerProcess) -> None:
    """Until it answers at all (for a server that is meant to stay unready)."""
    wait_for(lambda: _readyz(server) is not None, what="the server listening")


def _readyz(server: ServerProcess) -> int | None:
    if server.process.poll() is not None:
        pytest.fail(f"server exited early:\n{server.log.read_text()}")
    try:
        status: int = httpx.get(f"{server.url}/readyz", timeout=2).status_code
    except httpx.TransportError:
        return None
    return status


def connect(server: ServerProcess) -> socket.socket:
    """A raw TCP connection to the server, for what an HTTP client library will not send."""
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def accepting(server: ServerProcess) -> bool:
    """Whether the server still accepts TCP connections."""
    try:
        connect(server).close()
    except ConnectionRefusedError:
        return False
    return True


def upload_head(content_length: int, request_id: str, path: str = "/v1/remove") -> bytes:
    """A POST's headers; Connection: close, so reading the answer ends with it."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: server\r\nContent-Type: image/jpeg\r\n"
        f"Content-Length: {content_length}\r\nX-Request-ID: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> bytes:
    """Everything the server sends on `sock` until it closes (or resets) the connection."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def read_status(sock: socket.socket) -> int | None:
    """The status code of the response on `sock`; None when it closes without answering."""
    received = read_response(sock)
    if not received.startswith(b"HTTP/1.1 "):
        return None
    return int(received.split(b" ", 2)[1])


@dataclass
class RedisServer:
    """A real redis-server on 127.0.0.1, durable the way the job path documents: AOF with
    `appendfsync always`, so whatever it acknowledged survives a kill and a restart."""

    directory: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        if shutil.which(REDIS_SERVER) is None:
            pytest.fail(f"{REDIS_SERVER} is missing: run `make system-deps` (apt redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        log = (self.directory / "redis.log").open("ab")
        command = [
            REDIS_SERVER,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]  # fmt: skip
        with log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log)
        wait_for(self.ping, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            log = (self.directory / "redis.log").read_text()
            pytest.fail(f"redis-server exited:\n{log[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: only what the AOF already holds survives."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
