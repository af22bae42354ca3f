"""A run: one stream of events (a model's answer, an agent's thoughts, a workflow), its log, and who watches it.

No sockets here. A producer pushes events in (:func:`wsagent.engine.pump.pump`);
each watcher (a :class:`Watcher`: in the server, a connection's outbox) is
woken and takes its frames with :meth:`Subscription.take`, rendered for its
wire (:mod:`wsagent.core.render`). Tests feed events in and take frames out at any
interleaving, as the SSE decoder is tested at any split.

A run's life is two small state machines, each a transition table in the
manner of h11's: an input a state does not list is a bug and raises
:class:`RunStateError` rather than being checked ad hoc. An entry's *author*
is the (agent, workflow) pair that produced it (the run's own is (None, None)).

* :class:`Phase`: ``RUNNING`` → ``INTERRUPTED`` (a cancel or a budget; the
  producer is being stopped) → ``FINISHED`` (exactly one terminal event is
  sealed). ``RUNNING`` ⇄ ``WAITING`` while an agent waits for a person to
  answer an approval request (:mod:`wsagent.core.person`): nothing is open
  upstream, the run's time budget is paused, its resume grace does not run
  (``approval_timeout`` bounds each wait instead), and a cancel works as
  everywhere. A run that was interrupted ends with its interruption, whatever the
  producer says afterwards. The producer runs as the run's own task
  (:meth:`Run.start`), and that task's end is an input too: a task that is
  over, however it got there (cancelled before its first step, when a cancel
  came in the same read as the run), ends a run that is not yet finished.
  So every run that started reaches ``FINISHED`` with exactly one terminal
  event, from every state.
* :class:`Watch`: ``WATCHED`` while its own client (the *primary* watcher)
  is connected, ``ORPHANED`` while it is gone; an orphaned run that is still
  producing is cancelled after its resume grace.

Backpressure, without an unbounded buffer anywhere:

* Text deltas not yet taken sit in one *tail* and merge: the deltas of one
  read leave as one frame, and while a client's socket is busy, fifty tokens
  become one frame. Nothing is dropped or reordered: any other event seals the
  tail first.
* Sealed events live in the run's log. When what the primary watcher has not
  taken passes ``buffer_bytes``, the producer stops (:meth:`Run.room`), so TCP
  backpressure reaches the model server. Only the run's own client holds the
  producer back: another watcher (an ``attach``) that falls out of the log is
  told so and dropped; it never slows the run.
* The log also keeps ``replay_bytes`` of events the primary has taken, so a
  client that dropped can resume from the last ``seq`` it saw. The log stores
  each event once (a text delta as its text, anything else as its JSON frame),
  and ``replay_bytes`` bounds those stored characters.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from itertools import islice
from typing import Any, Protocol, TypeVar

from ..core.errors import TAKEN_OVER, WsAgentError
from ..core.events import (
    KIND_NAMES,
    TEXT_CLASSES,
    TEXT_KINDS,
    Approval,
    ApprovalRequest,
    Cancelled,
    Checkpoint,
    Done,
    ErrorEvent,
    Event,
    Steered,
    TextEvent,
    UsageEvent,
    encode,
    encode_message,
    encode_text,
)
from ..core.metrics import Histogram
from ..core.person import Decision, attend
from ..core.render import Renderer
from ..core.workflow_state import Controller, WorkflowState
from .transcripts import Transcript

__all__ = ["Run", "Subscription", "Watcher", "Outlet", "Phase", "Watch", "RunStateError", "ReplayGap", "BadResume",
           "NotAnswerable", "MAX_STEERS",
           "failure_frames", "terminal_outcome"]

_now = time.monotonic

# A merged frame stops growing past this many characters: big enough that a slow client gets few
# frames, small enough that no single frame is a large allocation.
_MAX_MERGED = 16384
_KIND_BITS = 5
_KIND_MASK = (1 << _KIND_BITS) - 1
_USAGE = KIND_NAMES.index("usage")
_TERMINAL_KINDS = frozenset({Done.kind, ErrorEvent.kind, Cancelled.kind})
_ASK = ApprovalRequest.kind
_ANSWER = Approval.kind
#: The answer on a route that cannot carry one (the tutorial's): a call that needs approval never runs there.
_UNASKABLE = Decision(False, "nobody can answer an approval request on this route (use /ws/chat or /ws/ai-sdk)")
#: The answer to a request whose call id the run asked about before: an answer names a call by its id alone.
_REUSED = Decision(False, "this run already asked about a call with this id, so no answer could tell them apart: "
                          "denied (call ids must be unique within a run)")
#: How a steering message that was never delivered is explained, by the run's outcome (as AI SDK 7 says it).
_UNDELIVERED = {"done": "finished", "error": "error", "cancelled": "cancelled"}


def kind_of(code: int) -> int:
    """The event kind (its number in :data:`~wsagent.core.events.KIND_NAMES`) of a log entry's code."""
    return code & _KIND_MASK


def terminal_outcome(code: int) -> str | None:
    """The outcome (``done``, ``error``, ``cancelled``) if a log entry's ``code`` is a terminal event's."""
    kind = code & _KIND_MASK
    return KIND_NAMES[kind] if kind in _TERMINAL_KINDS else None


def failure_frames(sub: Subscription, frame: str) -> list[str]:
    """What ``sub``'s socket is told when it stops watching a run that goes on without it (it lagged; in a
    cluster, the run can no longer be followed): ``frame``, an ``error`` of the JSON protocol, rendered for its
    wire as a run's error is (on ``/ws/ai-sdk`` an ``error`` chunk of its request, then ``end``)."""
    if sub.renderer is None:
        return [frame]
    frames: list[str] = []
    sub.renderer.render(ErrorEvent.kind, frame, frames, (None, None))
    return frames


class ReplayGap(WsAgentError):
    code = "replay_gap"


class BadResume(WsAgentError):
    code = "bad_resume"


class NotAnswerable(WsAgentError):
    """An ``approve`` or ``steer`` the run cannot take; ``code`` says why, and nothing changed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class RunStateError(RuntimeError):
    """An input the run's state does not allow: a bug in a producer or a handler, never a client's doing."""


class _State(enum.Enum):
    """Members hash by identity (they are singletons, equal only to themselves): the transition tables' keys are
    pairs of them, looked up at every step of every run, and Enum's own ``__hash__`` is a Python call a member."""

    __hash__ = object.__hash__


class Phase(_State):
    RUNNING = "running"
    WAITING = "waiting"  # for a person's answer to an approval request
    INTERRUPTED = "interrupted"
    FINISHED = "finished"


_RUNNING = Phase.RUNNING


class Watch(_State):
    WATCHED = "watched"
    ORPHANED = "orphaned"


class _In(_State):
    PUSH = "push"
    INTERRUPT = "interrupt"
    END = "end"
    ADOPT = "adopt"  # a socket becomes the run's own client (the run starts, or a resume)
    LEAVE = "leave"  # the run's own client went away
    ASK = "ask"  # an approval request was sealed
    SETTLE = "settle"  # the last pending approval request was answered


_PHASES: dict[tuple[Phase, _In], Phase] = {
    (Phase.RUNNING, _In.PUSH): Phase.RUNNING,
    (Phase.RUNNING, _In.INTERRUPT): Phase.INTERRUPTED,
    (Phase.RUNNING, _In.END): Phase.FINISHED,
    (Phase.RUNNING, _In.ASK): Phase.WAITING,
    (Phase.WAITING, _In.ASK): Phase.WAITING,  # another agent of a workflow asks too
    (Phase.WAITING, _In.PUSH): Phase.WAITING,  # ... or streams on while one waits
    (Phase.WAITING, _In.SETTLE): Phase.RUNNING,
    (Phase.WAITING, _In.INTERRUPT): Phase.INTERRUPTED,  # a cancel, an approval timeout
    (Phase.WAITING, _In.END): Phase.FINISHED,  # a producer that ends without waiting for its answers
    (Phase.INTERRUPTED, _In.PUSH): Phase.INTERRUPTED,  # dropped: the producer is being stopped
    (Phase.INTERRUPTED, _In.INTERRUPT): Phase.INTERRUPTED,  # the first interruption stands
    (Phase.INTERRUPTED, _In.END): Phase.FINISHED,  # ... and is the terminal event
    (Phase.FINISHED, _In.INTERRUPT): Phase.FINISHED,  # a late cancel: nothing left to stop
}

_WATCHES: dict[tuple[Watch, _In], Watch] = {
    (Watch.WATCHED, _In.ADOPT): Watch.WATCHED,  # a resume from a new socket before the old one was noticed gone
    (Watch.ORPHANED, _In.ADOPT): Watch.WATCHED,
    (Watch.WATCHED, _In.LEAVE): Watch.ORPHANED,
}


_S = TypeVar("_S", Phase, Watch)


def _step(table: dict[tuple[_S, _In], _S], state: _S, event: _In) -> _S:
    try:
        return table[state, event]
    except KeyError:
        raise RunStateError(f"{event.value} is not allowed while {state.value}") from None


class Watcher(Protocol):
    """Whoever writes subscriptions' frames somewhere (in the server, a connection's outbox)."""

    def watch(self, sub: Subscription) -> None:
        """``sub`` is new: take its frames from now on (and now)."""
        ...

    def wake(self) -> None:
        """Something is pending: take it now, or as soon as the socket allows."""
        ...

    def unwatch(self, sub: Subscription) -> None:
        """``sub`` has ended: forget it."""
        ...


class Outlet(Protocol):
    """Where a run's sealed events go besides its own watchers (in a cluster: Redis, for other nodes)."""

    def dirty(self, run: Run) -> None:
        """``run`` has events the outlet has not had yet (:meth:`Run.entries`); called once per
        upstream read, so the outlet batches them and never pays per token."""
        ...


class _Log:
    """A run's sealed events, oldest first, as parallel deques of ints, strings and floats.

    Each entry is a code (the event's kind, and the index of its agent and
    workflow in the run's authors), a payload (a text delta's text, any other
    event's JSON frame) and the time it was born. Its seq is ``first`` plus its
    index; ``size`` counts payload characters.

    No object per entry, on purpose: ints, strings and floats are not tracked
    by CPython's cyclic collector, while an object (or a tuple) per entry is. At
    1,000 streams of 20 tokens/s objects per entry meant 40,000 new tracked
    objects a second: a collection every second or so, each pausing every
    stream for 5-25 ms, and every twentieth (an older generation) for 180 ms
    (measured).
    """

    __slots__ = ("first", "end", "codes", "payloads", "borns", "size")

    def __init__(self) -> None:
        self.first = 1
        #: The seq the next sealed event gets (``first`` plus the entries; kept, not computed: read nine times a run).
        self.end = 1
        self.codes: deque[int] = deque()
        self.payloads: deque[str] = deque()
        self.borns: deque[float] = deque()
        self.size = 0

    def append(self, code: int, payload: str, born: float) -> None:
        self.codes.append(code)
        self.payloads.append(payload)
        self.borns.append(born)
        self.size += len(payload)
        self.end += 1

    def popleft(self) -> int:
        """Forget the oldest event; returns its size."""
        self.first += 1
        self.codes.popleft()
        self.borns.popleft()
        size = len(self.payloads.popleft())
        self.size -= size
        return size

    def clear(self) -> None:
        self.first = self.end
        self.codes.clear()
        self.payloads.clear()
        self.borns.clear()
        self.size = 0


class Subscription:
    """One socket watching one run, with its own position in the run's log and its own renderer
    (``None``: the JSON protocol). With ``pauses``, it ends at an approval request still waiting for
    its answer (but those in ``answered``: its own client just answered them, and a copy of the run on
    another node may not have the answers yet), and its renderer's ``pause`` closes the response (an AI SDK
    request is one response)."""

    __slots__ = ("run", "watcher", "cursor", "delivered", "mark", "renderer", "ended", "born", "pauses", "answered")

    def __init__(self, run: Run, watcher: Watcher, cursor: int, delivered: int, renderer: Renderer | None,
                 pauses: bool = False, answered: frozenset[str] = frozenset()) -> None:
        self.run = run
        self.watcher = watcher
        self.cursor = cursor
        self.delivered = delivered
        self.mark = delivered
        self.renderer = renderer
        self.ended = False
        self.born = 0.0
        self.pauses = pauses
        self.answered = answered

    @property
    def news(self) -> bool:
        """Whether :meth:`take` has anything to do: events after its cursor, or the run's end (a subscription
        to a run just started has neither: its watcher need not write yet)."""
        return self.run._has_news(self)

    def take(self) -> list[str]:
        """Frames for everything pending; call :meth:`sent` once they are written."""
        return self.run._take(self)

    def sent(self) -> None:
        """The frames of the last :meth:`take` are in the socket: they no longer count as buffered."""
        self.run._sent(self)


class _Ask:
    """One approval a producer waits for: asked (its request is in the log) and/or awaited (the producer
    called :meth:`Run.decide`, which a workflow's agent may do before its request reaches the log)."""

    __slots__ = ("future", "timer", "name", "author", "requested")

    def __init__(self) -> None:
        self.future: asyncio.Future[Decision] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.name = ""
        self.author: tuple[str | None, str | None] = (None, None)
        self.requested = False


#: Steering messages one run holds that its agent has not taken yet.
MAX_STEERS = 16


class Run:
    """One streamed generation (or agent run), its log, and who watches it.

    ``key`` is minted by the server and unguessable: whoever presents it (with
    the run's own user, if it has one) may resume, attach to or cancel the run
    from another socket. ``scope`` is where its ``id`` is unique: its user, or
    for an anonymous client the connection that started it (an anonymous AI SDK
    chat: the chat). ``owner`` is the user or anonymous connection that started
    it, whatever its scope: what budgets count it against.
    """

    # Slots: 65 attributes are past what a class's instances share in one keys table (30 in CPython 3.11), so
    # each run made a dict of its own and grew it four times while __init__ filled it.
    __slots__ = (
        "id", "key", "user", "scope", "owner", "agent", "workflow", "buffer_bytes", "replay_bytes", "controller",
        "state", "latency", "transcript", "task", "grace", "started", "phase", "watch", "primary", "outcome",
        "terminal", "streamed", "prompt_estimate", "usage_sent", "_parts_usage", "on_finish", "max_streamed", "_log",
        "_sealed_bytes", "_subs", "_floor_cursor", "_floor_delivered", "_authors", "_author_codes", "_tail_code",
        "_tail", "_tail_size", "_tail_born", "_room", "_stalled", "_done", "_interruption", "_orphan_timer",
        "_released", "outlet", "_holder", "approval_timeout", "steerable", "askable", "_asks", "_answered", "_steers",
        "_heard", "_budget_timer", "_budget_left", "_budget_deadline", "_budget_error", "resumable", "_handed_off",
        "checkpoint", "checkpoint_end", "resume_request", "still_owned", "step", "step_end", "__weakref__",
    )

    def __init__(
        self,
        run_id: str,
        *,
        key: str = "",
        user: str | None = None,
        scope: str = "",
        owner: str | None = None,
        buffer_bytes: int = 65536,
        replay_bytes: int = 262144,
        agent: str | None = None,
        workflow: str | None = None,
        latency: Histogram | None = None,
        transcript: Transcript | None = None,
        controller: Controller | None = None,
        state: WorkflowState | None = None,
        grace: float = 0.0,
    ) -> None:
        self.id = run_id
        self.key = key
        self.user = user
        self.scope = scope
        self.owner = scope if owner is None else owner  # whose replay budget its log counts against
        self.agent = agent
        self.workflow = workflow
        self.buffer_bytes = buffer_bytes
        self.replay_bytes = replay_bytes
        self.controller = controller
        self.state = state
        self.latency = latency
        self.transcript = transcript
        self.task: asyncio.Task[None] | None = None
        self.grace = grace  # how long it goes on for a resume once its own client is gone, and is kept once ended
        self.started = time.monotonic()
        self.phase = Phase.RUNNING
        self.watch = Watch.ORPHANED
        self.primary: Subscription | None = None
        self.outcome: str | None = None
        self.terminal: Event | None = None
        self.streamed = 0
        self.prompt_estimate = 0
        self.usage_sent = False
        self._parts_usage: list[int] | None = None  # prompt and completion tokens its parts reported, any estimated
        self.on_finish: list[Callable[[Run], None]] = []
        self.max_streamed = math.inf
        self._log = _Log()
        self._sealed_bytes = 0
        self._subs: list[Subscription] = []
        self._floor_cursor = 0
        self._floor_delivered = 0
        self._authors: list[tuple[str | None, str | None]] = [(None, None)]
        self._author_codes: dict[tuple[str | None, str | None], int] = {(None, None): 0}
        self._tail_code = -1
        self._tail: list[str] = []
        self._tail_size = 0
        self._tail_born = 0.0
        # Made when first needed: most runs never stall, and a finished run kept for a resume holds none
        # (each asyncio.Event holds a deque: three were a third of what a kept run cost).
        self._room: asyncio.Event | None = None  # what the producer waits on while the run is full
        self._stalled: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._interruption: Event | None = None
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._released = False
        self.outlet: Outlet | None = None
        self._holder: str | None = None  # the client on another node that resumed this run, if any
        self.approval_timeout = 300.0  # how long one approval request waits for its answer
        self.steerable = False  # an agent that takes steering messages at its step boundaries
        self.askable = True  # False: its route cannot carry an answer, so every approval request is denied
        self._asks: dict[str, _Ask] | None = None
        self._answered: dict[str, Decision] | None = None
        self._steers: list[str] | None = None  # sent, not yet taken by the agent
        self._heard: list[str] | None = None  # taken by the agent, not yet in the log as delivered
        self._budget_timer: asyncio.TimerHandle | None = None
        self._budget_left = 0.0
        self._budget_deadline = 0.0
        self._budget_error: ErrorEvent | None = None
        #: Another node may go on with it if this one dies (``--takeover``): its producer pushes a
        #: :class:`~wsagent.core.events.Checkpoint` after each batch, and never waits for room mid-batch.
        self.resumable = False
        self._handed_off = False  # another node produces it now: its end here has no seq
        self.checkpoint: str | None = None  # the last checkpoint's state
        self.checkpoint_end = 0  # the seq after the events it covers
        #: A run continued by asking the model to finish its partial answer: its request (text), which the
        #: cluster keeps with its answer so far.
        self.resume_request: str | None = None
        #: In a cluster, whether this node still produces it (a resumable run another may have taken over).
        self.still_owned: Callable[[], Awaitable[bool]] | None = None
        self.step: str | None = None  # an agent's last step checkpoint
        self.step_end = 0  # the seq after the events before it

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    # -- producing -------------------------------------------------------

    def push(self, event: Event) -> None:
        """Append ``event`` without waking the watchers; text deltas merge with the pending tail.

        A producer pushes every event of one upstream read, then calls :meth:`wake` once, so the
        deltas that arrived together leave together, in one frame.
        """
        if self.phase is not _RUNNING:
            self.phase = _step(_PHASES, self.phase, _In.PUSH)
            if self.phase is not Phase.WAITING:
                return
        if not isinstance(event, TextEvent):
            if self._tail_code >= 0:
                self._seal_tail()
            kind = event.kind
            if kind < 0:  # a checkpoint: where the producer could go on from, after everything sealed
                assert isinstance(event, Checkpoint)
                if event.step:  # an agent's step: the model call's position, if any, is of an older step
                    self.step, self.step_end, self.checkpoint = event.state, self._log.end, None
                else:
                    self.checkpoint = event.state
                    self.checkpoint_end = self._log.end
                return
            if kind == _USAGE:
                self._count_usage(event)
            self._seal(event)
            if kind >= _ASK:  # approval_request, approval, steer: the person's kinds, numbered last
                self._person_event(event)
            return
        self.streamed += 1
        if self.streamed > self.max_streamed:
            self.interrupt(ErrorEvent("budget_exceeded", f"run exceeded its {self.max_streamed} token budget",
                                      False, agent=self.agent, workflow=self.workflow))
            return
        code = event.kind
        if event.agent is not None or event.workflow is not None:
            code |= self._author(event.agent, event.workflow) << _KIND_BITS
        if self._tail_code != code or self._tail_size > _MAX_MERGED:
            if self._tail_code >= 0:
                self._seal_tail()
            self._tail_code = code
            self._tail_born = _now()
        text = event.content
        self._tail.append(text)
        self._tail_size += len(text)

    def _count_usage(self, event: Event) -> None:
        """A usage event of the run's own author is its total; one of a part (an agent of a workflow)
        counts toward the total the run reports at its end, if none came."""
        assert isinstance(event, UsageEvent)
        if event.agent == self.agent:
            self.usage_sent = True
            return
        parts = self._parts_usage
        if parts is None:
            parts = self._parts_usage = [0, 0, 0]
        parts[0] += event.prompt_tokens
        parts[1] += event.completion_tokens
        parts[2] |= event.estimated

    def _author(self, agent: str | None, workflow: str | None) -> int:
        author = (agent, workflow)
        number = self._author_codes.get(author)
        if number is None:
            number = self._author_codes[author] = len(self._authors)
            self._authors.append(author)
        return number

    def wake(self) -> None:
        """Let every watcher write what is pending."""
        if self.outlet is not None:
            self.outlet.dirty(self)
        subs = self._subs
        for sub in subs[:] if len(subs) > 1 else subs:  # a watcher that takes the terminal event leaves the list
            sub.watcher.wake()

    @property
    def full(self) -> bool:
        """True when the run's own client is ``buffer_bytes`` behind."""
        return self.undelivered > self.buffer_bytes

    async def room(self) -> None:
        """Wait until the run's own client has caught up below the buffer limit.

        While it waits, the upstream socket is not read: TCP flow control holds
        the model server back. ``stalled`` is set meanwhile (metrics and tests).
        """
        while self.full:
            room = self._room = asyncio.Event()
            self.stalled.set()
            try:
                await room.wait()
            finally:
                self.stalled.clear()
                self._room = None

    @property
    def stalled(self) -> asyncio.Event:
        """Set while the producer waits for the run's own client (:meth:`room`)."""
        if self._stalled is None:
            self._stalled = asyncio.Event()
        return self._stalled

    def _make_room(self) -> None:
        if self._room is not None:
            self._room.set()

    @property
    def undelivered(self) -> int:
        """Characters produced but not yet taken by the run's own client."""
        primary = self.primary
        if primary is not None:
            floor = primary.delivered
        elif self._holder is not None:
            return 0  # its client reads on another node, from the cluster's copy: it never holds the producer
        else:
            floor = self._floor_delivered
        return self._sealed_bytes + self._tail_size - floor

    def end(self, event: Event) -> None:
        """The producer is done: seal exactly one terminal event (``event``, or the interruption)."""
        terminal = self._interruption if self.phase is Phase.INTERRUPTED else event
        self.phase = _step(_PHASES, self.phase, _In.END)
        assert terminal is not None and terminal.terminal
        if self._tail_code >= 0:
            self._seal_tail()
        if self._handed_off and isinstance(terminal, ErrorEvent):  # the seqs from here are the new producer's
            self._asks = self._heard = self._steers = None
            self.usage_sent = True
            self._append(terminal.kind, encode_message("error", id=self.id, code=terminal.code,
                                                       retryable=terminal.retryable, message=terminal.message), _now())
            self.terminal, self.outcome = terminal, terminal.type
        self._stop_budget()
        if self._asks is not None:
            for ask in self._asks.values():
                if ask.timer is not None:
                    ask.timer.cancel()
            self._asks = None
        undelivered = (self._heard or []) + (self._steers or [])
        if undelivered:
            self._heard = self._steers = None
            reason = _UNDELIVERED[terminal.type]
            for content in undelivered:
                self._seal(Steered(content, False, reason, agent=self.agent, workflow=self.workflow))
        if not self.usage_sent:
            self.usage_sent = True
            parts = self._parts_usage
            if parts is not None:  # a workflow's agents reported theirs: the run's is their sum
                self._seal(UsageEvent(parts[0], parts[1], parts[0] + parts[1], estimated=bool(parts[2]),
                                      agent=self.agent, workflow=self.workflow))
            else:
                self._seal(UsageEvent(self.prompt_estimate, self.streamed, self.prompt_estimate + self.streamed,
                                      estimated=True, agent=self.agent, workflow=self.workflow))
        if not self._handed_off:
            self._seal(terminal)
            self.terminal = terminal
            self.outcome = terminal.type
        if self.transcript is not None:
            self.transcript.close()
        if self._done is not None:
            self._done.set()
        self._make_room()
        self._stop_orphan_timer()
        self.wake()
        callbacks, self.on_finish = self.on_finish, []  # run once; dropped, since they refer back to their owners
        for callback in callbacks:
            callback(self)

    async def wait(self) -> None:
        if not self.finished:
            if self._done is None:
                self._done = asyncio.Event()
            await self._done.wait()

    def cancel(self, reason: str = "cancelled") -> None:
        self.interrupt(Cancelled(reason, agent=self.agent, workflow=self.workflow))

    def start(self, producer: Coroutine[Any, Any, None]) -> None:
        """Run ``producer`` as this run's task: :func:`wsagent.engine.pump.pump`, which ends the run and, last,
        calls :meth:`producer_over`. A cancel can stop the task before its first step, so the producer never
        runs, its ``finally`` never either: :meth:`interrupt` ends the run itself then. (Not a done callback
        on the task: one more turn of the loop, and a handle, for every run.)
        """
        self.task = asyncio.get_running_loop().create_task(producer, context=attend(self))

    def producer_over(self) -> None:
        """The producer is over (its ``finally``): the run ends now if it has not (with the interruption), and
        its task is forgotten (its coroutine and producer: nothing a finished run kept for a resume needs)."""
        self.task = None
        if not self.finished:
            self.end(self.interruption())

    def interrupt(self, terminal: Event, why: str | None = None) -> None:
        """Stop the producer (its task cancelled with ``why``); the run ends with ``terminal`` (a cancellation
        or a budget error)."""
        was = self.phase
        self.phase = _step(_PHASES, was, _In.INTERRUPT)
        if was is not _RUNNING and was is not Phase.WAITING:
            return
        self._interruption = terminal
        task = self.task
        if task is not None and not task.done():
            task.cancel(why)
            coroutine = task.get_coro()
            if isinstance(coroutine, Coroutine) and inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                # cancelled before its first step: its producer will never run to end it
                self.task = None
                self.end(terminal)
        else:
            self.end(terminal)

    def hand_off(self, message: str) -> None:
        """Another node produces this run now (it took it over, or this node left it to the others): the
        producer stops (its task cancelled with ``TAKEN_OVER``: what it reads upstream goes on there), and
        each watcher here gets one ``error`` ``taken_over`` without a ``seq`` (the seqs after what Redis has are
        the new producer's); nothing else is sealed."""
        self._handed_off = True
        self.interrupt(ErrorEvent("taken_over", message, True, agent=self.agent, workflow=self.workflow),
                       TAKEN_OVER)

    def interruption(self) -> Event:
        """The terminal event for a producer that was cancelled."""
        return self._interruption or Cancelled("cancelled", agent=self.agent, workflow=self.workflow)

    def budget(self, seconds: float, tokens: int) -> None:
        """End the run with ``budget_exceeded`` after ``seconds`` or ``tokens`` streamed deltas (0: no limit).
        The seconds do not run while the run waits for a person (``WAITING``)."""
        if tokens:
            self.max_streamed = tokens
        if seconds:
            self._budget_left = seconds
            self._budget_error = ErrorEvent("budget_exceeded", f"run exceeded its {seconds:g}s budget", False,
                                            agent=self.agent, workflow=self.workflow)
            self._start_budget()

    def _start_budget(self) -> None:
        if self._budget_error is not None and self._budget_timer is None:
            loop = asyncio.get_running_loop()
            self._budget_deadline = loop.time() + self._budget_left
            self._budget_timer = loop.call_later(self._budget_left, self.interrupt, self._budget_error)

    def _stop_budget(self) -> None:
        if self._budget_timer is not None:
            self._budget_timer.cancel()
            self._budget_timer = None
            self._budget_left = max(0.0, self._budget_deadline - asyncio.get_running_loop().time())

    # -- a person in the loop ----------------------------------------------

    async def decide(self, call_id: str) -> Decision:
        """The answer to approval request ``call_id`` (the :class:`~wsagent.core.person.Person` its producer asks)."""
        if self._answered is not None and call_id in self._answered:
            return self._answered[call_id]
        if not self.askable:
            return _UNASKABLE
        asks = self._asks
        if asks is None:
            asks = self._asks = {}
        ask = asks.get(call_id)
        if ask is None:
            ask = asks[call_id] = _Ask()
        if ask.future is None:
            ask.future = asyncio.get_running_loop().create_future()
        return await ask.future

    def heard(self) -> list[str]:
        """The steering messages sent since the agent last asked; they count as delivered once it
        yields a :class:`~wsagent.core.events.Steered` for each."""
        taken = self._steers
        if not taken:
            return []
        self._steers = None
        self._heard = (self._heard or []) + taken
        return taken

    @property
    def waiting_for(self) -> list[str]:
        """The call ids of the approval requests waiting for an answer, oldest first."""
        return [call_id for call_id, ask in (self._asks or {}).items() if ask.requested]

    def answer(self, call_id: str, approved: bool, reason: str | None = None) -> None:
        """A person's answer to approval request ``call_id``. Raises :class:`NotAnswerable` (nothing changes)
        for a run that has ended, a call it never asked about, or one already answered."""
        if self.phase is Phase.FINISHED or self.phase is Phase.INTERRUPTED:
            raise NotAnswerable("run_ended", f"run {self.id} has ended; its approval requests are void")
        if self._answered is not None and call_id in self._answered:
            raise NotAnswerable("already_answered", f"the call {call_id!r} of run {self.id} was answered already")
        ask = self._asks.get(call_id) if self._asks is not None else None
        if ask is None or not ask.requested:
            raise NotAnswerable("unknown_call", f"run {self.id} asks no approval for a call {call_id!r}")
        self._settle(call_id, ask, Decision(approved, reason))
        self.wake()

    def steer(self, content: str) -> None:
        """A person's message for the agent's next step. Raises :class:`NotAnswerable` for a run that
        cannot take it (it has ended, it is not an agent's, it holds :data:`MAX_STEERS` already)."""
        if self.phase is Phase.FINISHED or self.phase is Phase.INTERRUPTED:
            raise NotAnswerable("run_ended", f"run {self.id} has ended; nothing can join it")
        if not self.steerable:
            raise NotAnswerable("not_steerable", f"run {self.id} is a model's answer, with no step for a message "
                                                 "to join; only an agent run can be steered")
        steers = self._steers
        if steers is None:
            steers = self._steers = []
        if len(steers) >= MAX_STEERS:
            raise NotAnswerable("too_many_steers", f"run {self.id} holds {MAX_STEERS} messages its agent has not "
                                                   "taken yet")
        steers.append(content)

    def _person_event(self, event: Event) -> None:
        if isinstance(event, ApprovalRequest):
            self._ask(event)
        elif isinstance(event, Steered) and event.delivered and self._heard and event.content in self._heard:
            self._heard.remove(event.content)

    def _ask(self, event: ApprovalRequest) -> None:
        call_id = event.call_id
        asks = self._asks
        if asks is None:
            asks = self._asks = {}
        ask = asks.get(call_id)
        if ask is not None and ask.requested:  # asked twice while waiting: an answer could not tell them apart
            self._settle(call_id, ask, _REUSED)
            return
        if not self.askable or (self._answered is not None and call_id in self._answered):
            # A route nobody answers on; or an id asked about before, whose answer must not pass for this one's.
            decision = _UNASKABLE if not self.askable else _REUSED
            if self._answered is None:
                self._answered = {}
            self._answered[call_id] = decision
            self._seal(Approval(call_id, decision.approved, decision.reason, agent=event.agent,
                                workflow=event.workflow))
            if ask is not None and ask.future is not None and not ask.future.done():
                del asks[call_id]
                ask.future.set_result(decision)
            return
        if ask is None:
            ask = asks[call_id] = _Ask()
        if self.phase is _RUNNING:
            self._stop_budget()
            self._stop_orphan_timer()
        self.phase = _step(_PHASES, self.phase, _In.ASK)
        ask.requested = True
        ask.name = event.name
        ask.author = (event.agent, event.workflow)
        ask.timer = asyncio.get_running_loop().call_later(self.approval_timeout, self._unanswered, call_id)

    def _settle(self, call_id: str, ask: _Ask, decision: Decision) -> None:
        assert self._asks is not None
        del self._asks[call_id]
        if self._answered is None:
            self._answered = {}
        self._answered[call_id] = decision
        if ask.timer is not None:
            ask.timer.cancel()
        agent, workflow = ask.author
        self.push(Approval(call_id, decision.approved, decision.reason, agent=agent, workflow=workflow))
        if ask.future is not None and not ask.future.done():
            ask.future.set_result(decision)
        if not self.waiting_for:
            self.phase = _step(_PHASES, self.phase, _In.SETTLE)
            self._start_budget()
            # Whoever answered may be about to watch (an AI SDK request continues the response): the
            # grace of a run nobody watches starts once the answer's handler has run.
            asyncio.get_running_loop().call_soon(self._unwatched)

    def _unwatched(self) -> None:
        if self.phase is _RUNNING and self.watch is Watch.ORPHANED and self._holder is None:
            self._orphaned(self.grace)

    def _unanswered(self, call_id: str) -> None:
        ask = (self._asks or {}).get(call_id)
        name = f"{ask.name} " if ask is not None and ask.name else ""
        self.interrupt(ErrorEvent("approval_timeout", f"nobody answered the approval request for {name}(call "
                                  f"{call_id}) within {self.approval_timeout:g}s", False,
                                  agent=self.agent, workflow=self.workflow))

    # -- watching --------------------------------------------------------

    def subscribe(self, watcher: Watcher, after: int = 0, renderer: Renderer | None = None, *,
                  primary: bool = False, pauses: bool = False, answered: frozenset[str] = frozenset(),
                  ) -> Subscription:
        """Watch from the event after ``after``.

        Raises :class:`ReplayGap` if those events are no longer kept, and :class:`BadResume` if
        ``after`` names an event the run never sent. With ``primary``, the watcher becomes the run's
        own client (the run's pace, and whoever leaving orphans it); the previous one, if any, watches on.
        With ``pauses`` (and a renderer), the subscription ends at an approval request still unanswered.
        """
        if self._tail_code >= 0:
            self._seal_tail()
        log_ = self._log
        if after > log_.end - 1:
            raise BadResume(f"run {self.id} has sent {log_.end - 1} events; there is no seq {after}")
        if after < log_.first - 1:
            raise ReplayGap(f"run {self.id}: events after seq {after} are no longer kept (oldest kept: {log_.first})")
        pending = sum(map(len, islice(log_.payloads, after + 1 - log_.first, None)))
        sub = Subscription(self, watcher, after, self._sealed_bytes - pending, renderer, pauses, answered)
        self._subs.append(sub)
        if primary:
            self.watch = _step(_WATCHES, self.watch, _In.ADOPT)
            self.primary = sub
            self._holder = None
            self._stop_orphan_timer()
        watcher.watch(sub)
        return sub

    def promote(self, sub: Subscription) -> None:
        """``sub``, a watcher, becomes the run's own client, as if it had resumed the run (its socket answered
        the run's approval request: a person who answers is the one it now waits for)."""
        if self.finished or sub.ended or sub is self.primary:
            return
        self.watch = _step(_WATCHES, self.watch, _In.ADOPT)
        self.primary = sub
        self._holder = None
        self._stop_orphan_timer()

    def unsubscribe(self, sub: Subscription, grace: float = 0.0) -> None:
        """``sub`` watches no more. If it was the run's own client and the run still produces, the run
        is orphaned: it goes on for ``grace`` seconds (waiting for a resume), or is cancelled at once."""
        was_primary = sub is self.primary
        self._end(sub)
        sub.watcher.unwatch(sub)
        self._make_room()  # the producer no longer waits for this watcher
        if was_primary and not self.finished:
            self._orphaned(grace)

    def _orphaned(self, grace: float) -> None:
        if self.phase is Phase.WAITING:  # an approval's own timeout bounds the wait; the grace starts after
            return
        if grace > 0:
            self._orphan_timer = asyncio.get_running_loop().call_later(grace, self.cancel, "client did not return")
        else:
            self.cancel("client disconnected")

    @property
    def watchers(self) -> int:
        return len(self._subs)

    @property
    def sealed_seq(self) -> int:
        """The seq of the last event sealed so far (0: none yet); a deltas' tail still pending is not."""
        return self._log.end - 1

    @property
    def oldest_kept(self) -> int:
        """The lowest seq still in the log (a watcher can start right before it)."""
        if self._tail_code >= 0:
            self._seal_tail()
        return self._log.first

    @property
    def log_bytes(self) -> int:
        """Characters the log keeps (what ``replay_bytes`` and ``buffer_bytes`` bound)."""
        return self._log.size

    def release(self) -> None:
        """Nobody can resume or attach to this finished run any more: drop its log once the
        watchers still reading it have taken their last event.

        A run's log keeps up to ``replay_bytes`` of events for resume, and the
        run object itself may outlive that need by far (a chat session keeps its
        last text run, to order the next one after it): an idle connection would
        hold a stream's worth of frames it can never send again.
        """
        self._released = True
        if not self._subs:
            self._log.clear()

    def _stop_orphan_timer(self) -> None:
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None

    # -- a client on another node (cluster mode) ---------------------------

    def adopt_remote(self, holder: str) -> None:
        """A client on another node resumed this run (``holder`` names its subscription there): the run
        is watched, and paced by nobody (that node reads the cluster's copy, never this log)."""
        if self.finished:
            return
        self.watch = _step(_WATCHES, self.watch, _In.ADOPT)
        self.primary = None  # a client of this node that was the run's own watches on, as after a resume
        self._holder = holder
        self._stop_orphan_timer()
        self._make_room()

    @property
    def holder(self) -> str | None:
        """The subscription on another node whose client resumed this run, while it watches."""
        return self._holder

    def leave_remote(self, holder: str) -> None:
        """The client on another node that resumed this run went away: orphaned, as if it were local.
        A leave from an older holder (the client moved on again) changes nothing."""
        if self._holder != holder or self.finished:
            return
        self._holder = None
        if self._tail_code >= 0:
            self._seal_tail()
        self.watch = _step(_WATCHES, self.watch, _In.LEAVE)
        self._floor_cursor = self._log.end - 1
        self._floor_delivered = self._sealed_bytes
        self._orphaned(self.grace)

    def entries(self, after: int) -> tuple[int, list[int], list[str]]:
        """The sealed events after seq ``after`` that the log still keeps: the seq of the first, their codes
        and payloads (for an :class:`Outlet`). Seals the tail: in a cluster, the deltas of one upstream read
        are one entry for every node alike."""
        if self._tail_code >= 0:
            self._seal_tail()
        log_ = self._log
        end = log_.end
        first = max(after + 1, log_.first)
        count = end - first
        codes, payloads = log_.codes, log_.payloads
        return first, [codes[i] for i in range(-count, 0)], [payloads[i] for i in range(-count, 0)]

    def shared_up_to(self, seq: int) -> None:
        """The outlet has every entry up to ``seq`` (in a cluster: in Redis). A run whose own client reads on
        another node, from that copy, keeps of them only ``replay_bytes`` (nobody here will take them)."""
        if self._holder is not None:
            self._trim_to(seq, self._sealed_bytes)

    def authors(self) -> list[list[str | None]]:
        """The [agent, workflow] pairs the high bits of an entry's code index (JSON-ready)."""
        return [[agent, workflow] for agent, workflow in self._authors]

    @property
    def author_count(self) -> int:
        return len(self._authors)

    # -- a copy of a run produced elsewhere (cluster mode's follower) -------

    def _restart_log(self, first: int) -> None:
        """The copy missed entries: its log starts again at ``first`` (a watcher behind it lags)."""
        self._log.clear()
        self._log.first = self._log.end = first

    def taken_over(self, history: list[tuple[int, int, str]], checkpoint: str | None, grace: float,
                   authors: list[list[str | None]], step: str | None = None, step_end: int = 0) -> None:
        """This node goes on with a run another node produced: ``history`` is what that node wrote of its log
        ((seq, code, payload), consecutive), whose codes name ``authors``; this log holds it and goes on after
        it, from ``checkpoint``. Its client, wherever it is, has ``grace`` seconds to come back."""
        self._authors = [(agent, workflow) for agent, workflow in authors]
        self._author_codes = {author: i for i, author in enumerate(self._authors)}
        self._restart_log(history[0][0] if history else 1)
        born = _now()
        for _, code, payload in history:
            self._append(code, payload, born)
        self._floor_cursor = self._log.end - 1  # (as after its client left: nobody here has taken any of it)
        self._floor_delivered = self._sealed_bytes
        self.resumable = True
        self.checkpoint = checkpoint
        self.checkpoint_end = self._log.end
        self.step, self.step_end = step, step_end
        self._orphaned(grace)

    def _finished_elsewhere(self, outcome: str) -> None:
        """The copy's terminal entry arrived: the run is finished (its producer ended it)."""
        self.phase = _step(_PHASES, self.phase, _In.END)
        self.outcome = outcome
        if self._done is not None:
            self._done.set()

    def _bound_log(self, bound: int) -> None:
        """Forget the copy's oldest entries past ``bound`` characters, whoever reads it (one at least stays)."""
        log_ = self._log
        while log_.size > bound and len(log_.codes) > 1:
            log_.popleft()

    # -- log -------------------------------------------------------------

    def _seal_tail(self) -> None:
        parts = self._tail
        text = parts[0] if len(parts) == 1 else "".join(parts)
        self._append(self._tail_code, text, self._tail_born)
        self._tail_code = -1
        self._tail = []
        self._tail_size = 0

    def _seal(self, event: Event) -> None:
        code = event.kind
        if event.agent is not None or event.workflow is not None:
            code |= self._author(event.agent, event.workflow) << _KIND_BITS
        self._append(code, encode(event, self.id, self._log.end), _now())

    def _append(self, code: int, payload: str, born: float) -> None:
        if self.transcript is not None:
            self.transcript.write(self._json(code, payload, self._log.end))
        self._log.append(code, payload, born)
        self._sealed_bytes += len(payload)

    def _json(self, code: int, payload: str, seq: int) -> str:
        if code < TEXT_KINDS:  # a text delta of the run's own author: the common case
            return encode_text(TEXT_CLASSES[code], payload, self.id, seq)
        kind = code & _KIND_MASK
        if kind >= TEXT_KINDS:
            return payload
        agent, workflow = self._authors[code >> _KIND_BITS]
        return encode_text(TEXT_CLASSES[kind], payload, self.id, seq, agent, workflow)

    def _has_news(self, sub: Subscription) -> bool:
        """Whether :meth:`_take` has anything for ``sub`` (a subclass that takes more says so here too)."""
        return self._tail_code >= 0 or sub.cursor < self._log.end - 1 or self.finished

    def _take(self, sub: Subscription) -> list[str]:
        if self._tail_code >= 0:
            self._seal_tail()
        log_ = self._log
        end = log_.end
        if sub.cursor >= end - 1:
            if self.finished:
                self._end(sub)
            return []
        if sub.cursor < log_.first - 1:  # not the primary (its events are kept): it fell out of the log
            self._end(sub)
            return failure_frames(sub, encode_message("error", id=self.id, code="lagging", retryable=True, message=(
                f"this watcher fell {self._log.first - 1 - sub.cursor} events behind the run and was dropped; "
                "attach again (from the oldest event kept)")))
        # The pending events are the log's last ``count``; index from the right, because the left
        # holds up to ``replay_bytes`` of delivered events (thousands of tokens).
        count = end - 1 - sub.cursor
        codes, payloads = log_.codes, log_.payloads
        sub.born = log_.borns[-count]
        frames: list[str] = []
        renderer = sub.renderer
        if renderer is None:
            if count == 1:  # a client that keeps up takes one entry at a time
                frames.append(self._json(codes[-1], payloads[-1], end - 1))
            else:
                for i in range(-count, 0):
                    frames.append(self._json(codes[i], payloads[i], end + i))
        else:
            authors = self._authors
            for i in range(-count, 0):
                code = codes[i]
                kind = code & _KIND_MASK
                renderer.render(kind, payloads[i], frames, authors[code >> _KIND_BITS])
                if kind == _ASK and sub.pauses and not self.finished and _pauses_at(i, codes, payloads,
                                                                                    sub.answered):
                    renderer.pause(frames)
                    sub.cursor = end + i
                    sub.mark = self._sealed_bytes - sum(len(payloads[j]) for j in range(i + 1, 0))
                    self._end(sub)
                    return frames
        sub.cursor = end - 1
        sub.mark = self._sealed_bytes
        return frames

    def _sent(self, sub: Subscription) -> None:
        if sub.born and self.latency is not None:
            self.latency.observe(_now() - sub.born)
            sub.born = 0.0
        sub.delivered = sub.mark
        if sub is self.primary:  # trimmed before an end below forgets who the primary was
            self._trim()
            if self._room is not None and not self.full:
                self._room.set()
        if self.finished and sub.cursor >= self._log.end - 1:
            self._end(sub)

    def _end(self, sub: Subscription) -> None:
        """``sub`` watches no more; if it was the run's own client, the floor of the log stays where it was."""
        sub.ended = True
        if sub in self._subs:
            self._subs.remove(sub)
        if sub is self.primary:
            self.primary = None
            self.watch = _step(_WATCHES, self.watch, _In.LEAVE)
            self._floor_cursor = sub.cursor
            self._floor_delivered = sub.delivered
        if self._released and not self._subs:
            self._log.clear()

    def _trim(self) -> None:
        """Forget the oldest events the run's own client has taken, down to ``replay_bytes``."""
        primary = self.primary
        if primary is not None:
            self._trim_to(primary.cursor, primary.delivered)
        else:
            self._trim_to(self._floor_cursor, self._floor_delivered)

    def _trim_to(self, min_cursor: int, min_delivered: int) -> None:
        log_ = self._log
        kept_delivered = log_.size - (self._sealed_bytes - min_delivered)
        while log_.codes and log_.first <= min_cursor and kept_delivered > self.replay_bytes:
            kept_delivered -= log_.popleft()


def _pauses_at(i: int, codes: deque[int], payloads: deque[str], answered: frozenset[str]) -> bool:
    """Whether a response stops after the approval request at index ``i`` (from the right) of the log: it is
    the last of the requests made together, and one of those has no answer, in the entries after it or in
    ``answered``."""
    if i < -1 and codes[i + 1] & _KIND_MASK == _ASK:
        return False
    start = i
    while start > -len(codes) and codes[start - 1] & _KIND_MASK == _ASK:
        start -= 1
    asked = {json.loads(payloads[j])["call_id"] for j in range(start, i + 1)}
    given = {json.loads(payloads[j])["call_id"] for j in range(i + 1, 0) if codes[j] & _KIND_MASK == _ANSWER}
    return not asked <= answered | given
