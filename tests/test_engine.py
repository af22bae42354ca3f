"""The engine's rules as a client sees them on the wire: budgets, run identity, who may slow a run,
every route through a run."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import ServerFactory, check_sequence, recv_json, run_events, run_request, text_reply, ws_connect


async def test_a_token_budget_holds_at_full_speed(make_server: ServerFactory) -> None:
    server = await make_server(run_max_tokens=50)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("b", "long answer sim:rate=0 sim:tokens=400 sim:reasoning=0"))
        events = await run_events(ws, "b")
    check_sequence(events)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "budget_exceeded"
    assert len("".join(e["content"] for e in events if e["type"] == "token").split()) == 50


async def test_tutorial_routes_are_runs_with_budgets_and_metrics(make_server: ServerFactory) -> None:
    server = await make_server(run_max_tokens=5)
    async with ws_connect(server, "/ws/agent") as ws:
        await ws.send("tell me sim:tokens=40 sim:rate=0")
        frames = []
        while not (frame := await ws.recv()).startswith(("[DONE]", "[ERROR]")):
            frames.append(frame)
    assert frame == "[ERROR] run exceeded its 5 token budget" and len(frames) <= 5
    async with ws_connect(server, "/ws/agent-thoughts") as ws:
        await ws.send("What is 17 * 23?")
        while (message := json.loads(await ws.recv()))["type"] != "done":
            last = message
    assert last == {"type": "error", "message": "run exceeded its 5 token budget"}
    assert server.metrics.runs["error"] == 2 and len(server.broker.active_runs()) == 0


async def test_an_agent_run_merges_what_arrives_together(server: WsAgentServer) -> None:
    """2,000 answer deltas once left as 2,000 frames; a model run's leave in a handful."""
    async with ws_connect(server, "/ws/chat", max_size=None) as ws:
        await ws.send(run_request("a", "an essay sim:rate=0 sim:tokens=2000 sim:reasoning=0", agent="assistant"))
        events = await run_events(ws, "a")
    answers = [e for e in events if e["type"] == "answer"]
    assert len("".join(e["content"] for e in answers).split()) >= 2000
    assert len(answers) < 200


async def test_anonymous_clients_cannot_reach_each_others_runs(server: WsAgentServer, sim: SimulatorServer) -> None:
    """Run ids were one key space for every anonymous client: guessing ``text-1`` or a JSON id let
    another socket read, cancel or take over the run."""
    async with ws_connect(server, "/ws/chat") as victim, ws_connect(server, "/ws/chat") as other:
        await victim.send(run_request("mine", "secret sim:rate=50 sim:tokens=60"))
        start = await recv_json(victim)
        assert start["type"] == "start" and len(start["key"]) >= 22
        for verb in ("attach", "resume", "cancel"):
            await other.send(json.dumps({"type": verb, "id": "mine"}))
            assert (await recv_json(other))["code"] == "unknown_run"
            await other.send(json.dumps({"type": verb, "id": "mine", "key": "guess" + start["key"][5:]}))
            assert (await recv_json(other))["code"] == "unknown_run"
        await other.send(json.dumps({"type": "attach", "id": "mine", "key": start["key"]}))
        watched = await run_events(other, "mine")
        mine = await run_events(victim, "mine")
    assert mine[-1]["type"] == watched[-1]["type"] == "done"
    assert [e["content"] for e in watched if e["type"] == "token"][-1] == \
        [e["content"] for e in mine if e["type"] == "token"][-1]


async def test_text_mode_runs_count_against_the_limit_whatever_the_ids(make_server: ServerFactory) -> None:
    """JSON runs named ``text-K`` once displaced text-mode runs in the registry, and the limit
    stopped counting them: 30 upstream streams ran on one socket with a limit of 8."""
    server = await make_server(max_runs_per_connection=2)
    async with ws_connect(server, "/ws/chat") as ws:
        conn = next(iter(server.manager))
        await ws.send(run_request(f"text-{conn.id}-1", "slow sim:rate=20 sim:tokens=1000"))
        await ws.send("a text prompt sim:rate=20 sim:tokens=1000")
        await ws.send("one too many")
        refusal = None
        while refusal is None:
            message = await ws.recv()
            if isinstance(message, str) and message.startswith("[ERROR]"):
                refusal = message
        assert "at most 2 runs" in refusal
        assert len(server.broker.active_runs()) == 2


async def test_resume_refuses_what_it_cannot_honour(make_server: ServerFactory) -> None:
    server = await make_server(resume_grace=10)
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("r", "short sim:tokens=5"))
        events = await run_events(ws, "r")
        key = events[0]["key"]
        await ws.send(json.dumps({"type": "resume", "id": "r", "key": key, "after": events[-1]["seq"] + 5}))
        error = await recv_json(ws)
        assert error["code"] == "bad_resume" and "no seq" in error["message"]
        await ws.send(run_request("s", "another sim:tokens=5"))
        await run_events(ws, "s")
        await ws.send(json.dumps({"type": "resume", "id": "s", "key": key, "after": 0}))
        assert (await recv_json(ws))["code"] == "unknown_run"  # that key is another run's


async def test_a_watcher_that_never_reads_does_not_stall_the_run(make_server: ServerFactory) -> None:
    """Forty attaches from a socket that never read once stalled the run's own client until the
    attacker was closed as a slow client."""
    server = await make_server(run_buffer_bytes=16384, replay_bytes=16384, slow_client_timeout=60)
    async with ws_connect(server, "/ws/chat", max_size=None) as owner, \
            ws_connect(server, "/ws/chat", max_queue=1, compression=None) as attacker:
        await owner.send(run_request("v", "bulk sim:rate=0 sim:tokens=3000 sim:pad=200"))
        start = await recv_json(owner)
        attacker.transport.pause_reading()
        for _ in range(40):
            await attacker.send(json.dumps({"type": "attach", "id": "v", "key": start["key"]}))
        events = await asyncio.wait_for(run_events(owner, "v"), 20)
        assert events[-1]["type"] == "done"


async def test_shutdown_cancels_every_text_mode_client(make_server: ServerFactory) -> None:
    server = await make_server()
    clients = [await ws_connect(server, "/ws/chat") for _ in range(5)]
    for client in clients:
        await client.send("a long one sim:rate=20 sim:tokens=10000")
        assert await client.recv()  # streaming
    await server.stop(drain=0)
    replies: list[Any] = [await text_reply(client) for client in clients]
    assert all("[CANCELLED] server shutting down" in reply for reply in replies)
