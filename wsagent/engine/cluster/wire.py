"""Redis spoken by hand, for cluster mode's hot path: RESP commands packed and replies parsed by hiredis (C).

redis-py serves everything else in :mod:`wsagent.engine.cluster`; this is the one
connection per node that carries a run's entries (and the one that subscribes),
where redis-py's per-command objects, awaited round trips and tasks cost more
than the rest of a token's path (see :class:`Wire`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit, urlunsplit

import hiredis
from redis.connection import SSLConnection, UnixDomainSocketConnection, parse_url

__all__ = ["Address", "Command", "Wire", "OPEN_TIMEOUT", "redacted"]

#: Seconds to connect, log in and select the database.
OPEN_TIMEOUT = 2.0


#: What a Redis URL may say besides where Redis is, who logs in and which database: the TLS options this
#: connection honours as redis-py does (``rediss://`` only). Anything else (``protocol``, ``socket_timeout``...)
#: would change redis-py's connection and not this one: such a URL is refused.
TLS_OPTIONS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def redacted(url: str) -> str:
    """``url`` without its password (for logs and errors)."""
    parts = urlsplit(url)
    query = "&".join(f"{name}=***" if name.lower() == "password" else f"{name}={value}" if sep else name
                     for name, sep, value in (item.partition("=") for item in parts.query.split("&") if item))
    if query == parts.query and parts.password is None:
        return url
    parts = parts._replace(query=query)  # (redis-py takes ?password= too)
    if parts.password is None:
        return urlunsplit(parts)
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclasses.dataclass(frozen=True)
class Address:
    """Where a Redis URL says Redis is, as redis-py's own parser reads it (so that this connection and
    redis-py's always reach the same server and database): a host and port or a Unix socket's path, the
    database, the login, and for ``rediss://`` a TLS context."""

    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: ssl.SSLContext | None = None

    @classmethod
    def parse(cls, url: str) -> Address:
        """``url`` read by ``redis.connection.parse_url``; ``ValueError`` (one line, without the password) for a
        URL redis-py refuses, or one that says what this connection would not do as redis-py does."""
        try:
            options: dict[str, Any] = cast(Callable[[str], dict[str, Any]], parse_url)(url)  # (untyped)
        except ValueError as exc:
            raise ValueError(f"{redacted(url)}: {exc}") from None
        kind = options.pop("connection_class", None)
        tls_options = {name: options.pop(name) for name in TLS_OPTIONS if name in options}
        known = {field.name for field in dataclasses.fields(cls)} - {"tls"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"{redacted(url)}: {', '.join(unknown)} cannot be honoured by wsagent's own connection "
                             f"to Redis (a Redis URL may give the database, as /0 or ?db=0, and with rediss:// "
                             f"{', '.join(TLS_OPTIONS)})")
        if tls_options and kind is not SSLConnection:
            raise ValueError(f"{redacted(url)}: {', '.join(sorted(tls_options))} applies to rediss:// URLs only")
        address = cls(**options)
        if kind is UnixDomainSocketConnection:
            if not address.path:
                raise ValueError(f"{redacted(url)}: a unix:// URL needs the socket's path (unix:///run/redis.sock)")
        elif kind is SSLConnection:
            try:
                address = dataclasses.replace(address, tls=_tls(tls_options))
            except (ValueError, OSError) as exc:  # (a certificate file missing or unreadable, an unknown value)
                raise ValueError(f"{redacted(url)}: {exc}") from None
        return address


def _tls(options: dict[str, Any]) -> ssl.SSLContext:
    """The TLS context redis-py would make of ``options``: the server's certificate required and its host
    name checked unless they say otherwise."""
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    reqs = options.get("ssl_cert_reqs", "required")
    verify = _CERT_REQS.get(str(reqs).lower()) if isinstance(reqs, str) else None
    if verify is None:
        raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}, not {reqs!r}")
    context.check_hostname = bool(options.get("ssl_check_hostname", True)) and verify != ssl.CERT_NONE
    context.verify_mode = verify
    if options.get("ssl_certfile"):
        context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
    return context


#: A command as Redis takes it: its name, then its arguments.
Command = tuple[str | int, ...]


def _pack(command: Command) -> bytes:
    """``command`` in RESP. (hiredis's stub types its argument as a tuple of one item.)"""
    packed: bytes = hiredis.pack_command(cast(Any, command))
    return packed


#: Replies a batch awaits that it never sent: positions of commands that could not be packed, and their errors.
Unsent = dict[int, hiredis.ReplyError]


def _pack_all(commands: list[Command]) -> tuple[bytes, Unsent | None]:
    """``commands`` in RESP, every one packed before anything is written or counted; a command that
    cannot be (a string that is not UTF-8, such as a lone surrogate; an argument of another type) is
    left out, and its error stands in for its reply, so that the replies Redis sends still match the
    commands it got."""
    try:
        return b"".join([_pack(command) for command in commands]), None
    except (TypeError, ValueError):  # (UnicodeEncodeError is a ValueError): pack them one by one
        pass
    packed: list[bytes] = []
    unsent: Unsent = {}
    for i, command in enumerate(commands):
        try:
            packed.append(_pack(command))
        except (TypeError, ValueError) as exc:
            unsent[i] = hiredis.ReplyError(f"ERR wsagent could not encode this {str(command[0])[:16]} command ({exc}); "
                                           "it was not sent")
    return b"".join(packed), unsent


def _merged(replies: list[Any], unsent: Unsent) -> list[Any]:
    """The replies of a batch with the errors of its commands that were not sent, in the batch's order."""
    merged = iter(replies)
    return [unsent[i] if i in unsent else next(merged) for i in range(len(replies) + len(unsent))]


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
        # Per batch written: how many replies it awaits, those come so far, and who wants them (None: nobody),
        # with the errors of its commands that could not be sent (None: it had none).
        self.waiting: deque[tuple[int, list[Any], asyncio.Future[list[Any]] | None, Unsent | None]] = deque()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @classmethod
    async def open(cls, where: str | Address, on_push: Callable[[Any], None] | None = None) -> Wire:
        """Connected to the Redis a URL names (``redis://[[user]:password@]host[:port][/db][?db=N]``,
        ``rediss://...``, ``unix:///path/to/redis.sock[?db=N]``; read as :class:`Address`), logged in as
        redis-py logs in, its database selected."""
        address = where if isinstance(where, Address) else Address.parse(where)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(OPEN_TIMEOUT):
            if address.path is not None:
                _, wire = await loop.create_unix_connection(lambda: cls(), address.path)
            else:
                _, wire = await loop.create_connection(lambda: cls(), address.host, address.port, ssl=address.tls)
            setup: list[Command] = []
            if address.username is not None or address.password is not None:  # (as redis-py's credentials)
                setup.append(("AUTH", address.username, address.password or "") if address.username is not None
                             else ("AUTH", address.password or ""))
            if address.db:
                setup.append(("SELECT", address.db))
            for reply in await wire.send(setup) if setup else []:
                if isinstance(reply, hiredis.ReplyError):
                    wire.close()
                    shown = address.path or f"{address.host}:{address.port}/{address.db}"
                    raise ConnectionError(f"Redis refused {shown}: {reply}")
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
            count, replies, future, unsent = self.waiting[0]
            replies.append(reply)
            if len(replies) == count:
                self.waiting.popleft()
                if future is not None and not future.done():
                    future.set_result(replies if unsent is None else _merged(replies, unsent))

    def connection_lost(self, exc: Exception | None) -> None:
        error = ConnectionError(f"Redis closed the connection ({exc or 'end of stream'})")
        for _, _, future, _ in self.waiting:
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
        data, unsent = _pack_all(commands)
        count = len(commands) - len(unsent or ())
        if not count:  # nothing could be sent: nothing to wait for
            future.set_result(_merged([], unsent or {}))
            return future
        self.waiting.append((count, [], future, unsent))
        self.transport.write(data)
        return future

    def write(self, commands: list[Command]) -> int:
        """Write ``commands`` at once, their replies read and dropped (a fence's refusal among them, or
        a command that could not be encoded, which is not sent); returns the bytes the connection has
        yet to send, or -1 if it is closed."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return -1
        data, unsent = _pack_all(commands)
        count = len(commands) - len(unsent or ())
        if count:
            self.waiting.append((count, [], None, None))
            transport.write(data)
        return transport.get_write_buffer_size()

    def push(self, command: Command) -> None:
        """Write ``command``; its reply goes to ``on_push`` (a subscriber's). One that cannot be encoded
        raises (nothing is written, and no reply is counted here)."""
        packed = _pack(command)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(packed)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
