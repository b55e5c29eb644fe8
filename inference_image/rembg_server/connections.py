"""The HTTP/1.1 connection layer: uvicorn's httptools protocol (the one its "auto" picks with
uvicorn[standard]), plus a deadline for a request's headers and a cap on the connections with a
request in progress.

uvicorn has no header deadline: a client that stops mid-headers holds its connection for ever
(the keep-alive timer only runs between requests). Its cap, `limit_concurrency`, would refuse
the probes and the Prometheus scrape too, so an overloaded pod would fail its liveness probe and
stop reporting the load its autoscaler needs. The body deadline lives in the app
(app.BodyDeadlineMiddleware), where a stalled upload can still be answered 408 and counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import httptools
from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from rembg_server.app import QUIET_PATHS
from rembg_server.metrics import ServerMetrics

log = logging.getLogger("rembg_server")


@dataclass
class ConnectionGuard:
    """The limits, shared by every connection of one server."""

    header_timeout: float
    max_connections: int
    metrics: ServerMetrics
    refusing: bool = False  # whether the last request past its headers was refused

    def refused(self, reason: str) -> None:
        self.metrics.http_refused.labels(reason).inc()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedHttpProtocol]:
    """The protocol class to give uvicorn.Config(http=...): uvicorn builds one per connection."""

    class Guarded(GuardedHttpProtocol):
        pass

    Guarded.guard = guard
    return Guarded


class GuardedHttpProtocol(HttpToolsProtocol):
    guard: ConnectionGuard

    _header_deadline: asyncio.TimerHandle | None = None
    _headers_begun = False  # between the first byte of a request and the end of its headers

    # --- the header deadline: from the connection (or the next request's first byte) ---------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._headers_begun = True
        if self._header_deadline is None:  # a later request on a kept-alive connection
            self._arm_header_deadline()

    def on_headers_complete(self) -> None:
        self._headers_begun = False
        self._disarm_header_deadline()
        self.app = self._refuse if self._over_capacity() else self.config.loaded_app
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def _arm_header_deadline(self) -> None:
        self._header_deadline = self.loop.call_later(
            self.guard.header_timeout, self._headers_overdue
        )

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The next request's headers are late while a pipelined one is still being
            # answered: let that answer go out, then close (as uvicorn's own shutdown does).
            self.cycle.keep_alive = False
            return
        self.guard.refused("header_timeout")
        timeout = self.guard.header_timeout
        fields = {"client": _address(self.client), "header_timeout_s": timeout}
        if self._headers_begun:
            log.info("request headers not received in time", extra={"fields": fields})
            self.transport.write(_request_timeout(timeout))
        else:  # an idle connection: an answer to no request could be read as the next one's
            log.debug("idle connection closed", extra={"fields": fields})
        self.transport.close()

    # --- the cap on requests in progress -------------------------------------------------------

    def _over_capacity(self) -> bool:
        """`max_connections` connections already have a request past its headers and not yet
        answered (uvicorn's tasks: one per busy HTTP/1.1 connection). Uploads stalled mid-body
        count, and the body deadline frees their places; idle kept-alive connections do not
        (a proxy's pool of them is no load), and mid-headers ones meet the header deadline."""
        guard = self.guard
        if len(self.tasks) < guard.max_connections:
            if guard.refusing:
                guard.refusing = False
                in_progress = {"in_progress": len(self.tasks)}
                log.info("accepting requests again", extra={"fields": in_progress})
            return False
        # Probes and the scrape are cheap, and the autoscaler needs them most under load.
        if httptools.parse_url(self.url).path.decode("latin-1") in QUIET_PATHS:
            return False
        guard.refused("over_capacity")
        if not guard.refusing:
            guard.refusing = True
            in_progress = {"in_progress": len(self.tasks)}
            log.warning("refusing requests: too many in progress", extra={"fields": in_progress})
        return True

    async def _refuse(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """503 without routing or reading the body; Connection: close, since the body is never
        read."""
        detail = (
            f"over capacity: {self.guard.max_connections} connections with a request in "
            "progress (REMBG_MAX_CONNECTIONS); retry"
        )
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", b"1"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _request_timeout(timeout: float) -> bytes:
    """A whole 408 response, written straight to the transport: no request reached the app."""
    detail = f"request headers not received within {timeout:g} s (REMBG_HEADER_TIMEOUT_SECONDS)"
    body = json.dumps({"detail": detail}).encode()
    return b"".join(
        [
            b"HTTP/1.1 408 Request Timeout\r\n",
            b"content-type: application/json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            b"connection: close\r\n\r\n",
            body,
        ]
    )


def _address(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else ""
