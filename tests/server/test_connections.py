"""Slow and surplus clients against the real process: header and body deadlines, the cap on
busy connections; raw sockets, since an HTTP client library never stalls on purpose."""

from __future__ import annotations

import json
import select
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from rembg_server.settings import Settings, describe_error

from tests.server.processes import (
    ServerProcess,
    connect,
    read_response,
    read_status,
    start_server,
    upload_head,
    wait_for,
)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 5.0
MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(
        model_dir,
        tmp_path_factory.mktemp("server"),
        REMBG_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        REMBG_BODY_TIMEOUT_SECONDS=str(BODY_TIMEOUT),
        REMBG_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    yield running
    running.stop()


def post(server: ServerProcess, data: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/remove", content=data, timeout=120)


def test_a_client_stopped_mid_headers_gets_408_and_is_cut_at_the_header_deadline(
    server: ServerProcess, photos: dict[str, bytes]
) -> None:
    refused = server.metric("rembg_http_refused_total", reason="header_timeout")
    with connect(server) as stalled, connect(server) as idle:
        stalled.sendall(b"POST /v1/remove HTTP/1.1\r\nHost: server\r\nContent-Le")
        # Served meanwhile: the stalled connections hold nothing the others need.
        assert post(server, photos["coffee"]).status_code == 200
        stalled.settimeout(10 * HEADER_TIMEOUT)  # never cut: recv times out, the test fails
        idle.settimeout(10 * HEADER_TIMEOUT)
        answer = read_response(stalled)
        assert answer.startswith(b"HTTP/1.1 408 ")
        detail = json.loads(answer.partition(b"\r\n\r\n")[2])["detail"]
        assert detail == "request headers not received within 1 s (REMBG_HEADER_TIMEOUT_SECONDS)"
        assert read_status(idle) is None  # closed, with no answer to a request never sent
    assert server.metric("rembg_http_refused_total", reason="header_timeout") == refused + 2
    wait_for(
        lambda: "request headers not received in time" in server.log.read_text(),
        what="the header timeout's log line",
    )


def test_a_trickling_body_gets_408_at_the_body_deadline_while_others_are_served(
    server: ServerProcess, photos: dict[str, bytes]
) -> None:
    labels = {"model": "u2netp", "device": "cpu"}
    timed_out = server.metric("rembg_requests_total", code="408", **labels)
    body = photos["coffee"]
    with connect(server) as trickle, ThreadPoolExecutor(1) as pool:
        trickle.sendall(upload_head(len(body), "trickle") + body[:100])
        served = pool.submit(post, server, photos["chelsea"])
        # A byte every 0.2 s while the server says nothing: progress, but far too slow. Bounded
        # at ten deadlines; never answered, read_status then times out and the test fails.
        for sent in range(100, 100 + int(10 * BODY_TIMEOUT / 0.2)):
            if select.select([trickle], [], [], 0.2)[0]:
                break
            trickle.sendall(body[sent : sent + 1])
        assert read_status(trickle) == 408
        assert served.result().status_code == 200
    wait_for(lambda: '"trickle"' in server.log.read_text(), what="the trickle's access line")
    [entry] = [e for e in map(json.loads, server.log_lines()) if e.get("request_id") == "trickle"]
    assert entry["status"] == 408
    assert entry["detail"] == "request body not received within 5 s (REMBG_BODY_TIMEOUT_SECONDS)"
    assert server.metric("rembg_requests_total", code="408", **labels) == timed_out + 1
    assert server.metric("rembg_requests_total", code="500", **labels) == 0


def test_past_the_connection_cap_requests_get_503_at_once_but_probes_do_not(
    server: ServerProcess, photos: dict[str, bytes]
) -> None:
    refused = server.metric("rembg_http_refused_total", reason="over_capacity")
    body = photos["coffee"]
    uploads = [connect(server) for _ in range(MAX_CONNECTIONS)]
    statuses: list[int] = []

    def surplus_refused() -> bool:
        statuses.append(post(server, b"").status_code)  # let in, an empty body is a quick 400
        return statuses[-1] == 503

    try:
        for index, upload in enumerate(uploads):
            upload.sendall(upload_head(len(body), f"busy-{index}") + body[:100])
        wait_for(surplus_refused, what="a request past the cap refused")
        started = time.monotonic()
        surplus = post(server, body)
        assert time.monotonic() - started < BODY_TIMEOUT  # answered before any busy one is cut
        assert surplus.status_code == 503
        assert surplus.headers["retry-after"] == "1"
        assert "(REMBG_MAX_CONNECTIONS)" in surplus.json()["detail"]
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200
        over_capacity = server.metric("rembg_http_refused_total", reason="over_capacity")
        assert over_capacity == refused + statuses.count(503) + 1
        for upload in uploads:
            upload.sendall(body[100:])
        assert [read_status(upload) for upload in uploads] == [200] * MAX_CONNECTIONS
    finally:
        for upload in uploads:
            upload.close()
    assert post(server, body).status_code == 200


# --- settings --------------------------------------------------------------------------------


def test_connection_settings_defaults() -> None:
    settings = Settings()
    assert settings.header_timeout_seconds == 10
    assert settings.body_timeout_seconds == 60
    assert settings.max_connections == 256


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("REMBG_HEADER_TIMEOUT_SECONDS", "0"),
        ("REMBG_BODY_TIMEOUT_SECONDS", "-1"),
        ("REMBG_MAX_CONNECTIONS", "0"),
        ("REMBG_MAX_CONNECTIONS", "many"),
    ],
)
def test_out_of_range_connection_settings_are_refused_by_name(
    variable: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert describe_error(raised.value).startswith(f"invalid configuration: {variable}:")
