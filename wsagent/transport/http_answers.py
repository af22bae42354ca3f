"""Plain HTTP answers on the WebSocket port (before any upgrade): health, metrics, the page, refusals."""

from __future__ import annotations

import http
import time

from websockets.datastructures import Headers
from websockets.http11 import Response

__all__ = ["http_response"]


def http_response(status: int, body: str | bytes, content_type: str = "text/plain; charset=utf-8",
                  extra: dict[str, str] | None = None) -> Response:
    """A complete plain HTTP response (the connection closes after it)."""
    data = body.encode() if isinstance(body, str) else body
    code = http.HTTPStatus(status)
    headers = Headers([
        ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
        ("Connection", "close"),
        ("Content-Length", str(len(data))),
        ("Content-Type", content_type),
        ("X-Content-Type-Options", "nosniff"),  # (every answer is what its type says: no browser guesses another)
    ])
    for key, value in (extra or {}).items():
        headers[key] = value
    return Response(code.value, code.phrase, headers, data)
