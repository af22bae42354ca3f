"""Agents and workflows against the simulated model over real HTTP, through the Python API and the server."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wsagent.core.events import Action, AgentEnd, Answer, Checkpoint, Done, Event, Observation
from wsagent.core.tools import BUILTIN_TOOLS, ToolBox, calculator, evaluate, search_notes, tool
from wsagent.upstream.agents.builtin import Agent, AgentResume, ConcurrentWorkflow, SequentialWorkflow, assistant
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import recv_json, run_events, upstream_for, ws_connect


@tool
async def explode(reason: str) -> str:
    """Always fails.

    Args:
        reason: why it fails
    """
    raise RuntimeError(f"kaboom: {reason}")


async def events_of(agent: Agent, task: str) -> list[Event]:
    return [event async for event in agent.stream(task)]


def kinds(events: list[Event]) -> list[str]:
    collapsed: list[str] = []
    for event in events:
        if not collapsed or collapsed[-1] != event.type:
            collapsed.append(event.type)
    return collapsed


async def test_tool_run_streams_thinking_action_observation_answer_done(sim: SimulatorServer) -> None:
    agent = Agent("calc", "You compute.", tools=BUILTIN_TOOLS, client=upstream_for(sim))
    events = await events_of(agent, "What is (2 + 3) * 7?")
    assert kinds(events) == ["thinking", "action", "observation", "thinking", "answer", "usage", "done"]
    action = next(e for e in events if e.type == "action")
    observation = next(e for e in events if e.type == "observation")
    assert isinstance(action, Action) and isinstance(observation, Observation)
    assert action.name == "calculator" and json.loads(action.arguments) == {"expression": "(2 + 3) * 7"}
    assert observation.content == "(2 + 3) * 7 = 35" and not observation.is_error
    assert "35" in "".join(e.content for e in events if isinstance(e, Answer))
    assert all(e.agent == "calc" for e in events)


async def test_failing_tool_becomes_an_observation(sim: SimulatorServer) -> None:
    agent = Agent("x", tools=[explode], client=upstream_for(sim))
    events = await events_of(agent, "please explode now")
    observation = next(e for e in events if e.type == "observation")
    assert isinstance(observation, Observation)
    assert observation.is_error and "kaboom" in observation.content
    assert events[-1].type == "done"


async def test_malformed_arguments_become_an_observation(sim: SimulatorServer) -> None:
    agent = Agent("x", tools=BUILTIN_TOOLS, client=upstream_for(sim))
    events = await events_of(agent, "what is 1 + 1 sim:bad_args=1")
    observation = next(e for e in events if e.type == "observation")
    assert isinstance(observation, Observation)
    assert observation.is_error and "not valid JSON" in observation.content
    assert events[-1].type == "done"


async def test_loop_limit(sim: SimulatorServer) -> None:
    agent = Agent("x", tools=BUILTIN_TOOLS, max_loops=2, client=upstream_for(sim))
    events = await events_of(agent, "what is 1 + 1 sim:tool_loop=1")
    assert sum(e.type == "action" for e in events) == 2
    last = events[-1]
    assert isinstance(last, Done) and last.finish_reason == "max_loops"


async def test_upstream_failure_is_one_error(sim: SimulatorServer) -> None:
    events = await events_of(Agent("x", client=upstream_for(sim)), "hi sim:status=401")
    assert [e.type for e in events] == ["usage", "error"]


async def test_concurrent_workflow_interleaves_and_each_finishes(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    agents = [Agent(name, f"You are the {name}.", client=client, params={"sim": {"rate": 100, "tokens": 20}})
              for name in ("researcher", "analyst", "critic")]
    events = [e async for e in ConcurrentWorkflow("panel", agents).stream("the future of streaming")]
    answers = [e.agent for e in events if e.type == "answer"]
    first_switch = next(i for i in range(1, len(answers)) if answers[i] != answers[i - 1])
    assert set(answers[first_switch:]) != {answers[first_switch]}  # interleaved, not one after another
    ends = {e.agent: e.outcome for e in events if isinstance(e, AgentEnd)}
    assert ends == {"researcher": "done", "analyst": "done", "critic": "done"}
    assert events[-1].type == "done" and all(e.workflow == "panel" for e in events)
    texts = {a.name: "".join(e.content for e in events if isinstance(e, Answer) and e.agent == a.name)
             for a in agents}
    assert texts["researcher"].startswith("As the researcher, here is")


async def test_cancelling_one_agent_leaves_the_others(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    slow = Agent("slow", client=client, params={"sim": {"rate": 50, "tokens": 100000}})
    fast = [Agent(n, client=client, params={"sim": {"rate": 200, "tokens": 20}}) for n in ("a", "b")]
    workflow = ConcurrentWorkflow("wf", [slow, *fast])
    ends: dict[str, str] = {}
    async for event in workflow.stream("task"):
        if event.type == "answer" and event.agent == "slow" and "slow" not in ends:
            assert workflow.cancel("slow")
            ends["slow"] = "requested"
        if isinstance(event, AgentEnd):
            ends[event.agent or ""] = event.outcome
    assert ends == {"slow": "cancelled", "a": "done", "b": "done"}
    await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1, 5)


async def test_sequential_workflow_passes_each_output_along(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    researcher = Agent("researcher", "You are a researcher.", client=client)
    writer = Agent("writer", "You are a writer.", client=client)
    final = await SequentialWorkflow("chain", [researcher, writer]).run("renewable energy")
    sent = sim.simulator.stats.last_body
    assert sent is not None
    user_turn = sent["messages"][-1]["content"]
    assert user_turn.startswith("As a researcher, here is")  # the writer's task is the researcher's answer
    assert final.startswith("As a writer, here is a simulated answer about As a researcher")


async def test_callback_modes(sim: SimulatorServer) -> None:
    agent = Agent("x", client=upstream_for(sim))
    tokens: list[str] = []
    answer = await agent.run("hello there", streaming_callback=tokens.append)
    assert tokens and "".join(tokens) == answer
    details: list[dict[str, Any]] = []

    async def detailed(info: dict[str, Any]) -> None:
        details.append(info)

    await agent.run("hello there", streaming_callback=detailed, detailed=True)
    assert any("content" in d for d in details)
    assert any(d.get("usage", {}).get("total_tokens") for d in details)
    assert details[-1]["finish_reason"] == "stop"

    def broken(token: str) -> None:
        raise ValueError("callback bug")

    assert await agent.run("hello there", streaming_callback=broken) == answer


async def test_workflow_run_styles(sim: SimulatorServer) -> None:
    client = upstream_for(sim)
    seen: list[str] = []
    answers = await ConcurrentWorkflow("w", [Agent("a", client=client), Agent("b", client=client)]).run(
        "x", streaming_callback=seen.append)
    assert set(answers) == {"a", "b"} and "".join(seen)


def test_tool_schema_from_signature_and_docstring() -> None:
    schema = calculator.schema()["function"]
    assert schema["name"] == "calculator"
    assert schema["parameters"]["required"] == ["expression"]
    assert "arithmetic" in schema["parameters"]["properties"]["expression"]["description"]
    with pytest.raises(TypeError):
        tool(lambda: None)  # type: ignore[arg-type, return-value]  # (not a coroutine function: refused)


@pytest.mark.parametrize(("expression", "value"), [("2 + 3 * 4", 14), ("2 ^ 10", 1024), ("sqrt(16)", 4.0),
                                                   ("-(3 - 5) % 3", 2), ("pi * 0", 0.0)])
def test_calculator_without_eval(expression: str, value: float) -> None:
    assert evaluate(expression) == value


@pytest.mark.parametrize("hostile", ["__import__('os').system('x')", "().__class__", "open('f')", "9 ** 99999",
                                     "x", "lambda: 1"])
def test_calculator_refuses(hostile: str) -> None:
    with pytest.raises((ValueError, SyntaxError)):
        evaluate(hostile)


async def test_builtin_tools() -> None:
    box = ToolBox(BUILTIN_TOOLS)
    assert await box.call("calculator", '{"expression": "6*7"}') == ("6*7 = 42", False)
    text, failed = await box.call("current_time", "{}")
    assert not failed and text.endswith("+00:00")
    assert (await box.call("nope", "{}"))[1]
    assert (await box.call("calculator", '{"wrong": 1}'))[1]
    assert "Backpressure" in await search_notes.function("backpressure slow reader")


async def test_chat_protocol_runs_agent_and_workflows(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "a", "prompt": "What is 6 * 7?", "agent": "assistant"}))
        events = await run_events(ws, "a")
        assert [e["type"] for e in events].count("action") == 1
        assert events[-1]["type"] == "done" and all(e.get("agent") == "assistant" for e in events)
        await ws.send(json.dumps({"type": "run", "id": "w", "prompt": "Analyze TSLA", "workflow": "market-analysis"}))
        events = await run_events(ws, "w")
        assert {e["agent"] for e in events if e["type"] == "agent_end"} == {
            "market-researcher", "financial-analyst", "technical-analyst"}
        assert events[-1]["type"] == "done" and events[-1]["workflow"] == "market-analysis"
        await ws.send(json.dumps({"type": "run", "id": "u", "prompt": "x", "workflow": "nope"}))
        assert "unknown workflow" in (await recv_json(ws))["message"]


async def test_cancel_one_agent_and_attach_snapshot_over_the_wire(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws, ws_connect(server, "/ws/chat") as late:
        await ws.send(json.dumps({"type": "run", "id": "w", "workflow": "market-analysis",
                                  "prompt": "Analyze sim:rate=100 sim:tokens=100"}))
        start = await recv_json(ws)
        while (await recv_json(ws))["type"] != "answer":
            pass
        await late.send(json.dumps({"type": "attach", "id": "w", "key": start["key"]}))
        snapshot = await recv_json(late)
        assert snapshot["type"] == "snapshot" and len(snapshot["agents"]) == 3
        assert all(a["status"] == "running" for a in snapshot["agents"])
        await ws.send(json.dumps({"type": "cancel", "id": "w", "agent": "technical-analyst"}))
        events = await run_events(ws, "w")
        ends = {e["agent"]: e["outcome"] for e in events if e["type"] == "agent_end"}
        assert ends == {"market-researcher": "done", "financial-analyst": "done", "technical-analyst": "cancelled"}
        watched = await run_events(late, "w")
        assert watched[-1]["type"] == "done"


async def test_cancelling_a_whole_workflow_stops_every_agent(server: WsAgentServer, sim: SimulatorServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "w", "workflow": "market-analysis",
                                  "prompt": "Analyze sim:rate=50 sim:tokens=100000"}))
        while (await recv_json(ws))["type"] != "answer":
            pass
        await ws.send(json.dumps({"type": "cancel", "id": "w"}))
        events = await run_events(ws, "w")
        assert events[-1]["type"] == "cancelled"
        await sim.simulator.stats.wait_for(lambda s: s.disconnected == 3 and s.active == 0, 10)


@pytest.mark.parametrize("workflow", ["market-analysis", "research-then-write"])
async def test_a_workflow_reports_its_total_usage_before_it_ends(server: WsAgentServer, workflow: str) -> None:
    """Each agent reported its usage; the run as a whole had none before ``done``."""
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "w", "prompt": "Analyze TSLA", "workflow": workflow}))
        events = await run_events(ws, "w")
    usages = [e for e in events if e["type"] == "usage"]
    per_agent = [u for u in usages if "agent" in u]
    total = events[-2]
    assert total["type"] == "usage" and "agent" not in total and total["workflow"] == workflow
    assert len(per_agent) >= 2 and usages == [*per_agent, total]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert total[field] == sum(u[field] for u in per_agent)


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_an_agent_killed_while_its_tool_runs_goes_on_from_there(sim: SimulatorServer, api: str) -> None:
    """A node dies while a tool runs (its ``action`` went out, its ``observation`` did not): the node that takes
    the run over goes on from the checkpoint that left with the action. The tool runs again there (a call in
    flight is run at least once: a tool with effects should be idempotent, or ask a person first), its action is
    not sent twice, and the steps before it are not run again; the rest is the uninterrupted run's."""
    upstream = upstream_for(sim, api=api, background=api == "responses")
    task = [{"role": "user", "content": "What is 17 * 23? sim:tokens=12 sim:reasoning=1 sim:tool=calculator"}]
    try:
        whole = [e async for batch in assistant(upstream).batches(task, checkpoints=True) for e in batch]
        cut = next(n for n, e in enumerate(whole) if isinstance(e, Action))
        step = whole[cut + 1]  # the checkpoint that left with the action, in its batch
        assert isinstance(step, Checkpoint) and step.step
        requests = sim.simulator.stats.requests
        rest = [e async for batch in assistant(upstream).batches([], checkpoints=True, resume=AgentResume(step.state))
                for e in batch]
    finally:
        await upstream.close()
    shown = [e for e in whole if not isinstance(e, Checkpoint)]
    after = shown[shown.index(whole[cut]) + 1:]
    assert [e for e in rest if not isinstance(e, Checkpoint)] == after  # the observation on, no action again
    assert sim.simulator.stats.requests == requests + 1  # the step after the tool's, only
