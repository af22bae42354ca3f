"""A person in the loop on ``/ws/chat``: approvals before a tool runs, and steering messages, through the real
server, the real ``websockets`` client and the simulated model over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from wsagent.core.tools import BUILTIN_TOOLS
from wsagent.engine.run import Phase
from wsagent.upstream.agents.builtin import build_workflows
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import (
    LIMIT,
    ServerFactory,
    find_run,
    recv_json,
    run_events,
    run_request,
    start_run,
    upstream_for,
    ws_connect,
)

CALC = "What is (2 + 3) * 7?"


async def until(ws: ClientConnection, kind: str, run_id: str | None = None) -> tuple[dict[str, Any],
                                                                                        list[dict[str, Any]]]:
    """Events until the first of type ``kind`` (of ``run_id``, if given); that one, and all read."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(LIMIT):
        while True:
            event = await recv_json(ws)
            seen.append(event)
            if event["type"] == kind and (run_id is None or event.get("id") == run_id):
                return event, seen


async def sequenced(ws: ClientConnection, run_id: str) -> list[dict[str, Any]]:
    """Frames of ``run_id`` until its terminal event (refusals of requests, which carry no seq, included)."""
    events: list[dict[str, Any]] = []
    async with asyncio.timeout(LIMIT):
        while True:
            event = await recv_json(ws)
            events.append(event)
            if event.get("id") == run_id and "seq" in event and event["type"] in ("done", "error", "cancelled"):
                return events


async def metrics(server: WsAgentServer) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    text = (await reader.read()).decode()
    writer.close()
    return text


def contiguous(events: list[dict[str, Any]]) -> None:
    """Every event after ``start`` (seq 1, read by ``start_run``), numbered without a gap, one terminal last."""
    assert [e["seq"] for e in events] == list(range(2, len(events) + 2))
    assert [e["type"] in ("done", "error", "cancelled") for e in events].count(True) == 1


def approve(run_id: str, call_id: str, approved: bool, **fields: Any) -> str:
    return json.dumps({"type": "approve", "id": run_id, "call_id": call_id, "approved": approved, **fields})


async def test_approved_call_runs_and_the_answer_uses_it(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "a", CALC, agent="assistant")
        request, before = await until(ws, "approval_request")
        assert request["name"] == "calculator" and json.loads(request["arguments"]) == {"expression": "(2 + 3) * 7"}
        assert not [e for e in before if e["type"] in ("action", "observation")]  # nothing ran yet
        run = find_run(server, "a")
        assert run is not None and run.phase is Phase.WAITING and run.waiting_for == [request["call_id"]]
        assert "\nwsagent_runs_waiting 1\n" in await metrics(server)
        await ws.send(approve("a", request["call_id"], True))
        events = await run_events(ws, "a")
    kinds = [e["type"] for e in events]
    assert kinds.index("approval") < kinds.index("action") < kinds.index("observation")
    answer = next(e for e in events if e["type"] == "approval")
    assert answer == {"type": "approval", "id": "a", "seq": answer["seq"], "agent": "assistant",
                      "call_id": request["call_id"], "approved": True}
    observation = next(e for e in events if e["type"] == "observation")
    assert observation["content"] == "(2 + 3) * 7 = 35"
    assert events[-1]["type"] == "done"
    contiguous(before + events)
    assert "\nwsagent_runs_waiting 0\n" in await metrics(server)


async def test_denied_call_never_runs_and_the_model_is_told(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("*",))
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "d", CALC, agent="assistant")
        request, before = await until(ws, "approval_request")
        await ws.send(approve("d", request["call_id"], False, reason="not now"))
        events = await run_events(ws, "d")
    kinds = [e["type"] for e in events]
    assert "action" not in kinds and "observation" not in kinds
    answer = next(e for e in events if e["type"] == "approval")
    assert answer["approved"] is False and answer["reason"] == "not now"
    text = "".join(e["content"] for e in events if e["type"] == "answer")
    assert "denied the call to calculator: not now" in text  # the simulator quotes the tool message it got
    assert events[-1]["type"] == "done"
    contiguous(before + events)


async def test_bad_answers_get_a_clear_error_and_change_nothing(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",), resume_grace=30)  # the ended run is kept
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "b", CALC, agent="assistant")
        request, _ = await until(ws, "approval_request")
        call_id = request["call_id"]
        await ws.send(approve("b", "call_nope", True))
        assert (await recv_json(ws))["code"] == "unknown_call"
        await ws.send(json.dumps({"type": "approve", "id": "b", "call_id": call_id, "approved": "yes"}))
        refusal = await recv_json(ws)
        assert refusal["code"] == "bad_request" and "'approved'" in refusal["message"]
        await ws.send(approve("nope", call_id, True))
        assert (await recv_json(ws))["code"] == "unknown_run"
        run = find_run(server, "b")
        assert run is not None and run.phase is Phase.WAITING  # none of that answered it
        await ws.send(approve("b", call_id, True))
        await ws.send(approve("b", call_id, False))  # a second answer, in the same read as the first
        events = await sequenced(ws, "b")
        refusals = [e for e in events if "seq" not in e]
        assert [e["code"] for e in refusals] == ["already_answered"]
        assert [e["approved"] for e in events if e["type"] == "approval"] == [True]
        assert events[-1]["type"] == "done"
        await ws.send(approve("b", call_id, True))  # after the run ended
        assert (await recv_json(ws))["code"] == "run_ended"


async def test_only_the_owner_or_the_keys_holder_may_answer(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as owner, ws_connect(server, "/ws/chat") as other:
        key = await start_run(owner, "o", CALC, agent="assistant")
        request, _ = await until(owner, "approval_request")
        await other.send(approve("o", request["call_id"], True))  # another anonymous socket, without the key
        assert (await recv_json(other))["code"] == "unknown_run"
        await other.send(json.dumps({"type": "attach", "id": "o", "key": key}))
        replayed, _ = await until(other, "approval_request")  # a pending request is part of the log
        assert replayed == request
        await other.send(approve("o", request["call_id"], True, key=key))  # holding the key, it may
        events = await run_events(owner, "o")
        assert [e["approved"] for e in events if e["type"] == "approval"] == [True]
        assert events[-1]["type"] == "done"


async def test_waiting_survives_a_disconnect_and_a_resume_sees_the_request(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))  # the default --resume-grace 0
    async with ws_connect(server, "/ws/chat") as ws:
        key = await start_run(ws, "r", CALC, agent="assistant")
        request, before = await until(ws, "approval_request")
    run = find_run(server, "r")
    assert run is not None
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "resume", "id": "r", "key": key, "after": 0}))
        replayed, _ = await until(ws, "approval_request")
        assert replayed == request and not run.finished
        await ws.send(approve("r", request["call_id"], True, key=key))
        events = await run_events(ws, "r")
    assert events[-1]["type"] == "done" and any(e["type"] == "observation" for e in events)


async def test_an_unanswered_request_ends_the_run_when_its_timeout_fires(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",), approval_timeout=0.5)
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "t", CALC, agent="assistant")
        _, _ = await until(ws, "approval_request")
        asked = time.monotonic()
        events = await run_events(ws, "t")
    waited = time.monotonic() - asked
    assert events[-1]["type"] == "error" and events[-1]["code"] == "approval_timeout"
    assert "calculator" in events[-1]["message"]
    assert 0.4 < waited < 0.5 + LIMIT / 4
    assert sum(e["type"] in ("done", "error", "cancelled") for e in events) == 1


async def test_waiting_does_not_count_against_the_run_budget(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",), run_max_seconds=1.0, sim_rate=0)
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "w", CALC, agent="assistant")
        request, _ = await until(ws, "approval_request")
        run = find_run(server, "w")
        assert run is not None
        await asyncio.sleep(1.5)  # longer than the whole budget, spent waiting: the run is still there
        assert not run.finished and run.phase is Phase.WAITING
        await ws.send(approve("w", request["call_id"], True))
        events = await run_events(ws, "w")
    assert events[-1]["type"] == "done"


async def test_cancel_while_waiting(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",), resume_grace=30)  # the ended run is kept
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "c", CALC, agent="assistant")
        request, _ = await until(ws, "approval_request")
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        events = await run_events(ws, "c")
        assert events[-1]["type"] == "cancelled"
        await ws.send(approve("c", request["call_id"], True))
        assert (await recv_json(ws))["code"] == "run_ended"


async def test_tutorial_route_denies_what_needs_approval(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/agent-thoughts") as ws:
        await ws.send(CALC)
        frames = []
        async with asyncio.timeout(LIMIT):
            while (frame := await recv_json(ws))["type"] != "done":
                frames.append(frame)
    assert not [f for f in frames if f["type"] in ("action", "observation")]
    assert "denied" in "".join(f.get("content", "") for f in frames if f["type"] == "answer")


async def test_steer_joins_the_agent_at_its_next_step(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "s", CALC, agent="assistant")
        request, _ = await until(ws, "approval_request")
        await ws.send(json.dumps({"type": "steer", "id": "s", "content": "and say it in French"}))
        await ws.send(approve("s", request["call_id"], True))
        events = await run_events(ws, "s")
    steer = next(e for e in events if e["type"] == "steer")
    assert steer["content"] == "and say it in French" and steer["delivered"] is True
    kinds = [e["type"] for e in events]
    assert kinds.index("observation") < kinds.index("steer") < kinds.index("done")


async def test_steer_a_model_run_is_refused_and_one_not_taken_is_reported(server: WsAgentServer,
                                                                          sim: SimulatorServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run_request("m", "hello there sim:rate=20"))
        assert (await recv_json(ws))["type"] == "start"
        await ws.send(json.dumps({"type": "steer", "id": "m", "content": "shorter"}))
        refusal, _ = await until(ws, "error")
        assert refusal["code"] == "not_steerable" and "seq" not in refusal
        await ws.send(json.dumps({"type": "cancel", "id": "m"}))
        events = await run_events(ws, "m")
    assert events[-1]["type"] == "cancelled" and not any(e["type"] == "steer" for e in events)


async def test_a_workflow_agent_waits_while_the_others_stream_on(make_server: ServerFactory) -> None:
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "f", "Assess 12 * 7 for the market", workflow="market-analysis")
        request, _ = await until(ws, "approval_request")
        assert (request["agent"], request["workflow"], request["name"]) == (
            "financial-analyst", "market-analysis", "calculator")
        others, _ = await until(ws, "agent_end")  # another agent finishes while this one waits
        assert others["agent"] != "financial-analyst"
        await ws.send(approve("f", request["call_id"], True))
        events = await run_events(ws, "f")
    observation = next(e for e in events if e["type"] == "observation")
    assert observation["agent"] == "financial-analyst" and observation["content"] == "12 * 7 = 84"
    assert events[-1]["type"] == "done"


def test_the_workflows_file_names_tools_that_need_approval(sim: SimulatorServer) -> None:
    spec = {"w": {"agents": [{"name": "a", "tools": ["calculator"], "needs_approval": ["calculator"]},
                             {"name": "b", "tools": ["search_notes"], "needs_approval": True},
                             {"name": "c", "tools": ["current_time"]}]}}
    flow = build_workflows(spec, upstream_for(sim), BUILTIN_TOOLS)["w"]()
    asks = {agent.name: [t for t in ("calculator", "search_notes", "current_time") if agent.toolbox.needs_approval(t)]
            for agent in flow.agents}
    assert asks == {"a": ["calculator"], "b": ["search_notes"], "c": []}
    everywhere = build_workflows(spec, upstream_for(sim), BUILTIN_TOOLS, ["current_time"])["w"]()
    assert [a.toolbox.needs_approval("current_time") for a in everywhere.agents] == [False, False, True]
    with pytest.raises(ValueError, match="needs_approval names tools the agent lacks"):
        build_workflows({"w": {"agents": [{"name": "a", "needs_approval": ["calculator"]}]}}, upstream_for(sim),
                        BUILTIN_TOOLS)


async def test_a_reload_turns_approvals_on_for_the_next_run(server: WsAgentServer) -> None:
    """``--approval-tools`` is read when a run starts (the workflows are built again): a SIGHUP reload applies
    to the next run of an open socket, the built-in agent's and a workflow's alike."""
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "before", CALC, agent="assistant")
        events = await run_events(ws, "before")
        assert "approval_request" not in [e["type"] for e in events] and events[-1]["type"] == "done"
        server.reload(dataclasses.replace(server.settings, approval_tools=("calculator",), approval_timeout=0.3))
        await start_run(ws, "after", CALC, agent="assistant")
        await until(ws, "approval_request", "after")
        events = await run_events(ws, "after")
        assert events[-1]["type"] == "error" and events[-1]["code"] == "approval_timeout"
        await start_run(ws, "flow", "Assess 12 * 7 for the market", workflow="market-analysis")
        request, _ = await until(ws, "approval_request", "flow")
        assert request["agent"] == "financial-analyst"


async def test_an_attached_watcher_that_answers_takes_the_run_over(make_server: ServerFactory) -> None:
    """Found by the newcomer: the owner left while the run waited (the default --resume-grace 0); a second socket
    attached with the key and approved, and the run was cancelled right after its action ("client disconnected",
    seconds after that happened), the approved tool's result never shown. The socket that answers, and watches
    the run, becomes its own client, as a resume would make it."""
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as owner:
        key = await start_run(owner, "t", CALC, agent="assistant")
        request, _ = await until(owner, "approval_request")
    async with ws_connect(server, "/ws/chat") as other:
        await other.send(json.dumps({"type": "attach", "id": "t", "key": key}))
        await until(other, "approval_request")
        await other.send(approve("t", request["call_id"], True, key=key))
        events = await sequenced(other, "t")
    kinds = [e["type"] for e in events]
    assert kinds.index("approval") < kinds.index("observation") and kinds[-1] == "done", kinds


async def test_each_turn_of_the_agent_asks_again(make_server: ServerFactory) -> None:
    """Found by the outside attack: a model that gives each turn's call the same id had its second call approved
    with the first's answer. The built-in agent makes every call id of a run its own, so each call is asked."""
    server = await make_server(approval_tools=("calculator",))
    async with ws_connect(server, "/ws/chat") as ws:
        await start_run(ws, "l", "what is 1 + 1 sim:tool_loop=1", agent="assistant")
        first, _ = await until(ws, "approval_request")
        await ws.send(approve("l", first["call_id"], True))
        second, seen = await until(ws, "approval_request")
        assert second["call_id"] != first["call_id"]
        assert [e["approved"] for e in seen if e["type"] == "approval"] == [True]  # the second waits for its own
        await ws.send(approve("l", second["call_id"], False))
        denied, _ = await until(ws, "approval")
        await ws.send(json.dumps({"type": "cancel", "id": "l"}))  # (the model would go on calling it)
        events = await run_events(ws, "l")
    assert (denied["call_id"], denied["approved"]) == (second["call_id"], False)
    assert events[-1]["type"] == "cancelled"
