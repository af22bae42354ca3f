"""What cluster mode keeps in Redis: its keys and channels, how each is named, and how long each lives.

No I/O. docs/scaling-out.md has the table of keys; each part that writes a key
names it here, so a newcomer finds every key and its lifetime in one file.

* ``wsagent:run:{key}`` (hash: ``meta``, ``origins``: the run's authors) says which node produces
  the run, whose it is and what its log's codes mean; ``wsagent:id:{scope}:{id}``
  maps a run id to its key for scopes other nodes can name (a user's, an AI SDK
  chat's);
* ``wsagent:log:{key}`` (a stream) holds the run's log as the producer keeps it
  (:mod:`~wsagent.engine.cluster.replication`);
* ``wsagent:run:{key}`` (a channel) carries each batch of new entries to the
  nodes that follow the run; ``wsagent:node:{node}`` carries control messages
  to one node (:mod:`~wsagent.engine.cluster.messages`); ``wsagent:broadcast`` reaches
  every node;
* ``wsagent:nodes`` (a sorted set of heartbeats) says which nodes are alive
  (:mod:`~wsagent.engine.cluster.liveness`); ``wsagent:user:{user}`` holds each node's
  count of the user's connections and runs, ``wsagent:client:{id}`` the holder
  of a client id (:mod:`~wsagent.engine.cluster.clients`).

Every part of a name (a scope, a run id, a user, a node, a client id) is
escaped (:func:`escaped`), so two lists of parts never name one key: user
``acme``'s run ``alice:r1`` is not user ``acme:alice``'s ``r1``.

Every key expires: a running run's keys after RUN_TTL unless its node refreshes
them (every REFRESH_EVERY), a finished run's after its resume grace and at least
ENDED_TTL, a client id's after CLIENT_TTL unless refreshed, a user's counts a
day after their last change, the heartbeats a minute after the last one.
"""

from __future__ import annotations

import re
from typing import Protocol

__all__ = ["name", "escaped", "ttl", "shared", "NODES", "BROADCAST", "RUN_CHANNELS", "KEY", "DELETE_IF",
           "RUN_TTL", "REFRESH_EVERY", "CLIENT_TTL", "ENDED_TTL", "USER_TTL", "BEATS_KEPT"]

#: A running run's keys live this long unless its node refreshes them (every REFRESH_EVERY seconds).
RUN_TTL = 30
REFRESH_EVERY = 10.0
CLIENT_TTL = 10
#: A finished run's hash and stream outlive its node's keeping of it (its resume grace, 0 by default) by at
#: least this long, so that a node that found the run a moment before still reads its end from them.
ENDED_TTL = 5
#: A user's counts (rewritten at each change) expire this long after the last one.
USER_TTL = 86400
#: Heartbeats older than this are removed, and the heartbeats' set itself expires this long after the last one.
BEATS_KEPT = 60

NODES = "wsagent:nodes"
BROADCAST = "wsagent:broadcast"
RUN_CHANNELS = "wsagent:run:"  # a run's channel: this, then its key
#: What a run's key is made of (:func:`~wsagent.engine.broker.mint_key`): any other string names no run.
KEY = re.compile("[A-Za-z0-9_-]{1,64}")
#: Delete a key only while it still holds the value we wrote (a client id, a run id).
DELETE_IF = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class _Kept(Protocol):
    """What a run's lifetime in Redis depends on."""

    @property
    def finished(self) -> bool: ...

    grace: float


def name(*parts: str) -> str:
    """A key or channel of ours: ``wsagent:run:{key}`` (a run's meta hash, and its channel), ``wsagent:log:{key}``
    (its stream), ``wsagent:id:{scope}:{id}``, ``wsagent:node:{node}`` (a channel), ``wsagent:user:{user}``,
    ``wsagent:client:{id}``; each component :func:`escaped`."""
    return ":".join(("wsagent", *map(escaped, parts)))


def escaped(part: str) -> str:
    """One component of a name, unambiguous once joined with ``:``: ``%`` as ``%25``, ``:`` as ``%3A``, and
    a lone surrogate (a JWT's ``sub`` can hold one; it is not UTF-8, so no Redis command can carry it) as
    ``%uD800``. A run's key (URL-safe, as minted) is its own escape."""
    if "%" in part or ":" in part:
        part = part.replace("%", "%25").replace(":", "%3A")
    if not part.isascii():
        part = _LONE_SURROGATE.sub(lambda found: f"%u{ord(found.group()):04X}", part)
    return part


def ttl(run: _Kept) -> int:
    """Seconds a run's hash and stream live unless refreshed: a running run's RUN_TTL (its node refreshes
    them), a finished run's its grace, and at least ENDED_TTL."""
    return RUN_TTL if not run.finished else max(ENDED_TTL, round(run.grace))


def shared(scope: str) -> bool:
    """Whether other nodes can name runs of ``scope`` (an anonymous connection's runs stay on its node)."""
    return not scope.startswith("conn:")
