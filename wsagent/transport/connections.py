"""Every open connection, and how frames get written to each of them.

Policy for a slow client (documented in docs/protocol.md): nothing a client has not
read is buffered without bound. Messages queued for a client (broadcasts,
personal sends from other connections) count against ``outbox_bytes``; a run's
undelivered events count against the run's own buffer (see
:mod:`wsagent.engine.run`). A client whose queue overflows, or that accepts no data
at all for ``slow_client_timeout`` seconds, is closed with 4008. One slow
client therefore never blocks or bloats delivery to the others: broadcast only
appends to queues and never awaits a socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import DATA_OPCODES, Frame, Opcode
from websockets.protocol import Event, State
from websockets.server import ServerProtocol

from ..engine.broker import Broker
from ..engine.run import Subscription
from .keepalive import Keepalive

__all__ = [
    "Connection", "ConnectionManager", "Outbox", "Session", "StreamConnection", "close_or_abort", "CLOSE_SLOW_CLIENT",
    "CLOSE_REPLACED", "utf8_size", "connection_id", "forget_subprotocol_choice",
]

log = logging.getLogger("wsagent.connections")

CLOSE_INTERNAL_ERROR = 1011
#: A rolling restart: reconnect (to another node) and resume.
CLOSE_SERVICE_RESTART = 1012
CLOSE_SLOW_CLIENT = 4008
CLOSE_REPLACED = 4009

_ids = itertools.count(1)


def connection_id(prefix: str = "") -> str:
    """A new connection id, unique in this process: ``c17``; a ``--workers`` worker's server gives its tag as
    ``prefix`` (``w2-c17``), so that ids stay unique across the workers of one server."""
    return f"{prefix}c{next(_ids)}"


def utf8_size(text: str) -> int:
    """Bytes ``text`` takes on the wire (a character of it may take up to four)."""
    return len(text) if text.isascii() else len(text.encode())


async def close_or_abort(ws: ServerConnection, code: int, reason: str, grace: float) -> None:
    """Close with ``code``; drop the TCP connection if the peer does not take the close frame in time.

    A client that reads nothing never drains our write buffer, so the closing
    handshake alone could wait for ever.
    """
    try:
        async with asyncio.timeout(grace):
            await ws.close(code, reason)
    except TimeoutError:
        ws.transport.abort()


class Session(Protocol):
    """What a message-driven route keeps of one connection (:class:`StreamConnection` drives it).

    No task waits for an idle connection's next message: when one arrives, a task starts that hands it
    to :meth:`on_message`, and every message after it that has arrived meanwhile, one at a time and in
    order, and ends when none is left. :meth:`on_leave` is called once, as soon as the client is known to
    be leaving (see :class:`StreamConnection`); :meth:`on_close` once, after it, when the connection is
    gone and no message is being handled any more.
    """

    async def on_message(self, message: str | bytes) -> None: ...

    def on_leave(self) -> None: ...

    def on_close(self) -> None: ...


class StreamConnection(ServerConnection):
    """The library's server connection, plus a write that does not wait.

    :meth:`send` is a coroutine that waits for the socket after every message;
    awaiting it for every token costs a task switch and a context manager per
    frame, most of the relay's time at a thousand streams. :meth:`write_now`
    hands a whole frame to the transport at once; :class:`Outbox` checks
    :attr:`paused` (the transport's buffer is past its high-water mark: the
    client reads slower than we write) before each batch and waits with
    :meth:`wait_writable` instead. Writing is synchronous on the event loop's
    thread, so these frames never interleave with the library's own (pings,
    close).

    :attr:`on_leave` is called once, as soon as the client is known to be leaving: its close
    frame arrived, or the connection was lost. The library's ``recv`` raises only once the TCP
    connection is closed, which after a close frame is a round trip through the client later
    (our close reply, its TCP close); a run the client leaves is released at the close frame
    instead, as a relay that reads its own frames would (from the close frame to the model server
    seeing its connection close, p50 here: 2.1 ms before, 1.0 after, aiohttp's relay 1.1).
    """

    # Slots, not the instance's dict: the library's own attributes fill the keys a class's instances share
    # (30 at most in CPython 3.11); one more made every connection's dict a full one of its own (1.5 KiB).
    __slots__ = ("on_leave", "pinger", "session", "inline", "_ping", "_reader", "_left", "_linger")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # The library wraps its logger in an adapter for each connection (an adapter, a dict and a weak
        # proxy: 400 bytes an idle connection holds); its records need no connection of their own here.
        adapter = self.logger
        if isinstance(adapter, logging.LoggerAdapter):
            self.logger = self.protocol.logger = adapter.logger
        self.on_leave: Callable[[], None] | None = None  # (a handler's route; a session has its own)
        self.pinger: Keepalive | None = None
        self.session: Session | None = None
        self.inline = False
        self._ping: tuple[bytes, float] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._left = False
        self._linger: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """The library's, with its two queues as lists: an empty deque costs 760 bytes, an empty list 56, and
        both hold a handful of items at most (frames up to ``max_queue``, a writer waiting to drain)."""
        super().connection_made(transport)
        self.drain_waiters = []  # type: ignore[assignment]  # (a deque in the library's annotation)
        self.recv_messages.frames.queue = _Frames()  # type: ignore[assignment]

    def send_ping(self, payload: bytes, now: float) -> None:
        """A keepalive ping, written at once (:class:`~wsagent.transport.keepalive.Keepalive`)."""
        self._ping = (payload, now)
        self.protocol.send_ping(payload)
        self.send_data()

    def acknowledge_pings(self, data: bytes) -> None:
        ping = self._ping
        if ping is not None and data == ping[0]:
            self._ping = None
            self.latency = self.loop.time() - ping[1]
            if self.pinger is not None:
                self.pinger.answered(self)
            return
        super().acknowledge_pings(data)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self._left and self.protocol.close_rcvd is not None:
            self._leave()

    def serve(self, session: Session, inline: bool = False) -> None:
        """Drive ``session`` by this connection's messages from now on; those that arrived before (while the
        connection was being checked) are handled first.

        With ``inline``, a message that arrives from now on is handled where it arrives, in the event loop's
        call that read it, and a task is made only if handling it waits (:meth:`_handle`). For a session whose
        coroutines wait only for what may be answered at once (an in-process broker's): nothing on its way may
        need a current task (``asyncio.timeout``; a cluster's commands do)."""
        self.session = session
        self.inline = inline
        if self.connection_lost_waiter.done():
            self._leave()
            self._closed()
        elif self.recv_messages.frames.queue:  # (a task: this runs in the handshake's, which ends here)
            self._reader = self.loop.create_task(self._read(session))

    def process_event(self, event: Event) -> None:
        super().process_event(event)
        if (self._reader is None and self.session is not None and isinstance(event, Frame)
                and event.opcode in DATA_OPCODES):
            self._handle(self.session)

    def _handle(self, session: Session) -> None:
        """:meth:`_read` as a task; or, :attr:`inline`, its first step here and the rest (if it waits) as a task.

        A prompt's message in text mode starts its run without waiting for anything: a task for it was
        made, stepped once and thrown away for every run, 14,000 instructions of a one-token run's 1,080,000
        (3.11's tasks enter a weak set in Python; counted with ``scripts/instructions.py``)."""
        if not self.inline:
            self._reader = self.loop.create_task(self._read(session))
            return
        reading = self._read(session)
        try:
            waiting = reading.send(None)
        except StopIteration:
            return
        self._reader = self.loop.create_task(_go_on(reading, waiting))

    async def _read(self, session: Session) -> None:
        """Hand the messages that have arrived to ``session``, in order, one at a time; end when none is
        left (a message in fragments is waited for whole). A failure the session did not handle itself
        closes the connection with 1011."""
        frames = self.recv_messages.frames.queue
        try:
            while frames:
                if asyncio.current_task() is None and not _takes_alone(frames[0]):
                    await asyncio.sleep(0)  # (recv() closes the connection for it, which needs a task: on in one)
                await session.on_message(await self.recv())
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("handling a message failed")
            _closing(self.loop.create_task(  # (a task: this may run inline, and a close needs a current task)
                close_or_abort(self, CLOSE_INTERNAL_ERROR, "internal error", self.close_timeout or 0.0)))
        finally:
            self._reader = None
            if self.connection_lost_waiter.done():
                self._closed()

    def _closed(self) -> None:
        session, self.session = self.session, None
        if session is not None:
            session.on_close()

    @property
    def leaving(self) -> bool:
        """The client sent its close frame, or the connection is lost."""
        return self._left

    def _leave(self) -> None:
        if self._left:
            return
        self._left = True
        # Its close frame: the library set when its TCP connection must have ended (close_timeout; none without).
        if self.close_deadline is not None and not self.connection_lost_waiter.done():
            self._linger = self.loop.call_at(self.close_deadline, self._linger_over)
        leave, self.on_leave = self.on_leave, None
        if leave is not None:
            leave()
        elif self.session is not None:
            self.session.on_leave()

    def _linger_over(self) -> None:
        """A client that sent its close frame and keeps its TCP connection open is dropped (the library waits for
        it to close for as long as anything awaits the connection: its handler's ``recv``, for ever)."""
        if not self.connection_lost_waiter.done():
            self.transport.abort()

    def write_now(self, messages: list[str]) -> bool:
        """Write ``messages`` now, a text frame each, in one write to the socket (one system call,
        not one per frame: a run's last token, its usage and ``done`` often leave together).
        False if the connection is no longer open."""
        protocol = self.protocol
        if protocol.state is not State.OPEN:
            return False
        for message in messages:
            protocol.send_text(message.encode())
        # Only frames are pending while the connection is open (the end of stream comes after a close).
        self.transport.write(b"".join(protocol.data_to_send()))
        return True

    async def wait_writable(self) -> None:
        """Wait until flow control lets writing go on, or the connection is lost."""
        await self.drain()

    def connection_lost(self, exc: Exception | None) -> None:
        """Break the reference cycles a closed connection would otherwise leave to the collector.

        ``serve(select_subprotocol=...)`` binds a closure over this connection to
        its protocol (and Python 3.11's socket transport keeps a bound method of
        itself: :func:`wsagent.core.tuning.break_transport_cycles`). Each cycle kept the whole
        connection (about 90 objects) alive until a collection, and at a thousand
        streams those collections paused every stream for hundreds of
        milliseconds. The library breaks its other cycles here too, but not the
        sans-I/O protocol's own: its parser is a suspended generator whose frame
        holds the protocol, and after a reset ``parser_exc`` holds a traceback
        through it. Nothing is parsed after the connection is lost, so the
        parser is closed and the exception dropped; without that, every closed
        connection of every kind left its protocol (and its deflate state) to the
        collector: 1,053 of them after a five-minute soak. And when the loss was
        an error raised while writing (a reset under a write of ours), that
        exception's traceback holds the frames of our write path, which hold
        this connection: the traceback goes too (the error itself is kept).
        """
        super().connection_lost(exc)
        self._leave()
        if self._linger is not None:  # (its timer would hold this connection until it fired)
            self._linger.cancel()
            self._linger = None
        if self._reader is None:  # (else the reader calls it when the message it handles is done)
            # After what leaving set going: a run cancelled above closes its upstream request in the loop's
            # next turn, before this connection's bookkeeping and its objects' release (cancellation after an
            # abrupt close, p50 of three rounds of 100: 1.12 ms with them first, 1.00 after, 1.09 before sessions).
            self.loop.call_soon(self._closed)
        if self.pinger is not None:
            self.pinger.discard(self)
        if exc is not None:
            exc.__traceback__ = None
        protocol = self.protocol
        forget_subprotocol_choice(protocol)  # the handshake is long over
        protocol.parser.close()
        protocol.parser_exc = None


def _takes_alone(frame: Frame) -> bool:
    """Whether ``recv()`` returns this frame's message without a task of its own: the whole message, binary or valid
    UTF-8. (For a message in fragments, or invalid text, it may close the connection, 1009 or 1007, under
    ``asyncio.timeout``, which needs a current task.)"""
    if not frame.fin:
        return False
    if frame.opcode is not Opcode.TEXT:
        return True
    data = frame.data if isinstance(frame.data, (bytes, bytearray)) else bytes(frame.data)
    if data.isascii():
        return True
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


class _GoOn:
    """A coroutine driven on from where it first waited (its first step ran inline, see
    :meth:`StreamConnection._handle`), by the task that awaits this: each future it waits on is the task's to
    wait on, each result and exception (a cancellation too) goes back into it, as ``await`` of it would."""

    __slots__ = ("coroutine", "waiting")

    def __init__(self, coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
        self.coroutine = coroutine
        self.waiting = waiting

    def __await__(self) -> Generator[Any, Any, None]:
        coroutine, waiting = self.coroutine, self.waiting
        self.waiting = None
        while True:
            try:
                sent = yield waiting
            except BaseException as exc:  # (thrown into the coroutine, as await would)
                try:
                    waiting = coroutine.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting = coroutine.send(sent)
                except StopIteration:
                    return


async def _go_on(coroutine: Coroutine[Any, Any, None], waiting: Any) -> None:
    await _GoOn(coroutine, waiting)


#: Closes begun where no task holds them (asyncio keeps only weak references to its tasks).
_CLOSING: set[asyncio.Task[None]] = set()


def _closing(task: asyncio.Task[None]) -> None:
    _CLOSING.add(task)
    task.add_done_callback(_CLOSING.discard)


def forget_subprotocol_choice(protocol: ServerProtocol) -> None:
    """Drop the closure ``serve(select_subprotocol=...)`` binds to a connection's protocol, without making
    the protocol's attributes a dictionary (``vars()`` would, for the protocol's life)."""
    with contextlib.suppress(AttributeError):
        del protocol.select_subprotocol


class _Frames(list[Frame]):
    """What the library's frame queue does with its deque (a few frames at most: ``max_queue``)."""

    def popleft(self) -> Frame:
        return self.pop(0)

    def extendleft(self, items: Iterable[Frame]) -> None:
        self[:0] = reversed(list(items))


class Outbox:
    """Serializes everything written to one connection: queued messages and run streams.

    Whoever has something new (a run's producer, a broadcast) writes it at
    once, synchronously, while the socket takes data: no task and no event
    loop iteration per token. Only when the client falls behind does a task
    start; it waits for the socket to drain and carries on, while the run
    merges what piles up meanwhile (see :mod:`wsagent.engine.run`). An idle or
    keeping-up connection therefore costs no task at all.
    """

    __slots__ = ("ws", "_conn", "_queue", "_queued_bytes", "_subs", "_task", "sending_since", "limit", "closing")

    def __init__(self, conn: Connection, limit: int) -> None:
        self.ws = conn.ws
        # Weak, so that connection and outbox are no reference cycle: a closed connection is freed
        # at once by reference counting, not by a collector pause (see StreamConnection.connection_lost).
        self._conn = weakref.ref(conn)
        self.limit = limit
        self._queue: deque[str] | None = None  # made on first use: an empty deque costs 760 bytes
        self._queued_bytes = 0
        self._subs: list[Subscription] = []
        self._task: asyncio.Task[None] | None = None
        self.sending_since: float | None = None
        self.closing = False

    @property
    def queued_bytes(self) -> int:
        return self._queued_bytes

    def put(self, frame: str) -> bool:
        """Queue ``frame`` without waiting. False (and a 4008 close) if the client is too far behind."""
        if self.closing:
            return False
        size = utf8_size(frame)
        if self._queued_bytes + size > self.limit:
            conn = self._conn()
            if conn is not None:
                conn.close_soon(CLOSE_SLOW_CLIENT, "slow client: too much queued")
            return False
        if self._queue is None:
            self._queue = deque()
        self._queue.append(frame)
        self._queued_bytes += size
        self.wake()
        return True

    def watch(self, sub: Subscription) -> None:
        self._subs.append(sub)
        if sub.news:
            self.wake()

    def unwatch(self, sub: Subscription) -> None:
        if sub in self._subs:
            self._subs.remove(sub)

    def close(self) -> None:
        """The connection is gone: stop the writer, drop what is queued."""
        self.closing = True
        self._drop()
        if self._task is not None:
            self._task.cancel()

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    def wake(self) -> None:
        """Something is pending: write it now, or leave it to the task that waits for the client."""
        if self._task is None and not self.closing and not self._flush():
            self._task = asyncio.get_running_loop().create_task(self._wait_and_flush())

    def _flush(self) -> bool:
        """:meth:`_write`, on whoever's behalf it runs (a run's producer wakes every watcher of its run):
        a write that fails is this connection's failure alone. It is logged and the connection closed
        with 1011; the run and its other watchers go on."""
        try:
            return self._write()
        except Exception:
            conn = self._conn()
            log.exception("writing to %s failed", conn.id if conn is not None else "a connection")
            self._drop()
            if conn is not None:  # closing: no more writes; leaving releases its subscriptions
                conn.close_soon(CLOSE_INTERNAL_ERROR, "internal error")
            return True

    def _write(self) -> bool:
        """Write what is pending while the socket takes it. False if the client must catch up first.

        Flow control is checked between batches: the frames of one
        :meth:`~wsagent.engine.run.Subscription.take` go out together.
        """
        ws = self.ws
        queue = self._queue
        while queue:
            if ws.paused:
                return False
            frame = queue.popleft()
            self._queued_bytes -= utf8_size(frame)
            if not ws.write_now([frame]):
                self._drop()
                return True
        subs = self._subs
        for sub in subs[:] if len(subs) > 1 else subs:  # (removing the only item ends the loop cleanly)
            if ws.paused:
                return False
            frames = sub.take()
            if frames and not ws.write_now(frames):
                self._drop()
                return True
            sub.sent()
            if sub.ended:
                self.unwatch(sub)
        return True

    def _drop(self) -> None:
        self._queue = None
        self._queued_bytes = 0

    async def _wait_and_flush(self) -> None:
        ws = self.ws
        loop = asyncio.get_running_loop()
        try:
            while not self.closing:
                self.sending_since = loop.time()
                try:
                    await ws.wait_writable()
                except Exception:  # the connection was lost while we waited: nothing more can be written
                    self._drop()
                    return
                self.sending_since = None
                if self._flush():
                    return
        finally:
            self.sending_since = None
            self._task = None

    async def flush(self) -> None:
        """Wait until everything pending is written (used before closing the socket), or the writer is gone.

        The writer may end cancelled (its connection was lost meanwhile): that is its end, not this
        waiter's cancellation, so it is waited for without taking on its outcome (``shield`` raised it here).
        """
        while self._task is not None:
            await asyncio.wait((self._task,))


@dataclass(eq=False, slots=True, weakref_slot=True)
class Connection:
    """One client: who it is, where it came from, and its outbox. (Slots: an idle connection's dict was
    as large as the object.)"""

    ws: StreamConnection
    path: str
    params: dict[str, str]
    remote: str
    outbox_limit: int
    close_timeout: float
    route: str = ""
    ip: str = ""
    user: str | None = None
    expires: float = math.inf
    expiry_timer: asyncio.TimerHandle | None = None
    manager: ConnectionManager | None = None
    client_id: str | None = None
    id: str = field(default_factory=connection_id)
    opened: float = field(default_factory=time.monotonic)
    outbox: Outbox = field(init=False)
    _closer: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.outbox = Outbox(self, self.outbox_limit)

    def close_soon(self, code: int, reason: str, flush: bool = False) -> None:
        """Close from code that must not wait (a broadcast, a sweeper, a timer).

        With ``flush``, what is already queued (an error explaining the close) goes out first.
        """
        if self._closer is None:
            if code == CLOSE_SLOW_CLIENT and self.manager is not None:
                self.manager.slow_closes += 1
            self.outbox.closing = True
            self._closer = asyncio.get_running_loop().create_task(self._close(code, reason, flush))

    async def _close(self, code: int, reason: str, flush: bool) -> None:
        if flush:
            try:
                async with asyncio.timeout(self.close_timeout):
                    await self.outbox.flush()
            except TimeoutError:
                pass
        await close_or_abort(self.ws, code, reason, self.close_timeout)

    def put(self, frame: str) -> bool:
        """Queue ``frame`` behind everything already pending for this client (one writer, one order)."""
        return self.outbox.put(frame)

    def evict(self) -> None:
        """A newer connection took this client's id."""
        self.close_soon(CLOSE_REPLACED, "replaced by a newer connection")


class ConnectionManager:
    """Knows every open connection of this process; client ids and per-user counts live in the broker.

    ``client_id_policy`` decides what a second connection with a connected
    client id gets: ``replace`` closes the old one with 4009 (a reloaded page
    or a reconnecting client wins over its own half-dead connection), and
    ``reject`` closes the new one with 4009.
    """

    def __init__(self, broker: Broker, max_connections: int, client_id_policy: str = "replace") -> None:
        self.broker = broker
        self.max_connections = max_connections
        self.client_id_policy = client_id_policy
        self._all: dict[str, Connection] = {}
        self._per_ip: Counter[str] = Counter()
        self.total = 0
        self.total_by_route: Counter[str] = Counter()
        self.slow_closes = 0
        self._emptied: asyncio.Future[None] | None = None

    def __len__(self) -> int:
        return len(self._all)

    def __iter__(self) -> Iterator[Connection]:
        return iter(list(self._all.values()))

    @property
    def full(self) -> bool:
        return len(self._all) >= self.max_connections

    def register(self, conn: Connection, route: str) -> None:
        conn.manager = self
        self._all[conn.id] = conn
        self._per_ip[conn.ip] += 1
        self.total += 1
        self.total_by_route[route] += 1

    def unregister(self, conn: Connection) -> None:
        if self._all.pop(conn.id, None) is None:
            return
        self._per_ip[conn.ip] -= 1
        if not self._per_ip[conn.ip]:
            del self._per_ip[conn.ip]
        if conn.user is not None:
            self.broker.user_disconnected(conn.user)
        if conn.client_id is not None:
            self.broker.release_client(conn.client_id, conn)
        if not self._all and self._emptied is not None and not self._emptied.done():
            self._emptied.set_result(None)

    async def wait_empty(self) -> None:
        """Until every connection is unregistered (a stop: those driven by messages have no task to wait for)."""
        while self._all:
            if self._emptied is None or self._emptied.done():  # (one future for every waiter)
                self._emptied = asyncio.get_running_loop().create_future()
            await asyncio.shield(self._emptied)

    def from_ip(self, ip: str) -> int:
        return self._per_ip.get(ip, 0)

    async def set_user(self, conn: Connection, user: str) -> int:
        """Record who ``conn`` is; returns how many connections that user now has open."""
        conn.user = user
        return await self.broker.user_connected(user)

    def open_by_route(self) -> Counter[str]:
        return Counter(conn.route for conn in self._all.values())

    async def claim_client_id(self, conn: Connection, client_id: str) -> bool:
        """Bind ``client_id`` to ``conn`` following the policy. False if ``conn`` must go."""
        if not await self.broker.claim_client(client_id, conn, self.client_id_policy):
            return False
        conn.client_id = client_id
        return True

    def sweep(self, now: float, slow_after: float) -> None:
        """Close clients stuck in one send for longer than ``slow_after`` seconds (4008)."""
        for conn in list(self._all.values()):
            since = conn.outbox.sending_since
            if since is not None and now - since > slow_after:
                log.info("closing slow client %s (no data accepted for %.1fs)", conn.id, now - since)
                conn.close_soon(CLOSE_SLOW_CLIENT, "slow client")
