"""The real process: `python -m rembg_server` under uvicorn, signals, sockets and logs."""

from __future__ import annotations

import json
import signal
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.server.processes import (
    ServerProcess,
    accepting,
    connect,
    read_status,
    start_server,
    upload_head,
    wait_for,
)


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # Room for 4 busy requests plus the one that hangs up, whatever this machine's CPU count
    # (the default admits 2 per CPU).
    running = start_server(
        model_dir, tmp_path_factory.mktemp("server"), REMBG_QUEUE_MAX_REQUESTS="8"
    )
    yield running
    running.stop()


def post(url: str, data: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/remove", content=data, headers=headers, timeout=120)


def test_one_json_log_line_per_request(server: ServerProcess, photos: dict[str, bytes]) -> None:
    response = post(server.url, photos["chelsea"], **{"X-Request-ID": "log-probe-1"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "log-probe-1"
    # The line is written once the response is sent, so it may land just after we read it.
    wait_for(lambda: "log-probe-1" in server.log.read_text(), what="the access log line")
    entries = [json.loads(line) for line in server.log_lines()]  # every line is JSON
    [entry] = [e for e in entries if e.get("request_id") == "log-probe-1"]
    assert entry["path"] == "/v1/remove"
    assert entry["status"] == 200
    assert entry["model"] == "u2netp"
    assert (entry["width"], entry["height"]) == (451, 300)
    assert entry["bytes_in"] == len(photos["chelsea"])
    assert entry["bytes_out"] == len(response.content)
    for timing in ("duration_s", "decode_s", "queue_s", "inference_s", "encode_s"):
        assert entry[timing] >= 0


def raw_request_then_hang_up(url: str, body: bytes) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /v1/remove HTTP/1.1\r\nHost: {host}\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {len(body)}\r\nX-Request-ID: hang-up\r\n\r\n"
        )
        sock.sendall(head.encode() + body)
    # closed here, before any response


def test_a_client_that_hangs_up_while_queued_costs_no_inference(
    server: ServerProcess, photos: dict[str, bytes]
) -> None:
    labels = {"model": "u2netp", "device": "cpu"}
    batches_before = server.metric("rembg_batch_size_count", **labels)
    with ThreadPoolExecutor(4) as pool:
        busy = [pool.submit(post, server.url, photos["astronaut"]) for _ in range(4)]
        wait_for(
            lambda: server.metric("rembg_pending_requests", **labels) >= 4,
            what="4 requests pending",
        )
        raw_request_then_hang_up(server.url, photos["coffee"])
        wait_for(
            lambda: server.metric("rembg_requests_total", code="499", **labels) == 1,
            what="the hang-up being noticed",
        )
        assert [future.result().status_code for future in busy] == [200] * 4
    wait_for(lambda: server.metric("rembg_pending_requests", **labels) == 0, what="drain")
    assert server.metric("rembg_batch_size_count", **labels) == batches_before + 4


def upload_part_then_hang_up(server: ServerProcess, request_id: str) -> None:
    """Headers announcing 100000 bytes, a few of them, then close: a client that gave up."""
    with connect(server) as sock:
        sock.sendall(upload_head(100_000, request_id) + b"\xff\xd8\xff\xe0" * 4)


def test_a_client_that_hangs_up_mid_upload_is_one_info_line_and_a_499_not_a_500(
    server: ServerProcess, photos: dict[str, bytes]
) -> None:
    labels = {"model": "u2netp", "device": "cpu"}
    left_before = server.metric("rembg_requests_total", code="499", **labels)
    upload_part_then_hang_up(server, "hang-up-mid-upload")
    wait_for(lambda: "hang-up-mid-upload" in server.log.read_text(), what="the hang-up's log line")
    entries = [json.loads(line) for line in server.log_lines()]
    [entry] = [e for e in entries if e.get("request_id") == "hang-up-mid-upload"]
    assert (entry["level"], entry["status"]) == ("info", 499)
    assert entry["detail"] == "client disconnected during upload"
    assert server.metric("rembg_requests_total", code="499", **labels) == left_before + 1
    assert server.metric("rembg_requests_total", code="500", **labels) == 0
    assert server.metric("rembg_pending_requests", **labels) == 0
    assert post(server.url, photos["coffee"]).status_code == 200
    # Read after a later request, so an error logged just after the access line is seen too.
    assert not [e for e in map(json.loads, server.log_lines()) if e["level"] == "error"]
    assert "Traceback" not in server.log.read_text()


def test_sigterm_turns_unready_finishes_in_flight_work_and_exits(
    model_dir: Path, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    # The drain window must outlast a busy machine's scheduling hiccups for the probe to land in it.
    server = start_server(model_dir, tmp_path, REMBG_DRAIN_DELAY_SECONDS="5")
    try:
        with ThreadPoolExecutor(3) as pool:
            in_flight = [pool.submit(post, server.url, photos["astronaut"]) for _ in range(3)]
            wait_for(
                lambda: server.metric("rembg_pending_requests", model="u2netp") >= 3,
                what="3 requests in flight",
            )
            server.process.send_signal(signal.SIGTERM)
            wait_for(
                lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503,
                what="readyz turning 503 during the drain delay",
            )
            assert [future.result().status_code for future in in_flight] == [200] * 3
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()


def test_during_the_drain_delay_requests_are_served_then_the_listener_closes_and_it_exits_0(
    model_dir: Path, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    """The delay is there so requests routed here before the endpoint removal propagates still
    succeed: only /readyz says 503. Then new connections are refused, and an upload still in
    flight is finished and answered before the process exits."""
    server = start_server(model_dir, tmp_path, REMBG_DRAIN_DELAY_SECONDS="4")
    body = photos["coffee"]
    try:
        with connect(server) as slow:
            slow.sendall(upload_head(len(body), "spans-the-drain") + body[:1000])
            server.process.send_signal(signal.SIGTERM)
            wait_for(
                lambda: httpx.get(f"{server.url}/readyz", timeout=5).status_code == 503,
                what="readyz turning 503 during the drain delay",
            )
            routed_late = post(server.url, body)
            assert routed_late.status_code == 200, routed_late.text
            wait_for(lambda: not accepting(server), what="the listener closing after the delay")
            assert server.process.poll() is None  # the slow upload is still in flight
            slow.sendall(body[1000:])
            assert read_status(slow) == 200
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
