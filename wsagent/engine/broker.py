"""The broker: where a node finds runs, delivers cancels, and keeps client ids and per-user counts.

The engine and the handlers depend on the :class:`Broker` interface only, as a
Centrifuge node depends on its broker: :class:`LocalBroker` keeps everything in
this process (the embedded default); a shared implementation (Redis) plugs in
behind the same methods without the rest of the engine changing.

Runs are found two ways:

* by ``key``, minted here for every run and unguessable: whoever presents it
  may resume, attach to or cancel the run (with the run's own user, if it has
  one), from any socket;
* by ``id`` within a *scope*: the user's, for an authenticated client, or the
  connection's own, for an anonymous one. An id is unique in its scope while
  its run is kept, and ids of different scopes never meet.
"""

from __future__ import annotations

import asyncio
import os
from binascii import b2a_base64
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from .run import Run, Subscription, Watch

__all__ = ["Broker", "LocalBroker", "Mailbox", "mint_key", "scope_of", "KEPT_RUN_COST"]

#: What a finished run kept for a resume costs besides its log's characters (the run, its log's deques, its
#: registrations), counted against the replay budgets with them: about 4.5 KiB by tracemalloc, 6.8 KiB of RSS per
#: run over 13,120 kept chats (measured). Counted at 0, a budget of 64 MiB held 157 MiB of runs with tiny logs.
KEPT_RUN_COST = 6144


def mint_key() -> str:
    """A run key: 128 random bits, URL-safe (``secrets.token_urlsafe(16)``, without its four Python calls)."""
    return b2a_base64(os.urandom(16), newline=False)[:22].translate(_URL_SAFE).decode()


_URL_SAFE = bytes.maketrans(b"+/", b"-_")


def scope_of(user: str | None, connection_id: str) -> str:
    """Where a client's run ids live: its user's runs, or (anonymous) its connection's."""
    return f"user:{user}" if user is not None else f"conn:{connection_id}"


@dataclass(frozen=True, slots=True)
class Handover:
    """Where a run taken over from a node that died goes on (``--takeover``): the checkpoint after the log's
    last entry (a background response's position), the answer so far (a chat completion continued by it),
    and for an agent its last step checkpoint with the answer text streamed since."""

    checkpoint: str | None = None
    answer: str = ""
    step: str | None = None
    step_text: str = ""
    step_begun: bool = False  # events of the step's model call went out (its reasoning, perhaps, alone)


class Mailbox(Protocol):
    """A client addressed by its client id (``/ws/{client_id}``)."""

    def put(self, frame: str) -> bool:
        """Queue ``frame`` without waiting; False if the client is gone or too far behind."""
        ...

    def evict(self) -> None:
        """A newer connection took this client id: close this one (4009)."""
        ...


class Broker(Protocol):
    """What a node shares with the others (with itself alone, in-process).

    The methods that may need the other nodes are coroutines; in-process they
    answer at once. Those that cannot be answered because the cluster is out of
    reach raise :class:`~wsagent.core.errors.ClusterUnavailable`.

    Finished runs are kept for a resume within a replay budget (``budget`` bytes
    in all, ``budget_per_user`` per owner; SIGHUP may change both): ``kept_bytes``
    is what they hold, ``evictions`` how many were forgotten early to stay under it.
    """

    budget: int
    budget_per_user: int
    #: Given each run of a node that died that this node goes on with, and where it goes on from (``--takeover``;
    #: a process alone takes nothing over).
    on_takeover: Callable[[Run, Handover], None] | None
    #: Its coroutines never wait (in-process): a message that needs nothing else is handled without a task
    #: (:meth:`~wsagent.transport.connections.StreamConnection.serve`).
    answers_at_once: bool

    @property
    def kept_bytes(self) -> int: ...

    @property
    def evictions(self) -> int: ...

    async def close(self) -> None:
        """Leave the cluster (in-process: nothing to release)."""
        ...

    def hand_over(self, run: Run) -> bool:
        """Stop producing ``run`` here, for another node to go on with it (``--takeover``, a node that stops
        past its drain); False if none can (in-process, or a run no other node can take over)."""
        ...

    def cluster_status(self) -> dict[str, Any] | None:
        """The node's view of its cluster (None: this process is alone)."""
        ...

    async def add_run(self, run: Run, keep_after_finish: float) -> None:
        """Register ``run`` (it gets its key); ``ValueError`` if its id is in use in its scope."""
        ...

    async def run_by_key(self, key: str) -> Run | None: ...

    async def run_by_id(self, scope: str, run_id: str) -> Run | None: ...

    async def follow(self, run: Run, after: int = 0) -> Run:
        """``run``, ready to be subscribed to from seq ``after``: a run produced elsewhere is followed
        from the cluster's copy of its log (the node's one follower of it is returned), once that copy
        has what the client says it saw (or, if it never comes, a resume check refuses it)."""
        ...

    def active_runs(self) -> list[Run]:
        """The runs this node produces that are in flight."""
        ...

    async def snapshot(self, run: Run) -> tuple[dict[str, Any], ...] | None:
        """Each agent's status and answer so far, for a workflow ``run`` (None for any other run)."""
        ...

    async def cancel_agent(self, run: Run, agent: str) -> bool:
        """Stop one agent of a workflow ``run``; False if it has no such agent running."""
        ...

    def forget(self, run: Run) -> None:
        """Stop keeping the finished ``run`` for a resume (a newer run takes its id)."""
        ...

    async def approve(self, run: Run, call_id: str, approved: bool, reason: str | None,
                      watcher: Subscription | None = None) -> None:
        """A person's answer to ``run``'s approval request ``call_id``, wherever the run is produced.
        ``watcher``: the answering socket's subscription to the run, if it watches it; a run whose own client
        has gone takes it for its own client (the person who answers is the one it waits for now). Raises
        :class:`~wsagent.engine.run.NotAnswerable` if the run cannot take the answer."""
        ...

    async def steer(self, run: Run, content: str) -> None:
        """A person's message for agent ``run``'s next step, wherever it is produced (or
        :class:`~wsagent.engine.run.NotAnswerable`)."""
        ...

    async def runs_of(self, user: str) -> int:
        """Runs of ``user`` in flight."""
        ...

    async def cancel(self, key: str, reason: str) -> bool:
        """Stop the run with ``key`` wherever it is produced; False if no such run is in flight."""
        ...

    async def user_connected(self, user: str) -> int:
        """Count a connection of ``user``; returns how many it now has."""
        ...

    def user_disconnected(self, user: str) -> None: ...

    async def claim_client(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        """Bind ``client_id`` to ``mailbox``: ``replace`` evicts its holder, ``reject`` refuses (False)."""
        ...

    def release_client(self, client_id: str, mailbox: Mailbox) -> None: ...

    async def broadcast(self, frame: str) -> None:
        """Queue ``frame`` for every addressed client."""
        ...

    async def send_to(self, client_id: str, frame: str) -> bool:
        """Queue ``frame`` for the client holding ``client_id``; False if none does (or it is too far behind)."""
        ...


class LocalBroker:
    """Everything in this process's memory.

    A finished run is kept for a resume for its grace period, but the logs of
    all kept runs together stay under ``budget`` bytes, and one user's (an
    anonymous client's: its connection's) under ``budget_per_user``: past
    either, the oldest finished run is forgotten first. Without a total bound,
    ten sockets starting ten runs a second with a 60 s grace grew the server
    to 1 GiB in 20 s.
    """

    answers_at_once = True

    def __init__(self, budget: int = 64 * 1024 * 1024, budget_per_user: int = 8 * 1024 * 1024) -> None:
        self.budget = budget
        self.budget_per_user = budget_per_user
        self._kept: dict[Run, int] = {}  # finished runs kept for resume, oldest first, and their log sizes
        self._kept_by_owner: Counter[str] = Counter()  # their bytes by owner (Run.owner)
        self._kept_of: dict[str, dict[Run, None]] = {}  # their runs by owner, oldest first: evicting finds one at once
        self.kept_bytes = 0
        self.evictions = 0
        self._by_key: dict[str, Run] = {}
        self._by_id: dict[tuple[str, str], Run] = {}
        self._user_runs: Counter[str] = Counter()
        self._user_conns: Counter[str] = Counter()
        self._clients: dict[str, Mailbox] = {}
        #: Told each run this broker stops keeping (in a cluster: its id is freed in Redis).
        self.on_drop: list[Callable[[Run], None]] = []
        self.on_takeover: Callable[[Run, Handover], None] | None = None

    async def close(self) -> None:
        """Nothing to release in-process (a cluster's broker leaves the cluster)."""

    def cluster_status(self) -> dict[str, Any] | None:
        """The node's view of its cluster (None: this process is alone)."""
        return None

    # -- runs ------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[Run]:
        return iter(list(self._by_key.values()))

    async def add_run(self, run: Run, keep_after_finish: float) -> None:
        self.register(run, keep_after_finish)

    def hand_over(self, run: Run) -> bool:
        return False

    def register(self, run: Run, keep_after_finish: float, by_id: bool = True) -> None:
        """:meth:`add_run` in this process (``by_id`` False: found by its key alone)."""
        if not run.key:
            run.key = mint_key()
        if by_id and (run.scope, run.id) in self._by_id:
            raise ValueError(f"run id {run.id!r} is already in use")
        self._by_key[run.key] = run
        if by_id:
            self._by_id[run.scope, run.id] = run
        if run.user is not None:
            self._user_runs[run.user] += 1

        def forget(finished: Run) -> None:
            if finished.user is not None:
                self._user_runs[finished.user] -= 1
                if not self._user_runs[finished.user]:
                    del self._user_runs[finished.user]
            if keep_after_finish > 0:
                self._keep(finished)
                asyncio.get_running_loop().call_later(keep_after_finish, self._drop, finished)
            else:
                self._drop(finished)

        run.on_finish.append(forget)

    def _keep(self, run: Run) -> None:
        size = run.log_bytes + KEPT_RUN_COST
        owner = run.owner
        self._kept[run] = size
        self._kept_of.setdefault(owner, {})[run] = None
        self._kept_by_owner[owner] += size
        self.kept_bytes += size
        # The owner's own first: a client over its budget never evicts another's run while its own can go.
        while self._kept_by_owner[owner] > self.budget_per_user and owner in self._kept_of:
            self._evict(next(iter(self._kept_of[owner])))
        while self.kept_bytes > self.budget and self._kept:
            self._evict(next(iter(self._kept)))

    def _evict(self, run: Run) -> None:
        self.evictions += 1
        self._drop(run)

    def _drop(self, run: Run) -> None:
        size = self._kept.pop(run, None)
        if size is not None:
            owner = run.owner
            self.kept_bytes -= size
            self._kept_by_owner[owner] -= size
            runs = self._kept_of[owner]
            del runs[run]
            if not runs:
                del self._kept_of[owner], self._kept_by_owner[owner]
        if self._by_key.get(run.key) is run:
            for dropped in self.on_drop:
                dropped(run)
            del self._by_key[run.key]
        if self._by_id.get((run.scope, run.id)) is run:
            del self._by_id[run.scope, run.id]
        run.release()

    async def run_by_key(self, key: str) -> Run | None:
        return self._by_key.get(key)

    def run_here(self, key: str) -> Run | None:
        """:meth:`run_by_key` among this process's runs."""
        return self._by_key.get(key)

    def has_id(self, scope: str, run_id: str) -> bool:
        return (scope, run_id) in self._by_id

    async def run_by_id(self, scope: str, run_id: str) -> Run | None:
        return self._by_id.get((scope, run_id))

    async def follow(self, run: Run, after: int = 0) -> Run:
        return run

    async def snapshot(self, run: Run) -> tuple[dict[str, Any], ...] | None:
        return run.state.snapshot() if run.state is not None else None

    async def cancel_agent(self, run: Run, agent: str) -> bool:
        return run.controller is not None and run.controller.cancel(agent)

    def active_runs(self) -> list[Run]:
        return [run for run in self._by_key.values() if not run.finished]

    def forget(self, run: Run) -> None:
        self._drop(run)

    async def approve(self, run: Run, call_id: str, approved: bool, reason: str | None,
                      watcher: Subscription | None = None) -> None:
        if watcher is not None and run.watch is Watch.ORPHANED and not run.finished:
            run.promote(watcher)
        run.answer(call_id, approved, reason)

    async def steer(self, run: Run, content: str) -> None:
        run.steer(content)

    async def runs_of(self, user: str) -> int:
        return self._user_runs.get(user, 0)

    async def cancel(self, key: str, reason: str) -> bool:
        return self.cancel_here(key, reason)

    def cancel_here(self, key: str, reason: str) -> bool:
        """:meth:`cancel` of a run this process produces."""
        run = self._by_key.get(key)
        if run is None or run.finished:
            return False
        run.cancel(reason)
        return True

    # -- users -----------------------------------------------------------

    async def user_connected(self, user: str) -> int:
        self._user_conns[user] += 1
        return self._user_conns[user]

    def user_disconnected(self, user: str) -> None:
        self._user_conns[user] -= 1
        if not self._user_conns[user]:
            del self._user_conns[user]

    def user_counts(self, user: str) -> tuple[int, int]:
        """``user``'s connections and runs in flight in this process."""
        return self._user_conns.get(user, 0), self._user_runs.get(user, 0)

    def users(self) -> set[str]:
        """Every user with a connection or a run in flight in this process."""
        return {*self._user_conns, *self._user_runs}

    # -- client ids ------------------------------------------------------

    async def claim_client(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        return self.claim_client_here(client_id, mailbox, policy)

    def claim_client_here(self, client_id: str, mailbox: Mailbox, policy: str) -> bool:
        """:meth:`claim_client` among this process's clients."""
        old = self._clients.get(client_id)
        if old is not None and old is not mailbox:
            if policy == "reject":
                return False
            old.evict()
        self._clients[client_id] = mailbox
        return True

    def release_client(self, client_id: str, mailbox: Mailbox) -> None:
        self.release_client_here(client_id, mailbox)

    def release_client_here(self, client_id: str, mailbox: Mailbox) -> None:
        """:meth:`release_client` among this process's clients."""
        if self._clients.get(client_id) is mailbox:
            del self._clients[client_id]

    def mailbox(self, client_id: str) -> Mailbox | None:
        """The client of this process that holds ``client_id``, if any."""
        return self._clients.get(client_id)

    async def broadcast(self, frame: str) -> None:
        self.deliver_all(frame)

    def deliver_all(self, frame: str) -> int:
        """Queue ``frame`` for every addressed client of this process; returns how many took it."""
        return sum(1 for mailbox in list(self._clients.values()) if mailbox.put(frame))

    async def send_to(self, client_id: str, frame: str) -> bool:
        return self.deliver(client_id, frame)

    def deliver(self, client_id: str, frame: str) -> bool:
        """:meth:`send_to` a client of this process."""
        mailbox = self._clients.get(client_id)
        return mailbox is not None and mailbox.put(frame)
