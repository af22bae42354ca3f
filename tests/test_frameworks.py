"""Real agent frameworks through a real wsagent server: swarms, LangGraph and the OpenAI Agents SDK, each
pointed at the simulator over HTTP, served with ``--agents examples/agents/...:AGENTS``.

The frameworks are installed into a virtual environment of their own (``tests/frameworks/requirements.txt``,
every package pinned; about 40 s and 700 MB on first use, kept in ``~/.cache/wsagent/`` or
``$WSAGENT_FRAMEWORKS_VENV``), and the server runs from it; the simulator runs in this process, so it sees
every model request and every closed connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from websockets.asyncio.client import connect

from wsagent.upstream.simulator import SimulatorServer

from .helpers import ROOT, simulator
from .processes import free_port, pinned_venv, started

pytestmark = [pytest.mark.frameworks, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

REQUIREMENTS = Path(__file__).parent / "frameworks" / "requirements.txt"
AGENTS = ",".join(f"examples/agents/{name}_example.py:AGENTS" for name in ("openai_agents", "langgraph", "swarms"))


@pytest.fixture(scope="module")
def venv() -> Path:
    # openai-agents after the rest, without its requirements: see tests/frameworks/requirements.txt
    return pinned_venv("frameworks", REQUIREMENTS, "WSAGENT_FRAMEWORKS_VENV", [["--no-deps", "openai-agents==0.24.0"]])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with simulator() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def url(venv: Path, sim: SimulatorServer, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """wsagent, run from the frameworks' environment with the examples' agents; its ``/ws/chat``."""
    port = free_port()
    command = [str(venv / "bin" / "python"), "-m", "wsagent.serve", "--port", str(port), "--upstream-url",
               sim.base_url, "--agents", AGENTS, "--run-max-seconds", "60"]
    env = {"PYTHONPATH": str(ROOT), "WORKSPACE_DIR": str(tmp_path_factory.mktemp("swarms"))}
    async with started(command, b"wsagent listening on", env=env, cwd=ROOT, limit=60):
        yield f"ws://127.0.0.1:{port}/ws/chat"


async def agent_events(url: str, agent: str, prompt: str, cancel_after: int | None = None,
                       approve: bool | None = None) -> list[dict[str, Any]]:
    """One run's events; with ``cancel_after``, cancelled once that many answer deltas arrived; with
    ``approve``, each approval request answered so (denials with the reason "not now")."""
    events: list[dict[str, Any]] = []
    async with connect(url, open_timeout=10) as ws:
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": prompt, "agent": agent}))
        answers = 0
        while True:
            event = json.loads(await asyncio.wait_for(ws.recv(), 60))
            events.append(event)
            if event["type"] == "answer":
                answers += 1
                if answers == cancel_after:
                    await ws.send(json.dumps({"type": "cancel", "id": "r"}))
            if event["type"] == "approval_request" and approve is not None:
                await ws.send(json.dumps({"type": "approve", "id": "r", "call_id": event["call_id"],
                                          "approved": approve, **({} if approve else {"reason": "not now"})}))
            if event["type"] in ("done", "error", "cancelled"):
                return events


@pytest.mark.parametrize("agent", ["openai-agents", "langgraph", "swarms", "swarms-detailed"])
async def test_a_tool_loop_end_to_end(url: str, agent: str) -> None:
    events = await agent_events(url, agent, "What is 6 * 7?")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done", json.dumps(events[-1])
    assert kinds.index("action") < kinds.index("observation") < kinds.index("answer")
    (action,) = [e for e in events if e["type"] == "action"]
    assert action["name"] == "calculator" and json.loads(action["arguments"]) == {"expression": "6 * 7"}
    (observation,) = [e for e in events if e["type"] == "observation"]
    assert observation["content"] == "42" and observation["call_id"] == action["call_id"]
    answer = "".join(e["content"] for e in events if e["type"] == "answer")
    assert answer.startswith("Based on the tool results: ") and answer.endswith("42."), answer
    (usage,) = [e for e in events if e["type"] == "usage"]
    assert usage["completion_tokens"] > 0
    assert usage["estimated"] is (agent == "swarms")  # plain swarms tokens carry no usage: wsagent counts
    assert all(e.get("agent") == agent for e in events)
    if agent != "langgraph":  # ChatOpenAI drops an OpenAI-compatible server's reasoning_content
        assert "thinking" in kinds


async def test_a_swarms_workflow_streams_each_agent(url: str) -> None:
    events = await agent_events(url, "swarms-panel", "What is 6 * 7?")
    assert events[-1]["type"] == "done"
    ends = {e["agent"]: e["outcome"] for e in events if e["type"] == "agent_end"}
    assert ends == {"market-researcher": "done", "risk-analyst": "done"}
    for name in ends:
        answer = "".join(e["content"] for e in events if e["type"] == "answer" and e["agent"] == name)
        assert answer.endswith("42.") and any(e["type"] == "action" and e["agent"] == name for e in events)
        assert all(e.get("workflow") == "swarms-panel" for e in events if e.get("agent") == name)


@pytest.mark.parametrize("agent", ["openai-agents", "langgraph", "swarms"])
async def test_cancel_stops_the_framework(url: str, sim: SimulatorServer, agent: str) -> None:
    """The simulator sees the model request close, and no further model request is made for the run."""
    tag = f"cancel-{agent}"
    events = await agent_events(url, agent, f"Tell me a long story sim:rate=50 sim:tokens=100000 sim:tag={tag}",
                                cancel_after=3)
    assert events[-1]["type"] == "cancelled"
    stats = sim.simulator.stats
    await stats.wait_for(lambda s: "disconnected" in s.tags.get(tag, {}), 10)
    barrier = await agent_events(url, agent, "What is 6 * 7?")  # a whole run after it: time for a stray request to show
    assert barrier[-1]["type"] == "done"
    assert stats.tags[tag]["streams"] == 1 and stats.tags[tag]["tokens"] < 1000


def asked(events: list[dict[str, Any]], approved: bool) -> dict[str, Any]:
    """The run's one approval request, checked: it names the calculator with its arguments, its answer
    follows, and the run ends with ``done``, its only terminal event, every event numbered without a gap."""
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [e["type"] in ("done", "error", "cancelled") for e in events].count(True) == 1
    assert events[-1]["type"] == "done", json.dumps(events[-1])
    (request,) = [e for e in events if e["type"] == "approval_request"]
    assert request["name"] == "calculator" and json.loads(request["arguments"]) == {"expression": "6 * 7"}
    (answer,) = [e for e in events if e["type"] == "approval"]
    assert answer["call_id"] == request["call_id"] and answer["approved"] is approved
    assert events.index(request) < events.index(answer)
    return request


@pytest.mark.parametrize("agent", ["openai-agents-approval", "langgraph-approval"])
async def test_an_approved_call_runs(url: str, agent: str) -> None:
    events = await agent_events(url, agent, "What is 6 * 7?", approve=True)
    request = asked(events, True)
    (action,) = [e for e in events if e["type"] == "action"]
    (observation,) = [e for e in events if e["type"] == "observation"]
    assert action["call_id"] == observation["call_id"] == request["call_id"] and observation["content"] == "42"
    answer = next(e for e in events if e["type"] == "approval")
    # the SDK knows which tools ask before it runs one; a LangGraph tool interrupts once it runs, after the
    # model's call was shown
    order = [request, answer, action] if agent == "openai-agents-approval" else [action, request, answer]
    assert [events.index(e) for e in [*order, observation]] == sorted(events.index(e) for e in [*order, observation])
    assert "".join(e["content"] for e in events if e["type"] == "answer").endswith("42.")
    (usage,) = [e for e in events if e["type"] == "usage"]
    assert usage["completion_tokens"] > 0 and not usage["estimated"]


@pytest.mark.parametrize("agent", ["openai-agents-approval", "langgraph-approval"])
async def test_a_denied_call_never_runs(url: str, agent: str) -> None:
    events = await agent_events(url, agent, "What is 6 * 7?", approve=False)
    request = asked(events, False)
    told = "The user denied the call to calculator: not now."
    if agent == "openai-agents-approval":  # rejected before it ran: nothing to show
        assert not [e for e in events if e["type"] in ("action", "observation")]
    else:  # the model's call was shown; the tool, resumed, returned the denial instead of computing
        (observation,) = [e for e in events if e["type"] == "observation"]
        assert observation["call_id"] == request["call_id"] and observation["content"].startswith(told)
    assert told in "".join(e["content"] for e in events if e["type"] == "answer")
