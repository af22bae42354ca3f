"""Following a run produced on another node: :class:`Mirror` (one run, its state in a transition table) and
:class:`Following` (the node's mirrors, fed from Redis).

A mirror is a :class:`~wsagent.engine.run.Run` whose log is filled from the run's
stream (its history) and its channel (each new batch) instead of a producer,
so its watchers get the producer's frames byte for byte, with the same ``seq``,
through the same code (renderers, lagging, resume checks). What a local run
would do itself goes to the producer instead: a cancel, and its own client
arriving (``Adopt``) or leaving (``Leave``: the producer's resume grace starts).

Its following state (:class:`Follow`) moves only through :data:`_FOLLOWING`,
as a run's phases move through the run's tables::

    FILLING --history read--> LIVE --batch past its end, or subscriber cut--> FILLING
    FILLING --producer gone--> FILLING_GONE --history read (no end in it)--> FAILED
    any but ENDED --fail (producer lost, cluster out of reach, events no longer kept)--> FAILED
    any but FAILED --terminal entry--> ENDED

A resumable run (``--takeover``) whose producer is lost or gone is adrift
instead: another node may take it over. Its new producer's first batch (or its
hash, read with the history) names it, and the mirror goes on::

    LIVE --adrift--> ADRIFT --taken--> LIVE;  ADRIFT --batches missed--> FILLING_ADRIFT
    FILLING, FILLING_GONE --adrift--> FILLING_ADRIFT --history read--> ADRIFT
    FILLING_ADRIFT --taken--> FILLING;  LIVE, FILLING --taken--> the same (the producer moved)

An adrift mirror nobody takes within ADRIFT_LIMIT fails (``producer_lost``).

While FILLING, batches from the channel wait (``early``) and are applied once
the history is read. FAILED and ENDED take every input and stay. Entering
FAILED gives each watcher what it has not taken, then one ``error`` without a
``seq`` (the producer never sent it); a request to follow a FAILED mirror that
has not ended is refused with the same code.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import time
from typing import Any, Protocol, cast

from ...core.errors import ClusterUnavailable, ProtocolViolation
from ...core.events import encode_message
from ...core.render import Renderer
from ..run import Run, RunStateError, Subscription, Watcher, failure_frames, terminal_outcome
from . import messages
from .link import COMMAND_TIMEOUT, DOWN_ERRORS, OUT_OF_REACH, RedisLink
from .liveness import Liveness
from .names import RUN_CHANNELS, name

__all__ = ["Mirror", "Following", "Follower", "Follow"]

#: A batch of a run's entries, as its channel carries it: (seq of the first, codes, payloads, authors or None).
Entries = tuple[int, list[int], list[str], list[list[str | None]] | None]
#: Numbers that make each subscription's name unique on its node (a holder: ``{node}/{n}``).
holders = itertools.count(1)


class Follow(enum.Enum):
    FILLING = "filling"  # reading its history; batches wait
    FILLING_GONE = "filling, producer gone"  # ... and its node says it no longer produces it
    LIVE = "live"  # batches apply as they come
    ADRIFT = "adrift"  # its producer is lost; another node may take it over
    FILLING_ADRIFT = "filling, adrift"
    ENDED = "ended"  # its terminal entry is here
    FAILED = "failed"  # it can no longer be followed from here


class _In(enum.Enum):
    HISTORY = "history read"
    MISSED = "batches missed"  # a batch past the log's end, or the subscriber was cut
    GONE = "producer gone"
    FAIL = "fail"
    END = "terminal entry"
    ADRIFT = "producer lost, another may take over"
    TAKEN = "another node produces it"


_FOLLOWABLE = (Follow.FILLING, Follow.FILLING_GONE, Follow.LIVE, Follow.ADRIFT, Follow.FILLING_ADRIFT)
_ADRIFT = (Follow.ADRIFT, Follow.FILLING_ADRIFT)
#: Seconds an adrift mirror waits for another node to take its run over: a claim comes within a heartbeat of
#: the producer's death being seen (NODE_TTL), its first batch a round trip later.
ADRIFT_LIMIT = 10.0

_FOLLOWING: dict[tuple[Follow, _In], Follow] = {
    (Follow.FILLING, _In.HISTORY): Follow.LIVE,
    (Follow.FILLING, _In.MISSED): Follow.FILLING,
    (Follow.FILLING, _In.GONE): Follow.FILLING_GONE,
    (Follow.FILLING_GONE, _In.HISTORY): Follow.FAILED,  # its end was not in it: it never comes
    (Follow.FILLING_GONE, _In.MISSED): Follow.FILLING_GONE,
    (Follow.FILLING_GONE, _In.GONE): Follow.FILLING_GONE,
    (Follow.LIVE, _In.MISSED): Follow.FILLING,
    (Follow.LIVE, _In.GONE): Follow.FAILED,
    (Follow.LIVE, _In.ADRIFT): Follow.ADRIFT,
    (Follow.FILLING, _In.ADRIFT): Follow.FILLING_ADRIFT,
    (Follow.FILLING_GONE, _In.ADRIFT): Follow.FILLING_ADRIFT,
    (Follow.ADRIFT, _In.ADRIFT): Follow.ADRIFT,
    (Follow.ADRIFT, _In.GONE): Follow.ADRIFT,
    (Follow.ADRIFT, _In.HISTORY): Follow.ADRIFT,
    (Follow.ADRIFT, _In.MISSED): Follow.FILLING_ADRIFT,
    (Follow.ADRIFT, _In.TAKEN): Follow.LIVE,
    (Follow.FILLING_ADRIFT, _In.ADRIFT): Follow.FILLING_ADRIFT,
    (Follow.FILLING_ADRIFT, _In.GONE): Follow.FILLING_ADRIFT,
    (Follow.FILLING_ADRIFT, _In.MISSED): Follow.FILLING_ADRIFT,
    (Follow.FILLING_ADRIFT, _In.HISTORY): Follow.ADRIFT,
    (Follow.FILLING_ADRIFT, _In.TAKEN): Follow.FILLING,
    (Follow.LIVE, _In.TAKEN): Follow.LIVE,
    (Follow.FILLING, _In.TAKEN): Follow.FILLING,
    (Follow.FILLING_GONE, _In.TAKEN): Follow.FILLING,
    **{(state, _In.FAIL): Follow.FAILED for state in _FOLLOWABLE},
    **{(state, _In.END): Follow.ENDED for state in _FOLLOWABLE},
    **{(Follow.ENDED, event): Follow.ENDED for event in _In},
    **{(Follow.FAILED, event): Follow.FAILED for event in _In},
}


class Follower(Protocol):
    """What a mirror asks of the node that follows it (:class:`Following`)."""

    node: str

    def tell(self, node: str, message: messages.Message) -> None:
        """Send ``message`` to ``node`` (the run's producer) without waiting."""
        ...

    def unfollow(self, mirror: Mirror) -> None:
        """Nobody watches ``mirror`` any more."""
        ...


class Mirror(Run):
    """A run produced on another node, as this node follows it: its log is the cluster's copy.

    The log is bounded like the producer's (``replay_bytes`` plus
    ``buffer_bytes``); a watcher that falls out of it is told ``lagging`` and
    may attach or resume again from the history in Redis.
    """

    def __init__(self, following: Follower, key: str, meta: dict[str, Any],
                 authors: list[list[str | None]]) -> None:
        super().__init__(str(meta["id"]), key=key, user=meta.get("user"), scope=str(meta["scope"]),
                         buffer_bytes=int(meta["buffer"]), replay_bytes=int(meta["replay"]),
                         agent=meta.get("agent"), workflow=meta.get("workflow"), grace=float(meta["grace"]))
        self.node = str(meta["node"])
        self.following = following
        self._authors = [(o[0], o[1]) for o in authors]
        self.follow_state = Follow.FILLING
        self.early: list[Entries] = []  # batches that came while its history was being read
        self.failed: tuple[str, str] | None = None  # why it can no longer be followed: (code, message)
        self._failure: str | None = None
        self._held_as: tuple[Subscription, str] | None = None
        self._grew = asyncio.Event()
        self.resumable = bool(meta.get("takeover"))  # another node may take it over if its own dies
        self._adrift_timer: asyncio.TimerHandle | None = None

    def _move(self, event: _In) -> bool:
        """Step the following state; True if this step failed the mirror."""
        was = self.follow_state
        try:
            now = self.follow_state = _FOLLOWING[was, event]
        except KeyError:
            raise RunStateError(f"{event.value} is not allowed while {was.value}") from None
        if now in _ADRIFT and self._adrift_timer is None:
            self._adrift_timer = asyncio.get_running_loop().call_later(ADRIFT_LIMIT, self._not_taken)
        elif now not in _ADRIFT and self._adrift_timer is not None:
            self._adrift_timer.cancel()
            self._adrift_timer = None
        return now is Follow.FAILED and was is not Follow.FAILED

    def _not_taken(self) -> None:
        self._adrift_timer = None
        self.fail("producer_lost", f"node {self.node}, which produced this run, stopped, and no other node took "
                                   f"it over within {ADRIFT_LIMIT:g} s; start the run again")

    @property
    def filling(self) -> bool:
        return self.follow_state in (Follow.FILLING, Follow.FILLING_GONE, Follow.FILLING_ADRIFT)

    def taken(self, node: str) -> None:
        """``node`` produces the run now (it took it over): what this node tells the producer goes there."""
        if node == self.node or self.finished or self.failed is not None:
            return
        self.node = node
        self._move(_In.TAKEN)
        if self._subs:
            self.following.tell(node, messages.Follow(self.key, self.following.node))
        held = self._held_as
        if held is not None:
            self.following.tell(node, messages.Adopt(self.key, held[1]))

    # -- inputs ------------------------------------------------------------

    def history_read(self) -> None:
        if self._move(_In.HISTORY):
            self._failed("producer_lost", self._lost_message())

    def missed(self) -> None:
        self._move(_In.MISSED)

    def gone(self) -> None:
        """Its node does not produce it (it started again under its id, or never had it): it is lost,
        unless its history, read first, holds its end (or, resumable, another node takes it over)."""
        if self._move(_In.ADRIFT if self.resumable else _In.GONE):
            self._failed("producer_lost", self._lost_message())

    def fail(self, code: str, message: str) -> None:
        """The run can no longer be followed from here."""
        if self._move(_In.FAIL):
            self._failed(code, message)

    def lost_producer(self) -> None:
        if self.resumable:
            self._move(_In.ADRIFT)
        else:
            self.fail("producer_lost", self._lost_message())

    def _lost_message(self) -> str:
        return f"node {self.node}, which produced this run, stopped answering; start the run again"

    def _failed(self, code: str, message: str) -> None:
        """Each watcher gets what it has not taken, then one ``error`` (without a ``seq``), and leaves."""
        self.failed = code, message
        self._failure = encode_message("error", id=self.id, code=code, retryable=True, message=message)
        self.wake()
        if not self._subs:
            self.following.unfollow(self)

    def replicate(self, first: int, codes: list[int], payloads: list[str],
                  authors: list[list[str | None]] | None = None) -> None:
        """Entries ``first``, ``first + 1``, ... of the producer's log (as its node wrote them). Entries
        already here are skipped; past a gap, the log starts again at ``first`` (a watcher behind it is told
        it lags). A terminal entry finishes the run. The log keeps at most ``replay_bytes`` plus
        ``buffer_bytes``, whoever reads it."""
        if authors is not None:
            self._authors = [(agent, workflow) for agent, workflow in authors]
        end = self._log.end
        if self.finished or not codes or first + len(codes) <= end:
            return
        if first > end:
            self._restart_log(first)
        born = time.monotonic()
        append = self._append
        for i in range(self._log.end - first, len(codes)):
            append(codes[i], payloads[i], born)
        outcome = terminal_outcome(codes[-1])  # (a terminal entry is its run's last)
        if outcome is not None:
            self._move(_In.END)
            self._finished_elsewhere(outcome)
        self._bound_log(self.replay_bytes + self.buffer_bytes)
        self.wake()

    def has(self, seq: int) -> bool:
        return self._log.end > seq

    def has_gap_before(self, first: int) -> bool:
        """Whether a batch starting at ``first`` leaves entries out (one went missing)."""
        return first > self._log.end

    def history_start(self) -> str:
        """The stream id its history is read from: after its log's last entry (all of it, for an empty log)."""
        log_ = self._log
        return f"{log_.end}-0" if log_.codes or log_.first > 1 else "-"

    # -- the run's own behaviour, sent to its producer ----------------------

    def wake(self) -> None:
        self._grew.set()
        super().wake()

    async def reach(self, seq: int, limit: float) -> None:
        """Wait (at most ``limit`` seconds) until entry ``seq`` is here: a client resuming on this node
        may have read it on the producer's a moment before the producer wrote it to Redis."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(limit):
                while self._log.end <= seq and not self.finished and self.failed is None:
                    self._grew.clear()
                    await self._grew.wait()

    def _has_news(self, sub: Subscription) -> bool:
        return self._failure is not None or super()._has_news(sub)

    def _take(self, sub: Subscription) -> list[str]:
        frames = super()._take(sub)
        if self._failure is not None and not sub.ended and sub.cursor >= self._log.end - 1:
            self._end(sub)
            frames += failure_frames(sub, self._failure)
        return frames

    def subscribe(self, watcher: Watcher, after: int = 0, renderer: Renderer | None = None, *,
                  primary: bool = False, pauses: bool = False, answered: frozenset[str] = frozenset(),
                  ) -> Subscription:
        sub = super().subscribe(watcher, after, renderer, primary=primary, pauses=pauses, answered=answered)
        if primary and not self.finished:
            holder = f"{self.following.node}/{next(holders)}"
            self._held_as = (sub, holder)
            self.following.tell(self.node, messages.Adopt(self.key, holder))
        return sub

    def holder_for(self, sub: Subscription) -> str:
        """The name under which ``sub``, a watcher here, may become the run's own client on its producer's node
        (which decides: only if the run's own client has gone); its leaving is then told there."""
        held = self._held_as
        if held is not None and held[0] is sub:
            return held[1]
        holder = f"{self.following.node}/{next(holders)}"
        if held is None:
            self._held_as = (sub, holder)
        return holder

    def unsubscribe(self, sub: Subscription, grace: float = 0.0) -> None:
        """The producer's grace applies (it was set when the run started), whatever ``grace`` says."""
        held = self._held_as
        self._end(sub)
        sub.watcher.unwatch(sub)
        if held is not None and held[0] is sub:
            self._held_as = None
            if not self.finished:
                self.following.tell(self.node, messages.Leave(self.key, held[1]))

    def _end(self, sub: Subscription) -> None:
        super()._end(sub)
        if not self._subs:
            self.following.unfollow(self)

    def cancel(self, reason: str = "cancelled") -> None:
        self.following.tell(self.node, messages.Cancel(self.key, reason))


class Following:
    """The runs this node follows (one :class:`Mirror` each, however many of its clients watch it)."""

    def __init__(self, link: RedisLink, liveness: Liveness, node: str) -> None:
        self.link = link
        self.liveness = liveness
        self.node = node
        self.mirrors: dict[str, Mirror] = {}

    def tell(self, node: str, message: messages.Message) -> None:
        """Send ``message`` to ``node`` without waiting, after everything this node wrote before it."""
        self.link.publish(name("node", node), messages.encode(message))

    def mirror(self, key: str, meta: dict[str, Any], authors: list[list[str | None]]) -> Mirror:
        """A new mirror of run ``key`` (not followed until :meth:`follow`)."""
        return Mirror(self, key, meta, authors)

    def channels(self) -> list[str]:
        return [name("run", key) for key in self.mirrors]

    # -- following ---------------------------------------------------------

    async def follow(self, run: Mirror, after: int) -> Mirror:
        """``run``, followed (this node's one mirror of it), once it has entry ``after`` (or can never have:
        then refused with why)."""
        asked_ms = time.time() * 1000
        following = self.mirrors.get(run.key)
        if following is not None:
            await self._catch_up(following, after, asked_ms)
            return _followable(following)
        self.link.require_up()
        self.mirrors[run.key] = run
        self.tell(run.node, messages.Follow(run.key, self.node))
        try:
            await self.link.subscribe(name("run", run.key))
            found = await self._refill(run)
        except (*DOWN_ERRORS, asyncio.CancelledError, ClusterUnavailable) as exc:
            self.mirrors.pop(run.key, None)
            if isinstance(exc, DOWN_ERRORS):
                self.link.lost(exc)
            if isinstance(exc, ClusterUnavailable):
                raise
            raise ClusterUnavailable(f"{OUT_OF_REACH}; try again shortly") from None
        if not found:  # it expired since it was found (it ended seconds ago): as if it had not been
            raise ProtocolViolation(f"no run {run.id!r}: it has ended and is no longer kept", code="unknown_run")
        if not await self.liveness.alive(run.node):
            run.lost_producer()
        await self._catch_up(run, after, asked_ms)
        return _followable(run)

    async def _catch_up(self, mirror: Mirror, after: int, asked_ms: float) -> None:
        """Wait (up to COMMAND_TIMEOUT) until ``mirror`` has entry ``after``, the last one the client saw. If it
        never comes and its node has not beaten since the client asked (it beats every second, and writes what
        it produces within 10 ms), that node is gone, though not yet for NODE_TTL: its run is lost (the client
        saw events that never reached Redis), rather than ``after`` called a seq the run never sent."""
        await mirror.reach(after, COMMAND_TIMEOUT)
        if mirror.has(after) or mirror.finished or mirror.failed is not None:
            return
        beat = await self.liveness.last_beat(mirror.node)
        if beat is None or beat < asked_ms:
            mirror.lost_producer()

    def unfollow(self, mirror: Mirror) -> None:
        """Nobody here watches ``mirror`` any more: stop following it."""
        if self.mirrors.get(mirror.key) is mirror:
            del self.mirrors[mirror.key]
            self.tell(mirror.node, messages.Unfollow(mirror.key, self.node))
            self.link.unsubscribe(name("run", mirror.key))
        mirror.release()

    # -- what Redis brings -------------------------------------------------

    def received(self, channel: str, data: str) -> None:
        """A batch on a run's channel."""
        mirror = self.mirrors.get(channel[len(RUN_CHANNELS):])
        if mirror is None:
            return
        batch = json.loads(data)
        first, codes, payloads, authors = batch[:4]
        if len(batch) > 4:  # the first batch of a node that took the run over names it
            mirror.taken(batch[4])
            if not codes:
                return
        if mirror.filling:
            mirror.early.append((first, codes, payloads, authors))
        else:
            self._apply(mirror, first, codes, payloads, authors)

    def _apply(self, mirror: Mirror, first: int, codes: list[int], payloads: list[str],
               authors: list[list[str | None]] | None) -> None:
        if mirror.has_gap_before(first) and not mirror.finished:  # a batch went missing: read it from history
            mirror.missed()
            mirror.early.append((first, codes, payloads, authors))
            self.link.spawn(self._refill(mirror))
        else:
            mirror.replicate(first, codes, payloads, authors)

    def subscribed(self) -> None:
        """The subscriber is (again) on every followed run's channel: each reads what passed meanwhile."""
        for mirror in self.mirrors.values():
            mirror.missed()
            self.link.spawn(self._refill(mirror))

    async def _refill(self, mirror: Mirror) -> bool:
        """Read the run's entries from its history in Redis, then apply what arrived meanwhile. False if
        the run is no longer in Redis (it ended, and its hash and stream expired) and nothing came: a
        follower that missed entries can never get them (it is failed: a ``replay_gap``)."""
        try:
            pipe = self.link.redis.pipeline(transaction=False)
            pipe.xrange(name("log", mirror.key), min=mirror.history_start(), max="+")
            pipe.hmget(name("run", mirror.key), "origins", "owner")
            found, (authors, owner) = await pipe.execute()
            entries = cast(list[tuple[str, dict[str, str]]], found)
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return True
        if mirror.finished or mirror.failed is not None:
            return True
        if isinstance(owner, str) and owner != mirror.node and await self.liveness.alive(owner):
            mirror.taken(owner)  # (taken over while this node did not listen)
        if not entries and authors is None and not mirror.early:
            mirror.fail("replay_gap", f"run {mirror.id} has ended, and the events this node missed are no "
                                      "longer kept")
            return False
        history: list[tuple[int, int, str]] = [(int(entry_id.partition("-")[0]), int(fields["c"]), fields["p"])
                                               for entry_id, fields in entries]
        # The stream may have holes (events its producer trimmed before a write, or kept no longer when it
        # wrote back after an outage): each stretch of consecutive entries is replicated by itself, so the log
        # starts again after a hole, as it does after a batch that went missing.
        known = json.loads(authors) if isinstance(authors, str) else None
        start_at = 0
        for i in range(1, len(history) + 1):
            if i == len(history) or history[i][0] != history[i - 1][0] + 1:
                part = history[start_at:i]
                mirror.replicate(part[0][0], [c for _, c, _ in part], [p for _, _, p in part], known)
                start_at = i
        mirror.history_read()
        early, mirror.early = mirror.early, []
        for first, codes, payloads, batch_authors in early:
            self._apply(mirror, first, codes, payloads, batch_authors)
        if not history and not early:
            mirror.wake()
        return True

    # -- what other nodes say, and the link --------------------------------

    def gone(self, key: str) -> None:
        mirror = self.mirrors.get(key)
        if mirror is not None:
            mirror.gone()

    def restarted(self, node: str) -> None:
        """A process started as ``node``: the runs followed from an earlier one are gone."""
        for mirror in [m for m in self.mirrors.values() if m.node == node]:
            mirror.gone()

    def beaten(self, live: frozenset[str]) -> None:
        """The runs of nodes no longer alive are lost."""
        for mirror in list(self.mirrors.values()):
            if mirror.node not in live and not mirror.finished:
                mirror.lost_producer()

    def down(self) -> None:
        """The link went down: every followed run ends for its watchers, who may resume shortly."""
        mirrors = list(self.mirrors.values())
        self.mirrors.clear()
        for mirror in mirrors:
            mirror.fail("cluster_unavailable", f"{OUT_OF_REACH}; resume shortly from the last seq you received")


def _followable(mirror: Mirror) -> Mirror:
    """``mirror``, unless it can no longer be followed and has not ended: then the request that would follow it
    is refused with why (``producer_lost``: the events after what the client saw may never have reached Redis,
    and no more will come), rather than told ``bad_resume`` or ``replay_gap``."""
    if mirror.failed is not None and not mirror.finished:
        code, message = mirror.failed
        raise ProtocolViolation(message, code=code, retryable=True)
    return mirror
