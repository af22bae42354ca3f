"""The relay: one run's events, from the model to every socket that watches it.

A chunk's path: :meth:`~wsagent.upstream.UpstreamClient.batches` reads bytes
and yields the model events of each network read; :func:`stream_model` appends
them to the run (:meth:`Run.push_text`, :meth:`Run.push`) and then wakes the
watchers once (:meth:`Run.wake`); each watching connection's
:class:`~wsagent.connections.Outbox` takes what is pending with
:meth:`Subscription.take` and writes it at once, in the same step, while the
client keeps up. One read, one frame, no task switch in between.

Backpressure, without an unbounded buffer anywhere:

* Text deltas not yet taken sit in one *tail* and merge: the deltas of one
  read leave as one frame, and while a client's socket is busy, fifty tokens
  become one frame. Nothing is dropped or reordered: any other event seals the
  tail first.
* Sealed events live in the run's log until every watcher has taken them. When
  the bytes not yet taken by the slowest watcher pass ``buffer_bytes``, the
  producer stops reading the upstream (:meth:`Run.room`), so TCP backpressure
  reaches the model server.
* The log also keeps ``replay_bytes`` of already delivered events, so a client
  that dropped can resume from the last ``seq`` it saw.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from itertools import islice
from typing import Any

from .chunks import Finish, TextDelta, ToolCall, Usage
from .connections import Outbox
from .errors import UpstreamError, WsAgentError
from .events import (
    Cancelled,
    Done,
    ErrorEvent,
    Event,
    Refusal,
    Start,
    TextEvent,
    Thinking,
    Token,
    ToolCallEvent,
    UsageEvent,
    encode,
    encode_text,
    render_text,
    render_text_delta,
)
from .metrics import Histogram
from .transcripts import Transcript
from .upstream import UpstreamClient

_now = time.monotonic

__all__ = ["Run", "RunRegistry", "Subscription", "ReplayGap", "stream_model", "drive", "estimate_tokens"]

log = logging.getLogger("wsagent.relay")

# A merged frame stops growing past this many characters: big enough that a slow client gets few
# frames, small enough that no single frame is a large allocation.
_MAX_MERGED = 16384


class ReplayGap(WsAgentError):
    code = "replay_gap"


class _Log:
    """A run's sealed events, oldest first, as parallel deques of strings and floats.

    Each event is encoded once, when sealed: its JSON frame, its text-mode
    frame (None if text mode shows nothing of it) and the time it was born. Its
    size is its JSON frame's length, and its seq is ``first`` plus its index.

    No object per entry, on purpose: strings and floats are not tracked by
    CPython's cyclic collector, while an object (or a tuple) per entry is. A run
    keeps up to ``replay_bytes`` of events, so at 1,000 streams of 20 tokens/s
    objects per entry meant 40,000 new tracked objects a second: a collection
    every second or so, each pausing every stream for 5-25 ms, and every
    twentieth (an older generation) for 180 ms (measured).
    """

    __slots__ = ("first", "frames", "texts", "borns", "size")

    def __init__(self) -> None:
        self.first = 1
        self.frames: deque[str] = deque()
        self.texts: deque[str | None] = deque()
        self.borns: deque[float] = deque()
        self.size = 0

    @property
    def end(self) -> int:
        """The seq the next sealed event gets."""
        return self.first + len(self.frames)

    def append(self, frame: str, text: str | None, born: float) -> None:
        self.frames.append(frame)
        self.texts.append(text)
        self.borns.append(born)
        self.size += len(frame)

    def popleft(self) -> int:
        """Forget the oldest event; returns its size."""
        self.first += 1
        self.texts.popleft()
        self.borns.popleft()
        size = len(self.frames.popleft())
        self.size -= size
        return size

    def clear(self) -> None:
        self.first = self.end
        self.frames.clear()
        self.texts.clear()
        self.borns.clear()
        self.size = 0


class Subscription:
    """One socket watching one run, with its own position in the run's log."""

    __slots__ = ("run", "outbox", "cursor", "delivered", "mark", "text_mode", "ended", "born")

    def __init__(self, run: Run, outbox: Outbox, cursor: int, delivered: int, text_mode: bool) -> None:
        self.run = run
        self.outbox = outbox
        self.cursor = cursor
        self.delivered = delivered
        self.mark = delivered
        self.text_mode = text_mode
        self.ended = False
        self.born = 0.0

    def take(self) -> list[str]:
        """Frames for everything pending; call :meth:`sent` once they are written."""
        return self.run._take(self)

    def sent(self) -> None:
        """The frames of the last :meth:`take` are in the socket: they no longer count as buffered."""
        self.run._sent(self)


class Run:
    """One streamed generation (or agent run), its log, and who watches it."""

    def __init__(
        self,
        run_id: str,
        *,
        user: str | None = None,
        buffer_bytes: int = 65536,
        replay_bytes: int = 262144,
        agent: str | None = None,
        workflow: str | None = None,
        latency: Histogram | None = None,
        transcript: Transcript | None = None,
    ) -> None:
        self.id = run_id
        self.user = user
        self.agent = agent
        self.workflow = workflow
        self.buffer_bytes = buffer_bytes
        self.replay_bytes = replay_bytes
        self.owner: Any = None
        self.task: asyncio.Task[Any] | None = None
        self.started = time.monotonic()
        self.finished = False
        self.outcome: str | None = None
        self.streamed = 0
        self.prompt_estimate = 0
        self.usage_sent = False
        self.on_finish: list[Callable[[Run], None]] = []
        self.controller: Any = None
        self.state: Any = None
        self.latency = latency
        self.transcript = transcript
        self._log = _Log()
        self._sealed_bytes = 0
        self._subs: list[Subscription] = []
        self._floor_cursor = 0
        self._floor_delivered = 0
        self._tail_cls: type[TextEvent] | None = None
        self._tail_agent: str | None = None
        self._tail_workflow: str | None = None
        self._tail: list[str] = []
        self._tail_size = 0
        self._tail_born = 0.0
        self._room = asyncio.Event()
        self._room.set()
        self.stalled = asyncio.Event()
        self._done = asyncio.Event()
        self._interruption: Event | None = None
        self.max_streamed = math.inf
        self._orphan_timer: asyncio.TimerHandle | None = None
        self._released = False

    # -- producing -------------------------------------------------------

    def push(self, event: Event) -> None:
        """Append ``event``; text deltas merge with the pending tail. Never waits."""
        if isinstance(event, TextEvent):
            self.push_text(type(event), event.content, event.agent, event.workflow)
            self.wake()
            return
        if self.finished or self._interruption is not None:
            return
        if self._tail_cls is not None:
            self._seal_tail()
        if type(event) is UsageEvent:
            self.usage_sent = True
        self._seal(event)
        self.wake()

    def push_text(self, cls: type[TextEvent], text: str, agent: str | None = None,
                  workflow: str | None = None) -> None:
        """Append a text delta without making the event first, and without waking the watchers:
        the relay's hot path pushes every delta of one upstream read, then calls :meth:`wake` once,
        so the deltas that arrived together leave together, in one frame."""
        if self.finished or self._interruption is not None:
            return
        self.streamed += 1
        if self.streamed > self.max_streamed:
            self.interrupt(ErrorEvent("budget_exceeded", f"run exceeded its {self.max_streamed} token budget",
                                      False, agent=self.agent, workflow=self.workflow))
            return
        if (self._tail_cls is not cls or self._tail_agent != agent or self._tail_workflow != workflow
                or self._tail_size > _MAX_MERGED):
            if self._tail_cls is not None:
                self._seal_tail()
            self._tail_cls = cls
            self._tail_agent = agent
            self._tail_workflow = workflow
            self._tail_born = _now()
        self._tail.append(text)
        self._tail_size += len(text)

    def wake(self) -> None:
        """Let every watcher's outbox write what is pending."""
        subs = self._subs
        for sub in subs[:] if len(subs) > 1 else subs:  # a watcher that takes the terminal event leaves the list
            sub.outbox.wake()

    @property
    def full(self) -> bool:
        """True when the slowest watcher is ``buffer_bytes`` behind."""
        return self.undelivered > self.buffer_bytes

    async def room(self) -> None:
        """Wait until the watchers have caught up below the buffer limit.

        While it waits, the upstream socket is not read: TCP flow control holds
        the model server back. ``stalled`` is set meanwhile (metrics and tests).
        """
        while self.full:
            self._room.clear()
            self.stalled.set()
            try:
                await self._room.wait()
            finally:
                self.stalled.clear()

    @property
    def undelivered(self) -> int:
        """Bytes (approximately) produced but not yet taken by the slowest watcher."""
        subs = self._subs
        floor = subs[0].delivered if len(subs) == 1 else min((s.delivered for s in subs), default=self._floor_delivered)
        return self._sealed_bytes + self._tail_size - floor

    def finish(self, event: Event) -> None:
        """End the run with its one terminal event (later calls do nothing)."""
        if self.finished:
            return
        assert event.terminal
        if self._tail_cls is not None:
            self._seal_tail()
        if not self.usage_sent:
            self.usage_sent = True
            self._seal(UsageEvent(self.prompt_estimate, self.streamed, self.prompt_estimate + self.streamed,
                                  estimated=True, agent=self.agent, workflow=self.workflow))
        self._seal(event)
        self.finished = True
        if self.transcript is not None:
            self.transcript.close()
        self.outcome = event.type
        self._done.set()
        self._room.set()
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None
        self.wake()
        callbacks, self.on_finish = self.on_finish, []  # run once; dropped, since they refer back to their owners
        for callback in callbacks:
            callback(self)

    async def wait(self) -> None:
        await self._done.wait()

    def cancel(self, reason: str = "cancelled") -> None:
        self.interrupt(Cancelled(reason, agent=self.agent, workflow=self.workflow))

    def interrupt(self, terminal: Event) -> None:
        """Stop the producer; the run ends with ``terminal`` (a cancellation or a budget error)."""
        if self.finished or self._interruption is not None:
            return
        self._interruption = terminal
        if self.task is not None and not self.task.done():
            self.task.cancel()
        else:
            self.finish(terminal)

    def interruption(self) -> Event:
        """The terminal event for a producer that was cancelled."""
        return self._interruption or Cancelled("cancelled", agent=self.agent, workflow=self.workflow)

    def budget(self, seconds: float, tokens: int) -> None:
        """End the run with ``budget_exceeded`` after ``seconds`` or ``tokens`` streamed deltas (0: no limit)."""
        if tokens:
            self.max_streamed = tokens
        if seconds:
            timer = asyncio.get_running_loop().call_later(
                seconds, self.interrupt,
                ErrorEvent("budget_exceeded", f"run exceeded its {seconds:g}s budget", False,
                           agent=self.agent, workflow=self.workflow))
            self.on_finish.append(lambda _run: timer.cancel())

    # -- watching --------------------------------------------------------

    def subscribe(self, outbox: Outbox, after: int = 0, text_mode: bool = False) -> Subscription:
        """Watch from the event after ``after``. Raises :class:`ReplayGap` if those are gone."""
        if self._tail_cls is not None:
            self._seal_tail()
        log_ = self._log
        if after < log_.first - 1:
            raise ReplayGap(f"run {self.id}: events after seq {after} are no longer kept (oldest kept: {log_.first})")
        after = min(after, log_.end - 1)
        pending = sum(map(len, islice(log_.frames, after + 1 - log_.first, None)))
        sub = Subscription(self, outbox, after, self._sealed_bytes - pending, text_mode)
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
            self._orphan_timer = None
        self._subs.append(sub)
        outbox.subscribe(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._end(sub)
        self._room.set()  # the producer no longer waits for this watcher
        sub.outbox.unsubscribe(sub)

    @property
    def oldest_kept(self) -> int:
        """The lowest seq still in the log (a watcher can start right before it)."""
        if self._tail_cls is not None:
            self._seal_tail()
        return self._log.first

    def orphan(self, grace: float) -> None:
        """Nobody watches: keep going for ``grace`` seconds, then cancel."""
        if self.finished or self._subs:
            return
        if self._orphan_timer is not None:
            self._orphan_timer.cancel()
        self._orphan_timer = asyncio.get_running_loop().call_later(grace, self.cancel, "client did not return")

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

    # -- log -------------------------------------------------------------

    def _seal_tail(self) -> None:
        cls = self._tail_cls
        assert cls is not None
        parts = self._tail
        text = parts[0] if len(parts) == 1 else "".join(parts)
        self._append(encode_text(cls, text, self.id, self._log.end, self._tail_agent, self._tail_workflow),
                     render_text_delta(cls, text), self._tail_born)
        self._tail_cls = None
        self._tail = []
        self._tail_size = 0

    def _seal(self, event: Event) -> None:
        self._append(encode(event, self.id, self._log.end), render_text(event), _now())

    def _append(self, frame: str, text: str | None, born: float) -> None:
        self._log.append(frame, text, born)
        if self.transcript is not None:
            self.transcript.write(frame)
        self._sealed_bytes += len(frame)

    def _take(self, sub: Subscription) -> list[str]:
        if self._tail_cls is not None:
            self._seal_tail()
        log_ = self._log
        last = log_.end - 1
        if sub.cursor >= last:
            if self.finished:
                self._end(sub)
            return []
        # The pending events are the log's last ``last - cursor``; index from the right, because
        # the left holds up to ``replay_bytes`` of delivered events (thousands of tokens).
        count = last - sub.cursor
        sub.born = log_.borns[-count]
        frames: list[str]
        if sub.text_mode:
            texts = log_.texts
            frames = [text for text in (texts[i] for i in range(-count, 0)) if text]
        else:
            json_frames = log_.frames
            frames = [json_frames[-1]] if count == 1 else [json_frames[i] for i in range(-count, 0)]
        sub.cursor = last
        sub.mark = self._sealed_bytes
        return frames

    def _sent(self, sub: Subscription) -> None:
        if sub.born and self.latency is not None:
            self.latency.observe(_now() - sub.born)
            sub.born = 0.0
        sub.delivered = sub.mark
        if self.finished and sub.cursor >= self._log.end - 1:
            self._end(sub)
        self._trim()
        if not self._room.is_set() and not self.full:
            self._room.set()

    def _end(self, sub: Subscription) -> None:
        """``sub`` watches no more; the last watcher to leave leaves the floor of the log behind it."""
        sub.ended = True
        if sub in self._subs:
            self._subs.remove(sub)
            self._floor_cursor = sub.cursor
            self._floor_delivered = sub.delivered
            if self._released and not self._subs:
                self._log.clear()

    def _trim(self) -> None:
        subs = self._subs
        if len(subs) == 1:
            min_cursor, min_delivered = subs[0].cursor, subs[0].delivered
        else:
            min_cursor = min((s.cursor for s in subs), default=self._floor_cursor)
            min_delivered = min((s.delivered for s in subs), default=self._floor_delivered)
        log_ = self._log
        kept_delivered = log_.size - (self._sealed_bytes - min_delivered)
        while log_.frames and log_.first <= min_cursor and kept_delivered > self.replay_bytes:
            kept_delivered -= log_.popleft()


class RunRegistry:
    """Runs by (user, id), so a client can resume or attach from another socket."""

    def __init__(self) -> None:
        self._runs: dict[tuple[str | None, str], Run] = {}
        self.total: Counter[str] = Counter()
        self.cancellations: Counter[str] = Counter()
        self.tokens = 0

    def __len__(self) -> int:
        return len(self._runs)

    def __iter__(self) -> Any:
        return iter(list(self._runs.values()))

    def get(self, user: str | None, run_id: str) -> Run | None:
        return self._runs.get((user, run_id))

    def add(self, run: Run, keep_after_finish: float) -> None:
        key = (run.user, run.id)
        self._runs[key] = run

        def forget(finished: Run) -> None:
            self.total[finished.outcome or "unknown"] += 1
            self.tokens += finished.streamed
            interruption = finished._interruption
            if isinstance(interruption, Cancelled):
                self.cancellations[interruption.reason] += 1
            if keep_after_finish > 0:
                asyncio.get_running_loop().call_later(keep_after_finish, self._drop, key, finished)
            else:
                self._drop(key, finished)

        run.on_finish.append(forget)

    def _drop(self, key: tuple[str | None, str], run: Run) -> None:
        if self._runs.get(key) is run:
            del self._runs[key]
        run.release()

    def active(self) -> list[Run]:
        return [run for run in self._runs.values() if not run.finished]


async def drive(run: Run, events: AsyncIterator[Event]) -> None:
    """Push an agent's or a workflow's events into ``run``; end it with exactly one terminal event."""
    try:
        async with aclosing(events) as stream:
            async for event in stream:
                if event.terminal:
                    run.finish(event)
                    return
                run.push(event)
                if run.full:
                    await run.room()
        run.finish(Done("stop", agent=run.agent, workflow=run.workflow))
    except asyncio.CancelledError:
        run.finish(run.interruption())
    except Exception:
        log.exception("run %s failed", run.id)
        run.finish(ErrorEvent("internal_error", "internal error (see server log)", False,
                              agent=run.agent, workflow=run.workflow))


def estimate_tokens(messages: Sequence[dict[str, Any]]) -> int:
    """A rough prompt size (4 characters a token) for usage the upstream did not report."""
    chars = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
    return chars // 4 + 4 * len(messages)


async def stream_model(
    run: Run,
    upstream: UpstreamClient,
    messages: Sequence[dict[str, Any]],
    *,
    model: str | None = None,
    tools: Sequence[dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    collect: list[str] | None = None,
    collect_chars: float = math.inf,
) -> None:
    """Relay one completion into ``run`` and end it with exactly one terminal event.

    With ``collect``, the answer's text is appended to it too, until it holds
    more than ``collect_chars`` characters: a caller that keeps answers (a chat
    history) keeps no more than that, and an answer that runs for an hour must
    not grow the server's memory with it.

    This is the hot path: per chunk it does a type check, one append, and a
    buffer check; no logging, no encoding, no task creation.
    """
    agent, workflow = run.agent, run.workflow
    collected = 0
    run.prompt_estimate = estimate_tokens(messages)
    finish_reason = "stop"
    try:
        run.push(Start(model or upstream.config.model, agent=agent, workflow=workflow))
        async with aclosing(upstream.batches(messages, model=model, tools=tools, params=params)) as batches:
            async for batch in batches:
                for event in batch:
                    kind = type(event)
                    if kind is TextDelta:
                        if event.choice:  # type: ignore[union-attr]
                            continue
                        text = event.text  # type: ignore[union-attr]
                        delta = event.kind  # type: ignore[union-attr]
                        if delta == "content":
                            run.push_text(Token, text, agent, workflow)
                            if collect is not None and collected <= collect_chars:
                                collect.append(text)
                                collected += len(text)
                        else:
                            run.push_text(Thinking if delta == "reasoning" else Refusal, text, agent, workflow)
                        if run.full:
                            run.wake()
                            await run.room()
                    elif kind is ToolCall:
                        call: ToolCall = event  # type: ignore[assignment]
                        if not call.choice:
                            run.push(ToolCallEvent(call.id, call.name, call.arguments, agent=agent,
                                                   workflow=workflow))
                    elif kind is Finish:
                        if not event.choice:  # type: ignore[union-attr]
                            finish_reason = event.reason  # type: ignore[union-attr]
                    elif kind is Usage:
                        usage: Usage = event  # type: ignore[assignment]
                        run.push(UsageEvent(usage.prompt_tokens, usage.completion_tokens, usage.total_tokens,
                                            agent=agent, workflow=workflow))
                run.wake()
        run.finish(Done(finish_reason, agent=agent, workflow=workflow))
    except asyncio.CancelledError:
        run.finish(run.interruption())
    except UpstreamError as exc:
        run.finish(ErrorEvent(exc.code, exc.message, exc.retryable, agent=agent, workflow=workflow))
    except Exception:
        log.exception("run %s failed", run.id)
        run.finish(ErrorEvent("internal_error", "internal error (see server log)", False,
                              agent=agent, workflow=workflow))
