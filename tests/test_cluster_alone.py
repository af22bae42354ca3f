"""A node whose Redis is gone goes on alone: every route, anonymous and authenticated, starts new runs.

What needs another node (a run produced elsewhere, a client id held elsewhere, a
broadcast to other nodes) gets ``cluster_unavailable`` (retryable); what this
node can do by itself it does, with limits and id uniqueness counted on this
node only until Redis is back. docs/scaling-out.md's failure table says the same, row by row.
"""

from __future__ import annotations

import asyncio
import json
import sys

from wsagent.engine.cluster.liveness import HEARTBEAT, NODE_TTL, may_have_been_taken_for_dead
from wsagent.engine.cluster.wire import redacted
from wsagent.upstream.simulator import SimulatorServer

from .helpers import Cluster, frames_until, redis_server, redis_went, terminal
from .processes import free_port


def ai_sdk_send(request: str, chat: str) -> str:
    return json.dumps({"type": "send", "requestId": request, "id": chat, "trigger": "submit-message",
                       "messages": [{"id": "m", "role": "user", "parts": [{"type": "text", "text": "hi"}]}]})


def finished(frame: dict[str, object]) -> bool:
    chunk = frame.get("chunk")
    return frame.get("type") == "error" or isinstance(chunk, dict) and chunk.get("type") == "finish"


async def test_every_route_starts_runs_while_redis_is_down(cluster: Cluster) -> None:
    a = await cluster.node("a", resume_grace=None)  # default settings
    cluster.redis.terminate()
    await cluster.redis.wait()
    await redis_went(a, "down")
    for user in (None, "alice"):
        async with a.connect("/ws/chat", user=user) as ws:
            await ws.send(json.dumps({"type": "run", "id": "r1", "prompt": "hi"}))
            events = [json.loads(f) for f in await frames_until(ws, terminal)]
            assert (events[0]["type"], events[-1]["type"]) == ("start", "done"), (user, events[-1])
            await ws.send("hello in text mode")
            text = ""
            while not text.endswith("[DONE]"):
                frame = await ws.recv()
                assert isinstance(frame, str) and not frame.startswith("[ERROR]"), frame
                text += frame
            # Ended, and not kept (no grace): an anonymous id is this socket's, so this node knows it
            # is gone; a user's might be on another node, which only Redis could tell.
            await ws.send(json.dumps({"type": "resume", "id": "r1", "after": 0}))
            refused = json.loads(await ws.recv())
            assert refused["code"] == ("unknown_run" if user is None else "cluster_unavailable"), refused
        async with a.connect("/ws/ai-sdk", user=user) as ws:
            await ws.send(ai_sdk_send("q1", "chat1"))
            frames = [json.loads(f) for f in await frames_until(ws, finished)]
            assert frames[-1]["type"] == "chunk", (user, frames[-1])
            await ws.send(ai_sdk_send("q2", "chat1"))  # the chat's next turn
            frames = [json.loads(f) for f in await frames_until(ws, finished)]
            assert frames[-1]["type"] == "chunk", (user, frames[-1])
    async with a.connect("/ws/secure", user="bob") as ws:
        await ws.send(json.dumps({"type": "run", "id": "r1", "prompt": "hi"}))
        events = [json.loads(f) for f in await frames_until(ws, terminal)]
        assert events[-1]["type"] == "done", events[-1]
        await ws.send(json.dumps({"type": "attach", "id": "r2", "key": "not-a-key-of-this-node"}))
        refused = json.loads(await ws.recv())
        assert (refused["code"], refused["retryable"]) == ("cluster_unavailable", True)
    async with a.connect("/ws/carol") as ws:  # a client id: claimed on this node alone
        await ws.send("hi")
        reply = ""
        while not reply.endswith("[DONE]"):
            frame = await ws.recv()
            assert isinstance(frame, str)
            reply += frame
        await ws.send(json.dumps({"type": "broadcast", "content": "to all"}))
        got = [json.loads(await ws.recv()) for _ in range(2)]  # this node's clients (carol too), and the error
        assert {"type": "broadcast", "from": "carol", "content": "to all"} in got
        assert any(g.get("code") == "cluster_unavailable" for g in got), got


async def test_a_nodes_log_never_shows_the_redis_password(sim: SimulatorServer) -> None:
    """The startup line named the Redis URL as given, password and all."""
    async with redis_server(0, "--requirepass", "hunter2-secret") as (port, _):
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "wsagent.serve", "--port", str(free_port()), "--upstream-url", sim.base_url,
            "--redis-url", f"redis://:hunter2-secret@127.0.0.1:{port}/0", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT)
        assert process.stdout is not None
        said: list[bytes] = []
        try:
            async with asyncio.timeout(30):
                while not said or b"wsagent listening on" not in said[-1]:
                    said.append(await process.stdout.readline())
        finally:
            process.terminate()
            said.append(await process.stdout.read())
            await process.wait()
    text = b"".join(said).decode()
    assert "cluster: node" in text and "Redis at redis://" in text
    assert "hunter2-secret" not in text


async def test_one_users_two_sockets_starting_the_same_id_at_once(cluster: Cluster) -> None:
    """Both sockets passed the id check, each awaited Redis for the user's run count, and the second to
    register its run got ``ValueError`` out of the handler: its socket closed with 1011. (Each answer lasts
    0.1 s: an instant one could end, and free its id with no grace, before the other socket asked, and both
    would start, one after the other, as they may.)"""
    a = await cluster.node("a", resume_grace=None)
    async with a.connect(user="alice") as one, a.connect(user="alice") as two:
        for n in range(10):
            request = json.dumps({"type": "run", "id": f"r{n}", "prompt": "hi sim:rate=50 sim:tokens=5"})
            await asyncio.gather(one.send(request), two.send(request))
            firsts = [json.loads(await ws.recv()) for ws in (one, two)]
            assert sorted(f["type"] for f in firsts) == ["error", "start"], firsts
            (refused,) = [f for f in firsts if f["type"] == "error"]
            assert refused["code"] == "bad_request" and "already in use" in refused["message"]
            for ws, first in zip((one, two), firsts, strict=True):
                if first["type"] == "start":
                    await frames_until(ws, terminal)


def test_a_password_in_the_query_is_hidden_from_logs_too() -> None:
    """redis-py takes ``?password=``; the startup line printed it in clear."""
    assert redacted("redis://127.0.0.1:6379/2?password=s3cr3t-pw") == "redis://127.0.0.1:6379/2?password=***"
    assert redacted("redis://u:pw@h:1/0?db=3") == "redis://u:***@h:1/0?db=3"
    assert redacted("unix:///run/redis.sock?db=2") == "unix:///run/redis.sock?db=2"


async def test_a_tutorial_route_takes_the_next_id_when_a_users_run_holds_its_own(cluster: Cluster) -> None:
    """The tutorial routes name a run ``<connection id>-<n>`` among the user's runs, and connection ids repeat
    (on every node, and a JSON run may take any id): ``/ws/agent`` closed with 1011 and a traceback."""
    a = await cluster.node("a", resume_grace=None)
    async with a.connect(user="alice") as json_socket, a.connect("/ws/agent", user="alice") as words:
        connection = "c2"  # the second socket of this node
        await json_socket.send(json.dumps({"type": "run", "id": f"{connection}-1",
                                           "prompt": "hold it sim:rate=20 sim:tokens=200"}))
        assert json.loads(await json_socket.recv())["type"] == "start"
        await words.send("hello")
        reply = ""
        while not reply.endswith("[DONE]"):
            frame = await asyncio.wait_for(words.recv(), 10)
            assert isinstance(frame, str)
            reply += frame


def test_a_node_paused_just_past_the_others_patience_asks_whether_it_still_owns_its_runs() -> None:
    """The race behind a rare failure of ``a_producer_that_comes_back_writes_nothing_more``: a node's beat is
    written at 0.000 s (its reply back at 0.040), the node is paused, another node finds its last beat older than
    NODE_TTL at 3.010 and takes its runs over, and the paused node's next beat comes back at 3.030. Measured
    from reply to reply, its silence was 2.99 s, under NODE_TTL: it never asked whether it still owned its runs,
    and relayed its run to its own client to the end (``done``, not ``taken_over``). Measured from what the
    others measure, the beat's written time, it was 3.03 s; and since the others look only once a HEARTBEAT,
    any silence over NODE_TTL - HEARTBEAT is worth one question to Redis."""
    assert may_have_been_taken_for_dead(previous_written=0.000, replied=3.030)
    assert may_have_been_taken_for_dead(previous_written=0.000, replied=NODE_TTL - HEARTBEAT + 0.001)
    assert not may_have_been_taken_for_dead(previous_written=0.000, replied=HEARTBEAT + 0.5)  # a beat a little late
    assert not may_have_been_taken_for_dead(previous_written=None, replied=100.0)  # its first beat
