"""Bounded polling for components that come up beside the cluster."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable

import httpx

from rembg_devcluster.errors import ComponentTimeoutError, DevClusterError

# What a probe may raise while the component is still coming up.
NOT_YET = (httpx.HTTPError, OSError, DevClusterError, subprocess.SubprocessError)


def wait_until(
    what: str,
    timeout: float,
    probe: Callable[[], bool],
    logs: Callable[[], str],
    every_seconds: float = 0.5,
) -> None:
    """Polls probe() until it holds; a probe that raises a transport or kubectl error counts as
    not yet. Times out with ComponentTimeoutError carrying logs()."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(*NOT_YET):
            if probe():
                return
        time.sleep(every_seconds)
    raise ComponentTimeoutError(f"{what} not ready after {timeout:.0f}s; diagnostics:\n{logs()}")
