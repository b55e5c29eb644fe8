"""The test-only fault setting (REMBG_FAULT_ERROR_RATIO): the schedule, then a real app."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from rembg_server.faults import FAULT_MESSAGE, FaultSchedule
from rembg_server.settings import Settings, describe_error

from tests.server.processes import start_server

pytestmark = pytest.mark.anyio
Metric = Callable[..., Awaitable[float]]


def test_the_fault_schedule_is_an_even_counter() -> None:
    quarter = FaultSchedule(0.25)
    assert [quarter.fires() for _ in range(8)] == [False, False, False, True] * 2
    tenth = FaultSchedule(0.1)
    assert sum(tenth.fires() for _ in range(1000)) == 100
    assert all(FaultSchedule(1).fires() for _ in range(10))
    off = FaultSchedule(0)
    assert not off.enabled
    assert not any(off.fires() for _ in range(10))
    with pytest.raises(ValueError, match=r"not within 0\.\.1"):
        FaultSchedule(1.5)


def test_the_fault_ratio_is_off_by_default_and_read_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().fault_error_ratio == 0
    monkeypatch.setenv("REMBG_FAULT_ERROR_RATIO", "0.5")
    assert Settings().fault_error_ratio == 0.5


@pytest.mark.parametrize("value", ["-0.1", "1.5", "often"])
def test_a_fault_ratio_outside_0_to_1_is_refused_by_name(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMBG_FAULT_ERROR_RATIO", value)
    with pytest.raises(ValidationError) as raised:
        Settings()
    assert describe_error(raised.value).startswith(
        "invalid configuration: REMBG_FAULT_ERROR_RATIO:"
    )


async def test_the_fault_ratio_answers_that_share_of_removals_500_and_counts_them(
    app_factory: Callable[..., Any],
    metric: Metric,
    photos: dict[str, bytes],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="rembg_server")
    async with app_factory(fault_error_ratio=0.5, warmup_runs=0) as client:
        [warning] = [r for r in caplog.records if "fault injection" in r.getMessage()]
        assert "TEST-ONLY" in warning.getMessage()
        files = {"file": ("coffee.jpg", photos["coffee"], "image/jpeg")}
        rembg_style = [await client.post("/api/remove", files=files) for _ in range(4)]
        ours = [await client.post("/v1/remove", content=photos["coffee"]) for _ in range(2)]
        codes = [response.status_code for response in [*rembg_style, *ours]]
        assert codes == [200, 500] * 3
        assert rembg_style[1].json() == {"detail": FAULT_MESSAGE}
        assert FAULT_MESSAGE == "injected fault (REMBG_FAULT_ERROR_RATIO)"
        assert await metric(client, "rembg_requests_total", code="500", model="u2netp") == 3
        assert await metric(client, "rembg_requests_total", code="200") == 3
        assert await metric(client, "rembg_pending_requests", model="u2netp") == 0


async def test_no_fault_and_no_warning_by_default(
    app_factory: Callable[..., Any], photos: dict[str, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rembg_server")
    async with app_factory(warmup_runs=0) as client:
        responses = [await client.post("/v1/remove", content=photos["coffee"]) for _ in range(3)]
        assert [response.status_code for response in responses] == [200] * 3
    assert not [r for r in caplog.records if "fault injection" in r.getMessage()]


def test_the_fault_ratio_in_the_process_warns_at_start_up_and_fails_its_share(
    model_dir: Path, tmp_path: Path, photos: dict[str, bytes]
) -> None:
    server = start_server(
        model_dir, tmp_path, REMBG_FAULT_ERROR_RATIO="0.25", REMBG_CANARY_INTERVAL_SECONDS="0"
    )
    try:
        [warning] = [json.loads(line) for line in server.log_lines() if "fault injection" in line]
        assert warning["level"] == "warning"
        assert warning["ratio"] == 0.25
        files = {"file": ("coffee.jpg", photos["coffee"], "image/jpeg")}
        codes = [
            httpx.post(f"{server.url}/api/remove", files=files, timeout=120).status_code
            for _ in range(8)
        ]
        assert codes == [200, 200, 200, 500] * 2
        assert server.metric("rembg_requests_total", code="500", model="u2netp") == 2
    finally:
        server.stop()
