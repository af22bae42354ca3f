"""Cluster mode: the broker that shares runs, client ids and per-user counts through Redis.

:class:`RedisBroker` is a :class:`~wsagent.broker.LocalBroker` (every run a
node produces lives in its memory, as alone) that also tells the cluster about
it, so that any node can resume, attach to, cancel or address it. What goes
where (docs/scaling-out.md has the table):

* ``wsagent:run:{key}`` (hash: ``meta``, ``origins``) says which node produces
  the run, whose it is and what its log's codes mean; ``wsagent:id:{scope}:{id}``
  maps a run id to its key for scopes other nodes can name (a user's, an AI SDK
  chat's);
* ``wsagent:log:{key}`` (a stream) holds the run's log as the producer keeps it:
  one entry per sealed event (the deltas of one upstream read are one entry),
  its stream id ``{seq}-0``. Redis refuses an id that is not above the last one,
  so a node that comes back after an outage can rewrite its history without
  ever writing stale entries over newer ones (the fence). The stream is trimmed
  to the producer's own log (``MINID``), so it never holds more than
  ``--replay-bytes`` plus ``--run-buffer-bytes`` of the run;
* ``wsagent:run:{key}`` (a channel) carries each batch of new entries to the
  nodes that follow the run; ``wsagent:node:{node}`` carries to one node a
  cancel, a follower's arrival and departure, a resumed client's, an eviction,
  a personal message, a question (a workflow's snapshot) and its answer, a
  node's ``hello`` (a process that starts under a node id: what its
  predecessor produced or held is gone) and a producer's ``gone`` (a run it
  does not produce was followed);
  ``wsagent:broadcast`` reaches every node;
* ``wsagent:nodes`` (a sorted set of heartbeats, every second) says which nodes
  are alive; ``wsagent:user:{user}`` holds each node's count of the user's
  connections and runs; ``wsagent:client:{id}`` names the holder of a client id.

Every part of a name (a scope, a run id, a user, a node, a client id) is
escaped (:func:`_escaped`), so two lists of parts never name one key: user
``acme``'s run ``alice:r1`` is not user ``acme:alice``'s ``r1``. A run found by
id must be the asking scope's own.

Every key expires: a running run's keys after 30 s unless its node refreshes
them (every 10 s), a finished run's after its resume grace and at least
ENDED_TTL (a node that has just found it still reads its end; its id is deleted
as soon as its node forgets it, so the id is free again everywhere), a client
id's after 10 s unless refreshed.

Cost on the hot path: a run's new entries are sealed once per upstream read, and
every dirty run's new entries go to Redis in one write, one ``XADD`` per entry
and one ``PUBLISH`` per run, on a connection spoken by hand
(:class:`~wsagent.resp.Wire`): at most once a millisecond while another node
follows one of them, every 10 ms while none does, and at the next turn of the
event loop once one has ended (its client may ask another node about it at
once). No round trip, task or future per batch, nothing per token.

A node that follows a run elsewhere keeps a :class:`Mirror`: a
:class:`~wsagent.run.Run` whose log is filled from the stream and the channel
instead of a producer, so its watchers get the producer's frames byte for byte,
with the same ``seq``, through the same code (renderers, lagging, resume
checks).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar, cast

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .broker import LocalBroker, Mailbox, mint_key
from .errors import ClusterUnavailable, ProtocolViolation
from .events import encode_message
from .render import Renderer
from .resp import Address, Command, Wire, redacted
from .run import Entries, Run, Subscription, Watcher, failure_frames

__all__ = ["RedisBroker", "Mirror", "Link", "default_node_id"]

log = logging.getLogger("wsagent.cluster")

#: Seconds between heartbeats; a node whose last one is older than NODE_TTL is taken for dead.
HEARTBEAT = 1.0
NODE_TTL = 3.0
#: Heartbeats older than this are removed, and the heartbeats' set itself expires this long after the last one.
BEATS_KEPT = 60
#: A running run's keys live this long unless its node refreshes them (every REFRESH_EVERY seconds).
RUN_TTL = 30
REFRESH_EVERY = 10.0
CLIENT_TTL = 10
#: A finished run's hash and stream outlive its node's keeping of it (its resume grace, 0 by default) by at
#: least this long, so that a node that found the run a moment before still reads its end from them.
ENDED_TTL = 5
#: Seconds one Redis command may take before the cluster is taken for out of reach.
COMMAND_TIMEOUT = 2.0
#: Seconds between two writes of run entries to Redis while another node follows one of them (at most one
#: write per turn of the event loop), and while none does (the entries only go to the history).
FLUSH_EVERY = 0.001
LAZY_EVERY = 0.01
#: Bytes of writes Redis may leave unread before the cluster is taken for out of reach.
MAX_UNSENT = 16 * 1024 * 1024

_NODES = "wsagent:nodes"
_BROADCAST = "wsagent:broadcast"
_RUNS = "wsagent:run:"  # a run's channel: this, then its key
#: What a run's key is made of (:func:`~wsagent.broker.mint_key`): any other string names no run.
_KEY = re.compile("[A-Za-z0-9_-]{1,64}")
_OUT_OF_REACH = "the cluster is out of reach (its Redis does not answer)"
_DOWN = (RedisError, OSError, TimeoutError)
_T = TypeVar("_T")
_holders = itertools.count(1)


def default_node_id() -> str:
    """Host name, pid and 16 random bits: unique per process, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def _text(value: object) -> str | None:
    """A Redis reply that should be a string (``decode_responses``), or None."""
    return value if isinstance(value, str) else None


def _name(*parts: str) -> str:
    """A key or channel of ours: ``wsagent:run:{key}`` (a run's meta hash, and its channel), ``wsagent:log:{key}``
    (its stream), ``wsagent:id:{scope}:{id}``, ``wsagent:node:{node}`` (a channel), ``wsagent:user:{user}``,
    ``wsagent:client:{id}``; each component :func:`_escaped`, so that two lists of components never give one
    name (a user ``acme`` naming run ``alice:r1`` is not user ``acme:alice`` naming ``r1``)."""
    return ":".join(("wsagent", *map(_escaped, parts)))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _escaped(part: str) -> str:
    """One component of a name, unambiguous once joined with ``:``: ``%`` as ``%25``, ``:`` as ``%3A``, and
    a lone surrogate (a JWT's ``sub`` can hold one; it is not UTF-8, so no Redis command can carry it) as
    ``%uD800``. A run's key (URL-safe, as minted) is its own escape."""
    if "%" in part or ":" in part:
        part = part.replace("%", "%25").replace(":", "%3A")
    if not part.isascii():
        part = _LONE_SURROGATE.sub(lambda found: f"%u{ord(found.group()):04X}", part)
    return part


def _ttl(run: Run) -> int:
    """Seconds a run's hash and stream live unless refreshed: a running run's RUN_TTL (its node refreshes
    them), a finished run's its grace, and at least ENDED_TTL."""
    return RUN_TTL if not run.finished else max(ENDED_TTL, round(run.grace))


def _shared(scope: str) -> bool:
    """Whether other nodes can name runs of ``scope`` (an anonymous connection's runs stay on its node)."""
    return not scope.startswith("conn:")


#: Delete a key only while it still holds the value we wrote (a client id, a run id).
_DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class Link(enum.Enum):
    """The node's link to the cluster's Redis."""

    UP = "up"
    DOWN = "down"


class Mirror(Run):
    """A run produced on another node, as this node follows it: its log is the cluster's copy.

    Its watchers read it exactly as they read a local run. What a local run
    would do itself goes to the producer instead: a cancel, and its own client
    arriving (``adopt``) or leaving (``leave``: the producer's resume grace
    starts). The log is bounded like the producer's (``replay_bytes`` plus
    ``buffer_bytes``); a watcher that falls out of it is told ``lagging`` and
    may attach or resume again from the history in Redis.
    """

    def __init__(self, broker: RedisBroker, key: str, meta: dict[str, Any], origins: list[list[str | None]]) -> None:
        super().__init__(str(meta["id"]), key=key, user=meta.get("user"), scope=str(meta["scope"]),
                         buffer_bytes=int(meta["buffer"]), replay_bytes=int(meta["replay"]),
                         agent=meta.get("agent"), workflow=meta.get("workflow"), grace=float(meta["grace"]))
        self.node = str(meta["node"])
        self.broker = broker
        self._origins = [(o[0], o[1]) for o in origins]
        self.filling = True
        self.early: list[Entries] = []  # batches that came while its history was being read
        #: Its node says it does not produce this run (that node started again under the same id): once its
        #: history is read, a run that has no end there is lost.
        self.gone = False
        self._failure: str | None = None
        self.failed: tuple[str, str] | None = None  # why it can no longer be followed: (code, message)
        self._held_as: tuple[Subscription, str] | None = None
        self._grew = asyncio.Event()

    def wake(self) -> None:
        self._grew.set()
        super().wake()

    async def reach(self, seq: int, limit: float) -> None:
        """Wait (at most ``limit`` seconds) until entry ``seq`` is here: a client resuming on this node
        may have read it on the producer's a moment before the producer wrote it to Redis."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self._log.end <= seq and not self.finished and self._failure is None:
                    self._grew.clear()
                    await self._grew.wait()

    def fail(self, code: str, message: str) -> None:
        """The run can no longer be followed from here: each watcher gets what it has not taken, then
        one ``error`` (without a ``seq``: the producer never sent it), and leaves."""
        if self.finished or self._failure is not None:
            return
        self.failed = code, message
        self._failure = encode_message("error", id=self.id, code=code, retryable=True, message=message)
        self.wake()
        if not self._subs:
            self.broker.unfollow(self)

    def lost_producer(self) -> None:
        self.fail("producer_lost", f"node {self.node}, which produced this run, stopped answering; start the run again")

    def _take(self, sub: Subscription) -> list[str]:
        frames = super()._take(sub)
        if self._failure is not None and not sub.ended and sub.cursor >= self._log.end - 1:
            self._end(sub)
            frames += failure_frames(sub, self._failure)
        return frames

    def subscribe(self, watcher: Watcher, after: int = 0, renderer: Renderer | None = None, *,
                  primary: bool = False) -> Subscription:
        sub = super().subscribe(watcher, after, renderer, primary=primary)
        if primary and not self.finished:
            holder = f"{self.broker.node}/{next(_holders)}"
            self._held_as = (sub, holder)
            self.broker.tell(self.node, {"op": "adopt", "key": self.key, "holder": holder})
        return sub

    def unsubscribe(self, sub: Subscription, grace: float = 0.0) -> None:
        """The producer's grace applies (it was set when the run started), whatever ``grace`` says."""
        held = self._held_as
        self._end(sub)
        sub.watcher.unwatch(sub)
        if held is not None and held[0] is sub:
            self._held_as = None
            if not self.finished:
                self.broker.tell(self.node, {"op": "leave", "key": self.key, "holder": held[1]})

    def _end(self, sub: Subscription) -> None:
        super()._end(sub)
        if not self._subs:
            self.broker.unfollow(self)

    def cancel(self, reason: str = "cancelled") -> None:
        self.broker.tell(self.node, {"op": "cancel", "key": self.key, "reason": reason})


def _followable(mirror: Mirror) -> Mirror:
    """``mirror``, unless it can no longer be followed and has not ended: then the request that would follow it
    is refused with why (``producer_lost``: the events after what the client saw may never have reached Redis,
    and no more will come), rather than told ``bad_resume`` or ``replay_gap``."""
    if mirror.failed is not None and not mirror.finished:
        code, message = mirror.failed
        raise ProtocolViolation(message, code=code, retryable=True)
    return mirror


class RedisBroker(LocalBroker):
    """A :class:`~wsagent.broker.LocalBroker` that shares what other nodes need through Redis.

    While Redis is out of reach (:attr:`link` is ``DOWN``) the node goes on
    alone: its own runs stream to its own clients untouched, new runs start,
    limits count this node only; whatever needs another node raises
    :class:`~wsagent.errors.ClusterUnavailable`, and the runs it follows end
    for their watchers with a retryable ``cluster_unavailable``. Once Redis
    answers again, the node writes back what it holds (runs, their retained
    logs, client ids, counts) and follows again.
    """

    def __init__(self, url: str, node: str, budget: int = 64 * 1024 * 1024,
                 budget_per_user: int = 8 * 1024 * 1024) -> None:
        """Raises ``SystemExit`` (one line) for a URL that cannot be followed: both connections, redis-py's
        and the one spoken by hand, read it with redis-py's parser, so each reaches the same server and
        database, or the node does not start."""
        super().__init__(budget, budget_per_user)
        try:
            self.address = Address.parse(url)
        except ValueError as exc:
            raise SystemExit(f"--redis-url {exc}") from None
        self.url = redacted(url)  # (for logs)
        self.node = node
        self.link = Link.DOWN
        #: Told each change of :attr:`link` (the server passes it on to systemd as the unit's status).
        self.on_link: Callable[[Link], None] = lambda link: None
        self.failures = 0
        self.down_since: float | None = time.monotonic()
        self.batches = 0
        self.resubscribes = 0
        self.live: frozenset[str] = frozenset({node})
        no_retry = Retry(NoBackoff(), 0)
        self.redis: Redis = Redis.from_url(url, decode_responses=True, socket_timeout=COMMAND_TIMEOUT,
                                           socket_connect_timeout=COMMAND_TIMEOUT, retry=no_retry)
        self._dirty: dict[Run, None] = {}
        self._users_dirty: set[str] = set()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_at = 0.0
        self._flushed = 0.0
        self._followers: dict[str, set[str]] = {}  # runs produced here -> the nodes that follow them
        self._mirrors: dict[str, Mirror] = {}
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._wire: Wire | None = None  # the hot path's writes
        self._subscriber: Wire | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._claims: dict[str, str] = {}  # client id -> the value this node wrote for it
        self._asked: dict[str, asyncio.Future[Any]] = {}  # questions to other nodes, by number
        self._loops: list[asyncio.Task[None]] = []
        self._refreshed = 0.0
        self._adding: set[str] = set()  # keys of runs being registered (a follower may ask about one already)
        self._greeted = False  # told the other nodes that this process is a node of its own

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> RedisBroker:
        """Join the cluster (or start alone, and join once Redis answers)."""
        await self._beat()
        if self.link is not Link.UP:
            log.warning("cluster: Redis at %s is out of reach; node %s runs alone until it answers",
                        self.url, self.node)
        loop = asyncio.get_running_loop()
        self._loops = [loop.create_task(self._heartbeats())]
        return self

    async def close(self) -> None:
        """Leave the cluster: the other nodes see this node gone at once (its runs have ended)."""
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._loops, *self._tasks, return_exceptions=True)
        if self.link is Link.UP:
            try:
                self._flush()
                await self._send([("PING",)])  # after everything written before it
                await self.redis.zrem(_NODES, self.node)
            except _DOWN:
                pass
        self._hang_up()
        await self.redis.aclose()

    def _hang_up(self) -> None:
        for wire in (self._wire, self._subscriber):
            if wire is not None:
                wire.on_push = None
                wire.close()
        self._wire = self._subscriber = None
        for confirmation in self._confirmations.values():
            if not confirmation.done():
                confirmation.cancel()
        self._confirmations.clear()

    def spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run ``work`` in the background (a write nobody waits for), kept until it is done."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def cluster_status(self) -> dict[str, Any]:
        return {"node": self.node, "redis": self.link.value, "nodes": len(self.live),
                "down_s": None if self.down_since is None else round(time.monotonic() - self.down_since, 3),
                "failures": self.failures, "followed_runs": len(self._mirrors), "batches": self.batches,
                "resubscribes": self.resubscribes}

    # -- the link --------------------------------------------------------

    def _lost(self, exc: BaseException) -> None:
        if self.link is Link.DOWN:
            return
        self.link = Link.DOWN
        self.failures += 1
        self.down_since = time.monotonic()
        self.on_link(self.link)
        log.warning("cluster: Redis at %s is out of reach (%s): node %s goes on alone", self.url,
                    exc or type(exc).__name__, self.node)
        self._hang_up()
        for mirror in list(self._mirrors.values()):
            mirror.fail("cluster_unavailable", f"{_OUT_OF_REACH}; resume shortly from the last seq you received")
        self._mirrors.clear()

    def _require_up(self) -> None:
        if self.link is not Link.UP:
            raise ClusterUnavailable(f"{_OUT_OF_REACH}; try again shortly")

    async def _ask(self, request: Awaitable[_T]) -> _T:
        """One request to Redis; out of reach, :class:`ClusterUnavailable`."""
        if self.link is not Link.UP and isinstance(request, Coroutine):
            request.close()  # never sent
        self._require_up()
        try:
            return await request
        except _DOWN as exc:
            self._lost(exc)
            raise ClusterUnavailable(f"{_OUT_OF_REACH}; try again shortly") from None

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self._beat()

    async def _beat(self) -> None:
        """Say this node is alive, learn which others are, refresh what would expire, and notice
        producers that died; when Redis answers again after an outage, write back what this node holds."""
        now_ms = int(time.time() * 1000)
        refresh = time.monotonic() - self._refreshed > REFRESH_EVERY
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(_NODES, {self.node: now_ms})
        pipe.zrangebyscore(_NODES, now_ms - int(NODE_TTL * 1000), "+inf")
        pipe.zremrangebyscore(_NODES, "-inf", now_ms - BEATS_KEPT * 1000)
        pipe.expire(_NODES, BEATS_KEPT)  # (once every node is gone, killed or not, nothing of them stays)
        if refresh and self.link is Link.UP:
            for run in self.active_runs():
                for name in (_name("run", run.key), _name("log", run.key)):
                    pipe.expire(name, RUN_TTL)
                if _shared(run.scope):
                    pipe.expire(_name("id", run.scope, run.id), RUN_TTL)
            for client_id in self._claims:
                pipe.expire(_name("client", client_id), CLIENT_TTL)
        try:
            replies = await pipe.execute()
            if self.link is Link.DOWN:
                await self._rejoin()
        except _DOWN as exc:
            self._lost(exc)
            return
        if refresh:
            self._refreshed = time.monotonic()
        self.live = frozenset(replies[1]) | {self.node}
        for key, followers in list(self._followers.items()):  # runs forgotten here, nodes that died
            followers &= self.live
            if not followers or key not in self._by_key:
                del self._followers[key]
        for run in self.active_runs():  # a client whose node died left its run: the grace starts
            holder = run.holder
            if holder is not None and holder.rpartition("/")[0] not in self.live:
                run.leave_remote(holder)
        for mirror in list(self._mirrors.values()):
            if mirror.node not in self.live and not mirror.finished:
                mirror.lost_producer()
        if not self._greeted:  # (a node started again under its id is alive to the others: its runs are not)
            self._greeted = True
            for node in self.live - {self.node}:
                self.tell(node, {"op": "hello", "node": self.node})

    async def _rejoin(self) -> None:
        """Redis answers again (perhaps restarted empty): write back this node's runs with the logs they
        keep, its client ids and counts, then follow again."""
        try:
            self._wire = await Wire.open(self.address)
            await self._subscribe()
            await self._write_back()
        except BaseException:
            self._hang_up()
            raise
        self.link = Link.UP
        self.down_since = None
        self.on_link(self.link)
        log.info("cluster: node %s joined through Redis at %s", self.node, self.url)

    async def _write_back(self) -> None:
        """Every run this node keeps, with its log (a stream refuses entries not above its last: the
        fence), each user's counts here, and each client id, unless another node took it meanwhile."""
        commands: list[Command] = []
        for run in list(self._by_key.values()):
            self._register_run(commands, run, _ttl(run))
            self._append(commands, run, *run.unpublished(everything=True), publish=False)
        for user in {*self._user_conns, *self._user_runs}:
            self._count_user(commands, user)
        for client_id, value in self._claims.items():
            commands += [("SET", _name("client", client_id), value, "NX", "EX", CLIENT_TTL),
                         ("GET", _name("client", client_id))]
        replies = await self._send(commands)
        holders = iter(replies[-2 * len(self._claims):] if self._claims else [])
        for client_id, value in list(self._claims.items()):
            next(holders)
            holder = next(holders)
            # Another node's client took the id while this one was cut off: that claim is the newer.
            if isinstance(holder, str) and holder != value:
                mailbox = self._clients.get(client_id)
                self._claims.pop(client_id)
                if mailbox is not None:
                    mailbox.evict()

    async def _send(self, commands: list[Command]) -> list[Any]:
        """``commands`` on the hot path's connection, at once; their replies (errors as values)."""
        wire = self._wire
        if wire is None:
            raise ConnectionError("not connected to Redis")
        if not commands:
            return []
        async with asyncio.timeout(COMMAND_TIMEOUT):
            return await wire.send(commands)

    # -- writing: once per upstream read, pipelined across runs -------------

    def dirty(self, run: Run) -> None:
        self._dirty[run] = None
        if run.finished:  # its end at once (next turn): its client may ask another node about it right away
            self._soon(0.0)
        else:
            self._soon(FLUSH_EVERY if run.key in self._followers else LAZY_EVERY)

    def _soon(self, every: float) -> None:
        """Flush once ``every`` seconds have passed since the last flush (at the end of this turn of the
        event loop if they have): FLUSH_EVERY while another node follows a dirty run, LAZY_EVERY while
        none does. Each write costs a ``send`` (a fifth of a busy node's time when every turn wrote):
        under load one carries a millisecond's reads, and a run nobody follows yet, whose entries only
        need to be in the history in case its client moves, shares one with ten milliseconds' worth."""
        loop = asyncio.get_running_loop()
        at = max(self._flushed + every, loop.time())
        if self._flush_timer is not None:
            if self._flush_at <= at:
                return
            self._flush_timer.cancel()  # a followed run came in: sooner than planned
        self._flush_at = at
        self._flush_timer = loop.call_at(at, self._flush)

    def _flush(self) -> None:
        """Every dirty run's new entries, one XADD each and one PUBLISH per run, in one write (when
        :meth:`_soon` says). Nothing waits for the replies (no task, no future); a Redis that stops
        reading is noticed by the heartbeat, and its unsent backlog bounded here."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # called directly (closing): the timer's turn is taken
            self._flush_timer = None
        self._flushed = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, {}
        users, self._users_dirty = self._users_dirty, set()
        wire = self._wire
        if wire is None or self.link is not Link.UP:
            return  # the retained logs are written again when Redis answers
        commands: list[Command] = []
        for run in dirty:
            unwritten = run.published == 0  # (its stream does not exist yet)
            first, codes, payloads, origins = run.unpublished()
            if codes:
                self._append(commands, run, first, codes, payloads, origins, publish=True, new=unwritten)
            if run.finished:
                ttl = _ttl(run)
                commands += [("EXPIRE", _name("run", run.key), ttl), ("EXPIRE", _name("log", run.key), ttl)]
                if _shared(run.scope):
                    commands.append(("EXPIRE", _name("id", run.scope, run.id), max(1, round(run.grace))))
        for user in users:
            self._count_user(commands, user)
        if not commands:
            return
        self.batches += 1
        if wire.write(commands) > MAX_UNSENT:
            self._lost(ConnectionError(f"Redis has not taken {MAX_UNSENT} bytes of writes"))

    def _register_run(self, commands: list[Command], run: Run, ttl: int) -> None:
        meta = {"id": run.id, "user": run.user, "scope": run.scope, "node": self.node, "agent": run.agent,
                "workflow": run.workflow, "grace": run.grace, "buffer": run.buffer_bytes, "replay": run.replay_bytes}
        commands += [("HSET", _name("run", run.key), "meta", json.dumps(meta), "origins", json.dumps(run.origins())),
                     ("EXPIRE", _name("run", run.key), ttl)]
        if _shared(run.scope):
            commands.append(("SET", _name("id", run.scope, run.id), run.key, "NX", "EX", ttl))

    def _append(self, commands: list[Command], run: Run, first: int, codes: list[int], payloads: list[str],
                origins: list[list[str | None]] | None, *, publish: bool, new: bool = False) -> None:
        """Commands that write entries ``first``... of ``run`` to its stream (``publish``: and to its followers).
        The stream's first write (``new``, or a write back) gives it its TTL: that write may begin past seq 1, when
        the run forgot its first events (taken by its client, past ``--replay-bytes``) before they were written."""
        stream = _name("log", run.key)
        if origins is not None and len(origins) != run.published_origins:
            run.published_origins = len(origins)
            commands.append(("HSET", _name("run", run.key), "origins", json.dumps(origins)))
        last = len(codes) - 1
        for i, (code, payload) in enumerate(zip(codes, payloads, strict=True)):
            if i == last:  # trimmed to what the producer keeps, once per batch
                commands.append(("XADD", stream, "MINID", "~", f"{run.oldest_kept}-0", f"{first + i}-0",
                                 "c", code, "p", payload))
            else:
                commands.append(("XADD", stream, f"{first + i}-0", "c", code, "p", payload))
        if new or not publish:
            commands.append(("EXPIRE", stream, _ttl(run)))
        if publish:
            commands.append(("PUBLISH", _name("run", run.key), json.dumps([first, codes, payloads, origins])))

    def _count_user(self, commands: list[Command], user: str) -> None:
        key = _name("user", user)
        commands += [("HSET", key, f"c:{self.node}", self._user_conns.get(user, 0),
                      f"r:{self.node}", self._user_runs.get(user, 0)), ("EXPIRE", key, 86400)]

    def tell(self, node: str, message: dict[str, Any]) -> None:
        """Send ``message`` to ``node`` without waiting (a cancel, an adopt, a leave, a question), after
        everything this node wrote before it."""
        if self._wire is not None and self.link is Link.UP:
            self._wire.write([("PUBLISH", _name("node", node), json.dumps(message))])

    # -- reading: one subscriber connection per node -----------------------

    async def _subscribe(self) -> None:
        """A subscriber connection on this node's channels and the followed runs', once Redis confirmed
        them all (so a cancel or an eviction sent from now on arrives); then the followed runs read from
        history what passed while they were not subscribed."""
        subscriber = await Wire.open(self.address, self._receive)
        loop = asyncio.get_running_loop()
        channels = [_name("node", self.node), _BROADCAST, *(_name("run", key) for key in self._mirrors)]
        confirmations = [self._confirmations.setdefault(channel, loop.create_future()) for channel in channels]
        subscriber.push(("SUBSCRIBE", *channels))
        try:
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await asyncio.gather(*confirmations)
        except BaseException:
            subscriber.close()
            raise
        self._subscriber = subscriber
        subscriber.closed.add_done_callback(lambda _closed: self._cut(subscriber))
        for mirror in self._mirrors.values():
            self.spawn(self._refill(mirror))

    def _cut(self, subscriber: Wire) -> None:
        """The subscriber connection closed. If Redis answers, it cut this connection alone (a subscriber
        too far behind passes its output buffer limit): subscribe again, and the followed runs refill
        from history; if not, the cluster is out of reach."""
        if self._subscriber is subscriber:
            self._subscriber = None
            self.spawn(self._resubscribe())

    async def _resubscribe(self) -> None:
        try:
            await self.redis.ping()
            await self._subscribe()
        except _DOWN as exc:
            self._lost(exc)
        else:
            log.warning("cluster: Redis cut node %s's subscriber connection; subscribed again", self.node)
            self.resubscribes += 1

    def _receive(self, reply: Any) -> None:
        if not isinstance(reply, list) or len(reply) != 3:
            return
        kind, channel, data = reply
        if kind == "subscribe":
            confirmation = self._confirmations.pop(channel, None)
            if confirmation is not None and not confirmation.done():
                confirmation.set_result(None)
        elif kind != "message":
            return
        elif channel == _BROADCAST:
            self.deliver_all(data)
        elif channel == _name("node", self.node):
            self._control(json.loads(data))
        else:
            mirror = self._mirrors.get(channel[len(_RUNS):])
            if mirror is not None:
                first, codes, payloads, origins = json.loads(data)
                if mirror.filling:
                    mirror.early.append((first, codes, payloads, origins))
                else:
                    self._apply(mirror, first, codes, payloads, origins)

    def _apply(self, mirror: Mirror, first: int, codes: list[int], payloads: list[str],
               origins: list[list[str | None]] | None) -> None:
        if first > mirror._log.end and not mirror.finished:  # a batch went missing: read it from history
            mirror.filling = True
            mirror.early.append((first, codes, payloads, origins))
            self.spawn(self._refill(mirror))
        else:
            mirror.replicate(first, codes, payloads, origins)

    def _control(self, message: dict[str, Any]) -> None:
        op, key = message.get("op"), message.get("key")
        run = self._by_key.get(key) if isinstance(key, str) else None
        if op == "cancel" and "ask" not in message:  # a follower passing its watcher's cancel on
            if run is not None:
                self.cancel_here(run.key, str(message.get("reason", "cancelled")))
        elif op == "forget" and run is not None and run.finished:  # a newer run took its id on another node
            self._drop(run)
        elif op == "follow" and run is not None:
            self._followers.setdefault(run.key, set()).add(str(message["node"]))
        elif op == "follow" and isinstance(key, str) and key not in self._adding:  # none of this process's
            self.tell(str(message["node"]), {"op": "gone", "key": key})
        elif op == "gone":
            mirror = self._mirrors.get(str(key))
            if mirror is not None:
                self._gone(mirror)
        elif op == "hello":  # a process started under this node id: what its predecessor held is gone
            node = str(message["node"])
            for mirror in [m for m in self._mirrors.values() if m.node == node]:
                self._gone(mirror)
            for active in self.active_runs():
                holder = active.holder
                if holder is not None and holder.rpartition("/")[0] == node:
                    active.leave_remote(holder)
        elif op == "unfollow":
            followers = self._followers.get(str(key))
            if followers is not None:
                followers.discard(str(message["node"]))
                if not followers:
                    del self._followers[str(key)]
        elif op == "adopt" and run is not None:
            run.adopt_remote(str(message["holder"]))
        elif op == "leave" and run is not None:
            run.leave_remote(str(message["holder"]))
        elif op == "evict":
            client_id = str(message["client"])
            mailbox = self._clients.get(client_id)
            if mailbox is not None and self._claims.get(client_id) == message.get("holder"):
                self._claims.pop(client_id)
                del self._clients[client_id]
                mailbox.evict()
        elif op == "send":
            self.deliver(str(message["client"]), str(message["frame"]))
        elif op in ("cancel", "snapshot", "cancel_agent"):  # a question from another node: answer on its channel
            answer: Any = None
            if run is not None and op == "cancel":
                answer = self.cancel_here(run.key, str(message.get("reason", "cancelled")))
            elif run is not None and op == "snapshot" and run.state is not None:
                answer = run.state.snapshot()
            elif run is not None and op == "cancel_agent" and run.controller is not None:
                answer = run.controller.cancel(str(message.get("agent")))
            self.tell(str(message["from"]), {"op": "answer", "ask": message["ask"], "answer": answer})
        elif op == "answer":
            waiting = self._asked.pop(str(message.get("ask")), None)
            if waiting is not None and not waiting.done():
                waiting.set_result(message.get("answer"))

    async def _refill(self, mirror: Mirror) -> bool:
        """Read the run's entries from its history in Redis, then apply what arrived meanwhile. False if
        the run is no longer in Redis (it ended, and its hash and stream expired) and nothing came: a
        follower that missed entries can never get them (it is failed: a ``replay_gap``)."""
        log_ = mirror._log
        start = f"{log_.end}-0" if log_.codes or log_.first > 1 else "-"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.xrange(_name("log", mirror.key), min=start, max="+")
            pipe.hget(_name("run", mirror.key), "origins")
            found, origins = await pipe.execute()
            entries = cast(list[tuple[str, dict[str, str]]], found)
        except _DOWN as exc:
            self._lost(exc)
            return True
        if mirror.finished or mirror._failure is not None:
            return True
        if not entries and origins is None and not mirror.early:
            mirror.fail("replay_gap", f"run {mirror.id} has ended, and the events this node missed are no "
                                      "longer kept")
            return False
        run: list[tuple[int, int, str]] = [(int(entry_id.partition("-")[0]), int(fields["c"]), fields["p"])
                                           for entry_id, fields in entries]
        # The stream may have holes (events its producer trimmed before a write, or kept no longer when it
        # wrote back after an outage): each run of consecutive entries is replicated by itself, so the log
        # starts again after a hole, as it does after a batch that went missing.
        known = json.loads(origins) if isinstance(origins, str) else None
        start_at = 0
        for i in range(1, len(run) + 1):
            if i == len(run) or run[i][0] != run[i - 1][0] + 1:
                part = run[start_at:i]
                mirror.replicate(part[0][0], [c for _, c, _ in part], [p for _, _, p in part], known)
                start_at = i
        mirror.filling = False
        early, mirror.early = mirror.early, []
        for first, codes, payloads, origins in early:
            self._apply(mirror, first, codes, payloads, origins)
        if not run and not early:
            mirror.wake()
        if mirror.gone and not mirror.filling:
            mirror.lost_producer()
        return True

    def _gone(self, mirror: Mirror) -> None:
        """``mirror``'s node does not produce it: it is lost, unless its history (read first) holds its end."""
        mirror.gone = True
        if not mirror.filling:
            mirror.lost_producer()

    # -- runs ------------------------------------------------------------

    async def add_run(self, run: Run, keep_after_finish: float) -> None:
        if (run.scope, run.id) in self._by_id:
            raise ValueError(f"run id {run.id!r} is already in use")
        if not run.key:
            run.key = mint_key()
        if self.link is Link.UP:  # known to the cluster before its client learns its key
            commands: list[Command] = []
            if run.user is not None:  # counted everywhere before it starts
                runs = self._user_runs.get(run.user, 0) + 1
                commands.append(("HSET", _name("user", run.user), f"r:{self.node}", runs))
            self._register_run(commands, run, RUN_TTL)
            self._adding.add(run.key)
            try:
                replies = await self._send(commands)
            except _DOWN as exc:
                self._lost(exc)
                replies = []
            finally:
                self._adding.discard(run.key)
            if _shared(run.scope) and replies and not replies[-1]:
                self._erase(run)
                raise ValueError(f"run id {run.id!r} is already in use")
            if _shared(run.scope) and replies and isinstance(replies[-1], Exception):  # (an error is a value)
                self._erase(run)
                raise ClusterUnavailable(f"Redis did not register run id {run.id!r} ({replies[-1]}); try again shortly")
        self.register(run, keep_after_finish)
        run.outlet = self
        if run.user is not None:
            self._users_dirty.add(run.user)
            run.on_finish.append(self._user_run_ended)
        self.dirty(run)

    def _user_run_ended(self, run: Run) -> None:
        assert run.user is not None
        self._users_dirty.add(run.user)
        self._soon(FLUSH_EVERY)  # counts that limits read elsewhere: soon

    async def run_by_key(self, key: str) -> Run | None:
        run: Run | None = self._by_key.get(key) or self._mirrors.get(key)
        if run is not None or not _KEY.fullmatch(key):
            return run
        fields = await self._ask(self.redis.hgetall(_name("run", key)))
        if not fields or "meta" not in fields:
            return None
        meta = json.loads(fields["meta"])
        if meta["node"] == self.node:  # a run this node no longer keeps
            return None
        return Mirror(self, key, meta, json.loads(fields.get("origins") or "[[null, null]]"))

    async def run_by_id(self, scope: str, run_id: str) -> Run | None:
        run = self._by_id.get((scope, run_id))
        if run is not None or not _shared(scope):
            return run
        key = await self._ask(self.redis.get(_name("id", scope, run_id)))
        run = None if not isinstance(key, str) else await self.run_by_key(key)
        if run is None or run.scope != scope or run.id != run_id:  # found by id: the asking scope's own, exactly
            return None
        return run

    async def follow(self, run: Run, after: int = 0) -> Run:
        if not isinstance(run, Mirror):
            return run
        asked_ms = time.time() * 1000
        following = self._mirrors.get(run.key)
        if following is not None:
            await self._catch_up(following, after, asked_ms)
            return _followable(following)
        self._require_up()
        subscriber = self._subscriber
        if subscriber is None:
            raise ClusterUnavailable("this node is joining the cluster again; try again shortly")
        self._mirrors[run.key] = run
        self.tell(run.node, {"op": "follow", "key": run.key, "node": self.node})
        channel = _name("run", run.key)
        confirmation = self._confirmations[channel] = asyncio.get_running_loop().create_future()
        try:
            subscriber.push(("SUBSCRIBE", channel))
            async with asyncio.timeout(COMMAND_TIMEOUT):
                await confirmation
            found = await self._refill(run)
        except (*_DOWN, asyncio.CancelledError) as exc:
            self._mirrors.pop(run.key, None)
            if not isinstance(exc, asyncio.CancelledError):
                self._lost(exc)
            raise ClusterUnavailable(f"{_OUT_OF_REACH}; try again shortly") from None
        if not found:  # it expired since it was found (it ended seconds ago): as if it had not been
            raise ProtocolViolation(f"no run {run.id!r}: it has ended and is no longer kept", code="unknown_run")
        if not await self._alive(run.node):
            run.lost_producer()
        await self._catch_up(run, after, asked_ms)
        return _followable(run)

    async def _catch_up(self, mirror: Mirror, after: int, asked_ms: float) -> None:
        """Wait (up to COMMAND_TIMEOUT) until ``mirror`` has entry ``after``, the last one the client saw. If it
        never comes and its node has not beaten since the client asked (it beats every second, and writes what
        it produces within 10 ms), that node is gone, though not yet for NODE_TTL: its run is lost (the client
        saw events that never reached Redis), rather than ``after`` called a seq the run never sent."""
        await mirror.reach(after, COMMAND_TIMEOUT)
        if mirror._log.end > after or mirror.finished or mirror.failed is not None:
            return
        try:
            beat = await self.redis.zscore(_NODES, mirror.node)
        except _DOWN as exc:
            self._lost(exc)
            return
        if beat is None or beat < asked_ms:
            mirror.lost_producer()

    async def snapshot(self, run: Run) -> tuple[dict[str, Any], ...] | None:
        if not isinstance(run, Mirror):
            return await super().snapshot(run)
        if run.workflow is None:
            return None
        answer = await self._question(run, {"op": "snapshot"})
        return tuple(answer) if isinstance(answer, list) else None

    async def cancel_agent(self, run: Run, agent: str) -> bool:
        if not isinstance(run, Mirror):
            return await super().cancel_agent(run, agent)
        return run.workflow is not None and await self._question(run, {"op": "cancel_agent", "agent": agent}) is True

    async def _question(self, run: Mirror, message: dict[str, Any]) -> Any:
        """Ask the node that produces ``run``; its answer, or None if it gives none within COMMAND_TIMEOUT."""
        ask = f"{next(_holders)}"
        waiting = self._asked[ask] = asyncio.get_running_loop().create_future()
        try:
            self.tell(run.node, {**message, "key": run.key, "from": self.node, "ask": ask})
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await waiting
        except TimeoutError:
            return None
        finally:
            self._asked.pop(ask, None)

    async def _alive(self, node: str) -> bool:
        """Whether ``node`` beat lately (asked of Redis: it may have joined since this node's last beat)."""
        if node in self.live:
            return True
        try:
            beat = await self.redis.zscore(_NODES, node)
        except _DOWN as exc:
            self._lost(exc)
            return False
        if beat is not None and beat > time.time() * 1000 - NODE_TTL * 1000:
            self.live |= {node}
            return True
        return False

    def unfollow(self, mirror: Mirror) -> None:
        """Nobody here watches ``mirror`` any more: stop following it."""
        if self._mirrors.get(mirror.key) is mirror:
            del self._mirrors[mirror.key]
            self.tell(mirror.node, {"op": "unfollow", "key": mirror.key, "node": self.node})
            if self._subscriber is not None:
                self._subscriber.push(("UNSUBSCRIBE", _name("run", mirror.key)))
        mirror.release()

    def _drop(self, run: Run) -> None:
        """This node stops keeping ``run`` (its grace is over, 0 by default; or it was evicted): its last
        entries leave first (the log is released here, and a run's end is often still unwritten: with
        the default grace it ends and is dropped in one turn), and its id is free again, as on this node.
        Its hash and stream stay a few seconds (ENDED_TTL) for the nodes reading its end."""
        if self._by_key.get(run.key) is run:
            if run in self._dirty:
                self._flush()
            if _shared(run.scope) and self._wire is not None and self.link is Link.UP:
                self._wire.write([("EVAL", _DELETE_IF, 1, _name("id", run.scope, run.id), run.key)])
        super()._drop(run)

    def forget(self, run: Run) -> None:
        super().forget(run)
        if isinstance(run, Mirror):  # its node forgets it too: it would still find it by id, and refuse the id
            self.unfollow(run)
            self.tell(run.node, {"op": "forget", "key": run.key})
        self._erase(run)

    def _erase(self, run: Run) -> None:
        """Delete ``run`` from Redis, on the hot path's connection: a run registered after this (a new
        turn taking the id) is written after it."""
        if self._wire is not None and self.link is Link.UP:
            commands: list[Command] = [("DEL", _name("run", run.key), _name("log", run.key))]
            if _shared(run.scope):
                commands.append(("EVAL", _DELETE_IF, 1, _name("id", run.scope, run.id), run.key))
            self._wire.write(commands)

    async def runs_of(self, user: str) -> int:
        return await self._count(user, "r", self._user_runs.get(user, 0))

    async def _count(self, user: str, kind: str, here: int) -> int:
        """``user``'s connections (``c``) or runs (``r``) on every live node; this node's alone while
        the cluster is out of reach."""
        if self.link is not Link.UP:
            return here
        now_ms = int(time.time() * 1000)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_name("user", user))
        pipe.zrangebyscore(_NODES, now_ms - int(NODE_TTL * 1000), "+inf")  # a node may have joined since
        try:
            counts, live = await pipe.execute()
        except _DOWN as exc:
            self._lost(exc)
            return here
        prefix = f"{kind}:"
        return here + sum(int(value) for field, value in counts.items()
                          if field.startswith(prefix) and field[2:] != self.node and field[2:] in live)

    async def cancel(self, key: str, reason: str) -> bool:
        if self.cancel_here(key, reason):
            return True
        if key in self._by_key:
            return False
        run = await self.run_by_key(key)
        if not isinstance(run, Mirror):
            return False
        self._require_up()
        return await self._question(run, {"op": "cancel", "reason": reason}) is True

    # -- users -----------------------------------------------------------

    async def user_connected(self, user: str) -> int:
        here = await super().user_connected(user)
        if self.link is Link.UP:
            try:
                commands: list[Command] = []
                self._count_user(commands, user)
                await self._send(commands)
            except _DOWN as exc:
                self._lost(exc)
        return await self._count(user, "c", here)

    def user_disconnected(self, user: str) -> None:
        super().user_disconnected(user)
        self._users_dirty.add(user)
        self._soon(FLUSH_EVERY)  # counts that limits read elsewhere: soon

    # -- client ids ------------------------------------------------------

    async def claim_client(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        if not self.claim_here(client_id, mailbox, policy):
            return False
        value = f"{self.node}/{next(_holders)}"
        self._claims[client_id] = value
        if self.link is not Link.UP:
            return True
        key = _name("client", client_id)
        try:
            if policy == "reject":
                if not await self.redis.set(key, value, nx=True, ex=CLIENT_TTL):
                    holder = _text(await self.redis.get(key))
                    if holder is not None and await self._alive(holder.rpartition("/")[0]):
                        self._claims.pop(client_id, None)
                        super().release_client(client_id, mailbox)
                        return False
                    await self.redis.set(key, value, ex=CLIENT_TTL)  # its holder's node is gone
            else:
                old = _text(await self.redis.set(key, value, ex=CLIENT_TTL, get=True))
                node = old.rpartition("/")[0] if old is not None else None
                if old is not None and node is not None and node != self.node:
                    await self.redis.publish(_name("node", node),
                                             json.dumps({"op": "evict", "client": client_id, "holder": old}))
        except _DOWN as exc:
            self._lost(exc)
        return True

    def release_client(self, client_id: str, mailbox: Mailbox) -> None:
        if self._clients.get(client_id) is mailbox:
            value = self._claims.pop(client_id, None)
            if value is not None and self._wire is not None and self.link is Link.UP:
                self._wire.write([("EVAL", _DELETE_IF, 1, _name("client", client_id), value)])
        super().release_client(client_id, mailbox)

    async def broadcast(self, frame: str) -> None:
        """Every node's clients get ``frame`` through Redis (this node's too, so each gets it once)."""
        if self.link is not Link.UP:
            self.deliver_all(frame)
            raise ClusterUnavailable("the cluster is out of reach: this broadcast reached this node's clients only")
        await self._ask(self.redis.publish(_BROADCAST, frame))

    async def send_to(self, client_id: str, frame: str) -> bool:
        if client_id in self._clients:
            return self.deliver(client_id, frame)
        holder = _text(await self._ask(self.redis.get(_name("client", client_id))))
        node = holder.rpartition("/")[0] if holder is not None else None
        if node is None or node == self.node:
            return False
        message = json.dumps({"op": "send", "client": client_id, "frame": frame})
        return bool(await self._ask(self.redis.publish(_name("node", node), message)))

