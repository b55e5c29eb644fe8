"""Webhooks: the one outbound request the server makes, and only to allow-listed hosts.

A job that ends (done or failed) POSTs its status JSON to the webhook URL given at submission.
The URL is checked against REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS at submission (400) and again right
before sending (the list may have changed since). Redirects are never followed and no proxy is
used, so the request goes to the allowed host and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from rembg_server import __version__

log = logging.getLogger("rembg_server.jobs")
SIGNATURE_HEADER = "X-Rembg-Signature"
DEFAULT_PORTS = {"http": 80, "https": 443}


class WebhookRefusedError(ValueError):
    """The URL may not be called; the message says why."""


def check_webhook_url(url: str, allowed_hosts: tuple[str, ...]) -> str:
    """The URL, if it is http(s) to an allowed host; WebhookRefusedError otherwise."""
    if not allowed_hosts:
        raise WebhookRefusedError(
            "webhooks are off here (REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS is empty)"
        )
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS:
        raise WebhookRefusedError(f"webhook_url must be http or https, not {parts.scheme!r}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as error:
        raise WebhookRefusedError(f"webhook_url has an invalid port: {error}") from error
    host = (parts.hostname or "").lower()
    if not host:
        raise WebhookRefusedError("webhook_url has no host")
    if not any(host_allowed(entry, host, port) for entry in allowed_hosts):
        raise WebhookRefusedError(
            f"webhook host {host}:{port} is not in REMBG_JOBS_WEBHOOK_ALLOWED_HOSTS"
        )
    return url


def host_allowed(entry: str, host: str, port: int) -> bool:
    """`host` (any port), `host:port`, or `*.domain` (any subdomain, optionally `:port`)."""
    name, _, entry_port = entry.lower().rpartition(":")
    if not name or not entry_port.isdigit():
        name, entry_port = entry.lower(), ""
    if entry_port and int(entry_port) != port:
        return False
    if name.startswith("*."):
        return host.endswith(name[1:])
    return host == name


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class Delivery:
    ok: bool
    retryable: bool
    detail: str


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *_args: Any, **_kwargs: Any) -> None:
        return None  # the 3xx surfaces as an HTTPError: a redirect could leave the allow-list


def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Delivery:
    """Blocking: one POST (runs in a thread)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310
    try:
        with opener.open(request, timeout=timeout) as response:
            return Delivery(ok=True, retryable=False, detail=f"HTTP {response.status}")
    except urllib.error.HTTPError as error:
        retryable = error.code >= 500 or error.code == 429
        return Delivery(ok=False, retryable=retryable, detail=f"HTTP {error.code}")
    except (urllib.error.URLError, OSError) as error:
        return Delivery(ok=False, retryable=True, detail=str(error))


class WebhookSender:
    """Delivers in the background: a few tries with backoff, never blocking the event loop."""

    def __init__(
        self,
        allowed_hosts: tuple[str, ...],
        secret: str,
        *,
        timeout_seconds: float = 5.0,
        attempts: int = 3,
        backoff_seconds: float = 1.0,
    ) -> None:
        self._allowed = allowed_hosts
        self._secret = secret
        self._timeout = timeout_seconds
        self._attempts = attempts
        self._backoff = backoff_seconds
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, url: str, payload: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self, grace_seconds: float) -> None:
        """Let deliveries in flight finish for up to `grace_seconds`, then cancel the rest."""
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_seconds)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _deliver(self, url: str, payload: dict[str, Any]) -> None:
        fields = {"job": payload.get("id"), "url": url}
        try:
            check_webhook_url(url, self._allowed)
        except WebhookRefusedError as error:
            log.warning("webhook refused", extra={"fields": {**fields, "reason": str(error)}})
            return
        body = json.dumps(payload, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"rembg-fleet/{__version__}"}
        if self._secret:
            headers[SIGNATURE_HEADER] = signature(self._secret, body)
        for attempt in range(1, self._attempts + 1):
            delivery = await asyncio.to_thread(_post, url, body, headers, self._timeout)
            if delivery.ok:
                log.info("webhook delivered", extra={"fields": {**fields, "attempt": attempt}})
                return
            if not delivery.retryable or attempt == self._attempts:
                break
            await asyncio.sleep(self._backoff * 2 ** (attempt - 1))
        failure = {**fields, "attempts": attempt, "detail": delivery.detail}
        log.warning("webhook not delivered", extra={"fields": failure})
