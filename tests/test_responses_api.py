"""The OpenAI Responses API as the upstream dialect: its interpreter (sans I/O, at any split), the request
it sends, and the whole server, which must stream the same frames on either dialect."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core.chunks import Finish, ModelEvent, TextDelta, ToolCall, Usage
from wsagent.core.config import Settings
from wsagent.core.errors import UpstreamError
from wsagent.core.responses_api import ResponsesInterpreter, response_to_events, responses_request
from wsagent.core.sse import SSEDecoder, SSEEvent
from wsagent.upstream.simulator import SimulatorServer, SimulatorSettings
from wsagent.upstream.simulator.plan import Plan
from wsagent.upstream.simulator.responses_format import ResponsesFormat
from wsagent.wiring.server import WsAgentServer

from .helpers import ServerFactory, recv_json, run_events, text_reply, ws_connect

PLAN = Plan(reasoning=["Think", " twice"], content=["Hello", " world"],
            tool_calls=[("call_a", "calculator", '{"expression": "1 + 2"}'), ("call_b", "clock", "{}")],
            finish_reason="tool_calls", prompt_tokens=7)


def written(the_plan: Plan = PLAN) -> bytes:
    """A whole stream exactly as the simulator writes it."""
    fmt = ResponsesFormat({"input": "x"}, "sim", the_plan, "\n")
    parts = [fmt.begin()]
    parts += [fmt.token("reasoning_content", t) for t in the_plan.reasoning]
    parts += [fmt.token("content", t) for t in the_plan.content]
    parts.append(fmt.end(len(the_plan.reasoning) + len(the_plan.content)))
    return "".join(parts).encode()


EXPECTED: list[ModelEvent] = [
    TextDelta("reasoning", "Think"), TextDelta("reasoning", " twice"), TextDelta("content", "Hello"),
    TextDelta("content", " world"), ToolCall("call_a", "calculator", '{"expression": "1 + 2"}', 0),
    ToolCall("call_b", "clock", "{}", 1), Usage(7, 4, 11), Finish("tool_calls")]


def interpret(data: bytes, cuts: list[int]) -> list[ModelEvent]:
    decoder, interpreter = SSEDecoder(), ResponsesInterpreter()
    out: list[ModelEvent] = []
    edges = [0, *sorted(set(cuts)), len(data)]
    for start, end in zip(edges, edges[1:], strict=False):
        for sse in decoder.feed(data[start:end]):
            out += interpreter.feed(sse)
    out += interpreter.end(decoder.close())
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(written())), max_size=12))
def test_same_events_at_any_split(cuts: list[int]) -> None:
    assert interpret(written(), cuts) == EXPECTED


def event(kind: str, **payload: Any) -> SSEEvent:
    return SSEEvent(json.dumps({"type": kind, **payload}), event=kind)


def test_errors_and_endings() -> None:
    failed = ResponsesInterpreter()
    with pytest.raises(UpstreamError) as caught:
        failed.feed(event("response.failed", response={"status": "failed",
                                                       "error": {"code": "server_error", "message": "boom"}}))
    assert (caught.value.code, caught.value.upstream_code, str(caught.value)) == (
        "upstream_stream_error", "server_error", "boom")
    with pytest.raises(UpstreamError) as caught:
        ResponsesInterpreter().feed(event("error", code="rate_limit_exceeded", message="slow down", param=None))
    assert caught.value.upstream_code == "rate_limit_exceeded" and str(caught.value) == "slow down"
    cut = ResponsesInterpreter()
    assert cut.feed(event("response.output_text.delta", delta="half")) == [TextDelta("content", "half")]
    with pytest.raises(UpstreamError) as caught:
        cut.end([])
    assert caught.value.code == "upstream_truncated"
    with pytest.raises(UpstreamError) as caught:
        ResponsesInterpreter().feed(SSEEvent("[DONE]"))
    assert caught.value.code == "upstream_truncated"
    with pytest.raises(UpstreamError) as caught:
        ResponsesInterpreter().feed(SSEEvent("{not json"))
    assert caught.value.code == "upstream_protocol"
    filtered = ResponsesInterpreter().feed(event("response.incomplete", response={
        "status": "incomplete", "incomplete_details": {"reason": "content_filter"}}))
    assert filtered == [Finish("content_filter")]
    parts = ResponsesInterpreter()
    assert parts.feed(event("response.reasoning_summary_part.added", summary_index=1)) == [
        TextDelta("reasoning", "\n\n")]
    assert parts.feed(event("response.some_future_event", anything=1)) == []


def test_whole_response_object() -> None:
    whole = ResponsesFormat({"input": "x"}, "sim", PLAN, "\n").whole()
    assert response_to_events(whole) == [
        TextDelta("reasoning", "Think twice"), TextDelta("content", "Hello world"), *EXPECTED[4:]]
    with pytest.raises(UpstreamError):
        response_to_events({"object": "response", "status": "failed", "output": [],
                            "error": {"code": "server_error", "message": "no"}})


def test_request_asks_what_the_chat_body_asks() -> None:
    chat = {"model": "m", "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 9,
            "temperature": 0.5, "reasoning_effort": "low",
            "messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "6 * 7?"}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c1", "type": "function", "function": {"name": "calc", "arguments": "{}"}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "42"}],
            "tools": [{"type": "function", "function": {"name": "calc", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "calc"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": True}}}
    assert responses_request(chat) == {
        "model": "m", "stream": True, "store": False, "max_output_tokens": 9, "temperature": 0.5,
        "reasoning": {"effort": "low", "summary": "auto"},
        "input": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "input_text", "text": "6 * 7?"}]},
                  {"type": "function_call", "call_id": "c1", "name": "calc", "arguments": "{}"},
                  {"type": "function_call_output", "call_id": "c1", "output": "42"}],
        "tools": [{"type": "function", "name": "calc", "parameters": {"type": "object"}}],
        "tool_choice": {"type": "function", "name": "calc"},
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True}}}


REQUESTS: list[dict[str, Any]] = [  # JSON frames, as sent
    {"type": "run", "id": "m", "prompt": "tell me about streams"},
    {"type": "run", "id": "a", "prompt": "What is 6 * 7?", "agent": "assistant"},
    {"type": "run", "id": "w", "prompt": "Analyze TSLA", "workflow": "market-analysis"},
    {"type": "run", "id": "s", "prompt": "short one", "params": {"max_tokens": 3}},
    {"type": "run", "id": "e", "prompt": "fails sim:error_after=4"},
    {"type": "run", "id": "r", "prompt": "limited sim:status=429"},
]


def merged(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each agent's events in order, consecutive text of one kind joined, without ``seq`` and ``key``: how
    text splits into frames depends on how the network split the upstream's bytes, and how a workflow's
    agents interleave on the loop, on either dialect."""
    out: list[dict[str, Any]] = []
    for event in sorted(events, key=lambda e: str(e.get("agent", ""))):
        event = {k: v for k, v in event.items() if k not in ("seq", "key")}
        last = out[-1] if out else None
        if (last is not None and isinstance(event.get("content"), str) and isinstance(last.get("content"), str)
                and {k: v for k, v in last.items() if k != "content"} == {
                    k: v for k, v in event.items() if k != "content"}):
            last["content"] += event["content"]
        else:
            out.append(event)
    return out


async def frames(server: WsAgentServer) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    async with ws_connect(server, "/ws/chat") as ws:
        for request in REQUESTS:
            await ws.send(json.dumps(request))
            events = await run_events(ws, str(request["id"]))
            out.append(merged(events))
        await ws.send("plain text mode")
        out.append([{"text": await text_reply(ws)}])
    return out


async def test_the_same_frames_on_either_dialect(make_server: ServerFactory, sim: SimulatorServer) -> None:
    """Relay, agent, workflow, a finish by length, a mid-stream failure and a 429: frame for frame the same."""
    on_chat = await frames(await make_server(max_retries=0))
    requests = sim.simulator.stats.requests
    on_responses = await frames(await make_server(upstream={"api": "responses"}, max_retries=0))
    assert sim.simulator.stats.requests == 2 * requests
    assert sim.simulator.stats.last_body is not None and "input" in sim.simulator.stats.last_body
    assert on_responses == on_chat
    model, agent, workflow, short, failed, limited, text = on_chat
    assert model[-1]["type"] == "done" and [e["type"] for e in agent].count("action") == 1
    assert [e["type"] for e in workflow].count("done") == 1 and [e["type"] for e in workflow].count("agent_end") == 3
    assert short[-1]["type"] == "done" and short[-1].get("finish_reason") == "length", short[-1]
    assert (failed[-1]["code"], failed[-1]["message"]) == ("upstream_stream_error", "simulated mid-stream failure")
    assert limited[-1]["code"] == "upstream_rate_limited" and text[0]["text"].endswith("[DONE]")


async def test_cancel_closes_the_responses_stream() -> None:
    sim = await SimulatorServer(SimulatorSettings(rate=100, switches=True)).start()
    server = await WsAgentServer(Settings(
        host="127.0.0.1", port=0, upstream_url=sim.base_url, upstream_api="responses")).start()
    try:
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(json.dumps({"type": "run", "id": "c", "prompt": "long sim:tokens=100000"}))
            while (await recv_json(ws))["type"] != "token":
                pass
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            assert (await run_events(ws, "c"))[-1]["type"] == "cancelled"
            await sim.simulator.stats.wait_for(lambda s: s.disconnected == 1 and s.active == 0, 5)
        assert sim.simulator.stats.completed == 0 and sim.simulator.stats.last_body is not None
        assert "input" in sim.simulator.stats.last_body
    finally:
        await server.stop(drain=0)
        await sim.stop()
