"""The one exception every layer uses to refuse a request with an HTTP status."""

from __future__ import annotations


class RequestRejectedError(Exception):
    """The request is answered with `status` and `message`; nothing went wrong server-side."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}
