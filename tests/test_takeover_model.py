"""Takeover proven over kill points: Hypothesis chooses when a producer dies, and what watches its run.

Each example boots its own Redis, simulator and three ``python -m wsagent.serve`` nodes with a drawn method
(``--upstream-api responses --takeover background``, or ``--takeover continue`` over chat completions) and
``--resume-grace`` (the default, 0, or 5 s). A run starts on node
0, on ``/ws/chat`` (the JSON protocol) or ``/ws/ai-sdk`` (an anonymous chat); a watcher may follow it from
another node (``attach``; for a chat, a second socket's ``resume``); the run is a model's answer, or the
built-in agent's (a tool call, then its answer); after the number of tokens (an agent's: events) Hypothesis
draws (none at all included), node 0 is SIGKILLed; the node that took the run over may be killed too, a few
tokens later; the run's own client resumes on a node still alive. Then:

* every socket gets the complete answer exactly once, with contiguous ``seq`` (on ``/ws/chat``) and exactly one
  terminal event: ``done``, or ``producer_lost`` when the producer died before the model's first event (then
  nobody saw a token);
* the simulator generated the run's answer once (one background response, each token once, never cancelled),
  or was asked only for its continuation (each takeover: the rest after a longer prefix);
* Redis names one producer, alive.

Each of the others' claims waits out their patience (NODE_TTL), so Hypothesis draws two different examples at a
time and runs them side by side, each in a cluster of its own (:func:`~tests.helpers.side_by_side`: a failure
names its example): six examples in all, as when they ran one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from functools import partial
from typing import Any, NamedTuple

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import example as drawn
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection

from .helpers import (
    REDIS_SERVER,
    TERMINAL,
    Cluster,
    Node,
    frames_until,
    key_events,
    redis_fields,
    side_by_side,
    start_run,
    terminal,
)

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="needs redis-server")

TOKENS = 60
LIMIT = 60.0
CHAT = "chat-takeover-0001"


def tokens_of(frames: list[dict[str, Any]]) -> str:
    return "".join(f.get("content", "") for f in frames if f["type"] == "token")


def chunks_of(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The UI message chunks in an AI SDK response's frames."""
    return [f["chunk"] for f in frames if f["type"] == "chunk"]


def deltas_of(frames: list[dict[str, Any]]) -> str:
    return "".join(c.get("delta", "") for c in chunks_of(frames) if c["type"] == "text-delta")


async def producer_of(port: int, key: str) -> str:
    return (await redis_fields(port, "hget", f"wsagent:run:{key}", "owner")).strip()


async def taken_by(port: int, key: str, among: set[str]) -> str:
    """The node among ``among`` that Redis names as the run's producer, once it does (keyspace events)."""
    async with key_events(port, f"wsagent:run:{key}", "gh") as events, asyncio.timeout(LIMIT):
        while (node := await producer_of(port, key)) not in among:
            await events.get()
    return node


class Chat:
    """A ``/ws/chat`` client of one run: frames parsed, read until a condition."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []

    async def until(self, stop: Any) -> None:
        self.frames += [json.loads(f) for f in await frames_until(self.ws, stop, LIMIT)]


class AiSdk:
    """A ``/ws/ai-sdk`` client of one chat's response (frames of one request id)."""

    def __init__(self, ws: ClientConnection, request: str) -> None:
        self.ws = ws
        self.request = request
        self.frames: list[dict[str, Any]] = []

    async def until(self, stop: Any) -> None:
        async with asyncio.timeout(LIMIT):
            while True:
                frame = json.loads(await self.ws.recv())
                if frame.get("requestId") != self.request:
                    continue
                self.frames.append(frame)
                if stop(frame):
                    return


def ai_sdk_send(request: str, chat: str, text: str) -> str:
    return json.dumps({"type": "send", "requestId": request, "id": chat, "trigger": "submit-message",
                       "messages": [{"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}],
                       "headers": {}, "body": {}})


def ai_sdk_resume(request: str, chat: str) -> str:
    return json.dumps({"type": "resume", "requestId": request, "id": chat, "headers": {}, "body": {}})


def token(frame: dict[str, Any]) -> bool:
    return bool(frame["type"] == "token")


def text_delta(frame: dict[str, Any]) -> bool:
    return bool(frame["type"] == "chunk" and frame["chunk"]["type"] == "text-delta")


def ai_sdk_over(frame: dict[str, Any]) -> bool:
    return frame["type"] in ("end", "error", "no-active")


class Example(NamedTuple):
    """One cluster's life: how its run is made, produced, watched and killed."""

    mode: str
    kind: str
    kill_after: int
    watcher: int | None
    second: bool
    grace: float | None


async def example(cluster: Cluster, mode: str, kind: str, kill_after: int, watcher: int | None, second: bool,
                  grace: float | None) -> None:
    """One example, in ``cluster`` (its own Redis and simulator, no node yet)."""
    sim, port = cluster.sim, cluster.redis_port
    async with contextlib.AsyncExitStack() as stack:
        api = "responses" if mode == "background" else "chat"
        nodes = await cluster.start("n0", "n1", "n2", upstream_api=api, takeover=mode, resume_grace=grace)
        prompt = f"sim:rate=40 sim:tokens={TOKENS} sim:reasoning=0 {kind} {kill_after}"
        if kind == "agent":
            prompt = f"What is 17 * 23? sim:rate=40 sim:tokens={TOKENS} sim:reasoning=1 sim:tool=calculator"
        key, own, watching = await begin(stack, kind, nodes, prompt, watcher)
        if not key:  # an AI SDK chat's run, by its id
            key = (await redis_fields(port, "get", f"wsagent:id:ai-sdk%3A{CHAT}:ai-sdk%3A{CHAT}")).strip()
        over = ai_sdk_over if kind == "ai-sdk" else terminal
        word = {"chat": token, "agent": thought, "ai-sdk": text_delta}[kind]
        count = [sum(map(word, own.frames))]

        def reached(frame: dict[str, Any]) -> bool:
            count[0] += word(frame)
            return count[0] >= kill_after or bool(over(frame))

        if count[0] < kill_after:
            await own.until(reached)
        await kill(nodes[0])
        alive = {"n1", "n2"}
        if second and key:
            first = await taken_by(port, key, alive)
            if watching is not None and watcher is not None and nodes[watcher].name != first:
                await watching.until(lambda f: word(f) or over(f))  # going on, from ``first``
            await kill(cluster.nodes[first])
            alive.discard(first)
        home = cluster.nodes[sorted(alive)[0]]
        views = [await resumed(stack, kind, home, own, key)]
        if watching is not None and watcher is not None and nodes[watcher].name in alive:
            await watching.until(over)
            views.append(watching)
        whole = await expected(home, prompt, kind)
        for view in views:
            check(kind, view, whole)
        stats = sim.simulator.stats
        if kind == "agent":  # (two model calls a run: the step that calls the tool, and the answer's)
            assert not any(r.cancelled for r in stats.background.values()), stats.background
            assert len(stats.continued) <= 1 + second, stats.continued
            return
        lost = not all(tokens_of(v.frames) or deltas_of(v.frames) for v in views)
        if mode == "background":
            records = list(stats.background.values())
            # this run's response and the expected one's; a node that died before the response's first event
            # may have asked for it (it goes on upstream: its id never reached Redis) or not
            assert len(records) == 2 or lost and len(records) == 1, records
            assert all(r.tokens == TOKENS and not r.cancelled for r in records), records
        else:  # each takeover asked for the rest after a longer prefix of the answer
            assert 1 <= len(stats.continued) <= 1 + second, stats.continued
            assert all(whole.startswith(prefix) for prefix in stats.continued), (whole, stats.continued)
            assert [len(prefix) for prefix in stats.continued] == sorted(map(len, stats.continued))


async def begin(stack: contextlib.AsyncExitStack, kind: str, nodes: list[Node], prompt: str,
                watcher: int | None) -> tuple[str, Any, Any]:
    """Start the run on node 0 (its key, its client, and its watcher on node ``watcher``, if any)."""
    path = "/ws/ai-sdk" if kind == "ai-sdk" else "/ws/chat"
    ws = await stack.enter_async_context(nodes[0].connect(path))
    other = None if watcher is None else await stack.enter_async_context(nodes[watcher].connect(path))
    if kind != "ai-sdk":
        key = await start_run(ws, "r1", prompt, **({"agent": "assistant"} if kind == "agent" else {}))
        own = Chat(ws)
        own.frames.append({"type": "start", "seq": 1})
        watching = None
        if other is not None:
            await other.send(json.dumps({"type": "attach", "id": "r1", "key": key}))
            watching = Chat(other)
        return key, own, watching
    await ws.send(ai_sdk_send("q1", CHAT, prompt))
    own_ai = AiSdk(ws, "q1")
    await own_ai.until(lambda f: f["type"] == "chunk" and f["chunk"]["type"] == "start")
    watching_ai = None
    if other is not None:
        await other.send(ai_sdk_resume("w1", CHAT))
        watching_ai = AiSdk(other, "w1")
    return "", own_ai, watching_ai


async def kill(node: Node) -> None:
    node.process.send_signal(signal.SIGKILL)
    await node.process.wait()


async def resumed(stack: contextlib.AsyncExitStack, kind: str, home: Node, own: Any, key: str) -> Any:
    """The run's own client, on ``home`` after its node died: a resume from the last seq it saw (an AI SDK chat:
    the chat's resume, which replays the response)."""
    if kind != "ai-sdk":
        if any(terminal(f) for f in own.frames):
            return own
        ws = await stack.enter_async_context(home.connect())
        after = own.frames[-1]["seq"]
        await ws.send(json.dumps({"type": "resume", "id": "r1", "key": key, "after": after}))
        view = Chat(ws)
        view.frames = list(own.frames)
        await view.until(terminal)
        return view
    ws = await stack.enter_async_context(home.connect("/ws/ai-sdk"))
    await ws.send(ai_sdk_resume("q2", CHAT))
    reloaded = AiSdk(ws, "q2")
    await reloaded.until(ai_sdk_over)
    return reloaded


async def expected(node: Node, prompt: str, kind: str) -> Any:
    """What the run gives, whole: its answer's text (an agent's: its answer, actions and observations)."""
    async with node.connect() as ws:
        await start_run(ws, "expected", prompt, **({"agent": "assistant"} if kind == "agent" else {}))
        frames = [json.loads(f) for f in await frames_until(ws, terminal, LIMIT)]
    return agent_view(frames) if kind == "agent" else tokens_of(frames)


def thought(frame: dict[str, Any]) -> bool:
    return frame["type"] in ("thinking", "answer", "action", "observation")


def agent_view(frames: list[dict[str, Any]]) -> tuple[str, list[str], list[str]]:
    return ("".join(f["content"] for f in frames if f["type"] == "answer"),
            [f["content"] for f in frames if f["type"] == "action"],
            [f["content"] for f in frames if f["type"] == "observation"])


def check(kind: str, view: Any, whole: Any) -> None:
    frames: list[dict[str, Any]] = view.frames
    if kind == "agent":  # each action and observation once, the answer whole (a cut reasoning may stay cut)
        seqs = [f["seq"] for f in frames if "seq" in f]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        finals = [f for f in frames if f["type"] in TERMINAL]
        assert len(finals) == 1 and finals[0] is frames[-1], finals
        assert finals[0]["type"] == "done" and agent_view(frames) == whole, (agent_view(frames), whole, frames)
        return
    if kind == "chat":
        seqs = [f["seq"] for f in frames if "seq" in f]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        finals = [f for f in frames if f["type"] in TERMINAL]
        assert len(finals) == 1 and finals[0] is frames[-1], finals
        if finals[0]["type"] == "error":  # (only a background response's id can be lost: before its first event)
            assert finals[0]["code"] == "producer_lost" and not tokens_of(frames), finals[0]
        else:
            assert finals[0]["type"] == "done" and tokens_of(frames) == whole
        return
    ends = [f for f in frames if ai_sdk_over(f)]
    assert len(ends) == 1 and ends[0] is frames[-1], ends
    chunks = chunks_of(frames)
    if frames[-1]["type"] != "end" or any(c["type"] == "error" for c in chunks):
        assert not deltas_of(frames), frames[-3:]  # (producer_lost: before the model's first token)
    else:
        assert deltas_of(frames) == whole and chunks[-1]["type"] == "finish", frames[-3:]


EXAMPLES = st.builds(Example, mode=st.sampled_from(["background", "continue"]),
                     kind=st.sampled_from(["chat", "agent", "ai-sdk"]), kill_after=st.integers(0, TOKENS // 2),
                     watcher=st.sampled_from([None, 1, 2]), second=st.booleans(), grace=st.sampled_from([None, 5.0]))
#: Examples run side by side (each in a cluster of its own), so that they wait out NODE_TTL together.
SIDE_BY_SIDE = 2


@pytest.mark.timeout(900)
@settings(max_examples=6 // SIDE_BY_SIDE, deadline=None, suppress_health_check=list(HealthCheck),
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # (no shrinking: each example is a cluster's life)
@given(examples=st.lists(EXAMPLES, min_size=SIDE_BY_SIDE, max_size=SIDE_BY_SIDE, unique=True))
# A continued agent answer taken over twice repeated its prefix (found by the model; every run of it failed).
@drawn(examples=[Example("continue", "agent", 29, 1, True, None), Example("continue", "chat", 29, 1, True, None)])
def test_a_killed_producer_s_run_reaches_everyone_whole_and_once(examples: list[Example]) -> None:
    """Six examples in all (three draws of two different ones), each a cluster's life."""
    together = side_by_side({repr(drawn): partial(example, **drawn._asdict()) for drawn in examples})
    asyncio.run(asyncio.wait_for(together, 3 * LIMIT))
