"""The node's link to the cluster's Redis: its connections, and whether Redis answers.

Three connections per node: redis-py's (questions that await an answer: a
lookup, a claim, a count), and two spoken by hand (:mod:`~wsagent.engine.cluster.wire`)
for what must cost nothing per batch: the *writer* (a run's entries, control
messages, deletes; nothing waits for their replies) and the *subscriber* (this
node's channel, the broadcast channel, and the channels of the runs it follows).

The link is ``UP`` or ``DOWN`` (:class:`Link`). Any failure takes it down at
once (:meth:`RedisLink.lost`): the connections are hung up and the broker is
told (its followed runs end for their watchers with ``cluster_unavailable``).
The heartbeat brings it up again (:meth:`RedisLink.rejoin`): the writer, then
the subscriber on every channel, then the broker writes back what it holds.
A subscriber Redis cut alone (a subscriber too far behind passes its output
buffer limit) is subscribed again while the link stays up.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol, TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from ...core.errors import ClusterUnavailable
from .names import BROADCAST, name
from .wire import Address, Command, Wire, redacted

__all__ = ["Link", "RedisLink", "Member", "DOWN_ERRORS", "COMMAND_TIMEOUT", "OUT_OF_REACH"]

log = logging.getLogger("wsagent.cluster")

#: Seconds one Redis command may take before the cluster is taken for out of reach.
COMMAND_TIMEOUT = 2.0
#: Bytes of writes Redis may leave unread before the cluster is taken for out of reach.
MAX_UNSENT = 16 * 1024 * 1024
OUT_OF_REACH = "the cluster is out of reach (its Redis does not answer)"
#: What a Redis that stopped answering raises, through redis-py or our own connections.
DOWN_ERRORS = (RedisError, OSError, TimeoutError)
_T = TypeVar("_T")


class Link(enum.Enum):
    """The node's link to the cluster's Redis."""

    UP = "up"
    DOWN = "down"


class Member(Protocol):
    """What the link tells the node it links (the broker)."""

    def received(self, channel: str, data: str) -> None:
        """A message on one of the node's channels."""
        ...

    def channels(self) -> list[str]:
        """The channels besides the node's own to subscribe to (the runs it follows)."""
        ...

    def subscribed(self) -> None:
        """The subscriber is (again) on every channel: read what passed while it was not."""
        ...

    def down(self) -> None:
        """The link went down."""
        ...


class RedisLink:
    """The connections to Redis and the link's state, for ``member``."""

    def __init__(self, url: str, node: str, member: Member) -> None:
        """Raises ``SystemExit`` (one line) for a URL that cannot be followed: every connection reads it
        with redis-py's parser, so each reaches the same server and database, or the node does not start."""
        try:
            self.address = Address.parse(url)
        except ValueError as exc:
            raise SystemExit(f"--redis-url {exc}") from None
        self.url = redacted(url)  # (for logs)
        self.node = node
        self.state = Link.DOWN
        #: Told each change of :attr:`state` (the server passes it on to systemd as the unit's status).
        self.on_change: Callable[[Link], None] = lambda state: None
        self.failures = 0
        self.down_since: float | None = time.monotonic()
        self.resubscribes = 0
        self.redis: Redis = Redis.from_url(url, decode_responses=True, socket_timeout=COMMAND_TIMEOUT,
                                           socket_connect_timeout=COMMAND_TIMEOUT, retry=Retry(NoBackoff(), 0))
        self._member = member
        self._writer: Wire | None = None
        self._subscriber: Wire | None = None
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def up(self) -> bool:
        return self.state is Link.UP

    def status(self) -> dict[str, Any]:
        return {"redis": self.state.value, "failures": self.failures, "resubscribes": self.resubscribes,
                "down_s": None if self.down_since is None else round(time.monotonic() - self.down_since, 3)}

    # -- up and down -----------------------------------------------------

    async def rejoin(self, write_back: Callable[[], Awaitable[None]]) -> None:
        """Redis answers again (perhaps restarted empty): connect, subscribe, let the broker ``write_back``
        what it holds, and the link is up."""
        try:
            self._writer = await Wire.open(self.address)
            await self._subscribe()
            await write_back()
        except BaseException:
            self._hang_up()
            raise
        self.state = Link.UP
        self.down_since = None
        self.on_change(self.state)
        log.info("cluster: node %s joined through Redis at %s", self.node, self.url)

    def lost(self, exc: BaseException) -> None:
        """Redis failed to answer: the link is down until the heartbeat finds it answering again."""
        if self.state is Link.DOWN:
            return
        self.state = Link.DOWN
        self.failures += 1
        self.down_since = time.monotonic()
        self.on_change(self.state)
        log.warning("cluster: Redis at %s is out of reach (%s): node %s goes on alone", self.url,
                    exc or type(exc).__name__, self.node)
        self._hang_up()
        self._member.down()

    def require_up(self) -> None:
        if self.state is not Link.UP:
            raise ClusterUnavailable(f"{OUT_OF_REACH}; try again shortly")

    async def close(self) -> None:
        """Stop the background work, and hang up."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._hang_up()
        await self.redis.aclose()

    def _hang_up(self) -> None:
        for wire in (self._writer, self._subscriber):
            if wire is not None:
                wire.on_push = None
                wire.close()
        self._writer = self._subscriber = None
        for confirmation in self._confirmations.values():
            if not confirmation.done():
                confirmation.cancel()
        self._confirmations.clear()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background (a write nobody waits for), kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- asking and writing ----------------------------------------------

    async def ask(self, request: Awaitable[_T]) -> _T:
        """One request through redis-py; out of reach, :class:`ClusterUnavailable`."""
        if self.state is not Link.UP and isinstance(request, Coroutine):
            request.close()  # never sent
        self.require_up()
        try:
            return await request
        except DOWN_ERRORS as exc:
            self.lost(exc)
            raise ClusterUnavailable(f"{OUT_OF_REACH}; try again shortly") from None

    async def send(self, commands: list[Command]) -> list[Any]:
        """``commands`` on the writer, at once; their replies (errors as values)."""
        writer = self._writer
        if writer is None:
            raise ConnectionError("not connected to Redis")
        if not commands:
            return []
        async with asyncio.timeout(COMMAND_TIMEOUT):
            return await writer.send(commands)

    def write(self, commands: list[Command]) -> None:
        """``commands`` on the writer, after everything written before them, without waiting for their
        replies (nothing while the link is down); a Redis that leaves MAX_UNSENT bytes unread is down."""
        writer = self._writer
        if writer is None or self.state is not Link.UP or not commands:
            return
        if writer.write(commands) > MAX_UNSENT:
            self.lost(ConnectionError(f"Redis has not taken {MAX_UNSENT} bytes of writes"))

    def publish(self, channel: str, data: str) -> None:
        """:meth:`write` one PUBLISH."""
        self.write([("PUBLISH", channel, data)])

    # -- subscribing -----------------------------------------------------

    async def _subscribe(self) -> None:
        """A subscriber on this node's channels and its member's, once Redis confirmed them all (so that a
        message sent from now on arrives); then the member reads what passed while it was not subscribed."""
        subscriber = await Wire.open(self.address, self._pushed)
        everything = [name("node", self.node), BROADCAST, *self._member.channels()]
        loop = asyncio.get_running_loop()
        confirmations = [self._confirmations.setdefault(channel, loop.create_future()) for channel in everything]
        subscriber.push(("SUBSCRIBE", *everything))
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await asyncio.gather(*confirmations)
        except BaseException:
            subscriber.close()
            raise
        self._subscriber = subscriber
        subscriber.closed.add_done_callback(lambda _closed: self._cut(subscriber))
        self._member.subscribed()

    async def subscribe(self, channel: str) -> None:
        """Subscribe to one more channel; returns once Redis confirmed it."""
        subscriber = self._subscriber
        if subscriber is None:
            raise ClusterUnavailable("this node is joining the cluster again; try again shortly")
        confirmation = self._confirmations[channel] = asyncio.get_running_loop().create_future()
        subscriber.push(("SUBSCRIBE", channel))
        async with asyncio.timeout(COMMAND_TIMEOUT):
            await confirmation

    def unsubscribe(self, channel: str) -> None:
        if self._subscriber is not None:
            self._subscriber.push(("UNSUBSCRIBE", channel))

    def _cut(self, subscriber: Wire) -> None:
        """The subscriber closed. If Redis answers, it cut this connection alone: subscribe again (the
        member reads what passed meanwhile); if not, the link is down."""
        if self._subscriber is subscriber:
            self._subscriber = None
            self.spawn(self._resubscribe())

    async def _resubscribe(self) -> None:
        try:
            await self.redis.ping()
            await self._subscribe()
        except DOWN_ERRORS as exc:
            self.lost(exc)
        else:
            log.warning("cluster: Redis cut node %s's subscriber connection; subscribed again", self.node)
            self.resubscribes += 1

    def _pushed(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) != 3:
            return
        kind, channel, data = reply
        if kind == "subscribe":
            confirmation = self._confirmations.pop(channel, None)
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
        elif kind == "message":
            self._member.received(channel, data)
