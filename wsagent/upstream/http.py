"""The model server's connections: HTTP/1.1 over asyncio, kept alive and reused, with TCP flow control.

One :class:`Pool` per model server (its scheme, host and port), shared by every run of the process. A request is
one write (its head and body together); the response's bytes are decoded where they arrive
(:meth:`_Connection.data_received`, through the sans-I/O :class:`~wsagent.core.http1.ResponseDecoder`) and
handed to the reader as they came, up to :data:`HIGH_WATER` unread, after which the socket is not read until the
reader catches up: TCP flow control then holds the model server back (after the socket's receive buffer, which
:class:`Pool` bounds).

This replaced aiohttp's client (2026-12-07), measured per one-token run with ``scripts/instructions.py``: the
benchmark's floor relay took 889,474 instructions with aiohttp's client, 313,838 with no request at all and
446,009 with this code's design, so aiohttp's request path cost about 575,000 instructions and this one 132,000.
aiohttp makes a task per request to write its body, a request, a response, a stream reader and a timer context
per request, and takes five turns of the event loop from the request to its first byte.

A connection that came back from the pool may have been closed by the model server meanwhile (its keep-alive
timeout: uvicorn's is 5 s), most often seen at once (its close is read, and it leaves the pool); a request written
as it closed fails ``stale`` (:class:`Broken`), and the model client sends it again at once if its retries allow.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from collections.abc import Coroutine
from typing import Any, Protocol
from urllib.parse import urlsplit

from ..core.http1 import ProtocolError, ResponseDecoder, Truncated

__all__ = ["Broken", "ConnectFailed", "Failable", "Pool", "ProtocolError", "Response", "Truncated", "Watch"]

#: Unread body bytes at which the socket stops being read (aiohttp's stream reader paused at 128 KiB too).
HIGH_WATER = 131072
#: ... and at which it is read again.
LOW_WATER = 32768
#: How long an unused connection is kept open for the next request (aiohttp's default, kept).
KEEP_IDLE = 15.0
#: How long a connection released before its response's last bytes came (the end of a chunked body, after the
#: event that ended the answer) waits for them before it is closed instead of kept: 3 in 50 one-token answers
#: measured; aiohttp closed those connections, and each cost a new one.
DRAIN_WAIT = 1.0


class ConnectFailed(Exception):
    """No connection to the model server: ``reason`` says why, as a person would ("connection refused");
    ``lasting``: trying again will not help (the server's certificate was refused)."""

    def __init__(self, where: str, reason: str, lasting: bool = False) -> None:
        super().__init__(f"cannot connect to {where} ({reason})")
        self.where = where
        self.reason = reason
        self.lasting = lasting


class Broken(Exception):
    """The connection failed (or closed) after the request was sent, before the response ended. ``stale``: a
    kept connection that ended before any byte of an answer came (most often, the model server closed it, idle,
    as the request was written): the request may go again at once, on a new connection."""

    stale = False


class Failable(Protocol):
    """What a timeout fails: the wait for it (a connection's for its answer, a response's for its bytes)."""

    def set_exception(self, exc: BaseException) -> None: ...


class Watch(Protocol):
    """Who times a request: told the connection it was written on, whose wait it fails when the answer is late."""

    def attach(self, reader: Failable) -> None: ...


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (exc.verify_message or exc.reason or "certificate refused").rstrip(".")
        return f"TLS: {why}; trust its CA with SSL_CERT_FILE"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {(exc.reason or str(exc)).lower().replace('_', ' ')}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    if isinstance(exc, OSError) and exc.errno:
        return errno.errorcode.get(exc.errno, "no connection").lower()
    return "no connection"


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection to the model server, and the response being read on it."""

    __slots__ = ("pool", "transport", "decoder", "body", "size", "waiter", "error", "paused", "busy", "reused",
                 "received", "idle_since", "lost", "draining")

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.decoder = ResponseDecoder()
        self.body: list[bytes] = []
        self.size = 0
        self.waiter: asyncio.Future[None] | None = None
        self.error: BaseException | None = None
        self.paused = False
        self.busy = False
        self.reused = False
        self.received = False  # a byte of the current request's answer has come
        self.idle_since = 0.0
        self.lost = False
        self.draining: asyncio.TimerHandle | None = None  # released, its response's last bytes still to come

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # nothing was asked: the connection cannot carry a request any more
            self.close()
            return
        self.received = True
        try:
            body = self.decoder.feed(data)
        except ProtocolError as exc:
            if exc.body:  # delivered before the error, as what the SSE decoder read before a break is
                self.body.append(exc.body)
                self.size += len(exc.body)
            self.error = exc
            self.close()
        else:
            if self.draining is not None:
                self._drained(body)
                return
            if body:
                self.body.append(body)
                self.size += len(body)
                if self.size > HIGH_WATER and not self.paused:
                    self.paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _drained(self, body: bytes) -> None:
        """More of a released response: kept once it ended with nothing more of the body, else closed."""
        if body:
            self.close()
        elif self.decoder.done:
            assert self.draining is not None
            self.draining.cancel()
            self.draining = None
            self.pool.draining.discard(self)
            self.pool.keep(self)

    def set_exception(self, exc: BaseException) -> None:
        """Fail the wait for this connection's answer (or its body's next bytes) with ``exc``: a timeout. The
        connection is not reused."""
        self.error = exc
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        return False  # (close the transport: HTTP/1.1 has no half-open use)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.draining is not None:  # released: nobody waits for the rest
            self.draining.cancel()
            self.draining = None
            self.pool.draining.discard(self)
            return
        if not self.busy:
            self.pool.forget(self)
            return
        if self.error is None:
            if exc is not None:
                self.error = Broken(f"the connection to the model server broke ({_reason(exc)})")
            elif self.decoder.head is None:
                self.error = Broken("the model server closed the connection before answering")
            else:
                try:
                    self.decoder.end()
                except Truncated as truncated:
                    self.error = truncated
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until more of the answer (or its end, or an error) has come."""
        self.waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self.waiter = None

    async def send(self, data: bytes, watch: Watch | None) -> Response:
        """Write a request; the response once its head is in."""
        self.decoder = ResponseDecoder()
        self.busy, self.received, self.error, self.size = True, False, None, 0
        self.body = []
        self.transport.write(data)  # type: ignore[union-attr]
        if watch is not None:
            watch.attach(self)
        try:
            while self.decoder.head is None:
                if self.error is not None:
                    if isinstance(self.error, Broken) and self.reused and not self.received:
                        self.error.stale = True
                    raise self.error
                await self.wait()
        except BaseException:
            self.close()
            raise
        return Response(self)

    def close(self) -> None:
        self.busy = False
        if self.draining is not None:
            self.draining.cancel()
            self.draining = None
            self.pool.draining.discard(self)
        if self.transport is not None:
            self.transport.close()


class Response:
    """A response whose head is in: its status, headers (names in lower case) and a body to :meth:`read`.
    End it with :meth:`release` (read to its end: the connection goes back to the pool) or :meth:`close`."""

    __slots__ = ("status", "headers", "_conn")

    def __init__(self, conn: _Connection) -> None:
        head = conn.decoder.head
        assert head is not None
        self.status = head.status
        self.headers = head.headers
        self._conn: _Connection | None = conn

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body as they come; ``b""`` at its end. :class:`Truncated` if the
        connection ended first, :class:`Broken` if it failed, a :class:`ProtocolError` for a broken framing, or
        what :meth:`set_exception` set."""
        conn = self._conn
        assert conn is not None, "read after release or close"
        while not conn.body:
            if conn.error is not None:
                raise conn.error
            if conn.decoder.done:
                return b""
            await conn.wait()
        body = conn.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        if len(data) > limit:
            body.append(data[limit:])
            data = data[:limit]
        conn.size -= len(data)
        if conn.paused and conn.size <= LOW_WATER:
            conn.paused = False
            conn.transport.resume_reading()  # type: ignore[union-attr]
        return data

    def set_exception(self, exc: BaseException) -> None:
        """Fail the waiting (or next) read with ``exc`` (a timeout); the connection is not reused."""
        if self._conn is not None:
            self._conn.set_exception(exc)

    def release(self) -> None:
        """Done with a response read to its end: its connection serves the next request."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.pool.keep(conn)

    def close(self) -> None:
        """Done with a response whose rest is not wanted: its connection is closed (the model server stops)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class Pool:
    """Connections to one model server (``url``'s scheme, host and port), each kept :data:`KEEP_IDLE` seconds
    for the next request. ``receive_buffer`` bounds each socket's receive buffer (when the relay stops reading,
    TCP flow control holds the model server back after this much instead of after the kernel's autotuned
    maximum, several MiB on Linux)."""

    def __init__(self, url: str, connect_timeout: float, receive_buffer: int = 0) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the model server's URL must be http:// or https:// with a host: {url[:200]!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        #: The ``Host`` header's value.
        self.authority = shown if parts.port is None else f"{shown}:{self.port}"
        self.where = f"{self.host}:{self.port}"
        self.connect_timeout = connect_timeout
        self.receive_buffer = receive_buffer
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._idle: list[_Connection] = []
        self._sweep: asyncio.TimerHandle | None = None
        #: Released connections waiting for their answer's last bytes (:data:`DRAIN_WAIT`).
        self.draining: set[_Connection] = set()

    def request(self, data: bytes, watch: Watch | None = None) -> Coroutine[Any, Any, Response]:
        """Send a request's bytes (head and body) on a kept connection or a new one; its response once the head
        is in. :class:`ConnectFailed`, :class:`Broken` or :class:`ProtocolError` else, or what ``watch`` (told
        the connection once the request is written) failed the wait with. It is sent once: a caller decides
        whether to send it again (aiohttp's client did not send a POST again either). (The kept connection's
        own coroutine: no coroutine of the pool's between the request and its answer.)"""
        if self._idle:
            return self._idle.pop().send(data, watch)
        return self._send_on_new(data, watch)

    async def _send_on_new(self, data: bytes, watch: Watch | None) -> Response:
        conn = await self._connect()
        return await conn.send(data, watch)

    def keep(self, conn: _Connection) -> None:
        """Back to the pool if its response ended as HTTP/1.1 allows reuse (or once its last bytes come, if that is
        all that is missing, within :data:`DRAIN_WAIT`); closed otherwise."""
        head = conn.decoder.head
        if (conn.lost or conn.error is not None or conn.body or head is None or not head.keep_alive
                or conn.decoder.extra):
            conn.close()
            return
        loop = asyncio.get_running_loop()
        if not conn.decoder.done:
            conn.draining = loop.call_later(DRAIN_WAIT, conn.close)
            self.draining.add(conn)
            return
        conn.busy = False
        conn.reused = True
        conn.idle_since = loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = loop.call_at(conn.idle_since + KEEP_IDLE, self._close_idle)

    def forget(self, conn: _Connection) -> None:
        """A connection the model server closed while it waited in the pool."""
        if conn in self._idle:
            self._idle.remove(conn)

    def _close_idle(self) -> None:
        self._sweep = None
        now = asyncio.get_running_loop().time()
        idle = [conn for conn in self._idle if now - conn.idle_since < KEEP_IDLE]
        for conn in self._idle:
            if now - conn.idle_since >= KEEP_IDLE:
                conn.close()
        self._idle = idle
        if idle:
            self._sweep = asyncio.get_running_loop().call_at(idle[0].idle_since + KEEP_IDLE, self._close_idle)

    def close(self) -> None:
        """Close every connection waiting in the pool, or for its answer's last bytes (those in use end with
        their responses)."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in [*idle, *self.draining]:
            conn.close()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                failure: OSError | None = None
                for family, kind, proto, _, address in infos:
                    sock = socket.socket(family, kind, proto)
                    try:
                        sock.setblocking(False)
                        if self.receive_buffer:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.receive_buffer)
                        await loop.sock_connect(sock, address)
                    except OSError as exc:
                        sock.close()
                        failure = exc
                        continue
                    except BaseException:
                        sock.close()
                        raise
                    transport, conn = await loop.create_connection(
                        lambda: _Connection(self), sock=sock, ssl=self._ssl,
                        server_hostname=self.host if self._ssl is not None else None)
                    conn.transport = transport  # (uvloop may call connection_made after this returns)
                    return conn
                raise ConnectFailed(self.where, _reason(failure))
        except TimeoutError:
            raise
        except OSError as exc:  # the name did not resolve, or TLS failed
            raise ConnectFailed(self.where, _reason(exc), isinstance(exc, ssl.SSLCertVerificationError)) from None
