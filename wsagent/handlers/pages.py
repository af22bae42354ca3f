"""The browser page, served by the server itself on its own port (no build step, no web framework)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from websockets.http11 import Request, Response

from ..transport.http_answers import http_response
from .app import App

__all__ = ["index", "static", "favicon", "workflows", "agents"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# A strict policy: scripts and styles from this server only, WebSockets to this host only.
_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@cache
def _file(name: str) -> bytes | None:
    path = resources.files("wsagent").joinpath("static", name)
    return path.read_bytes() if path.is_file() else None


def _serve(name: str) -> Response:
    body = _file(name)
    if body is None:
        return http_response(404, "Not found.\n")
    content_type = _TYPES.get(name[name.rfind("."):], "application/octet-stream")
    return http_response(200, body, content_type, extra={
        "Cache-Control": "no-cache", "Content-Security-Policy": _CSP})


def index(app: App, request: Request) -> Response:
    return _serve("index.html")


def static(app: App, request: Request) -> Response:
    name = request.path.partition("?")[0].removeprefix("/static/")
    if "/" in name or name.startswith("."):
        return _serve("")
    return _serve(name)


def favicon(app: App, request: Request) -> Response:
    """``/favicon.ico``, asked for by browsers (and by tabs showing /healthz or /metrics): the page's icon."""
    return _serve("favicon.svg")


def workflows(app: App, request: Request) -> Response:
    return http_response(200, json.dumps(sorted(app.workflows)), "application/json")


def agents(app: App, request: Request) -> Response:
    """What a run's ``agent`` may name, for the page's menu: the built-in ``assistant``, then ``--agents``'
    (read at each request: a SIGHUP reload changes them)."""
    names = ["assistant", *sorted(name for name in app.agents if name != "assistant")]
    return http_response(200, json.dumps(names), "application/json")
