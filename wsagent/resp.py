"""Redis spoken by hand, for cluster mode's hot path: RESP commands packed and replies parsed by hiredis (C).

redis-py serves everything else in :mod:`wsagent.cluster`; this is the one
connection per node that carries a run's entries (and the one that subscribes),
where redis-py's per-command objects, awaited round trips and tasks cost more
than the rest of a token's path (see :class:`Wire`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis

__all__ = ["Command", "Wire", "OPEN_TIMEOUT"]

#: Seconds to connect, log in and select the database.
OPEN_TIMEOUT = 2.0


#: A command as Redis takes it: its name, then its arguments.
Command = tuple[str | int, ...]


def _pack(command: Command) -> bytes:
    """``command`` in RESP. (hiredis's stub types its argument as a tuple of one item.)"""
    packed: bytes = hiredis.pack_command(cast(Any, command))
    return packed


class Wire(asyncio.Protocol):
    """A connection to Redis spoken by hand, for the hot path: commands packed and replies parsed by
    hiredis (C), no object per command.

    redis-py's pipeline spent about 23 µs of this process's CPU per XADD and PUBLISH pair, most of a
    token's cost here (py-spy: 29% of a node's time in ``Pipeline.execute``, its packing and its
    reply parsing); packed by ``hiredis.pack_command`` and read by ``hiredis.Reader`` they cost about 3.
    Two uses: :meth:`send` a batch and get its replies (errors as ``hiredis.ReplyError`` values, not
    raised), or, as a subscriber, every reply goes to ``on_push``.
    """

    def __init__(self, on_push: Callable[[Any], None] | None = None) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.on_push = on_push
        self.transport: asyncio.Transport | None = None
        # Per batch written: how many replies it awaits, those come so far, and who wants them (None: nobody).
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]] | None]] = deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, url: str, on_push: Callable[[Any], None] | None = None) -> Wire:
        """Connected to the Redis of ``url`` (``redis://[user:password@]host[:port][/db]``), logged in,
        its database selected."""
        parts = urlsplit(url)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(OPEN_TIMEOUT):
            _, wire = await loop.create_connection(lambda: cls(), parts.hostname or "127.0.0.1", parts.port or 6379,
                                                   ssl=parts.scheme == "rediss" or None)
            setup: list[Command] = []
            if parts.password:
                setup.append(("AUTH", unquote(parts.username or "default"), unquote(parts.password)))
            if parts.path.strip("/"):
                setup.append(("SELECT", int(parts.path.strip("/"))))
            for reply in await wire.send(setup) if setup else []:
                if isinstance(reply, hiredis.ReplyError):
                    wire.close()
                    raise ConnectionError(f"Redis refused {url}: {reply}")
        wire.on_push = on_push
        return wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's is not an asyncio.Transport subclass)

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            if self.on_push is not None:
                self.on_push(reply)
                continue
            count, replies, future = self.waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self.waiting.popleft()
                if future is not None and not future.done():
                    future.set_result(replies)

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})")
        for _, _, future in self.waiting:
            if future is not None and not future.done():
                future.set_exception(error)
        self.waiting.clear()
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, commands: list[Command]) -> asyncio.Future[list[Any]]:
        """Write ``commands`` at once; the future has their replies, in order."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        if self.transport is None or self.transport.is_closing():
            future.set_exception(ConnectionError("the connection to Redis is closed"))
            return future
        self.waiting.append((len(commands), [], future))
        self.transport.write(b"".join([_pack(command) for command in commands]))
        return future

    def write(self, commands: list[Command]) -> int:
        """Write ``commands`` at once, their replies read and dropped (a fence's refusal among them);
        returns the bytes the connection has yet to send, or -1 if it is closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return -1
        self.waiting.append((len(commands), [], None))
        transport.write(b"".join([_pack(command) for command in commands]))
        return transport.get_write_buffer_size()

    def push(self, command: Command) -> None:
        """Write ``command``; its reply goes to ``on_push`` (a subscriber's)."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_pack(command))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
