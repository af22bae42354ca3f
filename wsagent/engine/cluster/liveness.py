"""Which nodes are alive: each node's heartbeat in ``wsagent:nodes``, and what a node does when one stops.

Every HEARTBEAT a node writes its beat (a sorted set scored by time), reads which
nodes beat within NODE_TTL, drops beats older than BEATS_KEPT and gives the set
a TTL of BEATS_KEPT (once every node is gone, killed or not, nothing of them
stays). Every REFRESH_EVERY the beat also carries its member's refreshes (the
TTLs of the keys of its running runs and client ids). While the link is down,
the beat is what finds Redis answering again, and rejoins.

A process that starts under a node id says ``Hello`` once to the live nodes: to
them that id is alive throughout, but what an earlier process of that id
produced or held is gone (the member is told, through ``restarted``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any, Protocol

from redis.asyncio.client import Pipeline

from . import messages
from .link import DOWN_ERRORS, RedisLink
from .names import BEATS_KEPT, NODES, REFRESH_EVERY, name

__all__ = ["Liveness", "HEARTBEAT", "NODE_TTL", "may_have_been_taken_for_dead"]

#: Seconds between heartbeats; a node whose last one is older than NODE_TTL is taken for dead.
HEARTBEAT = 1.0
NODE_TTL = 3.0


def may_have_been_taken_for_dead(previous_written: float | None, replied: float) -> bool:
    """Whether the other nodes may have taken this one for dead between two of its beats: its previous beat
    written at ``previous_written`` (the time the others measure from; None: this is its first), the next one's
    reply back at ``replied`` (wall clock, seconds). The others look once a HEARTBEAT, so a silence a beat short
    of NODE_TTL is worth a question to Redis; measured from the previous reply instead, a pause just past the
    others' patience went unnoticed by the paused node."""
    return previous_written is not None and replied - previous_written > NODE_TTL - HEARTBEAT


class Member(Protocol):
    """What liveness asks of, and tells, the node it beats for."""

    def refresh(self, pipe: Pipeline) -> None:
        """Add to ``pipe`` the TTL refreshes of what the node keeps in Redis."""
        ...

    def write_back(self) -> Awaitable[None]:
        """Write back what the node holds (the link is coming up again)."""
        ...

    def beaten(self, live: frozenset[str], dead: frozenset[str], silent: bool) -> None:
        """The nodes alive at the last beat (this one among them): whatever was of the others is gone.
        ``dead``: those that beat within BEATS_KEPT but not NODE_TTL (at the first beat, this node too: what
        a process before this one left under its id). ``silent``: this node was silent long enough that the
        others may have taken it for dead (:func:`may_have_been_taken_for_dead`)."""
        ...


class Liveness:
    """This node's heartbeat, and its view of which nodes are alive (:attr:`live`)."""

    def __init__(self, link: RedisLink, node: str, member: Member) -> None:
        self.link = link
        self.node = node
        self.live: frozenset[str] = frozenset({node})
        self._member = member
        self._refreshed = 0.0
        self._greeted = False
        self._written: float | None = None  # the wall-clock time of the last beat written (what others measure)

    async def run(self) -> None:
        """Beat every HEARTBEAT, forever (cancelled when the node leaves)."""
        while True:
            await asyncio.sleep(HEARTBEAT)
            await self.beat()

    async def beat(self) -> None:
        """Say this node is alive, learn which others are, refresh what would expire; when Redis answers
        again after an outage, rejoin."""
        written = time.time()
        now_ms = int(written * 1000)
        refresh = time.monotonic() - self._refreshed > REFRESH_EVERY
        pipe = self.link.redis.pipeline(transaction=False)
        pipe.zadd(NODES, {self.node: now_ms})
        pipe.zrangebyscore(NODES, now_ms - int(NODE_TTL * 1000), "+inf")
        pipe.zrangebyscore(NODES, now_ms - BEATS_KEPT * 1000, f"({now_ms - int(NODE_TTL * 1000)}")
        pipe.zremrangebyscore(NODES, "-inf", now_ms - BEATS_KEPT * 1000)
        pipe.expire(NODES, BEATS_KEPT)
        if refresh and self.link.up:
            self._member.refresh(pipe)
        try:
            replies: list[Any] = await pipe.execute()
            if not self.link.up:
                await self.link.rejoin(self._member.write_back)
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return
        if refresh:
            self._refreshed = time.monotonic()
        self.live = frozenset(replies[1]) | {self.node}
        dead = frozenset(replies[2]) - self.live
        silent = may_have_been_taken_for_dead(self._written, time.time())
        self._written = written
        self._member.beaten(self.live, dead if self._greeted else dead | {self.node}, silent)
        if not self._greeted:  # (a node started again under its id is alive to the others: its runs are not)
            self._greeted = True
            hello = messages.encode(messages.Hello(self.node))
            for node in self.live - {self.node}:
                self.link.publish(name("node", node), hello)

    def query(self, pipe: Pipeline) -> None:
        """Add to ``pipe`` the question of which nodes are alive now (one may have joined since the last beat)."""
        now_ms = int(time.time() * 1000)
        pipe.zrangebyscore(NODES, now_ms - int(NODE_TTL * 1000), "+inf")

    async def last_beat(self, node: str) -> float | None:
        """When ``node`` last beat (ms since the epoch), None if never or if Redis does not answer."""
        try:
            beat = await self.link.redis.zscore(NODES, node)
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return None
        return None if beat is None else float(beat)

    async def alive(self, node: str) -> bool:
        """Whether ``node`` beat lately (asked of Redis: it may have joined since this node's last beat)."""
        if node in self.live:
            return True
        beat = await self.last_beat(node)
        if beat is not None and beat > time.time() * 1000 - NODE_TTL * 1000:
            self.live |= {node}
            return True
        return False

    async def leave(self, handed_over: bool = False) -> None:
        """The other nodes see this node gone at once (its runs have ended); ``handed_over``: as one that
        died, so that their next beat claims the runs it left."""
        try:
            if handed_over:
                await self.link.redis.zadd(NODES, {self.node: int(time.time() * 1000) - int(NODE_TTL * 1000) - 1})
            else:
                await self.link.redis.zrem(NODES, self.node)
        except DOWN_ERRORS:
            pass
