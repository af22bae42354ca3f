"""The run's ``WAITING`` phase without sockets: a producer asks, a person answers or steers, at any interleaving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core.events import Answer, ApprovalRequest, Done, Producer, Steered, Token
from wsagent.core.person import NOBODY, Decision, approval, steering
from wsagent.core.ui_stream import UIChunks
from wsagent.engine.pump import pump
from wsagent.engine.run import NotAnswerable, Phase, Run, RunStateError, Watch

from .helpers import Sink


async def asking(calls: Sequence[str], decisions: list[Decision], then: str = "after") -> Producer:
    """Asks about ``calls`` together, records each decision, then answers ``then``."""
    yield [ApprovalRequest(call_id, "tool", "{}") for call_id in calls]
    for call_id in calls:
        decisions.append(await approval(call_id))
    yield [Answer(then)]


async def settled(run: Run) -> None:
    """Let the run's task take its next steps (it waits on nothing but the loop)."""
    for _ in range(5):
        await asyncio.sleep(0)


def kinds(sink: Sink) -> list[str]:
    return [e["type"] for e in sink.events()]


async def test_a_request_waits_and_an_answer_lets_it_go_on() -> None:
    run = Run("r")
    sink = Sink()
    run.subscribe(sink, primary=True)
    decisions: list[Decision] = []
    run.start(pump(run, lambda: asking(["c1"], decisions)))
    await settled(run)
    assert run.phase is Phase.WAITING and run.waiting_for == ["c1"] and run.task is not None
    assert kinds(sink) == ["approval_request"]
    run.answer("c1", False, "no")
    await run.wait()
    assert decisions == [Decision(False, "no")]
    assert kinds(sink) == ["approval_request", "approval", "answer", "usage", "done"]
    assert sink.events()[1] == {"type": "approval", "id": "r", "seq": 2, "call_id": "c1", "approved": False,
                                "reason": "no"}


async def test_wrong_answers_change_nothing() -> None:
    run = Run("r", grace=60)
    run.subscribe(Sink(), primary=True)
    run.start(pump(run, lambda: asking(["c1"], [])))
    await settled(run)
    with pytest.raises(NotAnswerable) as unknown:
        run.answer("c2", True)
    assert unknown.value.code == "unknown_call" and run.phase is Phase.WAITING
    run.answer("c1", True)
    with pytest.raises(NotAnswerable) as twice:
        run.answer("c1", False)
    assert twice.value.code == "already_answered"
    await run.wait()
    with pytest.raises(NotAnswerable) as ended:
        run.answer("c1", True)
    assert ended.value.code == "run_ended"


async def test_an_unanswered_request_times_out_with_one_terminal_event() -> None:
    run = Run("r")
    run.approval_timeout = 0.05
    sink = Sink()
    run.subscribe(sink, primary=True)
    loop = asyncio.get_running_loop()
    run.start(pump(run, lambda: asking(["c1"], [])))
    started = loop.time()
    await run.wait()
    assert loop.time() - started >= 0.05
    events = sink.events()
    assert [e["type"] for e in events] == ["approval_request", "usage", "error"]
    assert events[-1]["code"] == "approval_timeout" and "tool (call c1)" in events[-1]["message"]


async def test_the_resume_grace_does_not_run_while_waiting_and_starts_after() -> None:
    run = Run("r", grace=0)  # a client that leaves would cancel it at once, were it not waiting
    sink = Sink()
    sub = run.subscribe(sink, primary=True)

    async def slow() -> Producer:
        yield [ApprovalRequest("c1", "tool", "{}")]
        await approval("c1")
        yield [Answer("working")]
        await asyncio.Event().wait()  # a long step, which the grace cuts short

    run.start(pump(run, slow))
    await settled(run)
    run.unsubscribe(sub, 0)
    await settled(run)
    assert run.watch is Watch.ORPHANED and run.phase is Phase.WAITING and not run.finished
    run.answer("c1", True)  # answered, with nobody watching: the grace (0) applies now
    await run.wait()
    assert run.outcome == "cancelled"


async def test_the_time_budget_pauses_while_waiting() -> None:
    run = Run("r")
    run.approval_timeout = 5
    sink = Sink()
    run.subscribe(sink, primary=True)
    run.budget(0.05, 0)
    run.start(pump(run, lambda: asking(["c1"], [])))
    await asyncio.sleep(0.1)  # twice the budget, all of it waiting
    assert run.phase is Phase.WAITING
    run.answer("c1", True)
    await run.wait()
    assert run.outcome == "done"


async def test_cancel_while_waiting_ends_once() -> None:
    run = Run("r")
    sink = Sink()
    run.subscribe(sink, primary=True)
    run.start(pump(run, lambda: asking(["c1", "c2"], [])))
    await settled(run)
    run.cancel("stop")
    run.cancel("again")
    await run.wait()
    assert kinds(sink) == ["approval_request", "approval_request", "usage", "cancelled"]


async def test_a_run_that_cannot_ask_denies_at_once() -> None:
    run = Run("r")
    run.askable = False
    sink = Sink()
    run.subscribe(sink, primary=True)
    decisions: list[Decision] = []
    await asyncio.wait_for(_run(run, asking(["c1"], decisions)), 1)
    assert not decisions[0].approved and kinds(sink) == ["approval_request", "approval", "answer", "usage", "done"]


async def _run(run: Run, producer: Producer) -> None:
    run.start(pump(run, lambda: producer))
    await run.wait()


async def test_outside_a_run_nobody_approves_and_nothing_steers() -> None:
    assert await approval("c1") == NOBODY and steering() == []


async def test_a_push_after_the_end_is_a_bug_whatever_it_carries() -> None:
    run = Run("r")
    run.end(Done("stop"))
    with pytest.raises(RunStateError):
        run.push(ApprovalRequest("c1", "tool", "{}"))


async def steered_agent(log: list[list[str]]) -> Producer:
    """Takes steering at two step boundaries and reports what it took."""
    for step in range(2):
        yield [Answer(f"step{step} ")]
        await asyncio.sleep(0)
        heard = steering()
        log.append(heard)
        if heard:
            yield [Steered(text) for text in heard]


async def test_steering_is_delivered_once_or_reported_undelivered() -> None:
    run = Run("s")
    run.steerable = True
    sink = Sink()
    run.subscribe(sink, primary=True)
    taken: list[list[str]] = []
    run.steer("first")
    run.start(pump(run, lambda: steered_agent(taken)))
    await run.wait()
    run2 = Run("s2")
    with pytest.raises(NotAnswerable) as model:
        run2.steer("x")
    assert model.value.code == "not_steerable"
    steers = [e for e in sink.events() if e["type"] == "steer"]
    assert taken[0] == ["first"] and steers == [{"type": "steer", "id": "s", "seq": steers[0]["seq"],
                                                 "content": "first", "delivered": True}]


async def never_steered() -> Producer:
    yield [Answer("a")]
    await asyncio.sleep(3600)


async def test_a_message_the_agent_never_took_is_reported_with_why() -> None:
    run = Run("s")
    run.steerable = True
    sink = Sink()
    run.subscribe(sink, primary=True)
    run.start(pump(run, never_steered))
    await settled(run)
    run.steer("late")
    run.cancel()
    await run.wait()
    steer = next(e for e in sink.events() if e["type"] == "steer")
    assert steer["delivered"] is False and steer["reason"] == "cancelled"
    assert kinds(sink)[-1] == "cancelled"


def _ui(sink: Sink) -> list[dict[str, Any]]:
    return [json.loads(f) for f in sink.frames]


async def test_an_ai_sdk_response_pauses_at_a_pending_request_and_a_replay_after_the_answer_does_not() -> None:
    run = Run("r", key="k")
    live = Sink()
    run.subscribe(live, 0, UIChunks("q1", "m"), primary=True, pauses=True)
    run.start(pump(run, lambda: asking(["c1", "c2"], [])))
    await settled(run)
    chunks = [f["chunk"]["type"] for f in _ui(live) if f["type"] == "chunk"]
    assert chunks.count("tool-approval-request") == 2 and chunks[-2:] == ["finish-step", "finish"]
    assert _ui(live)[-1] == {"type": "end", "requestId": "q1"} and not live.subs
    run.answer("c1", True)
    run.answer("c2", False)
    await run.wait()
    replay = Sink()
    run.subscribe(replay, 0, UIChunks("q2", "m"), pauses=True)
    types = [f["chunk"]["type"] for f in _ui(replay) if f["type"] == "chunk"]
    assert types.count("finish") == 1 and "tool-output-denied" in types and types[-1] == "finish"


reads = st.lists(st.sampled_from(["text", "ask", "answer", "steer", "cancel", "leave"]), min_size=1, max_size=14)


@settings(max_examples=80, deadline=None)
@given(reads, st.sampled_from([0.0, 30.0]))
def test_every_interleaving_ends_with_exactly_one_terminal_event(steps: list[str], grace: float) -> None:
    """Asks, answers, steering messages, cancels and a client leaving, in any order and in the same read:
    the run ends with exactly one terminal event, numbered without a gap, and nothing waits for ever."""

    async def scenario() -> None:
        run = Run("h", grace=grace)
        run.steerable = True
        run.approval_timeout = 0.2
        sink = Sink()
        sub = run.subscribe(sink, primary=True)
        asked: list[str] = []

        async def producer() -> Producer:
            for n, step in enumerate(steps):
                if step == "text":
                    yield [Token(f"t{n} ")]
                elif step == "ask":
                    asked.append(f"c{n}")
                    yield [ApprovalRequest(f"c{n}", "tool", "{}")]
                    await approval(f"c{n}")
                heard = steering()
                if heard:
                    yield [Steered(text) for text in heard]
                await asyncio.sleep(0)

        async def person() -> None:
            for step in steps:
                if step == "answer" and run.waiting_for:
                    run.answer(run.waiting_for[0], True)
                elif step == "steer" and not run.finished and run.phase is not Phase.INTERRUPTED:
                    run.steer("s")
                elif step == "cancel":
                    run.cancel()
                elif step == "leave" and not sub.ended:
                    run.unsubscribe(sub, grace)
                await asyncio.sleep(0)
            while run.waiting_for:
                run.answer(run.waiting_for[0], False)
                await asyncio.sleep(0)

        run.start(pump(run, producer))
        await asyncio.gather(person(), asyncio.wait_for(run.wait(), 5))
        watcher = Sink()
        run.subscribe(watcher)  # the whole log, as a late watcher sees it
        events = watcher.events()
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert [e["type"] in ("done", "error", "cancelled") for e in events].count(True) == 1
        assert events[-1]["type"] in ("done", "error", "cancelled")

    asyncio.run(scenario())


async def test_a_replay_of_a_run_whose_request_was_never_answered_shows_how_it_ended() -> None:
    """An AI SDK reload of a chat whose approval timed out stopped at the request, as if it still waited: the
    page offered Approve for a run that had ended, and never saw its error."""
    run = Run("r", key="k")
    run.approval_timeout = 0.05
    run.subscribe(Sink(), primary=True)
    run.start(pump(run, lambda: asking(["c1"], [])))
    await run.wait()
    replay = Sink()
    run.subscribe(replay, 0, UIChunks("q", "m"), pauses=True)
    types = [f["chunk"]["type"] for f in _ui(replay) if f["type"] == "chunk"]
    assert types[-2:] == ["tool-approval-request", "error"] and _ui(replay)[-1]["type"] == "end"


async def test_a_call_id_asked_again_is_never_answered_by_the_earlier_answer() -> None:
    """Found by the outside attack: an answer was remembered by call id for the whole run, so a later request
    with the same id (a model that numbers its calls per turn: call_0_0 each time) was approved at once,
    whatever its arguments, and nobody was asked. A request with an id the run already asked about is denied."""
    run = Run("r")
    sink = Sink()
    run.subscribe(sink, primary=True)
    decisions: list[Decision] = []

    async def twice() -> Producer:
        for expression in ("1 + 1", "6 * 7"):
            yield [ApprovalRequest("call_0_0", "calculator", json.dumps({"expression": expression}))]
            decisions.append(await approval("call_0_0"))

    run.start(pump(run, twice))
    await settled(run)
    run.answer("call_0_0", True)
    await run.wait()
    assert decisions[0].approved and not decisions[1].approved and "already" in (decisions[1].reason or "")
    answers = [e["approved"] for e in sink.events() if e["type"] == "approval"]
    assert answers == [True, False]
