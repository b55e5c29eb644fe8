"""`python -m rembg_server`: read settings, then serve with uvicorn until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError

from rembg_server.app import create_app
from rembg_server.logs import configure_logging
from rembg_server.settings import Settings, describe_error


class DrainingServer(uvicorn.Server):
    """On SIGTERM/SIGINT turn unready first, optionally keep serving for `drain_delay` seconds
    (so endpoints controllers stop routing here), then let uvicorn finish in-flight requests."""

    def __init__(self, config: uvicorn.Config, drain_delay: float) -> None:
        super().__init__(config)
        self._drain_delay = drain_delay
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        app = self.config.loaded_app if self.config.loaded else None
        service = getattr(getattr(app, "state", None), "service", None) if app else None
        if service is not None:
            service.begin_drain()
        if self._draining or self._drain_delay <= 0 or sig != signal.SIGTERM:
            super().handle_exit(sig, frame)
            return
        self._draining = True
        asyncio.get_event_loop().call_later(self._drain_delay, super().handle_exit, sig, frame)


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        sys.stderr.write(f"rembg_server: {describe_error(error)}\n")
        return 2
    configure_logging(settings.log_format, settings.log_level)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        server_header=False,
    )
    server = DrainingServer(config, settings.drain_delay_seconds)
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
