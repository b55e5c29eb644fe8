"""`python -m rembg_server`: read settings, then serve with uvicorn until SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from pydantic import ValidationError

from rembg_server.app import create_app
from rembg_server.connections import ConnectionGuard, guarded_protocol
from rembg_server.logs import configure_logging
from rembg_server.memory import limit_allocator_growth
from rembg_server.settings import Settings, describe_error


class DrainingServer(uvicorn.Server):
    """On SIGTERM: turn unready at once, keep serving for `drain_delay` seconds (so endpoint
    controllers stop routing here), then let uvicorn finish in-flight requests and exit 0.

    uvicorn's own handler re-raises the signal after a graceful shutdown, which makes the exit
    status -15; a drained server exits cleanly instead.
    """

    def __init__(
        self, config: uvicorn.Config, drain_delay: float, on_drain: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._drain_delay = drain_delay
        self._on_drain = on_drain
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._on_drain()
        if sig == signal.SIGTERM and self._drain_delay > 0 and not self._draining:
            self._draining = True
            asyncio.get_event_loop().call_later(self._drain_delay, self._stop, sig)
            return
        self._stop(sig)

    def _stop(self, sig: int) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting for connections
        self.should_exit = True


def main() -> int:
    try:
        settings = Settings()
    except ValidationError as error:
        sys.stderr.write(f"rembg_server: {describe_error(error)}\n")
        return 2
    configure_logging(settings.log_format, settings.log_level)
    limit_allocator_growth()  # before the server starts its worker threads
    app = create_app(settings)

    def drain() -> None:
        service = getattr(app.state, "service", None)
        if service is not None:
            service.begin_drain()

    # The connection cap is ours (connections.py), not uvicorn's limit_concurrency, which would
    # refuse the probes and the scrape too; nor the listen backlog, which only bounds
    # connections not yet accepted (asyncio accepts at once), never the ones being served.
    guard = ConnectionGuard(
        settings.header_timeout_seconds, settings.max_connections, app.state.metrics
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(guard),
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) or None,
        server_header=False,
    )
    server = DrainingServer(config, settings.drain_delay_seconds, drain)
    server.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
