"""The canary in the real process, wired as `python -m rembg_server` runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from tests.server.conftest import BrokenModel
from tests.server.processes import (
    ServerProcess,
    start_server,
    wait_for,
    wait_until_listening,
)


def log_entries(server: ServerProcess, message: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in server.log_lines()]
    return [entry for entry in entries if entry["message"] == message]


def test_the_default_canary_runs_right_after_warmup_and_passes(
    model_dir: Path, tmp_path: Path
) -> None:
    server = start_server(model_dir, tmp_path)  # defaults: every 60 s, first after warmup
    try:
        wait_for(
            lambda: server.metric("rembg_canary_success", model="u2netp") == 1,
            what="the first canary pass",
        )
        assert server.metric("rembg_canary_iou", model="u2netp") >= 0.99
        assert server.metric("rembg_canary_failures_total") == 0
        [passed] = log_entries(server, "inference canary passed")
        assert passed["level"] == "info"
        assert passed["model"] == "u2netp"
    finally:
        server.stop()


def test_a_broken_model_turns_the_process_unready_with_one_warning(
    broken_model: BrokenModel, tmp_path: Path
) -> None:
    server = start_server(
        broken_model.model_dir,
        tmp_path,
        wait_ready=False,
        REMBG_MODEL_CHECKSUMS=json.dumps({"u2netp": broken_model.digest}),
        REMBG_CANARY_INTERVAL_SECONDS="0.2",
        REMBG_CANARY_UNREADY_AFTER_FAILURES="1",
    )
    try:
        wait_until_listening(server)
        wait_for(
            lambda: server.metric("rembg_canary_failures_total", reason="iou") >= 3,
            what="three failed canary runs",
        )
        response = httpx.get(f"{server.url}/readyz", timeout=5)
        assert response.status_code == 503
        [reason] = response.json()["reasons"]
        assert "u2netp: inference canary failed" in reason
        assert server.metric("rembg_canary_success", model="u2netp") == 0
        assert server.metric("rembg_ready", model="u2netp") == 0
        [warning] = log_entries(server, "inference canary failing")  # not one per run
        assert warning["level"] == "warning"
        assert warning["reason"] == "iou"
        assert warning["iou"] < 0.01
        assert "Traceback" not in server.log.read_text()
    finally:
        server.stop()
