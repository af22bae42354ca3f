"""wsagent behind LiteLLM's proxy, the real one: ``litellm[proxy]`` pinned in ``tests/litellm/requirements.txt``
and installed into a virtual environment of its own (it pins its own openai, pydantic and aiohttp), started on
loopback with two models: ``mock`` answers with LiteLLM's ``mock_response``, ``sim`` forwards to the simulator
in this process, so real reasoning, tool-call and error streams pass through LiteLLM, and the simulator sees
whether a cancel reached it.

The first run installs LiteLLM (about 50 s, 740 MB) into ``$WSAGENT_LITELLM_VENV`` or
``~/.cache/wsagent/litellm-<digest>``; later runs reuse it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from wsagent.core.chunks import ModelEvent, TextDelta
from wsagent.core.config import Settings
from wsagent.core.errors import UpstreamError
from wsagent.upstream.model import UpstreamClient, UpstreamConfig
from wsagent.upstream.simulator import SimulatorServer
from wsagent.wiring.server import WsAgentServer

from .helpers import recv_json, run_events, simulator, text_reply, ws_connect
from .processes import free_port, pinned_venv, started

pytestmark = [pytest.mark.litellm, pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

HERE = Path(__file__).parent
REQUIREMENTS = HERE / "litellm" / "requirements.txt"
KEY = "sk-wsagent-test"
TOOLS = [{"type": "function", "function": {"name": name, "description": text, "parameters": {
    "type": "object", "properties": {arg: {"type": "string"}}, "required": [arg]}}}
    for name, text, arg in (("calculator", "Evaluate arithmetic.", "expression"), ("get_time", "The time.", "tz"))]


@pytest.fixture(scope="module")
def proxy_venv() -> Path:
    return pinned_venv("litellm", REQUIREMENTS, "WSAGENT_LITELLM_VENV")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def sim() -> AsyncIterator[SimulatorServer]:
    async with simulator() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def litellm(proxy_venv: Path, sim: SimulatorServer, tmp_path_factory: pytest.TempPathFactory,
                  ) -> AsyncIterator[str]:
    """LiteLLM's proxy on a free loopback port; its base URL once it says it is listening."""
    port = free_port()
    config = tmp_path_factory.mktemp("litellm") / "config.yaml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "model_list": [
            {"model_name": "mock", "litellm_params": {"model": "openai/mock", "api_key": "unused",
                                                     "mock_response": "Hello from LiteLLM's mock response"}},
            {"model_name": "sim", "litellm_params": {"model": "openai/wsagent-sim", "api_base": sim.base_url,
                                                    "api_key": "unused"}},
        ],
        "general_settings": {"master_key": KEY},
        "litellm_settings": {"telemetry": False},
    }))
    command = [str(proxy_venv / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    async with started(command, b"Uvicorn running on", env={"LITELLM_LOCAL_MODEL_COST_MAP": "True"}):
        yield f"http://127.0.0.1:{port}/v1"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def server(litellm: str) -> AsyncIterator[WsAgentServer]:
    settings = Settings(host="127.0.0.1", port=0, upstream_url=litellm, api_key=KEY, model="sim",
                        allowed_models="*", retry_deadline=2)  # type: ignore[arg-type]  # (parsed as the CLI's)
    started = await WsAgentServer(settings).start()
    try:
        yield started
    finally:
        await started.stop(drain=0)


async def events_of(base_url: str, prompt: str, **params: Any) -> tuple[list[ModelEvent], UpstreamError | None]:
    client = UpstreamClient(UpstreamConfig(base_url=base_url, api_key=KEY, model="sim", max_retries=0))
    out: list[ModelEvent] = []
    try:
        async for event in client.stream([{"role": "user", "content": prompt}], params=params or None):
            out.append(event)
    except UpstreamError as exc:
        return out, exc
    finally:
        await client.close()
    return out, None


async def test_text_mode_and_json_runs(server: WsAgentServer, sim: SimulatorServer, litellm: str) -> None:
    direct, _ = await events_of(sim.base_url, "tell me about websockets")
    expected = "".join(e.text for e in direct if isinstance(e, TextDelta) and e.kind == "content")
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send("tell me about websockets")
        assert await text_reply(ws) == expected + "\n[DONE]"
        await ws.send(json.dumps({"type": "run", "id": "mock", "prompt": "hi", "model": "mock"}))
        events = await run_events(ws, "mock")
    assert "".join(e["content"] for e in events if e["type"] == "token") == "Hello from LiteLLM's mock response"
    assert [e["type"] for e in events].count("usage") == 1 and events[-1]["type"] == "done"


async def test_agent_tool_loop_through_litellm(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "a", "prompt": "What is 6 * 7?", "agent": "assistant"}))
        events = await run_events(ws, "a")
    kinds = [e["type"] for e in events]
    assert kinds.index("action") < kinds.index("observation") < kinds.index("answer") and kinds[-1] == "done"
    (action,) = [e for e in events if e["type"] == "action"]
    assert action["name"] == "calculator" and json.loads(action["arguments"]) == {"expression": "6 * 7"}
    assert "42" in "".join(e["content"] for e in events if e["type"] == "answer")


async def test_failures_read_plainly(server: WsAgentServer) -> None:
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "u", "prompt": "hi", "model": "no-such-model"}))
        unknown = (await run_events(ws, "u"))[-1]
        await ws.send(json.dumps({"type": "run", "id": "m", "prompt": "hi sim:error_after=3 sim:reasoning=0"}))
        mid = await run_events(ws, "m")
        loop = asyncio.get_running_loop()
        started = loop.time()
        await ws.send(json.dumps({"type": "run", "id": "r", "prompt": "hi sim:status=429"}))
        limited = (await run_events(ws, "r"))[-1]
        waited = loop.time() - started
    assert unknown["code"] == "upstream_bad_request" and "Invalid model name" in unknown["message"]
    assert "".join(e["content"] for e in mid if e["type"] == "token") == "here is a"
    assert mid[-1]["code"] == "upstream_stream_error" and "simulated mid-stream failure" in mid[-1]["message"]
    # LiteLLM retries a 429 itself (about 5 s): wsagent starts no retry past its 2 s deadline, and says so.
    assert limited["code"] == "upstream_rate_limited", limited
    assert limited["message"].endswith("(1 attempt; gave up at the 2 s retry deadline)"), limited
    assert waited < 15


async def test_cancel_reaches_the_model_behind_litellm(server: WsAgentServer, sim: SimulatorServer) -> None:
    stats = sim.simulator.stats
    async with ws_connect(server, "/ws/chat") as ws:
        await ws.send(json.dumps({"type": "run", "id": "c", "prompt": "long sim:rate=50 sim:tokens=100000 sim:tag=c"}))
        while (await recv_json(ws))["type"] != "token":
            pass
        loop = asyncio.get_running_loop()
        await ws.send(json.dumps({"type": "cancel", "id": "c"}))
        cancelled = loop.time()
        assert (await run_events(ws, "c"))[-1]["type"] == "cancelled"
    await stats.wait_for(lambda s: "disconnected" in s.tags.get("c", {}), 10)
    # the simulator saw its connection close within a second of the cancel, through LiteLLM
    assert stats.tags["c"]["disconnected"] - cancelled < 1.0


@pytest.mark.parametrize(("name", "prompt", "tools"), [
    ("litellm-tools", "What is 2 + 2 and what time is it?", TOOLS),
    ("litellm-midstream-error", "hello sim:error_after=3 sim:reasoning=0", None),
])
async def test_recorded_transcripts_match_litellm_today(litellm: str, sim: SimulatorServer, name: str, prompt: str,
                                                         tools: Any) -> None:
    """``tests/transcripts/litellm-*.sse`` were captured from this proxy with curl; it still writes them so."""
    params = {"tools": tools} if tools else {}
    live = await events_of(litellm, prompt, **params)
    raw = (HERE / "transcripts" / f"{name}.sse").read_text()
    replayed = await events_of(sim.base_url, prompt, sim={"raw": raw, "raw_chunk": 11})
    assert live[0] == replayed[0]
    assert (live[1] and live[1].message, live[1] and live[1].code) == (
        replayed[1] and replayed[1].message, replayed[1] and replayed[1].code)



async def test_responses_dialect_through_litellm(litellm: str, sim: SimulatorServer) -> None:
    """``--upstream-api responses`` with LiteLLM's ``/v1/responses`` in front of the simulator: an agent's tool
    loop and a model run with reasoning, read from Responses API events that a third party wrote."""
    settings = Settings(host="127.0.0.1", port=0, upstream_url=litellm, api_key=KEY, model="sim",
                        upstream_api="responses")
    server = await WsAgentServer(settings).start()
    try:
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(json.dumps({"type": "run", "id": "a", "prompt": "What is 6 * 7?", "agent": "assistant"}))
            events = await run_events(ws, "a")
            await ws.send(json.dumps({"type": "run", "id": "t", "prompt": "tell me about websockets"}))
            text = await run_events(ws, "t")
    finally:
        await server.stop(drain=0)
    assert "42" in "".join(e["content"] for e in events if e["type"] == "answer") and events[-1]["type"] == "done"
    direct, _ = await events_of(sim.base_url, "tell me about websockets")
    assert "".join(e["content"] for e in text if e["type"] == "token") == "".join(
        e.text for e in direct if isinstance(e, TextDelta) and e.kind == "content")
    assert [e["type"] for e in text].count("thinking") >= 1 and text[-1]["type"] == "done"
    # LiteLLM bridges its /v1/responses to the simulator's chat completions: the Responses events wsagent
    # read were written by LiteLLM, not by our simulator
    assert sim.simulator.stats.last_body is not None and "messages" in sim.simulator.stats.last_body
