"""Keepalive pings for every connection of a server, from one timer.

The websockets library runs a keepalive task for each connection: a task, its
coroutine's frames, a sleep's future and timer, then a future per ping. For a
connection that only waits (a chat page left open all day) that task was the
biggest thing the server held for it besides the library's connection object.
Here one timer serves all of them: every connection gets the same interval, so
the order in which they are due is the order in which they were last pinged,
and an ordered mapping keeps it with O(1) work per ping and per closed
connection (no scan, no heap).

Behaviour is the library's: a ping every ``interval`` seconds, and a peer that
has not answered one within ``timeout`` seconds is failed with 1011
("keepalive ping timeout"), the close frame written and the TCP connection
dropped if the peer does not close within the close timeout. A ping that is
still unanswered when the next one is due is not doubled. Pings are written at
once, even to a client that reads slowly: the frame is a few bytes, and waiting
for a slow client's buffer to drain would be the slow client timeout's job.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from contextlib import AbstractAsyncContextManager, suppress
from typing import Protocol

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import Protocol as WebSocketProtocol
from websockets.protocol import State

__all__ = ["Keepalive", "Pinged"]


class Pinged(Protocol):
    """What is pinged: :class:`~wsagent.transport.connections.StreamConnection`."""

    pinger: Keepalive | None

    @property
    def protocol(self) -> WebSocketProtocol:
        """The library's sans-I/O protocol of the connection."""

    def send_ping(self, payload: bytes, now: float) -> None:
        """Write a ping with ``payload`` now, and note when it was sent."""

    def send_context(self) -> AbstractAsyncContextManager[None]:
        """The library's: write what the protocol has to send, and wait for a close it expects."""


class Keepalive:
    """Pings the connections :meth:`add`\\ ed to it every ``interval`` seconds; see the module."""

    def __init__(self, interval: float, timeout: float | None) -> None:
        self.interval = interval
        self.timeout = timeout
        #: How finely pings due at about the same moment are gathered into one wake-up.
        self.resolution = min(1.0, interval / 10)
        self._loop = asyncio.get_running_loop()
        self._due: OrderedDict[Pinged, float] = OrderedDict()  # next ping, soonest first
        self._awaited: OrderedDict[Pinged, float] = OrderedDict()  # pong deadline, soonest first
        self._timer: asyncio.TimerHandle | None = None
        self._payloads = itertools.count(1)
        self._failing: set[asyncio.Task[None]] = set()

    def add(self, ws: Pinged) -> None:
        """Ping ``ws`` from ``interval`` seconds from now until it is lost."""
        if ws.protocol.state is State.CLOSED:  # lost already: it would never be discarded
            return
        ws.pinger = self
        self._due[ws] = self._loop.time() + self.interval
        if self._timer is None:
            self._schedule()

    def discard(self, ws: Pinged) -> None:
        self._due.pop(ws, None)
        self._awaited.pop(ws, None)

    def answered(self, ws: Pinged) -> None:
        """``ws``'s peer answered the ping it was sent."""
        self._awaited.pop(ws, None)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _schedule(self) -> None:
        soonest = min((next(iter(pending.values())) for pending in (self._due, self._awaited) if pending),
                      default=None)
        if soonest is None:
            self._timer = None
            return
        # A wake-up every ``resolution`` at most, however the connections' times are spread.
        self._timer = self._loop.call_at(max(soonest, self._loop.time() + self.resolution), self._tick)

    def _tick(self) -> None:
        now = self._loop.time()
        due, awaited, interval, timeout = self._due, self._awaited, self.interval, self.timeout
        while due:
            ws, at = next(iter(due.items()))
            if at > now:
                break
            due.move_to_end(ws)
            due[ws] = now + interval
            if ws in awaited or ws.protocol.state is not State.OPEN:
                continue
            ws.send_ping(next(self._payloads).to_bytes(4, "big"), now)
            if timeout is not None:
                awaited[ws] = now + timeout
        while awaited:
            ws, at = next(iter(awaited.items()))
            if at > now:
                break
            self.discard(ws)
            task = self._loop.create_task(_fail(ws))
            self._failing.add(task)
            task.add_done_callback(self._failing.discard)
        self._schedule()


async def _fail(ws: Pinged) -> None:
    """The library's own end for a peer that stopped answering: 1011, then the close handshake's timeout."""
    with suppress(ConnectionClosed):
        async with ws.send_context():
            ws.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
