"""Client ids and per-user counts across the cluster.

* ``wsagent:client:{id}`` names the holder of a client id (``{node}/{n}``), with
  a TTL of CLIENT_TTL that its node refreshes: a client id is held on one node
  of the cluster at a time (``replace`` evicts the older holder wherever it is,
  ``reject`` refuses a newer one while the holder's node is alive).
* ``wsagent:user:{user}`` (a hash) holds each node's count of the user's
  connections (``c:{node}``) and runs (``r:{node}``); a limit reads the sum over
  the nodes alive. A node writes its counts as they change, with its next batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

from redis.asyncio.client import Pipeline

from ...core.errors import ClusterUnavailable
from ..broker import LocalBroker, Mailbox
from . import messages
from .link import DOWN_ERRORS, RedisLink
from .liveness import Liveness
from .names import BROADCAST, CLIENT_TTL, DELETE_IF, USER_TTL, name
from .wire import Command

__all__ = ["Clients"]

_claims = itertools.count(1)


def _text(value: object) -> str | None:
    """A Redis reply that should be a string (``decode_responses``), or None."""
    return value if isinstance(value, str) else None


class Clients:
    """This node's part of the cluster's client ids and per-user counts (the node's own are ``local``'s)."""

    def __init__(self, link: RedisLink, liveness: Liveness, local: LocalBroker, soon: Callable[[], None]) -> None:
        self.link = link
        self.liveness = liveness
        self.local = local
        self.node = liveness.node
        self.claims: dict[str, str] = {}  # client id -> the value this node wrote for it
        self._users_dirty: set[str] = set()
        self._soon = soon

    # -- per-user counts -------------------------------------------------------

    def count(self, commands: list[Command], user: str) -> None:
        """Commands that write this node's counts of ``user``."""
        key = name("user", user)
        connections, runs = self.local.user_counts(user)
        commands += [("HSET", key, f"c:{self.node}", connections, f"r:{self.node}", runs), ("EXPIRE", key, USER_TTL)]

    def changed(self, user: str) -> None:
        """``user``'s counts here changed: written with the next batch, soon (limits read them elsewhere)."""
        self._users_dirty.add(user)
        self._soon()

    def due(self, commands: list[Command]) -> None:
        """The counts that changed since the last batch (called as each batch is written)."""
        users, self._users_dirty = self._users_dirty, set()
        for user in users:
            self.count(commands, user)

    async def connected(self, user: str, here: int) -> int:
        """``user`` has ``here`` connections on this node now (one more): its count on every live node."""
        if self.link.up:
            try:
                commands: list[Command] = []
                self.count(commands, user)
                await self.link.send(commands)
            except DOWN_ERRORS as exc:
                self.link.lost(exc)
        return await self.total(user, "c", here)

    async def total(self, user: str, kind: str, here: int) -> int:
        """``user``'s connections (``c``) or runs (``r``) on every live node; this node's alone while
        the cluster is out of reach."""
        if not self.link.up:
            return here
        pipe: Pipeline = self.link.redis.pipeline(transaction=False)
        pipe.hgetall(name("user", user))
        self.liveness.query(pipe)
        try:
            counts, live = await pipe.execute()
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return here
        prefix = f"{kind}:"
        return here + sum(int(value) for field, value in counts.items()
                          if field.startswith(prefix) and field[2:] != self.node and field[2:] in live)

    # -- client ids ------------------------------------------------------------

    async def claim(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        if not self.local.claim_client_here(client_id, mailbox, policy):
            return False
        value = f"{self.node}/{next(_claims)}"
        self.claims[client_id] = value
        if not self.link.up:
            return True
        key = name("client", client_id)
        redis = self.link.redis
        try:
            if policy == "reject":
                if not await redis.set(key, value, nx=True, ex=CLIENT_TTL):
                    holder = _text(await redis.get(key))
                    if holder is not None and await self.liveness.alive(holder.rpartition("/")[0]):
                        self.claims.pop(client_id, None)
                        self.local.release_client_here(client_id, mailbox)
                        return False
                    await redis.set(key, value, ex=CLIENT_TTL)  # its holder's node is gone
            else:
                old = _text(await redis.set(key, value, ex=CLIENT_TTL, get=True))
                node = old.rpartition("/")[0] if old is not None else None
                if old is not None and node is not None and node != self.node:
                    await redis.publish(name("node", node), messages.encode(messages.Evict(client_id, old)))
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
        return True

    def release(self, client_id: str, mailbox: Mailbox) -> None:
        if self.local.mailbox(client_id) is mailbox:
            value = self.claims.pop(client_id, None)
            if value is not None:
                self.link.write([("EVAL", DELETE_IF, 1, name("client", client_id), value)])
        self.local.release_client_here(client_id, mailbox)

    def evicted(self, client_id: str, holder: str) -> None:
        """A newer connection on another node took ``client_id`` from ``holder``: if that is this node's
        claim, its connection closes (4009)."""
        mailbox = self.local.mailbox(client_id)
        if mailbox is not None and self.claims.get(client_id) == holder:
            self.claims.pop(client_id)
            self.local.release_client_here(client_id, mailbox)
            mailbox.evict()

    def refresh(self, pipe: Pipeline) -> None:
        for client_id in self.claims:
            pipe.expire(name("client", client_id), CLIENT_TTL)

    def write_back(self, commands: list[Command], users: set[str]) -> int:
        """Commands that write back ``users``' counts and each client id this node holds, unless another node
        took it meanwhile (see :meth:`taken`); how many replies at the end are the claims'."""
        for user in users:
            self.count(commands, user)
        for client_id, value in self.claims.items():
            commands += [("SET", name("client", client_id), value, "NX", "EX", CLIENT_TTL),
                         ("GET", name("client", client_id))]
        return 2 * len(self.claims)

    def taken(self, replies: list[object]) -> None:
        """The replies of :meth:`write_back`'s claims: another node's client took the id while this one was
        cut off, so that claim is the newer, and this node's connection closes."""
        holders = iter(replies)
        for client_id, value in list(self.claims.items()):
            next(holders)
            holder = next(holders)
            if isinstance(holder, str) and holder != value:
                mailbox = self.local.mailbox(client_id)
                self.claims.pop(client_id)
                if mailbox is not None:
                    mailbox.evict()

    # -- messages --------------------------------------------------------------

    async def broadcast(self, frame: str) -> None:
        """Every node's clients get ``frame`` through Redis (this node's too, so each gets it once)."""
        if not self.link.up:
            self.local.deliver_all(frame)
            raise ClusterUnavailable("the cluster is out of reach: this broadcast reached this node's clients only")
        await self.link.ask(self.link.redis.publish(BROADCAST, frame))

    async def send_to(self, client_id: str, frame: str) -> bool:
        if self.local.mailbox(client_id) is not None:
            return self.local.deliver(client_id, frame)
        holder = _text(await self.link.ask(self.link.redis.get(name("client", client_id))))
        node = holder.rpartition("/")[0] if holder is not None else None
        if node is None or node == self.node:
            return False
        message = messages.encode(messages.Send(client_id, frame))
        return bool(await self.link.ask(self.link.redis.publish(name("node", node), message)))
