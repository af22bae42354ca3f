"""The engine without sockets: events in, frames out, at any interleaving."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core.events import Answer, Done, Event, Producer, Start, Thinking, Token, ToolCallEvent
from wsagent.core.render import Thoughts, Words
from wsagent.engine.pump import pump
from wsagent.engine.run import Run, RunStateError

from .helpers import Sink


async def batches(items: Sequence[Sequence[Event]]) -> Producer:
    for batch in items:
        yield batch


async def run_to_end(run: Run, producer: Producer) -> None:
    run.start(pump(run, lambda: producer))
    await run.wait()


async def test_a_token_budget_ends_the_run_with_its_error_at_any_speed() -> None:
    """A producer that never suspends (a model at full speed) once reached ``done`` before the
    budget's cancellation landed: the run said ``stop`` after 50 tokens, silently truncated."""
    run = Run("fast")
    run.budget(0, 50)
    sink = Sink()
    run.subscribe(sink, primary=True)
    await run_to_end(run, batches([[Token(f"w{i} ") for i in range(400)]]))
    events = sink.events()
    assert events[-1]["type"] == "error" and events[-1]["code"] == "budget_exceeded"
    assert "".join(e.get("content", "") for e in events if e["type"] == "token") == "".join(
        f"w{i} " for i in range(50))


text_batches = st.lists(st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=8), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None)
@given(text_batches)
def test_the_agent_path_merges_as_the_model_path_does(reads: list[list[str]]) -> None:
    """An agent's answer deltas and a model's tokens, read in the same batches, leave as the same
    frames (one per read, while the client keeps up): the agent path once sent a frame per delta."""

    async def frames(cls: type[Token] | type[Answer]) -> list[dict[str, Any]]:
        run = Run("r")
        sink = Sink()
        run.subscribe(sink, primary=True)
        await run_to_end(run, batches([[cls(text) for text in read] for read in reads]))
        return sink.events()

    async def both() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return await frames(Token), await frames(Answer)

    model, agent = asyncio.run(both())
    assert [{**e, "type": "token"} if e["type"] == "answer" else e for e in agent] == model
    assert sum(e["type"] == "token" for e in model) == len(reads)


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("text"), st.text(min_size=1, max_size=5)),
                          st.tuples(st.just("call"), st.text(max_size=5)),
                          st.tuples(st.just("take"), st.just("")),
                          st.tuples(st.just("attach"), st.just(""))), max_size=40),
       st.integers(min_value=0, max_value=64))
def test_any_interleaving_delivers_every_event_once_in_order(ops: list[tuple[str, str]], replay: int) -> None:
    """Pushes, takes and late watchers in any order: every watcher sees seq 1, 2, 3... (a late one
    from where the log starts, or a ``lagging`` error), the text that was pushed, one terminal event."""
    run = Run("r", replay_bytes=replay, buffer_bytes=10**9)
    owner = Sink(eager=False)
    run.subscribe(owner, primary=True)
    late: list[Sink] = []
    text = ""
    for op, value in ops:
        if op == "text":
            run.push(Token(value))
            text += value
        elif op == "call":
            run.push(ToolCallEvent("c", value, "{}"))
        elif op == "take":
            owner.drain()
        else:
            late.append(Sink(eager=False))
            run.subscribe(late[-1], run.oldest_kept - 1)
    run.end(Done("stop"))
    for sink in [owner, *late]:
        sink.drain()
        events = sink.events()
        if events[-1]["type"] == "error" and events[-1]["code"] == "lagging":
            assert sink is not owner
            continue
        seqs = [e["seq"] for e in events]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        assert [e["type"] for e in events].count("done") == 1 and events[-1]["type"] == "done"
        if sink is owner:
            assert seqs[0] == 1 and "".join(e["content"] for e in events if e["type"] == "token") == text


def test_a_watcher_that_does_not_read_never_holds_the_producer_back() -> None:
    run = Run("r", buffer_bytes=100, replay_bytes=50)
    owner, idle = Sink(), Sink(eager=False)
    run.subscribe(owner, primary=True)
    run.subscribe(idle)
    for i in range(1000):
        run.push(Token(f"token {i} "))
        run.wake()
        assert not run.full
    idle.drain()
    (error,) = idle.events()
    assert error["type"] == "error" and error["code"] == "lagging" and error["retryable"]
    assert idle.subs == [] and run.watchers == 1


def test_the_run_s_own_client_holds_the_producer_back() -> None:
    run = Run("r", buffer_bytes=100)
    owner = Sink(eager=False)
    run.subscribe(owner, primary=True)
    for i in range(30):
        run.push(Token(f"token {i} "))
    assert run.full
    owner.drain()
    assert not run.full


def test_replay_bytes_bounds_what_the_log_keeps() -> None:
    """The log keeps each event once: a JSON run once also kept a text-mode copy of every event,
    and only the JSON copies counted, so a log held about twice ``replay_bytes``."""
    run = Run("r", replay_bytes=4096)
    owner = Sink()
    run.subscribe(owner, primary=True)
    for i in range(5000):
        run.push(Token(f"word{i} "))
        run.wake()
    stored = sum(len(p) for p in run._log.payloads)
    assert stored == run.log_bytes <= 4096 + 16
    assert len(run._log.payloads) == len(run._log.codes) == len(run._log.borns)


def test_replay_bytes_bound_a_run_whose_end_left_in_its_last_take() -> None:
    """A whole answer and its ``done`` taken at once (one upstream read) is trimmed like any take: the
    last take once ended the run's own client before its log was trimmed, and the run kept everything."""
    run = Run("r", replay_bytes=100)
    owner = Sink(eager=False)
    run.subscribe(owner, primary=True)
    for i in range(300):
        run.push(Token(f"word{i} "))
    run.end(Done("stop"))
    owner.drain()
    assert owner.events()[-1]["type"] == "done"
    assert run.oldest_kept > 2 and run.log_bytes <= 100 + 64


def test_the_phase_table_refuses_what_a_finished_run_cannot_do() -> None:
    run = Run("r")
    run.push(Start("m"))
    run.end(Done("stop"))
    run.cancel("late")  # a late cancel: nothing to stop, and no second terminal event
    assert run.outcome == "done"
    with pytest.raises(RunStateError):
        run.push(Token("x"))
    with pytest.raises(RunStateError):
        run.end(Done("stop"))


def test_an_interrupted_run_ends_with_its_interruption() -> None:
    run = Run("r")
    sink = Sink()
    run.subscribe(sink, primary=True)
    run.push(Token("a"))
    run.cancel("first")  # no producer task: ends at once
    assert run.outcome == "cancelled" and sink.events()[-1]["reason"] == "first"


def test_renderers_hold_back_a_bounded_amount() -> None:
    """A word or a sentence that never ends is sent once it is 4 KiB long, not held for ever."""
    words, thoughts = Words(), Thoughts()
    out: list[str] = []
    for _ in range(100):
        words.render(Token.kind, "x" * 100, out, (None, None))
        thoughts.render(Thinking.kind, "y" * 100, out, (None, None))
    assert len(words.pending) <= 4096 and len(thoughts.thought) <= 4096
    assert sum(len(frame) for frame in out if frame.startswith("x")) >= 10_000 - 4096


async def test_a_run_cancelled_before_its_producer_ever_ran_ends_once() -> None:
    """A cancel in the same turn of the loop as the start: the task never takes its first step, so its producer
    (whose ``finally`` ends a run) never runs. The cancel ends the run itself: one ``cancelled``, and no task."""
    ran: list[str] = []

    async def never() -> Producer:
        ran.append("producer")
        yield [Token("unseen")]

    run = Run("early")
    sink = Sink()
    run.subscribe(sink, primary=True)
    run.start(pump(run, never))
    task = run.task
    assert task is not None
    run.cancel("gone at once")
    assert run.finished and run.task is None
    await asyncio.wait([task], timeout=5)  # its one step: the cancellation, thrown into a coroutine never started
    assert task.cancelled()
    events = sink.events()
    assert [e["type"] for e in events] == ["usage", "cancelled"] and events[-1]["reason"] == "gone at once"
    assert run.task is None and not ran
