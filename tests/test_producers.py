"""Your own agents (``--agents``): the thread bridge's bounds, and registered agents on every route."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from wsagent.core.events import Answer
from wsagent.upstream.agents.producers import Stopped, ThreadBridge, load_agents
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from . import agents_fixture
from .helpers import ServerFactory, recv_json, run_events, ws_connect

AGENTS = "examples/agents/plain.py:AGENTS,tests.agents_fixture:AGENTS"


async def test_a_bridge_never_holds_more_than_its_limit_and_releases_the_thread() -> None:
    """A framework's thread that outruns the run blocks at ``limit`` events; stopping the run raises
    ``Stopped`` in it, so it is never blocked for ever and memory stays bounded."""
    bridge = ThreadBridge(limit=16)
    emitted: list[int] = []
    outcome: list[BaseException] = []
    ended = threading.Event()

    def work() -> None:
        try:
            for n in range(1_000_000):
                bridge.emit(Answer(str(n)))
                emitted.append(n)
        except Stopped as exc:
            outcome.append(exc)
            raise
        finally:
            ended.set()

    stream = bridge.stream(work)
    first = await anext(stream)
    assert 1 <= len(first) <= 16
    second = await anext(stream)  # the thread filled the bridge again meanwhile, and no more
    assert 1 <= len(second) <= 16
    await stream.aclose()  # the run is cancelled
    assert await asyncio.to_thread(ended.wait, 5)
    assert isinstance(outcome[0], Stopped) and len(emitted) <= 16 * 3 + 1
    with pytest.raises(Stopped):
        bridge.emit(Answer("late"))


def test_agents_load_from_a_file_or_a_module_and_bad_specs_are_clear() -> None:
    agents = load_agents(AGENTS)
    assert set(agents) == {"countdown", "blocking", "mailer", "fails", "hangs", "flood"}
    assert set(load_agents("tests/agents_fixture.py:AGENTS")) == {"fails", "hangs", "flood"}
    with pytest.raises(ValueError, match="expected module:attribute"):
        load_agents("no-colon")
    with pytest.raises(ValueError, match="must be a dict of agent name to factory"):
        load_agents("tests.agents_fixture:STOPPED")


@pytest.fixture
async def server(make_server: ServerFactory) -> WsAgentServer:
    return await make_server(agents=AGENTS, run_max_seconds=3)


def run(run_id: str, agent: str, prompt: str = "lift off") -> str:
    return json.dumps({"type": "run", "id": run_id, "prompt": prompt, "agent": agent})


async def test_registered_agents_stream_on_chat(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run("c", "countdown"))
        events = await run_events(ws, "c")
        await ws.send(run("b", "blocking", "shout these words"))
        threaded = await run_events(ws, "b")
        await ws.send(run("u", "nobody"))
        unknown = await recv_json(ws)
    kinds = [e["type"] for e in events]
    assert kinds[:4] == ["start", "thinking", "action", "observation"] and kinds[-2:] == ["usage", "done"]
    assert "".join(e["content"] for e in events if e["type"] == "answer") == "5… 4… 3… 2… 1… liftoff."
    assert all(e.get("agent") == "countdown" for e in events)
    assert "".join(e["content"] for e in threaded if e["type"] == "answer") == "SHOUT THESE WORDS "
    usage = next(e for e in threaded if e["type"] == "usage")
    assert usage["estimated"] and usage["completion_tokens"] >= 1
    assert unknown["code"] == "bad_request" and "'countdown'" in unknown["message"]


async def test_registered_agents_on_the_thoughts_route_and_the_ai_sdk(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/agent-thoughts?agent=countdown") as ws:
        await ws.send("go")
        thoughts: list[dict[str, Any]] = []
        while not thoughts or thoughts[-1]["type"] != "done":
            thoughts.append(await recv_json(ws))
    assert [t["type"] for t in thoughts][:3] == ["thinking", "action", "observation"]
    async with ws_connect(server, "/ws/agent-thoughts?agent=nobody") as ws:
        assert "unknown agent 'nobody'" in (await recv_json(ws))["message"]
        await ws.wait_closed()
        assert ws.close_code == 1008
    async with ws_connect(server, "/ws/ai-sdk") as ws:
        message = {"id": "u", "role": "user", "parts": [{"type": "text", "text": "go"}]}
        await ws.send(json.dumps({"type": "send", "requestId": "r", "id": "chat-byo-0123456789",
                                  "trigger": "submit-message", "headers": {}, "body": {"agent": "countdown"},
                                  "messages": [message]}))
        chunks = []
        while True:
            frame = await recv_json(ws)
            if frame["type"] == "end":
                break
            chunks.append(frame["chunk"])
    types = [c["type"] for c in chunks]
    assert "tool-input-available" in types and "tool-output-available" in types and types[-1] == "finish"


async def test_a_failing_agent_is_a_plain_error(server: WsAgentServer, caplog: pytest.LogCaptureFixture) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run("f", "fails"))
        events = await run_events(ws, "f")
    error = events[-1]
    assert error == {**error, "type": "error", "code": "agent_error",
                     "message": "agent 'fails' failed: RuntimeError: the framework's own bug"}
    assert "Traceback" in caplog.text and "Traceback" not in json.dumps(events)


async def test_a_hanging_agent_is_ended_by_its_budget(server: WsAgentServer) -> None:
    loop = asyncio.get_running_loop()
    async with ws_connect(server, "/ws/chat") as ws:
        started = loop.time()
        await ws.send(run("h", "hangs"))
        events = await run_events(ws, "h")
    assert events[-1]["code"] == "budget_exceeded" and 2.9 <= loop.time() - started < 4.5


async def test_cancel_stops_a_threaded_agent(server: WsAgentServer, sim: SimulatorServer) -> None:
    agents_fixture.STOPPED.clear()
    async with ws_connect(server, "/ws/chat", max_queue=4) as ws:
        await ws.send(run("x", "flood"))
        while (await recv_json(ws))["type"] != "answer":
            pass
        await ws.send(json.dumps({"type": "cancel", "id": "x"}))
        events = await run_events(ws, "x")
    assert events[-1]["type"] == "cancelled"
    assert await asyncio.to_thread(agents_fixture.STOPPED.wait, 5)  # its next emit raised Stopped


async def test_sighup_imports_an_edited_agents_file_again(make_server: ServerFactory, tmp_path: Path) -> None:
    """The file is read again on every reload, as the workflows file is, not only when the flag changes."""
    agents = tmp_path / "mine.py"
    agents.write_text("from wsagent.events import Answer\n\nasync def one(request):\n    yield Answer('1')\n\n"
                      "AGENTS = {'one': one}\n")
    server = await make_server(agents=f"{agents}:AGENTS")
    assert set(server.app.agents) == {"one"}
    agents.write_text(agents.read_text().replace("AGENTS = {'one': one}", "AGENTS = {'one': one, 'two': one}"))
    server.reload(server.settings)
    assert set(server.app.agents) == {"one", "two"}


async def test_sighup_reloads_the_agents_and_a_bad_spec_changes_nothing(server: WsAgentServer) -> None:
    before = server.settings
    with pytest.raises(ValueError):
        server.reload(dataclasses.replace(before, agents="tests.agents_fixture:STOPPED", max_connections=3))
    assert server.settings is before and set(server.app.agents) >= {"countdown", "fails"}
    server.reload(dataclasses.replace(before, agents="examples/agents/plain.py:AGENTS"))
    assert set(server.app.agents) == {"countdown", "blocking", "mailer"}
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run("f", "fails"))
        assert "unknown agent 'fails'" in (await recv_json(ws))["message"]
        await ws.send(run("c", "countdown"))
        assert (await run_events(ws, "c"))[-1]["type"] == "done"


async def test_the_documented_mailer_asks_first_and_hears_what_was_said(server: WsAgentServer) -> None:
    """docs/agents.md's mailer (examples/agents/plain.py): an agent of one's own asks before it sends, takes the
    steering message sent while it waited, and sends only once approved; denied, it does not."""
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(run("m1", "mailer", "quarterly figures"))
        while (event := await recv_json(ws))["type"] != "approval_request":
            pass
        assert (event["name"], json.loads(event["arguments"])["to"]) == ("send_email", "team@example.com")
        await ws.send(json.dumps({"type": "steer", "id": "m1", "content": "cc the board"}))
        await ws.send(json.dumps({"type": "approve", "id": "m1", "call_id": "mail-1", "approved": True}))
        sent = await run_events(ws, "m1")
        await ws.send(run("m2", "mailer", "draft"))
        while (event := await recv_json(ws))["type"] != "approval_request":
            pass
        await ws.send(json.dumps({"type": "approve", "id": "m2", "call_id": "mail-1", "approved": False,
                                  "reason": "not yet"}))
        denied = await run_events(ws, "m2")
    assert [e["delivered"] for e in sent if e["type"] == "steer"] == [True]
    action = next(e for e in sent if e["type"] == "action")
    assert json.loads(action["arguments"])["note"] == "cc the board" and sent[-1]["type"] == "done"
    assert not [e for e in denied if e["type"] == "action"]
    assert "".join(e["content"] for e in denied if e["type"] == "answer") == "Not sent: not yet."
