"""Writing the runs a node produces to Redis: their registration, their logs, and who follows them.

A run's log goes to ``wsagent:log:{key}`` (a stream) as the producer keeps it:
one entry per sealed event (the deltas of one upstream read are one entry), its
stream id ``{seq}-0``. Redis refuses an id that is not above the last one, so a
node that comes back after an outage can rewrite its history without ever
writing stale entries over newer ones (the fence). The stream is trimmed to the
producer's own log (``MINID``), so it never holds more than ``--replay-bytes``
plus ``--run-buffer-bytes`` of the run. Each batch also goes to the nodes that
follow the run, on its channel.

Cost on the hot path: a run's new entries are sealed once per upstream read, and
every dirty run's new entries go to Redis in one write, one ``XADD`` per entry
and one ``PUBLISH`` per run, on the writer spoken by hand: at most once a
millisecond while another node follows one of them, every 10 ms while none
does, and at the next turn of the event loop once one has ended (its client may
ask another node about it at once). No round trip, task or future per batch,
nothing per token. What the run itself knows of this: that it has an
:class:`~wsagent.engine.run.Outlet` to tell when it has new entries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable

from redis.asyncio.client import Pipeline

from ...core.errors import ClusterUnavailable
from ...core.events import Token
from ..run import Run
from .link import DOWN_ERRORS, RedisLink
from .names import DELETE_IF, RUN_TTL, name, shared, ttl
from .takeover import END_FENCED, WRITE_FENCED, takeover_set
from .wire import Command

__all__ = ["Replicator", "FLUSH_EVERY", "LAZY_EVERY"]

_TOKEN = Token.kind  # (the code of an answer's text of the run's own author)

#: Seconds between two writes of run entries to Redis while another node follows one of them (at most one
#: write per turn of the event loop), and while none does (the entries only go to the history).
FLUSH_EVERY = 0.001
LAZY_EVERY = 0.01


class _Written:
    """How much of one run Redis has: its last seq, and how many of its authors (and of a run continued by its
    answer, that answer)."""

    __slots__ = ("seq", "authors", "answer", "step_end")

    def __init__(self) -> None:
        self.seq = 0
        self.authors = 1
        self.answer: list[str] = []
        self.step_end = 0  # of the agent's last step checkpoint written


class Replicator:
    """This node's runs in Redis. ``more`` adds to each write what else is due (the users' counts)."""

    def __init__(self, link: RedisLink, node: str, more: Callable[[list[Command]], None], life: str = "") -> None:
        self.link = link
        self.node = node
        self.life = life  # this process, among those that ran as ``node`` (a resumable run's fence)
        self.batches = 0
        #: Runs produced here -> the nodes that follow them (their entries are written at once).
        self.followers: dict[str, set[str]] = {}
        self._more = more
        self._written: dict[Run, _Written] = {}
        self._dirty: dict[Run, None] = {}
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_at = 0.0
        self._flushed = 0.0

    # -- registration ------------------------------------------------------

    async def add(self, run: Run, first: list[Command]) -> None:
        """Make ``run`` known to the cluster (after ``first``, in the same write), before its client learns
        its key; ``ValueError`` if its id is taken on another node."""
        self._written[run] = _Written()
        if not self.link.up:
            return
        commands = [*first]
        self._register(commands, run, RUN_TTL)
        try:
            replies = await self.link.send(commands)
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return
        if shared(run.scope) and not replies[-1]:
            self.erase(run)
            raise ValueError(f"run id {run.id!r} is already in use")
        if shared(run.scope) and isinstance(replies[-1], Exception):  # (an error is a value)
            self.erase(run)
            raise ClusterUnavailable(f"Redis did not register run id {run.id!r} ({replies[-1]}); try again shortly")

    def _meta(self, run: Run) -> str:
        meta = {"id": run.id, "user": run.user, "scope": run.scope, "node": self.node, "agent": run.agent,
                "workflow": run.workflow, "grace": run.grace, "buffer": run.buffer_bytes, "replay": run.replay_bytes}
        if run.resumable:
            meta["takeover"] = True
        return json.dumps(meta)

    def _register(self, commands: list[Command], run: Run, seconds: int) -> None:
        hash_ = name("run", run.key)
        if run.resumable:  # its producer, for the fence; and in its node's set, for a claim
            request = () if run.resume_request is None else ("request", run.resume_request)
            commands += [("HSET", hash_, "meta", self._meta(run), "origins", json.dumps(run.authors()),
                          "owner", self.node, "life", self.life, *request),
                         ("SADD", takeover_set(self.node), run.key), ("EXPIRE", takeover_set(self.node), RUN_TTL)]
        else:
            commands.append(("HSET", hash_, "meta", self._meta(run), "origins", json.dumps(run.authors())))
        commands.append(("EXPIRE", hash_, seconds))
        if shared(run.scope):
            commands.append(("SET", name("id", run.scope, run.id), run.key, "NX", "EX", seconds))

    def write_back(self, commands: list[Command], runs: Iterable[Run]) -> None:
        """Commands that write ``runs`` again, each with the log it keeps (a stream refuses entries not above
        its last: the fence)."""
        for run in runs:
            written = self._written.setdefault(run, _Written())
            if not run.resumable:  # (a resumable run's registration is fenced: written with its entries)
                self._register(commands, run, ttl(run))
            elif shared(run.scope):
                commands.append(("SET", name("id", run.scope, run.id), run.key, "EX", ttl(run)))
            written.seq = run.oldest_kept - 1  # (everything it keeps; its authors are in its registration)
            written.authors = run.author_count
            self._append(commands, run, written, publish=False)

    def refresh(self, pipe: Pipeline, running: Iterable[Run]) -> None:
        """The TTLs of the running runs' keys, renewed (the heartbeat's, every REFRESH_EVERY)."""
        resumable = False
        for run in running:
            for key in _keys(run):
                pipe.expire(key, RUN_TTL)
            if shared(run.scope):
                pipe.expire(name("id", run.scope, run.id), RUN_TTL)
            resumable |= run.resumable
        if resumable:
            pipe.expire(takeover_set(self.node), RUN_TTL)

    # -- writing: once per upstream read, pipelined across runs -------------

    def dirty(self, run: Run) -> None:
        """``run`` has new entries (its :class:`~wsagent.engine.run.Outlet`). A resumable run's go at once,
        before any client of this node is woken: whatever a client saw is in Redis (written before the
        client's socket, so even a SIGKILL right after leaves it there), and a run taken over goes on
        after what its client saw."""
        self._dirty[run] = None
        if run.resumable:
            self.flush()
        elif run.finished:  # its end at once (next turn): its client may ask another node about it right away
            self.soon(0.0)
        else:
            self.soon(FLUSH_EVERY if run.key in self.followers else LAZY_EVERY)

    def soon(self, every: float) -> None:
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
        self._flush_timer = loop.call_at(at, self.flush)

    def flush(self) -> None:
        """Every dirty run's new entries, one XADD each and one PUBLISH per run, in one write (when
        :meth:`soon` says). Nothing waits for the replies (no task, no future); a Redis that stops
        reading is noticed by the heartbeat, and its unsent backlog bounded by the link."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()  # called directly (closing): the timer's turn is taken
            self._flush_timer = None
        self._flushed = asyncio.get_running_loop().time()
        dirty, self._dirty = self._dirty, {}
        if not self.link.up:
            return  # the retained logs are written again when Redis answers
        commands: list[Command] = []
        for run in dirty:
            written = self._written.get(run)
            if written is None:  # (dropped meanwhile)
                continue
            self._append(commands, run, written, publish=True)
            if run.finished and run.resumable:
                commands.append(self._end_fenced(run, ttl(run), max(1, round(run.grace))))
            elif run.finished:
                seconds = ttl(run)
                commands += [("EXPIRE", key, seconds) for key in _keys(run)]
                if shared(run.scope):
                    commands.append(("EXPIRE", name("id", run.scope, run.id), max(1, round(run.grace))))
        self._more(commands)
        if commands:
            self.batches += 1
            self.link.write(commands)

    def _append(self, commands: list[Command], run: Run, written: _Written, *, publish: bool) -> None:
        """Commands that write ``run``'s entries after ``written`` to its stream (``publish``: and to its
        followers). The stream's first write gives it its TTL: that write may begin past seq 1, when the run
        forgot its first events (taken by its client, past ``--replay-bytes``) before they were written."""
        new = written.seq == 0 or not publish
        first, codes, payloads = run.entries(written.seq)
        if not codes and (publish or not run.resumable) and written.step_end == run.step_end:
            return
        stream = name("log", run.key)
        written.seq = first + len(codes) - 1
        authors = run.authors() if not publish or run.author_count > 1 else None
        origins = authors is not None and len(authors) != written.authors
        if run.resumable:
            self._append_fenced(commands, run, written, first, codes, payloads, authors, origins or not publish,
                                new, publish)
            return
        if origins:
            assert authors is not None
            written.authors = len(authors)
            commands.append(("HSET", name("run", run.key), "origins", json.dumps(authors)))
        last = len(codes) - 1
        for i, (code, payload) in enumerate(zip(codes, payloads, strict=True)):
            if i == last:  # trimmed to what the producer keeps, once per batch
                commands.append(("XADD", stream, "MINID", "~", f"{run.oldest_kept}-0", f"{first + i}-0",
                                 "c", code, "p", payload))
            else:
                commands.append(("XADD", stream, f"{first + i}-0", "c", code, "p", payload))
        if new:
            commands.append(("EXPIRE", stream, ttl(run)))
        if publish:
            commands.append(("PUBLISH", name("run", run.key), json.dumps([first, codes, payloads, authors])))
        run.shared_up_to(written.seq)

    def _append_fenced(self, commands: list[Command], run: Run, written: _Written, first: int, codes: list[int],
                       payloads: list[str], authors: list[list[str | None]] | None, origins: bool, new: bool,
                       publish: bool) -> None:
        """:meth:`_append` for a resumable run: one :data:`~wsagent.engine.cluster.takeover.WRITE_FENCED`,
        whose last entry carries the checkpoint when nothing was sealed after it (written back after an
        outage: with the run's registration, in the same fence)."""
        if origins:
            assert authors is not None
            written.authors = len(authors)
        end = first + len(codes)
        checkpoint = run.checkpoint if run.checkpoint is not None and run.checkpoint_end == end else ""
        message = json.dumps([first, codes, payloads, authors]) if publish and codes else ""
        added = ""
        if run.resume_request is not None:  # continued by its answer: the answer's text, as it grows
            added = "".join(payload for code, payload in zip(codes, payloads, strict=True) if code == _TOKEN)
            written.answer.append(added)
        request = "" if publish or run.resume_request is None else run.resume_request
        command: list[str | int] = [
            "EVAL", WRITE_FENCED, 3, name("run", run.key), name("log", run.key), name("answer", run.key), self.node,
            self.life, name("run", run.key), message, f"{run.oldest_kept}-0", ttl(run) if new else 0, checkpoint,
            "" if publish else self._meta(run), json.dumps(authors) if origins else "", 0 if publish else ttl(run),
            added if publish else "", "".join(written.answer) if request else "", request,
            (run.step or "") if run.step_end != written.step_end or not publish else "", run.step_end]
        written.step_end = run.step_end
        for i, (code, payload) in enumerate(zip(codes, payloads, strict=True)):
            command += (f"{first + i}-0", code, payload)
        commands.append(tuple(command))
        if not publish and run.resumable and not run.finished:
            commands += [("SADD", takeover_set(self.node), run.key), ("EXPIRE", takeover_set(self.node), RUN_TTL)]
        if codes:
            run.shared_up_to(written.seq)

    def taken(self, run: Run, seq: int, answer: str) -> None:
        """This node took ``run`` over (Redis has its entries up to ``seq``, and its ``answer`` so far): its first
        batch names this node to the followers, even before the model's next event."""
        self._written[run] = written = _Written()
        written.seq = seq
        written.authors = run.author_count
        written.answer = [answer] if answer else []
        written.step_end = run.step_end
        self.link.publish(name("run", run.key), json.dumps([seq + 1, [], [], None, self.node]))

    # -- forgetting ----------------------------------------------------------

    def dropped(self, run: Run) -> None:
        """This node stops keeping ``run`` (its grace is over, 0 by default; or it was evicted): its last
        entries leave first (a run's end is often still unwritten: with the default grace it ends and is
        dropped in one turn), and its id is free again, as on this node. Its hash and stream stay a few
        seconds (ENDED_TTL) for the nodes reading its end."""
        if run in self._dirty:
            self.flush()
        written = self._written.pop(run, None)
        self.followers.pop(run.key, None)
        if written is None or not shared(run.scope):  # (none: another node took it over, id and all)
            return
        if run.resumable:
            self.link.write([self._end_fenced(run, 0, 0)])
        else:
            self.link.write([("EVAL", DELETE_IF, 1, name("id", run.scope, run.id), run.key)])

    def _end_fenced(self, run: Run, seconds: int, id_seconds: int) -> Command:
        """:data:`~wsagent.engine.cluster.takeover.END_FENCED` for ``run``: its keys' TTL ``seconds`` (0: left) and
        its id's ``id_seconds`` (0: deleted if it names this run)."""
        id_key = name("id", run.scope, run.id) if shared(run.scope) else ""
        return ("EVAL", END_FENCED, 5, name("run", run.key), name("log", run.key), name("answer", run.key), id_key,
                takeover_set(self.node), self.node, self.life, run.key, seconds, id_seconds)

    def surrendered(self, run: Run) -> None:
        """Another node took ``run`` over: nothing of it is written from here any more."""
        self._written.pop(run, None)
        self._dirty.pop(run, None)
        self.followers.pop(run.key, None)

    def erase(self, run: Run) -> None:
        """Delete ``run`` from Redis, on the writer: a run registered after this (a new turn taking the id)
        is written after it."""
        self._written.pop(run, None)
        commands: list[Command] = [("DEL", *_keys(run))]
        if shared(run.scope):
            commands.append(("EVAL", DELETE_IF, 1, name("id", run.scope, run.id), run.key))
        self.link.write(commands)

    # -- followers -----------------------------------------------------------

    def followed(self, key: str, node: str, here: bool) -> None:
        if here:
            self.followers.setdefault(key, set()).add(node)

    def unfollowed(self, key: str, node: str) -> None:
        followers = self.followers.get(key)
        if followers is not None:
            followers.discard(node)
            if not followers:
                del self.followers[key]

    def beaten(self, live: frozenset[str]) -> None:
        """Followers on nodes no longer alive follow no more."""
        for key, followers in list(self.followers.items()):
            followers &= live
            if not followers:
                del self.followers[key]


def _keys(run: Run) -> tuple[str, ...]:
    """The keys a run's node writes and refreshes: its hash and stream (and its answer, for a run continued by
    it)."""
    if run.resume_request is None:
        return name("run", run.key), name("log", run.key)
    return name("run", run.key), name("log", run.key), name("answer", run.key)
