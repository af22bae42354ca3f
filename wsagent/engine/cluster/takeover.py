"""Runs that outlive their node (``--takeover``): who may write a resumable run, and who goes on with it.

A resumable run's hash holds its producer, ``owner`` (a node) and ``life`` (that
process, minted at its start: a node started again under its id is another
life). Its node lists it in ``wsagent:takeover:{node}`` (a set).

* **The fence.** Every write of a resumable run's entries is one script
  (:data:`WRITE_FENCED`) that writes only while the hash names the writer's own
  node and life (or names nobody: Redis restarted empty); so are its end and its
  node forgetting it (:data:`END_FENCED`: the keys' TTLs, the id), and the
  upstream cancel of what it reads (``still_owned``). A producer that comes
  back after others took it for dead (a paused process, a partition) writes
  nothing more: its clients are told ``taken_over``.
* **The checkpoint.** The last entry of each write carries ``u``: where the
  producer could go on from after it (the last :class:`~wsagent.core.events.Checkpoint`,
  when nothing was sealed after it). Entry and checkpoint are written together
  or not at all, so whoever reads the stream's last entry knows where to go on.
  A run continued by asking the model to finish its partial answer (chat
  completions) also keeps its request in the hash (``request``) and its answer so
  far in ``wsagent:answer:{key}``, appended in the same script.
* **The claim.** A node that sees another stop beating runs :data:`CLAIM` on the
  dead node's set: in one script, each run still owned by that life becomes the
  claimer's (its hash's ``owner``, which readers take over its meta's ``node``,
  and its place in the claimer's set; the meta, which may hold any user's id,
  is not parsed in Lua).
  Exactly one node claims each run; the others find the set empty. A process
  claims its own node's runs of an earlier life at start.

The claimer then reads the run's stream (nobody else may write it now) and
builds a local run from the hash and that history, whose log goes on after
its last entry, and its node's app goes on from the checkpoint
(:attr:`~wsagent.engine.cluster.broker.RedisBroker.on_takeover`); a run whose last
entry carries none (its node died before the model's first event) ends there
with ``producer_lost``. Followers find the new producer in the first batch it
publishes (:meth:`~wsagent.engine.cluster.follower.Following.received`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .names import RUN_TTL, name

__all__ = ["WRITE_FENCED", "END_FENCED", "CLAIM", "Claimed", "claim_command", "claimed", "history", "takeover_set"]

#: KEYS: the run's hash, its stream, its answer. ARGV: node, life, channel, message ('' none), minid, the stream's
#: TTL ('0': keep), ``u`` of the last entry ('' none), meta and origins to write ('' none), the hash's TTL ('0':
#: keep), the answer's text to append ('' none), the answer whole and the request to write ('' none), an agent's
#: step checkpoint and the seq after it ('' none), then (id, code, payload) per entry. 1 written, 0 fenced off.
WRITE_FENCED = """
local held = redis.call('HMGET', KEYS[1], 'owner', 'life')
if held[1] and (held[1] ~= ARGV[1] or held[2] ~= ARGV[2]) then return 0 end
if ARGV[8] ~= '' then redis.call('HSET', KEYS[1], 'meta', ARGV[8], 'owner', ARGV[1], 'life', ARGV[2]) end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'origins', ARGV[9]) end
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'request', ARGV[13])
  redis.call('SET', KEYS[3], ARGV[12])
end
if ARGV[14] ~= '' then redis.call('HSET', KEYS[1], 'step', ARGV[14], 'stepend', ARGV[15]) end
if ARGV[10] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[10]) end
local last = #ARGV - 2
for i = 16, last, 3 do
  if i < last then
    redis.call('XADD', KEYS[2], ARGV[i], 'c', ARGV[i + 1], 'p', ARGV[i + 2])
  elseif ARGV[7] ~= '' then
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[5], ARGV[i], 'c', ARGV[i + 1], 'p', ARGV[i + 2], 'u', ARGV[7])
  else
    redis.call('XADD', KEYS[2], 'MINID', '~', ARGV[5], ARGV[i], 'c', ARGV[i + 1], 'p', ARGV[i + 2])
  end
end
if ARGV[11] ~= '' then redis.call('APPEND', KEYS[3], ARGV[11]) end
if ARGV[6] ~= '0' then
  redis.call('EXPIRE', KEYS[2], ARGV[6])
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ARGV[6]) end
end
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""

#: A resumable run's end, or its node forgetting it, fenced as its writes are. KEYS: its hash, stream, answer, id
#: ('' if not shared), its node's set. ARGV: node, life, key, the TTL of its keys ('0': leave them), of its id
#: ('0': delete it if it names this run). 1 done, 0 fenced off.
END_FENCED = """
local held = redis.call('HMGET', KEYS[1], 'owner', 'life')
if held[1] and (held[1] ~= ARGV[1] or held[2] ~= ARGV[2]) then return 0 end
redis.call('SREM', KEYS[5], ARGV[3])
if ARGV[4] ~= '0' then
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ARGV[4]) end
end
if KEYS[4] ~= '' then
  if ARGV[5] ~= '0' then
    redis.call('EXPIRE', KEYS[4], ARGV[5])
  elseif redis.call('GET', KEYS[4]) == ARGV[3] then
    redis.call('DEL', KEYS[4])
  end
end
return 1
"""

#: KEYS: the dead node's set, the claimer's. ARGV: the dead node, the claimer, its life, the runs' prefix, the
#: TTL. Each run claimed: key, meta, origins. (Its stream is read after: only the claimer may write it now.)
CLAIM = """
local out = {}
for _, key in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local hash = ARGV[4] .. key
  local held = redis.call('HMGET', hash, 'owner', 'life', 'meta', 'origins')
  if held[1] == ARGV[1] and held[2] ~= ARGV[3] and held[3] then
    redis.call('HSET', hash, 'owner', ARGV[2], 'life', ARGV[3])
    redis.call('EXPIRE', hash, ARGV[5])
    redis.call('SMOVE', KEYS[1], KEYS[2], key)
    redis.call('EXPIRE', KEYS[2], ARGV[5])
    for _, v in ipairs({key, held[3], held[4] or ''}) do out[#out + 1] = v end
  elseif held[1] ~= ARGV[1] then
    redis.call('SREM', KEYS[1], key)
  end
end
return out
"""


def takeover_set(node: str) -> str:
    """The set of ``node``'s resumable runs."""
    return name("takeover", node)


def claim_command(dead: str, node: str, life: str) -> tuple[Any, ...]:
    """The :data:`CLAIM` of ``dead``'s runs by ``node`` (of ``life``)."""
    return ("EVAL", CLAIM, 2, takeover_set(dead), takeover_set(node), dead, node, life, name("run", ""), RUN_TTL)


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run this node claimed: its hash's fields."""

    key: str
    meta: dict[str, Any]
    authors: list[list[str | None]]


def claimed(reply: Any) -> list[Claimed]:
    """The runs in a :data:`CLAIM`'s reply."""
    if not isinstance(reply, list):
        return []
    return [Claimed(str(reply[i]), json.loads(reply[i + 1]), json.loads(reply[i + 2]) if reply[i + 2] else
                    [[None, None]]) for i in range(0, len(reply) - 2, 3)]


def history(entries: list[Any]) -> tuple[list[tuple[int, int, str]], str | None]:
    """A claimed run's stream (``XRANGE``'s reply: [id, [field, value, ...]] per entry) as (seq, code, payload),
    its last stretch of consecutive entries, and the checkpoint its last entry carries (None: none)."""
    rows: list[tuple[int, int, str]] = []
    checkpoint = None
    for entry_id, flat in entries:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        rows.append((int(entry_id.partition("-")[0]), int(fields["c"]), fields["p"]))
        checkpoint = fields.get("u")
    start = len(rows) - 1
    while start > 0 and rows[start - 1][0] == rows[start][0] - 1:
        start -= 1
    return rows[max(start, 0):], checkpoint
