"""``/ws/ai-sdk``'s busy policies: a ``send`` for a chat whose response still streams, with the real ``websockets``
client speaking ``WebSocketChatTransport``'s frames (one socket, two requests for one chat id), the real server and
the simulated model over real HTTP.

Each policy is tried as the server's ``--on-busy`` and as a request's ``body.on_busy`` over another default, with the
second ``send`` sent once the first response streams and back to back with the first (both in one read). Every wait
reads frames until something is seen, bounded by :data:`~tests.helpers.LIMIT`; nothing sleeps."""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from wsagent.core.chunks import TextDelta
from wsagent.engine.run import Phase, Run
from wsagent.handlers.ai_sdk import MAX_QUEUED
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import LIMIT, ServerFactory, local_broker, upstream_for, ws_connect

POLICIES = ("enqueue", "reject", "interrupt", "steer")
#: A default other than the policy a request asks for, so that ``body.on_busy`` is seen to win.
OTHER = {"enqueue": "reject", "reject": "enqueue", "interrupt": "enqueue", "steer": "reject"}
#: Long enough to be streaming when the second ``send`` is handled (about half a second).
FIRST = "first question sim:rate=100 sim:tokens=40"
#: Far too long to end by itself within a test: it ends when it is interrupted or aborted.
ENDLESS = "an endless answer sim:rate=50 sim:tokens=100000"
SECOND = "second question sim:tokens=12"
#: The built-in agent calls its calculator; at 20 tokens a second its steps take over a second in all.
AGENT_TASK = "What is 6 * 7? sim:rate=20"
STEER = "and say it in French"
CALC = "What is (2 + 3) * 7?"
REJECTED = "a response is already streaming for this chat (on_busy=reject); abort it first"
BAD_POLICY = "'on_busy' must be one of enqueue, reject, interrupt, steer"

Frame = dict[str, Any]
_probes = itertools.count()


# -- frames ----------------------------------------------------------------------------------------------------------


def user(text: str, n: int = 1) -> dict[str, Any]:
    return {"id": f"user-{n}", "role": "user", "parts": [{"type": "text", "text": text}]}


def history(*texts: str) -> list[dict[str, Any]]:
    """A chat of user messages only (as ``useChat`` sends it: the whole chat each time)."""
    return [user(text, n) for n, text in enumerate(texts, 1)]


def send(request_id: str, chat_id: str, messages: list[dict[str, Any]], **body: Any) -> str:
    return json.dumps({"type": "send", "requestId": request_id, "id": chat_id, "trigger": "submit-message",
                       "messages": messages, "headers": {}, "body": body})


def abort(request_id: str) -> str:
    return json.dumps({"type": "abort", "requestId": request_id})


def resume(request_id: str, chat_id: str) -> str:
    return json.dumps({"type": "resume", "requestId": request_id, "id": chat_id, "headers": {}, "body": {}})


class Frames:
    """What one socket received, in order: each frame as sent and parsed; reads only while a condition waits."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.raw: list[str] = []
        self.log: list[Frame] = []

    async def until(self, condition: Callable[[], bool], limit: float = LIMIT) -> None:
        """Read frames until ``condition()`` holds (checked before each read), at most ``limit`` seconds."""
        async with asyncio.timeout(limit):
            while not condition():
                message = await self.ws.recv()
                assert isinstance(message, str), message
                frame = json.loads(message)
                assert isinstance(frame, dict), frame
                self.raw.append(message)
                self.log.append(frame)

    async def ended(self, *request_ids: str) -> None:
        """Read until each request has ended (an ``end`` or an ``error`` frame)."""
        await self.until(lambda: all(self.over(r) for r in request_ids))

    async def started(self, request_id: str) -> None:
        """Read until the request's first frame."""
        await self.until(lambda: bool(self.of(request_id)))

    async def streaming(self, request_id: str) -> None:
        """Read until the request streams the model's words (a reasoning or text delta)."""
        await self.until(lambda: any(t in ("reasoning-delta", "text-delta") for t in self.types(request_id)))
        assert not self.over(request_id)

    async def settle(self) -> None:
        """A round trip: a ``resume`` for a chat nobody has, answered ``no-active`` after every frame the server
        had queued before it (what a request sends after its end would show up here)."""
        probe = f"probe-{next(_probes)}"
        await self.ws.send(resume(probe, f"chat-nobody-{probe}"))
        await self.until(lambda: any(f.get("requestId") == probe for f in self.log))
        assert [f for f in self.log if f.get("requestId") == probe] == [{"type": "no-active", "requestId": probe}]

    def of(self, request_id: str) -> list[Frame]:
        return [f for f in self.log if f.get("requestId") == request_id]

    def raw_of(self, request_id: str) -> list[str]:
        return [r for r, f in zip(self.raw, self.log, strict=True) if f.get("requestId") == request_id]

    def over(self, request_id: str) -> bool:
        return any(f["type"] in ("end", "error") for f in self.of(request_id))

    def chunks(self, request_id: str) -> list[Frame]:
        return [f["chunk"] for f in self.of(request_id) if f["type"] == "chunk"]

    def types(self, request_id: str) -> list[str]:
        return [str(c["type"]) for c in self.chunks(request_id)]

    def position(self, request_id: str, kind: str) -> int:
        """Where the request's first frame of type ``kind`` is in the socket's order."""
        return next(i for i, f in enumerate(self.log) if f.get("requestId") == request_id and f["type"] == kind)

    def ends_once(self, request_id: str) -> list[Frame]:
        """The request's chunks, checked: numbered 0, 1, ... without a gap, then exactly one ``end``, last, and
        no ``error`` frame."""
        frames = self.of(request_id)
        assert [f["type"] for f in frames].count("end") == 1, frames
        assert frames[-1] == {"type": "end", "requestId": request_id}, frames[-1]
        chunks = frames[:-1]
        assert all(f["type"] == "chunk" for f in chunks), [f["type"] for f in chunks]
        assert [f["sequence"] for f in chunks] == list(range(len(chunks))), [f["sequence"] for f in chunks]
        return [f["chunk"] for f in chunks]

    def refused(self, request_id: str) -> str:
        """The request got one ``error`` frame and nothing else; its text."""
        frames = self.of(request_id)
        assert [f["type"] for f in frames] == ["error"], frames
        assert set(frames[0]) == {"type", "requestId", "errorText"}
        return str(frames[0]["errorText"])


def text(chunks: list[Frame], kind: str = "text") -> str:
    return "".join(c["delta"] for c in chunks if c["type"] == f"{kind}-delta")


def finished(chunks: list[Frame]) -> None:
    """A whole answer: ``start`` and ``start-step`` first, ``finish-step`` and ``finish`` (reason stop) last."""
    types = [c["type"] for c in chunks]
    assert types[:2] == ["start", "start-step"] and types[-2:] == ["finish-step", "finish"], types
    assert chunks[-1]["finishReason"] == "stop" and types.count("finish") == 1 and "abort" not in types


def merged(chunks: list[Frame]) -> list[Frame]:
    """The chunks with consecutive deltas of one part joined (a run merges what its client has not taken yet, so
    how deltas are cut depends on timing) and the message id (of a random run key) left out."""
    out: list[Frame] = []
    for chunk in chunks:
        last = out[-1] if out else None
        if (last is not None and chunk["type"] in ("text-delta", "reasoning-delta") and last["type"] == chunk["type"]
                and last["id"] == chunk["id"]):
            out[-1] = {**last, "delta": last["delta"] + chunk["delta"]}
        else:
            out.append({k: v for k, v in chunk.items() if k != "messageId"})
    return out


async def answer_of(sim: SimulatorServer, *texts: str) -> str:
    """The simulator's deterministic answer to a chat of these user messages, as a plain model run sends it."""
    client = upstream_for(sim)
    parts = [e.text async for e in client.stream([{"role": "user", "content": t} for t in texts])
             if isinstance(e, TextDelta) and e.kind == "content"]
    await client.close()
    return "".join(parts)


def runs(server: WsAgentServer, chat_id: str) -> list[Run]:
    """The runs the server holds for the chat (a finished one is kept for ``--ai-sdk-grace``)."""
    return [r for r in local_broker(server) if r.id == f"ai-sdk:{chat_id}"]


async def busy_server(make_server: ServerFactory, policy: str, where: str, **settings: Any
                      ) -> tuple[WsAgentServer, dict[str, Any]]:
    """A server and the second request's body: the policy as the server's default, or in the body over another."""
    if where == "server":
        return await make_server(on_busy=policy, **settings), {}
    return await make_server(on_busy=OTHER[policy], **settings), {"on_busy": policy}


async def two_sends(frames: Frames, chat_id: str, first: tuple[list[dict[str, Any]], dict[str, Any]],
                    second: tuple[list[dict[str, Any]], dict[str, Any]], same_read: bool) -> None:
    """Send request ``a`` then ``b`` for ``chat_id``: back to back, or ``b`` once ``a``'s response streams the
    model's deltas (its ``start`` comes before the model is asked).

    Back to back, nothing is read in between, and the server (on this event loop) cannot run between the two
    writes: both frames are in the socket when it reads, and it handles ``b`` right after starting ``a``."""
    await frames.ws.send(send("a", chat_id, first[0], **first[1]))
    if not same_read:
        await frames.streaming("a")
    await frames.ws.send(send("b", chat_id, second[0], **second[1]))


WHERE = pytest.mark.parametrize("where", ["server", "request"])
SAME_READ = pytest.mark.parametrize("same_read", [False, True], ids=["streaming", "same-read"])


# -- reject ----------------------------------------------------------------------------------------------------------


@WHERE
@SAME_READ
async def test_reject_refuses_the_new_request_and_leaves_the_response_whole(
        make_server: ServerFactory, sim: SimulatorServer, where: str, same_read: bool) -> None:
    server, body = await busy_server(make_server, "reject", where)
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await ws.send(send("ref", "chat-reference-0123456789", history(FIRST)))  # the same answer, left alone
        await frames.ended("ref")
        await two_sends(frames, "chat-reject-0123456789", (history(FIRST), {}), (history(FIRST, SECOND), body),
                        same_read)
        await frames.ended("b")
        assert frames.refused("b") == REJECTED
        assert not frames.over("a")  # refused while the response streamed
        await frames.ended("a")
        await frames.settle()
    reference, first = frames.ends_once("ref"), frames.ends_once("a")
    finished(first)
    assert merged(first) == merged(reference)
    assert sim.simulator.stats.streams == 2  # the reference and the first: the refused one never went upstream
    assert text(first) == await answer_of(sim, FIRST)
    assert frames.refused("b") == REJECTED  # still only the one frame
    (run,) = runs(server, "chat-reject-0123456789")
    assert run.outcome == "done"


# -- interrupt -------------------------------------------------------------------------------------------------------


@WHERE
@SAME_READ
async def test_interrupt_aborts_the_running_response_then_answers(
        make_server: ServerFactory, sim: SimulatorServer, where: str, same_read: bool) -> None:
    server, body = await busy_server(make_server, "interrupt", where)
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, "chat-interrupt-0123456789", (history(ENDLESS), {}),
                        (history(ENDLESS, SECOND), body), same_read)
        await frames.ended("a", "b")
        await frames.settle()
    first, second = frames.ends_once("a"), frames.ends_once("b")
    assert first[-1] == {"type": "abort", "reason": "interrupted by a new message"}, first[-3:]
    assert [c["type"] for c in first].count("abort") == 1 and "finish" not in [c["type"] for c in first]
    finished(second)
    # the model server saw the interrupted answer's connection close (back to back, it may not have been asked yet)
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: s.completed == 1 and s.active == 0 and s.disconnected == s.streams - 1, LIMIT)
    assert stats.streams == 2 or (same_read and stats.streams == 1)
    assert text(second) == await answer_of(sim, ENDLESS, SECOND)
    assert second[0]["messageId"] != first[0]["messageId"]  # a new assistant message
    assert frames.position("a", "end") < frames.position("b", "chunk")  # cancelled first, then the new one


@WHERE
@SAME_READ
async def test_interrupt_also_ends_the_requests_queued_before_it(make_server: ServerFactory, sim: SimulatorServer,
                                                                 where: str, same_read: bool) -> None:
    """Two sends back to back while a response streams (or all three in one read), under interrupt: the response is
    aborted, the request queued behind it ends without starting (an ``end``, no error), and the newest is answered.
    (Found from outside: only the running response was cancelled, the two queued requests raced when it ended,
    and the loser, sometimes the newest, got "run id ... is already in use".)"""
    server, body = await busy_server(make_server, "interrupt", where)
    chat = "chat-interrupt-three-0123"
    third = "third question sim:tokens=10"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await ws.send(send("a", chat, history(ENDLESS)))
        if not same_read:  # (in one read, the response is cancelled before its task began: it ends at once)
            await frames.streaming("a")
        await ws.send(send("b", chat, history(ENDLESS, SECOND), **body))
        await ws.send(send("c", chat, history(ENDLESS, SECOND, third), **body))
        await frames.ended("a", "b", "c")
        await frames.settle()
    first, last = frames.ends_once("a"), frames.ends_once("c")
    assert first[-1] == {"type": "abort", "reason": "interrupted by a new message"}, first[-3:]
    assert frames.of("b") == [{"type": "end", "requestId": "b"}]  # never started
    finished(last)
    assert text(last) == await answer_of(sim, ENDLESS, SECOND, third)
    assert frames.position("a", "end") < frames.position("c", "chunk")


# -- enqueue ---------------------------------------------------------------------------------------------------------


@WHERE
@SAME_READ
async def test_enqueue_starts_the_new_request_once_the_response_ended(
        make_server: ServerFactory, sim: SimulatorServer, where: str, same_read: bool) -> None:
    server, body = await busy_server(make_server, "enqueue", where)
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, "chat-enqueue-0123456789", (history(FIRST), {}), (history(FIRST, SECOND), body),
                        same_read)
        await frames.ended("a", "b")
        await frames.settle()
    first, second = frames.ends_once("a"), frames.ends_once("b")
    finished(first)
    finished(second)
    assert frames.position("a", "end") < frames.position("b", "chunk")  # nothing of the second before the end
    assert sim.simulator.stats.streams == 2 and sim.simulator.stats.completed == 2
    assert text(first) == await answer_of(sim, FIRST)
    assert text(second) == await answer_of(sim, FIRST, SECOND)
    assert second[0]["messageId"] != first[0]["messageId"]


# -- steer -----------------------------------------------------------------------------------------------------------


@WHERE
@SAME_READ
async def test_steer_joins_the_running_agent(make_server: ServerFactory, where: str, same_read: bool) -> None:
    server, body = await busy_server(make_server, "steer", where)
    agent = {"agent": "assistant"}
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, "chat-steer-0123456789", (history(AGENT_TASK), agent),
                        (history(AGENT_TASK, STEER), {**agent, **body}), same_read)
        await frames.ended("b")
        assert not frames.over("a")  # the agent was still running when the message joined it
        await frames.ended("a")
        await frames.settle()
    steered = frames.ends_once("b")
    assert steered == [{"type": "data-steer", "data": {"content": STEER, "status": "sent"}, "transient": True},
                       {"type": "finish"}]
    first = frames.ends_once("a")
    finished(first)
    parts = [c for c in first if c["type"] == "data-steer"]
    assert parts == [{"type": "data-steer", "id": "steer-1", "data": {"content": STEER, "delivered": True}}]
    types = [c["type"] for c in first]
    assert types.index("tool-output-available") < types.index("data-steer") < types.index("finish")
    # the step after the tool's took the message: the model answered it (the simulator speaks of the last user text)
    assert "here is a simulated answer about and say it in French:" in text(first)
    assert "Based on the tool results" not in text(first)
    (run,) = runs(server, "chat-steer-0123456789")  # no second run: the message went into the first
    assert run.outcome == "done"


@WHERE
@SAME_READ
async def test_steer_on_a_model_run_is_enqueued(make_server: ServerFactory, sim: SimulatorServer, where: str,
                                                same_read: bool) -> None:
    server, body = await busy_server(make_server, "steer", where)
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, "chat-steer-model-0123456789", (history(FIRST), {}),
                        (history(FIRST, SECOND), body), same_read)
        await frames.ended("a", "b")
        await frames.settle()
    first, second = frames.ends_once("a"), frames.ends_once("b")
    finished(first)
    finished(second)
    assert "data-steer" not in [c["type"] for c in first + second]
    assert frames.position("a", "end") < frames.position("b", "chunk")
    assert sim.simulator.stats.streams == 2
    assert text(first) == await answer_of(sim, FIRST)
    assert text(second) == await answer_of(sim, FIRST, SECOND)


# -- an invalid policy -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["queue", "REJECT", "", 7, ["steer"], {"on_busy": "steer"}])
@pytest.mark.parametrize("busy", [True, False], ids=["busy", "idle"])
async def test_an_invalid_policy_is_an_error_for_its_request(make_server: ServerFactory, sim: SimulatorServer,
                                                             policy: object, busy: bool) -> None:
    server = await make_server()
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        if busy:
            await ws.send(send("a", "chat-invalid-0123456789", history(FIRST)))
            await frames.started("a")
        await ws.send(send("b", "chat-invalid-0123456789", history(FIRST, SECOND), on_busy=policy))
        await frames.ended("b", *(["a"] if busy else []))
        await frames.settle()
    assert frames.refused("b") == BAD_POLICY
    assert sim.simulator.stats.streams == int(busy)
    if busy:
        first = frames.ends_once("a")
        finished(first)
        assert text(first) == await answer_of(sim, FIRST)


# -- a response waiting for an approval ------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_new_message_cancels_a_response_waiting_for_approval(make_server: ServerFactory,
                                                                     sim: SimulatorServer, policy: str) -> None:
    server = await make_server(approval_tools=("calculator",))
    chat = "chat-approval-0123456789"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await ws.send(send("a", chat, history(CALC), agent="assistant"))
        await frames.ended("a")
        asked = frames.ends_once("a")
        request = next(c for c in asked if c["type"] == "tool-approval-request")
        assert asked[-1]["type"] == "finish" and asked[-1]["finishReason"] == "tool-calls"
        (waiting,) = runs(server, chat)
        assert waiting.phase is Phase.WAITING and waiting.waiting_for == [request["approvalId"]]
        # useChat's next message: the chat so far, with the unanswered approval in the assistant's message
        assistant = {"id": asked[0]["messageId"], "role": "assistant", "parts": [
            {"type": "step-start"},
            {"type": "dynamic-tool", "toolName": "calculator", "toolCallId": request["toolCallId"],
             "state": "approval-requested", "input": {"expression": "(2 + 3) * 7"},
             "approval": {"id": request["approvalId"]}}]}
        await ws.send(send("b", chat, [user(CALC), assistant, user(SECOND, 2)], on_busy=policy))
        await frames.ended("b")
        await frames.settle()
        await asyncio.wait_for(waiting.wait(), LIMIT)
    assert waiting.outcome == "cancelled"
    assert frames.ends_once("a") == asked  # nothing more for the request that ended at the approval
    second = frames.ends_once("b")
    finished(second)
    assert second[0]["messageId"] != asked[0]["messageId"]
    assert "Based on the tool results" not in text(second)  # the abandoned call never ran
    assert "tool-output-available" not in [c["type"] for c in second]
    assert text(second) == await answer_of(sim, CALC, SECOND)


# -- an abort of a queued request ------------------------------------------------------------------------------------


@SAME_READ
async def test_an_aborted_queued_request_ends_and_never_starts(make_server: ServerFactory, sim: SimulatorServer,
                                                               same_read: bool) -> None:
    server = await make_server()  # on_busy=enqueue
    chat = "chat-queued-0123456789"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, chat, (history(FIRST), {}), (history(FIRST, SECOND), {}), same_read)
        await ws.send(abort("b"))
        await frames.ended("b")
        assert frames.of("b") == [{"type": "end", "requestId": "b"}]
        assert not frames.over("a")  # it went on
        await frames.ended("a")
        await frames.settle()
        # what the chat holds now is the first response: a resume replays it, and nothing else started
        await ws.send(resume("again", chat))
        await frames.ended("again")
        await frames.settle()
    assert sim.simulator.stats.streams == 1
    first = frames.ends_once("a")
    finished(first)
    assert text(first) == await answer_of(sim, FIRST)
    assert frames.of("b") == [{"type": "end", "requestId": "b"}]
    replay = frames.of("again")
    assert replay[0] == {"type": "start", "requestId": "again"}
    replayed = [f["chunk"] for f in replay if f["type"] == "chunk"]
    assert replayed[0]["messageId"] == first[0]["messageId"] and merged(replayed) == merged(first)
    (run,) = runs(server, chat)
    assert run.outcome == "done"


# -- more of a queue -------------------------------------------------------------------------------------------------


@SAME_READ
async def test_enqueue_three_requests_run_one_after_another(make_server: ServerFactory, sim: SimulatorServer,
                                                            same_read: bool) -> None:
    server = await make_server()  # on_busy=enqueue
    chat = "chat-three-0123456789"
    third = "third question sim:tokens=10"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, chat, (history(FIRST), {}), (history(FIRST, SECOND), {}), same_read)
        await ws.send(send("c", chat, history(FIRST, SECOND, third)))
        await frames.ended("a", "b", "c")
        await frames.settle()
    first, second, last = frames.ends_once("a"), frames.ends_once("b"), frames.ends_once("c")
    for chunks in (first, second, last):
        finished(chunks)
    assert frames.position("a", "end") < frames.position("b", "chunk")
    assert frames.position("b", "end") < frames.position("c", "chunk")
    assert sim.simulator.stats.streams == 3
    assert text(second) == await answer_of(sim, FIRST, SECOND)
    assert text(last) == await answer_of(sim, FIRST, SECOND, third)


@SAME_READ
async def test_an_aborted_response_lets_the_queued_request_start(make_server: ServerFactory, sim: SimulatorServer,
                                                                 same_read: bool) -> None:
    server = await make_server()  # on_busy=enqueue
    chat = "chat-abort-running-0123456789"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, chat, (history(ENDLESS), {}), (history(ENDLESS, SECOND), {}), same_read)
        await ws.send(abort("a"))
        await frames.ended("a", "b")
        await frames.settle()
    first, second = frames.ends_once("a"), frames.ends_once("b")
    assert first[-1] == {"type": "abort", "reason": "aborted by client"}
    finished(second)
    assert frames.position("a", "end") < frames.position("b", "chunk")
    assert [r.outcome for r in runs(server, chat)] == ["done"]
    assert text(second) == await answer_of(sim, ENDLESS, SECOND)


async def test_a_queued_request_dies_with_its_socket(make_server: ServerFactory, sim: SimulatorServer) -> None:
    """Found by this file's author: a request queued behind the chat's response started its run after its socket
    had closed, a model call for nobody. A running response outlives its socket (``--ai-sdk-grace``), for a
    resume; a queued one has nothing to resume and goes with the socket."""
    server = await make_server()  # on_busy=enqueue, --ai-sdk-grace 30
    chat = "chat-gone-0123456789"
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        frames = Frames(ws)
        await two_sends(frames, chat, (history(FIRST), {}), (history(FIRST, SECOND), {}), False)
    (first,) = runs(server, chat)
    await asyncio.wait_for(first.wait(), LIMIT)  # it went on without its socket, for a resume, and ended
    async with ws_connect(server, "/ws/ai-sdk") as ws:  # the next page: the chat holds the first response only
        frames = Frames(ws)
        await ws.send(resume("again", chat))
        await frames.ended("again")
    assert [run.outcome for run in runs(server, chat)] == ["done"] and not server.app.broker.active_runs()
    assert sim.simulator.stats.streams == 1


async def test_requests_queued_for_a_chat_are_bounded(make_server: ServerFactory, sim: SimulatorServer) -> None:
    """Found by the outside attack: one socket queued 300 sends of 900 KB each behind one response (327 MB held,
    nothing refused). Requests waiting count against --max-runs-per-connection on their socket, and a chat holds
    at most MAX_QUEUED of them, from every socket."""
    server = await make_server(max_runs_per_connection=3)  # on_busy=enqueue
    chat = "chat-flood-0123456789"
    async with ws_connect(server, "/ws/ai-sdk") as ws, ws_connect(server, "/ws/ai-sdk") as other:
        frames, others = Frames(ws), Frames(other)
        await ws.send(send("a", chat, history(ENDLESS)))
        await frames.streaming("a")
        for n in range(4):  # the running one and two waiting fill the socket's three
            await ws.send(send(f"q{n}", chat, history(ENDLESS, f"more {n}")))
        await frames.settle()
        assert [bool(frames.of(f"q{n}")) for n in range(4)] == [False, False, True, True]  # (refusals)
        assert "at most 3" in frames.refused("q2")
        assert frames.refused("q3")
        for n in range(MAX_QUEUED):  # another socket: the chat's own bound
            await other.send(send(f"o{n}", chat, history(ENDLESS, f"other {n}")))
        await others.settle()
        waiting = [n for n in range(MAX_QUEUED) if not others.of(f"o{n}")]
        assert len(waiting) == MAX_QUEUED - 2 and "waiting for this chat" in others.refused(f"o{MAX_QUEUED - 1}")
        await ws.send(abort("a"))
        await frames.ended("a")
    assert sim.simulator.stats.streams >= 1
