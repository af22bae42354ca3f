"""Cluster mode's broker: a node's :class:`~wsagent.engine.broker.LocalBroker`, shared through Redis by parts.

:class:`RedisBroker` implements the :class:`~wsagent.engine.broker.Broker` protocol
by holding a ``LocalBroker`` (every run this node produces lives in its memory,
as alone) and the parts that share what other nodes need, each with the state
and rules of one job:

* :class:`~wsagent.engine.cluster.link.RedisLink`: the connections, and whether Redis answers;
* :class:`~wsagent.engine.cluster.liveness.Liveness`: the heartbeat, which nodes are alive;
* :class:`~wsagent.engine.cluster.replication.Replicator`: this node's runs and their logs in Redis;
* :class:`~wsagent.engine.cluster.follower.Following`: the runs it follows from other nodes (:class:`Mirror`);
* :class:`~wsagent.engine.cluster.clients.Clients`: client ids and per-user counts;
* :mod:`~wsagent.engine.cluster.messages`: the typed control messages, dispatched here by one table
  (:meth:`RedisBroker._handlers`).

While Redis is out of reach the node goes on alone: its own runs stream to its
own clients untouched, new runs start, limits count this node only; whatever
needs another node raises :class:`~wsagent.core.errors.ClusterUnavailable`, and the
runs it follows end for their watchers with a retryable ``cluster_unavailable``.
Once Redis answers again, the node writes back what it holds (runs, their
retained logs, client ids, counts) and follows again.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import secrets
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

from redis.asyncio.client import Pipeline

from ...core.events import Answer, Thinking
from ..broker import Handover, LocalBroker, Mailbox, mint_key
from ..run import NotAnswerable, Run, Subscription, Watch, kind_of, terminal_outcome
from . import messages
from .clients import Clients
from .follower import Following, Mirror
from .link import COMMAND_TIMEOUT, DOWN_ERRORS, Link, RedisLink
from .liveness import Liveness
from .names import BROADCAST, KEY, RUN_CHANNELS, name, shared
from .replication import FLUSH_EVERY, Replicator
from .takeover import Claimed, claim_command, claimed, history, takeover_set
from .wire import Command

__all__ = ["RedisBroker", "default_node_id"]

log = logging.getLogger("wsagent.cluster")

_questions = itertools.count(1)

#: Seconds at least that a run taken over waits for its client (its own grace if longer): the client, or
#: the node where it resumed, finds the new producer within a few.
TAKEOVER_GRACE = 10.0


def default_node_id() -> str:
    """Host name, pid and 16 random bits: unique per process, readable in logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


class RedisBroker:
    """A node of a cluster: a :class:`~wsagent.engine.broker.LocalBroker` whose runs, client ids and counts the
    other nodes see through Redis at ``url``."""

    answers_at_once = False  # (its commands wait for Redis, bounded by asyncio.timeout: in a task)

    def __init__(self, url: str, node: str, budget: int = 64 * 1024 * 1024,
                 budget_per_user: int = 8 * 1024 * 1024) -> None:
        """Raises ``SystemExit`` (one line) for a URL that cannot be followed."""
        self.node = node
        self.local = LocalBroker(budget, budget_per_user)
        self.link = RedisLink(url, node, self)
        self.liveness = Liveness(self.link, node, self)
        self.following = Following(self.link, self.liveness, node)
        #: This process among those that ran as ``node``: a resumable run's producer is a node and a life.
        self.life = secrets.token_hex(4)
        self.replication = Replicator(self.link, node, self._more, self.life)
        #: ``--takeover``: this node claims the resumable runs of nodes that die, and hands each to this
        #: (with its checkpoint, None if it has none), which goes on with it or ends it.
        self._on_takeover: Callable[[Run, Handover], None] | None = None
        self._untaken: list[Claimed] = []  # claimed, not yet read (Redis failed between): tried at each beat
        self.taken_over = 0
        self._handed_over = False  # runs left to other nodes: this node leaves as one that died
        self.clients = Clients(self.link, self.liveness, self.local, lambda: self.replication.soon(FLUSH_EVERY))
        self.local.on_drop.append(self.replication.dropped)
        self._asked: dict[str, asyncio.Future[Any]] = {}  # questions to other nodes, by number
        self._adding: set[str] = set()  # keys of runs being registered (a follower may ask about one already)
        self._beating: asyncio.Task[None] | None = None
        self._handlers: dict[type[messages.Message], Callable[[Any], None]] = {
            messages.Cancel: self._on_cancel, messages.Forget: self._on_forget,
            messages.Follow: self._on_follow, messages.Unfollow: self._on_unfollow,
            messages.Gone: self._on_gone, messages.Hello: self._on_hello,
            messages.Adopt: self._on_adopt, messages.Leave: self._on_leave,
            messages.Evict: self._on_evict, messages.Send: self._on_send,
            messages.AskCancel: self._on_question, messages.AskSnapshot: self._on_question,
            messages.AskCancelAgent: self._on_question, messages.AskApprove: self._on_person,
            messages.AskSteer: self._on_person, messages.Answer: self._on_answer,
        }

    # -- lifecycle -------------------------------------------------------

    @property
    def url(self) -> str:
        """The Redis URL, without its password."""
        return self.link.url

    @property
    def on_link(self) -> Callable[[Link], None]:
        return self.link.on_change

    @on_link.setter
    def on_link(self, told: Callable[[Link], None]) -> None:
        self.link.on_change = told

    async def start(self) -> RedisBroker:
        """Join the cluster (or start alone, and join once Redis answers)."""
        await self.liveness.beat()
        if not self.link.up:
            log.warning("cluster: Redis at %s is out of reach; node %s runs alone until it answers",
                        self.url, self.node)
        self._beating = asyncio.get_running_loop().create_task(self.liveness.run())
        return self

    async def close(self) -> None:
        """Leave the cluster: the other nodes see this node gone at once (its runs have ended)."""
        if self._beating is not None:
            self._beating.cancel()
            await asyncio.gather(self._beating, return_exceptions=True)
        if self.link.up:
            try:
                self.replication.flush()
                await self.link.send([("PING",)])  # after everything written before it
            except DOWN_ERRORS:
                pass
            else:
                await self.liveness.leave(handed_over=self._handed_over)
        await self.link.close()

    def hand_over(self, run: Run) -> bool:
        """Stop producing ``run`` without ending it in Redis: at :meth:`close` this node's beat says it is
        dead, and another node claims the run at its next heartbeat (within a second)."""
        if self.on_takeover is None or not run.resumable or run.finished or not self.link.up:
            return False
        self.replication.surrendered(run)
        self._handed_over = True
        run.hand_off("this node stopped; another goes on with this run: resume it from the last seq you received")
        return True

    def cluster_status(self) -> dict[str, Any]:
        return {"node": self.node, **self.link.status(), "nodes": len(self.liveness.live),
                "followed_runs": len(self.following.mirrors), "batches": self.replication.batches,
                "taken_over": self.taken_over}

    @property
    def on_takeover(self) -> Callable[[Run, Handover], None] | None:
        return self._on_takeover

    @on_takeover.setter
    def on_takeover(self, take: Callable[[Run, Handover], None] | None) -> None:
        """Set once the node's app can go on with runs: it claims at once what a process before it left under
        its node id (restarted within NODE_TTL, the others never took it for dead)."""
        self._on_takeover = take
        if take is not None and self.link.up:
            self.link.spawn(self._claim(frozenset({self.node})))

    # -- what the parts ask of the node ----------------------------------

    def received(self, channel: str, data: str) -> None:
        if channel == BROADCAST:
            self.local.deliver_all(data)
        elif channel.startswith(RUN_CHANNELS):
            self.following.received(channel, data)
        else:
            message = messages.decode(data)
            if message is not None:
                self._handlers[type(message)](message)

    def channels(self) -> list[str]:
        return self.following.channels()

    def subscribed(self) -> None:
        self.following.subscribed()

    def down(self) -> None:
        self.following.down()

    def refresh(self, pipe: Pipeline) -> None:
        self.replication.refresh(pipe, self.local.active_runs())
        self.clients.refresh(pipe)

    async def write_back(self) -> None:
        """Every run this node keeps, with its log, each user's counts here, and each client id."""
        commands: list[Command] = []
        self.replication.write_back(commands, self.local)
        claims = self.clients.write_back(commands, self.local.users())
        replies = await self.link.send(commands)
        self.clients.taken(replies[len(replies) - claims:] if claims else [])

    def beaten(self, live: frozenset[str], dead: frozenset[str], silent: bool) -> None:
        if dead and self.on_takeover is not None:
            self.link.spawn(self._claim(dead))
        elif self._untaken:
            self.link.spawn(self._take_claimed())
        if silent:  # the others may have taken this node for dead
            self.link.spawn(self._still_own())
        self.replication.beaten(live)
        for run in self.local.active_runs():  # a client whose node died left its run: the grace starts
            holder = run.holder
            if holder is not None and holder.rpartition("/")[0] not in live:
                run.leave_remote(holder)
        self.following.beaten(live)

    async def _claim(self, dead: frozenset[str]) -> None:
        """Claim the resumable runs of the ``dead`` nodes (one script each: no other node gets them) and go on
        with each (see :mod:`~wsagent.engine.cluster.takeover`); those claimed whose history could not be read
        (Redis failed between) are read again at the next beat, never left."""
        try:
            replies = await self.link.send([claim_command(node, self.node, self.life) for node in sorted(dead)])
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return
        for reply in replies:
            if isinstance(reply, Exception):
                log.warning("cluster: node %s could not claim runs: %s", self.node, reply)
        self._untaken += [run for reply in replies for run in claimed(reply)]
        await self._take_claimed()

    async def _take_claimed(self) -> None:
        runs, self._untaken = self._untaken, []
        if not runs:
            return
        try:
            reads = await self.link.send([command for run in runs for command in (
                ("XRANGE", name("log", run.key), "-", "+"),
                ("HMGET", name("run", run.key), "request", "step", "stepend", "cancel"),
                ("GET", name("answer", run.key)))])
        except DOWN_ERRORS as exc:
            self._untaken += runs
            self.link.lost(exc)
            return
        for i, run in enumerate(runs):
            entries, fields, answer = reads[3 * i:3 * i + 3]
            request, step, step_end, cancel = fields if isinstance(fields, list) else (None, None, None, None)
            try:
                taken = self._take(run, entries if isinstance(entries, list) else [], request,
                                   answer if isinstance(answer, str) else "", step, int(step_end or 0))
                if taken is not None and cancel is not None:  # cancelled while nobody produced it
                    taken.cancel(cancel)
            except Exception:  # (a defect: the others are taken over all the same, and this one is logged)
                log.exception("cluster: node %s could not take run %s over", self.node, run.key)

    async def _owns(self, run: Run) -> bool:
        """Whether this process still produces ``run`` (Redis's ``owner`` and ``life``; False if Redis cannot say:
        a node cut off from it may have been taken for dead)."""
        try:
            (held,) = await self.link.send([("HMGET", name("run", run.key), "owner", "life")])
        except DOWN_ERRORS:
            return False
        return isinstance(held, list) and (held[0] is None or held == [self.node, self.life])

    async def _still_own(self) -> None:
        """After a silence past NODE_TTL (a paused process, a partition): each resumable run another node took
        over meanwhile ends here, its clients told ``taken_over`` (the fence kept its writes out of Redis), and
        its producer is closed without cancelling what it read upstream (the new producer reads it)."""
        runs = [run for run in self.local.active_runs() if run.resumable]
        if not runs:
            return
        try:
            replies = await self.link.send([("HMGET", name("run", run.key), "owner", "life") for run in runs])
        except DOWN_ERRORS as exc:
            self.link.lost(exc)
            return
        for run, reply in zip(runs, replies, strict=True):
            if isinstance(reply, list) and reply[0] is not None and reply != [self.node, self.life]:
                log.warning("cluster: node %s was taken for dead; node %s took run %s over", self.node,
                            reply[0], run.key)
                self.replication.surrendered(run)
                run.hand_off(f"node {reply[0]} took this run over while this node was unreachable; resume it on "
                             "any node (this node relayed what the cluster may not have: from the last seq it "
                             "had, or from the start)")

    def _take(self, claimed_run: Claimed, entries: list[Any], request: str | None, answer: str, step: str | None,
              step_end: int) -> Run | None:
        """Go on with a run this node claimed: a local run holding the history of its stream (``entries``), whose
        log goes on after the last (a run continued by its answer: with its ``request`` and ``answer`` so far; an
        agent's: from its last ``step`` checkpoint, before seq ``step_end``)."""
        meta = claimed_run.meta
        rows, checkpoint = history(entries)
        if step is not None and (not rows or rows[-1][0] < step_end):
            checkpoint = None  # (a position of an older step's model call)
        if rows and terminal_outcome(rows[-1][1]) is not None or self.local.run_here(claimed_run.key) is not None:
            self.link.write([("SREM", takeover_set(self.node), claimed_run.key)])  # it had ended
            return None
        run = Run(str(meta["id"]), key=claimed_run.key, user=meta.get("user"), scope=str(meta["scope"]),
                  buffer_bytes=int(meta["buffer"]), replay_bytes=int(meta["replay"]), agent=meta.get("agent"),
                  workflow=meta.get("workflow"), grace=float(meta["grace"]))
        try:
            self.local.register(run, run.grace)
        except ValueError:  # its id names another run here (a newer one of its user; an anonymous connection's
            self.local.register(run, run.grace, by_id=False)  # numbered alike on another node): by key alone
        self.taken_over += 1
        run.taken_over(rows, checkpoint, max(run.grace, TAKEOVER_GRACE), claimed_run.authors, step, step_end)
        run.resume_request = request
        self.replication.taken(run, rows[-1][0] if rows else 0, answer)
        run.still_owned = partial(self._owns, run)
        step_text = "".join(payload for seq, code, payload in rows if seq >= step_end and kind_of(code) == Answer.kind)
        run.outlet = self.replication
        log.warning("cluster: node %s takes over run %s after seq %d", self.node, run.key, rows[-1][0] if rows else 0)
        assert self.on_takeover is not None
        begun = step is not None and any(seq >= step_end and kind_of(code) in (Thinking.kind, Answer.kind)
                                         for seq, code, _ in rows)
        self.on_takeover(run, Handover(checkpoint, answer, step, step_text if step is not None else "", begun))
        return run

    def _more(self, commands: list[Command]) -> None:
        self.clients.due(commands)

    # -- control messages (one handler per type) ---------------------------

    def _on_cancel(self, message: messages.Cancel) -> None:  # a follower passing its watcher's cancel on
        self.local.cancel_here(message.key, message.reason)

    def _on_forget(self, message: messages.Forget) -> None:  # a newer run took its id on another node
        run = self.local.run_here(message.key)
        if run is not None and run.finished:
            self.local.forget(run)

    def _on_follow(self, message: messages.Follow) -> None:
        if self.local.run_here(message.key) is not None:
            self.replication.followed(message.key, message.node, True)
        elif message.key not in self._adding:  # none of this process's: its follower need not wait for it
            self.following.tell(message.node, messages.Gone(message.key))

    def _on_unfollow(self, message: messages.Unfollow) -> None:
        self.replication.unfollowed(message.key, message.node)

    def _on_gone(self, message: messages.Gone) -> None:
        self.following.gone(message.key)

    def _on_hello(self, message: messages.Hello) -> None:  # a process started as that node: its past is gone
        self.following.restarted(message.node)
        for run in self.local.active_runs():
            holder = run.holder
            if holder is not None and holder.rpartition("/")[0] == message.node:
                run.leave_remote(holder)

    def _on_adopt(self, message: messages.Adopt) -> None:
        run = self.local.run_here(message.key)
        if run is not None:
            run.adopt_remote(message.holder)

    def _on_leave(self, message: messages.Leave) -> None:
        run = self.local.run_here(message.key)
        if run is not None:
            run.leave_remote(message.holder)

    def _on_evict(self, message: messages.Evict) -> None:
        self.clients.evicted(message.client, message.holder)

    def _on_send(self, message: messages.Send) -> None:
        self.local.deliver(message.client, message.frame)

    def _on_question(self, question: messages.AskCancel | messages.AskSnapshot | messages.AskCancelAgent) -> None:
        """Answer on the asker's channel (None: no such run here)."""
        run = self.local.run_here(question.key)
        answer: Any = None
        if run is not None:
            if isinstance(question, messages.AskCancel):
                answer = self.local.cancel_here(run.key, question.reason)
            elif isinstance(question, messages.AskSnapshot) and run.state is not None:
                answer = run.state.snapshot()
            elif isinstance(question, messages.AskCancelAgent) and run.controller is not None:
                answer = run.controller.cancel(question.agent)
        self.following.tell(question.asker, messages.Answer(question.ask, answer))

    def _on_person(self, question: messages.AskApprove | messages.AskSteer) -> None:
        """A person's answer or message for a run produced here: "ok" once taken, else [code, message]."""
        run = self.local.run_here(question.key)
        answer: str | list[str] = "ok"
        try:
            if run is None:
                raise NotAnswerable("run_ended", "the run has ended")
            if isinstance(question, messages.AskApprove):
                if question.holder and run.watch is Watch.ORPHANED and run.holder is None:
                    run.adopt_remote(question.holder)
                run.answer(question.call_id, question.approved == "1", question.reason or None)
            else:
                run.steer(question.content)
        except NotAnswerable as exc:
            answer = [exc.code, exc.message]
        self.following.tell(question.asker, messages.Answer(question.ask, answer))

    def _on_answer(self, message: messages.Answer) -> None:
        waiting = self._asked.pop(message.ask, None)
        if waiting is not None and not waiting.done():
            waiting.set_result(message.answer)

    async def _question(self, run: Mirror, ask: Callable[[str, str], messages.Message]) -> Any:
        """Ask the node that produces ``run`` (``ask`` makes the question of its number and this node);
        its answer, or None if it gives none within COMMAND_TIMEOUT."""
        number = str(next(_questions))
        waiting = self._asked[number] = asyncio.get_running_loop().create_future()
        try:
            self.following.tell(run.node, ask(number, self.node))
            async with asyncio.timeout(COMMAND_TIMEOUT):
                return await waiting
        except TimeoutError:
            return None
        finally:
            self._asked.pop(number, None)

    # -- runs ------------------------------------------------------------

    async def add_run(self, run: Run, keep_after_finish: float) -> None:
        if self.local.has_id(run.scope, run.id):
            raise ValueError(f"run id {run.id!r} is already in use")
        if not run.key:
            run.key = mint_key()
        first: list[Command] = []
        if run.user is not None:  # counted everywhere before it starts
            _, runs = self.local.user_counts(run.user)
            first.append(("HSET", name("user", run.user), f"r:{self.node}", runs + 1))
        self._adding.add(run.key)
        try:
            await self.replication.add(run, first)
        finally:
            self._adding.discard(run.key)
        try:
            self.local.register(run, keep_after_finish)
        except ValueError:  # another run of its scope took the id while this one was written
            self.replication.erase(run)
            raise
        run.outlet = self.replication
        if run.resumable:
            run.still_owned = partial(self._owns, run)
        if run.user is not None:
            self.clients.changed(run.user)
            run.on_finish.append(lambda ended: self.clients.changed(str(ended.user)))
        self.replication.dirty(run)

    async def run_by_key(self, key: str) -> Run | None:
        run: Run | None = self.local.run_here(key) or self.following.mirrors.get(key)
        if run is not None or not KEY.fullmatch(key):
            return run
        fields = await self.link.ask(self.link.redis.hgetall(name("run", key)))
        if not fields or "meta" not in fields:
            return None
        meta = json.loads(fields["meta"])
        meta["node"] = fields.get("owner") or meta["node"]  # (a run taken over: its producer now)
        if meta["node"] == self.node:  # a run this node no longer keeps
            return None
        return self.following.mirror(key, meta, json.loads(fields.get("origins") or "[[null, null]]"))

    async def run_by_id(self, scope: str, run_id: str) -> Run | None:
        run = await self.local.run_by_id(scope, run_id)
        if run is not None or not shared(scope):
            return run
        key = await self.link.ask(self.link.redis.get(name("id", scope, run_id)))
        run = None if not isinstance(key, str) else await self.run_by_key(key)
        if run is None or run.scope != scope or run.id != run_id:  # found by id: the asking scope's own, exactly
            return None
        return run

    async def follow(self, run: Run, after: int = 0) -> Run:
        if not isinstance(run, Mirror):
            return run
        return await self.following.follow(run, after)

    def active_runs(self) -> list[Run]:
        return self.local.active_runs()

    async def snapshot(self, run: Run) -> tuple[dict[str, Any], ...] | None:
        if not isinstance(run, Mirror):
            return await self.local.snapshot(run)
        if run.workflow is None:
            return None
        answer = await self._question(run, lambda ask, asker: messages.AskSnapshot(ask, asker, run.key))
        return tuple(answer) if isinstance(answer, list) else None

    async def cancel_agent(self, run: Run, agent: str) -> bool:
        if not isinstance(run, Mirror):
            return await self.local.cancel_agent(run, agent)
        return run.workflow is not None and await self._question(
            run, lambda ask, asker: messages.AskCancelAgent(ask, asker, run.key, agent)) is True

    async def approve(self, run: Run, call_id: str, approved: bool, reason: str | None,
                      watcher: Subscription | None = None) -> None:
        if not isinstance(run, Mirror):
            return await self.local.approve(run, call_id, approved, reason, watcher)
        holder = run.holder_for(watcher) if watcher is not None else ""
        await self._person(run, lambda ask, asker: messages.AskApprove(ask, asker, run.key, call_id,
                                                                        "1" if approved else "0", reason or "",
                                                                        holder))

    async def steer(self, run: Run, content: str) -> None:
        if not isinstance(run, Mirror):
            return await self.local.steer(run, content)
        await self._person(run, lambda ask, asker: messages.AskSteer(ask, asker, run.key, content))

    async def _person(self, run: Mirror, ask: Callable[[str, str], messages.Message]) -> None:
        self.link.require_up()
        answer = await self._question(run, ask)
        if answer == "ok":
            return
        if isinstance(answer, list) and len(answer) == 2:
            raise NotAnswerable(str(answer[0]), str(answer[1]))
        raise NotAnswerable("run_ended", f"the node producing run {run.id} did not answer (it may have stopped)")

    def forget(self, run: Run) -> None:
        self.local.forget(run)
        if isinstance(run, Mirror):  # its node forgets it too: it would still find it by id, and refuse the id
            self.following.unfollow(run)
            self.following.tell(run.node, messages.Forget(run.key))
        self.replication.erase(run)

    async def runs_of(self, user: str) -> int:
        return await self.clients.total(user, "r", self.local.user_counts(user)[1])

    async def cancel(self, key: str, reason: str) -> bool:
        if self.local.cancel_here(key, reason):
            return True
        if self.local.run_here(key) is not None:
            return False
        run = await self.run_by_key(key)
        if not isinstance(run, Mirror):
            return False
        self.link.require_up()
        answer = await self._question(run, lambda ask, asker: messages.AskCancel(ask, asker, key, reason))
        if answer is None and run.resumable and not run.finished:
            # its producer did not answer (it died, not yet taken for dead): the node that takes the run over
            # finds the cancel with it, and cancels it at once
            await self.link.ask(self.link.redis.hset(name("run", key), "cancel", reason))
            return True
        return answer is True

    # -- users and client ids ----------------------------------------------

    async def user_connected(self, user: str) -> int:
        return await self.clients.connected(user, await self.local.user_connected(user))

    def user_disconnected(self, user: str) -> None:
        self.local.user_disconnected(user)
        self.clients.changed(user)

    async def claim_client(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        return await self.clients.claim(client_id, mailbox, policy)

    def release_client(self, client_id: str, mailbox: Mailbox) -> None:
        self.clients.release(client_id, mailbox)

    async def broadcast(self, frame: str) -> None:
        await self.clients.broadcast(frame)

    async def send_to(self, client_id: str, frame: str) -> bool:
        return await self.clients.send_to(client_id, frame)

    # -- the replay budget (the local broker's) ------------------------------

    @property
    def budget(self) -> int:
        return self.local.budget

    @budget.setter
    def budget(self, value: int) -> None:
        self.local.budget = value

    @property
    def budget_per_user(self) -> int:
        return self.local.budget_per_user

    @budget_per_user.setter
    def budget_per_user(self, value: int) -> None:
        self.local.budget_per_user = value

    @property
    def kept_bytes(self) -> int:
        return self.local.kept_bytes

    @property
    def evictions(self) -> int:
        return self.local.evictions

