"""Path matching for the route table in :mod:`wsagent.wiring.routes`.

Static paths win over patterns; patterns use ``{name}`` for one non-empty path
segment and are tried in the order the table lists them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from websockets.http11 import Request, Response

from ..handlers.app import App, MessageSession
from ..transport.connections import Connection

__all__ = ["Route", "Router", "Handler", "HttpHandler", "Opener"]

#: A WebSocket route's handler: it gets the application context and its connection, and the connection
#: closes when it returns. Its task lives as long as the connection.
Handler = Callable[[App, Connection], Awaitable[None]]
#: A message-driven route: makes the connection's :class:`~wsagent.handlers.app.MessageSession` once the
#: connection is checked (one that refuses the connection closes it, and handles nothing). No task waits
#: while the connection is idle; the routes clients keep open for long (/ws/chat, /ws/ai-sdk) are these. (A
#: MessageSession, whose ``on_close`` ends the connection for the server: its release, its ``close`` line.)
Opener = Callable[[App, Connection], MessageSession]
#: A plain HTTP answer on the same port, before any upgrade (or a coroutine that makes one).
HttpHandler = Callable[[App, Request], Response | Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    """A WebSocket endpoint, with a ``handler`` or a ``session`` ``Opener``. ``auth`` makes it refuse clients
    without a valid token."""

    pattern: str
    handler: Handler | None = None
    auth: bool = False
    session: Opener | None = None

    def __post_init__(self) -> None:
        if (self.handler is None) == (self.session is None):
            raise ValueError(f"route {self.pattern}: give it a handler or a session opener, one of them")

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(self.pattern.strip("/").split("/"))

    @property
    def is_static(self) -> bool:
        return "{" not in self.pattern


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        self.routes = tuple(routes)
        self._static = {r.pattern: r for r in routes if r.is_static}
        self._patterns = [(r.segments, r) for r in routes if not r.is_static]

    def match(self, path: str) -> tuple[Route, dict[str, str]] | None:
        route = self._static.get(path)
        if route is not None:
            return route, {}
        parts = path.strip("/").split("/") if path.startswith("/") else None
        if not parts:
            return None
        for segments, candidate in self._patterns:
            if len(segments) != len(parts):
                continue
            params: dict[str, str] = {}
            for pattern, part in zip(segments, parts, strict=True):
                if pattern.startswith("{") and pattern.endswith("}"):
                    if not part:
                        break
                    params[pattern[1:-1]] = part
                elif pattern != part:
                    break
            else:
                return candidate, params
        return None
