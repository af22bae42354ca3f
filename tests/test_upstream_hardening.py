"""What broke in the upstream path when wsagent was attacked, each reproduced before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from types import FrameType
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from wsagent.core import chunks
from wsagent.core.chunks import (
    MAX_ANSWER_ARGUMENTS,
    MAX_TOOL_ARGUMENTS,
    MAX_TOOL_CALLS,
    Arguments,
    ChunkInterpreter,
    Finish,
    ModelEvent,
    TextDelta,
    ToolCall,
    completion_to_events,
)
from wsagent.core.config import Settings
from wsagent.core.errors import UpstreamError
from wsagent.core.events import ToolCallEvent, encode
from wsagent.core.responses_api import ResponsesInterpreter
from wsagent.core.sse import SSEEvent
from wsagent.core.tools import ToolBox, tool
from wsagent.core.ui_stream import UIChunks
from wsagent.upstream.model import UpstreamClient, UpstreamConfig
from wsagent.wiring.server import WsAgentServer

from .helpers import check_sequence, run_events, run_request, ws_connect

MiB = 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def one_run(server: WsAgentServer, caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    """The events of one run ("hi" on /ws/chat), read within 10 s, seqs checked, the log captured."""
    with caplog.at_level(logging.INFO, "wsagent"):
        async with ws_connect(server, "/ws/chat") as ws:
            await ws.send(run_request("a", "hi"))
            async with asyncio.timeout(10):
                events = await run_events(ws, "a")
    check_sequence(events)
    return events


@pytest.fixture
async def model_server() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    """A hostile model server on 127.0.0.1:0 (both dialects' paths); returns its base URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", handler)
        app.router.add_post("/v1/responses", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/v1"

    try:
        yield start
    finally:
        for runner in runners:
            await runner.cleanup()


@pytest.fixture
async def wsagent() -> AsyncIterator[Callable[..., Awaitable[WsAgentServer]]]:
    """The wsagent server on 127.0.0.1:0 with ``upstream_url`` and other settings as keyword arguments."""
    started: list[WsAgentServer] = []

    async def start(**overrides: Any) -> WsAgentServer:
        server = await WsAgentServer(Settings(host="127.0.0.1", port=0, max_retries=0, **overrides)).start()
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            await server.stop(drain=0)


def sse(payload: dict[str, Any], event: str | None = None) -> bytes:
    """One SSE event; ``json.dumps`` escapes a lone surrogate as ``\\udXXX``, as a relay writing UTF-16 does."""
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def delta(**fields: Any) -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": fields, "finish_reason": None}]})


def finish(reason: str = "stop") -> bytes:
    return sse({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})


async def event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    return response


def interpret(*events: SSEEvent) -> list[ModelEvent]:
    interpreter = ChunkInterpreter()
    out: list[ModelEvent] = []
    for event in events:
        out += interpreter.feed(event)
    return out + interpreter.end([])


def chunk(**fields: Any) -> SSEEvent:
    return SSEEvent(delta(**fields).decode()[len("data: "):].strip())


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


# -- 1. tool-call arguments ---------------------------------------------------------------------------------------

#: What the hostile model server below writes at most, if nobody stops it.
HOSTILE_ARGUMENTS = 16 * MiB


@pytest.mark.parametrize("style", ["indexed", "repeated name"])
async def test_endless_tool_call_arguments_end_the_run_with_one_clear_error(
        style: str, model_server: Callable[[Handler], Awaitable[str]],
        wsagent: Callable[..., Awaitable[WsAgentServer]], caplog: pytest.LogCaptureFixture) -> None:
    """8 s of argument deltas took the server from 54 MiB to 2.5 GiB: neither --run-max-tokens nor
    --run-buffer-bytes saw them. Deltas that repeat the name without an id re-parsed all the arguments
    so far each time (100k deltas: 56 s, the event loop frozen up to 13 s)."""
    sent = {"arguments": 0, "hung up": False}
    ended = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        response = await event_stream(request)
        if "plain" in json.dumps(body["messages"]):
            await response.write(delta(content="fine") + finish() + b"data: [DONE]\n\n")
            return response
        await response.write(delta(tool_calls=[{"index": 0, "id": "call_1", "type": "function",
                                                "function": {"name": "f", "arguments": '{"a": "'}}]))
        if style == "indexed":  # the usual shape: the index, then only arguments
            piece = "x" * 1000
            more = delta(tool_calls=[{"index": 0, "function": {"arguments": piece}}])
        else:  # the name again each time, no id: the interpreter asks whether the call so far is whole
            piece = "x" * 16
            more = delta(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": piece}}])
        try:
            while sent["arguments"] < HOSTILE_ARGUMENTS:
                await response.write(more * 64)
                sent["arguments"] += 64 * len(piece)
        except ConnectionError:
            sent["hung up"] = True
        finally:
            ended.set()
        return response

    url = await model_server(handler)
    server = await wsagent(upstream_url=url)
    others: dict[str, list[dict[str, Any]]] = {}
    with caplog.at_level(logging.INFO, "wsagent"):
        async with ws_connect(server, "/ws/chat") as ws:
            async with asyncio.timeout(30):
                await ws.send(run_request("a", "call it"))
                events = await run_events(ws, "a")
                await ended.wait()
                await ws.send(run_request("b", "plain"))
                after = await run_events(ws, "b", others)
    check_sequence(events)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "upstream_protocol", error
    assert "tool call arguments" in error["message"] and f"{MAX_TOOL_ARGUMENTS} characters" in error["message"]
    assert not [e for e in events if e["type"] == "tool_call"]
    assert sent["hung up"] and sent["arguments"] < HOSTILE_ARGUMENTS  # wsagent gave up, and hung up at once
    assert others == {}  # nothing more of run "a" after its one terminal event
    assert [e["type"] for e in after][-1] == "done" and "fine" in [e.get("content") for e in after]
    no_tracebacks(caplog)


def test_repeated_name_deltas_are_parsed_once(codec: str) -> None:
    """Each delta repeating ``function.name`` without an id joined and parsed every argument so far: quadratic.
    Counted here: the characters handed to the standard library's JSON parser, whatever decodes the chunks."""
    count = 20_000
    events = [chunk(tool_calls=[{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": '{"a": "'}}])]
    events += [chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "xy"}}])] * count
    events += [chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": '"}'}}]),
               SSEEvent("[DONE]")]
    parsed = [0]
    target = json.loads.__code__

    def profile(frame: FrameType, kind: str, arg: Any) -> None:
        if kind == "call" and frame.f_code is target:
            parsed[0] += len(frame.f_locals["s"])

    sys.setprofile(profile)
    try:
        out = interpret(*events)
    finally:
        sys.setprofile(None)
    assert out == [ToolCall("call_1", "f", '{"a": "' + "xy" * count + '"}')]
    streamed = sum(len(e.data) for e in events)
    assert parsed[0] <= 2 * streamed  # linear: the chunks themselves (with json), and the call once at most


def test_a_hundred_thousand_repeated_name_deltas_are_one_call() -> None:
    count = 100_000
    interpreter = ChunkInterpreter()
    assert interpreter.feed(chunk(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f",
                                                                                  "arguments": "["}}])) == []
    repeat = chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "1,"}}])
    for _ in range(count):
        assert interpreter.feed(repeat) == []
    assert interpreter.feed(chunk(tool_calls=[{"index": 0, "function": {"name": "f", "arguments": "1]"}}])) == []
    assert interpreter.feed(SSEEvent("[DONE]")) == [ToolCall("c", "f", "[" + "1," * count + "1]")]


def test_more_calls_than_any_model_makes_is_a_clear_error() -> None:
    interpreter = ChunkInterpreter()
    for n in range(MAX_TOOL_CALLS):
        interpreter.feed(chunk(tool_calls=[{"index": n, "id": f"c{n}", "function": {"name": "f", "arguments": "{}"}}]))
    with pytest.raises(UpstreamError) as caught:
        interpreter.feed(chunk(tool_calls=[{"index": MAX_TOOL_CALLS, "id": "one more", "function": {"name": "f"}}]))
    assert caught.value.code == "upstream_protocol" and f"over {MAX_TOOL_CALLS} tool calls" in caught.value.message


def test_one_answer_s_arguments_are_bounded_together() -> None:
    """Each call may hold MAX_TOOL_ARGUMENTS, and the answer's calls MAX_ANSWER_ARGUMENTS together."""
    calls = MAX_ANSWER_ARGUMENTS // MAX_TOOL_ARGUMENTS
    body: dict[str, Any] = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {"tool_calls": [
        {"id": f"c{n}", "function": {"name": "f", "arguments": "x" * MAX_TOOL_ARGUMENTS}} for n in range(calls)]}}]}
    assert [len(e.arguments) for e in completion_to_events(body) if isinstance(e, ToolCall)] == [
        MAX_TOOL_ARGUMENTS] * calls
    body["choices"][0]["message"]["tool_calls"].append({"id": "more", "function": {"name": "f", "arguments": "x"}})
    with pytest.raises(UpstreamError) as caught:
        completion_to_events(body)
    assert caught.value.code == "upstream_protocol" and f"over {MAX_ANSWER_ARGUMENTS} characters in one answer" in (
        caught.value.message)
    with pytest.raises(UpstreamError) as caught:
        interpret(chunk(tool_calls=[{"index": 0, "id": "c", "function": {"name": "f",
                                                                          "arguments": "x" * MAX_TOOL_ARGUMENTS}}]),
                  chunk(tool_calls=[{"index": 0, "function": {"arguments": "x"}}]))
    assert caught.value.code == "upstream_protocol" and f"over {MAX_TOOL_ARGUMENTS} characters" in caught.value.message


def test_the_responses_api_s_tool_calls_have_the_same_bounds() -> None:
    def feed(interpreter: ResponsesInterpreter, **event: Any) -> list[ModelEvent]:
        return interpreter.feed(SSEEvent(json.dumps(event), event=event["type"]))

    streaming = ResponsesInterpreter()
    feed(streaming, type="response.output_item.added", item={"type": "function_call", "id": "i", "call_id": "c",
                                                             "name": "f"})
    piece = "x" * 65536
    with pytest.raises(UpstreamError) as caught:
        for _ in range(MAX_TOOL_ARGUMENTS // len(piece) + 1):
            feed(streaming, type="response.function_call_arguments.delta", item_id="i", delta=piece)
    assert caught.value.code == "upstream_protocol" and f"over {MAX_TOOL_ARGUMENTS} characters" in caught.value.message
    whole = ResponsesInterpreter()
    with pytest.raises(UpstreamError) as caught:
        feed(whole, type="response.output_item.done", item={"type": "function_call", "id": "i", "call_id": "c",
                                                            "name": "f", "arguments": "x" * (MAX_TOOL_ARGUMENTS + 1)})
    assert caught.value.code == "upstream_protocol"
    many = ResponsesInterpreter()
    with pytest.raises(UpstreamError) as caught:
        for n in range(MAX_TOOL_CALLS + 1):
            feed(many, type="response.output_item.added", item={"type": "function_call", "id": f"i{n}", "name": "f"})
    assert caught.value.code == "upstream_protocol" and f"over {MAX_TOOL_CALLS} tool calls" in caught.value.message


#: Arguments as they may be cut: JSON's structure, strings, escapes, bare values, whitespace and garbage.
JSONISH = st.lists(st.sampled_from(['{', '}', '[', ']', '"', '\\', ':', ',', ' ', '\n', '1', 'a', 'true', 'nul',
                                    'l', '"k"', '{"a": 1}', '[1, 2]', '\\"', '-']), max_size=14)


@settings(max_examples=500, deadline=None)
@given(JSONISH, st.lists(st.booleans(), max_size=14))
def test_whole_arguments_are_told_as_the_json_parser_tells_them(pieces: list[str], asks: list[bool]) -> None:
    """The linear scan says what ``json.loads(text or "null")`` said, asked at any point as the deltas come."""
    arguments = Arguments()
    for n, piece in enumerate(pieces):
        arguments.append(piece)
        if n < len(asks) and asks[n]:
            assert arguments.whole() == parses(arguments.text or "null"), arguments.text
    assert arguments.whole() == parses(arguments.text or "null"), arguments.text
    assert arguments.text == "".join(pieces) and arguments.size == len(arguments.text)


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


# -- 2. text that is not valid Unicode ----------------------------------------------------------------------------

def completed(**response: Any) -> bytes:
    return sse({"type": "response.completed", "response": {
        "status": "completed", "usage": {"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}, **response}},
        "response.completed")


async def test_a_lone_surrogate_from_the_responses_api_becomes_a_replacement_character(
        model_server: Callable[[Handler], Awaitable[str]], wsagent: Callable[..., Awaitable[WsAgentServer]],
        caplog: pytest.LogCaptureFixture) -> None:
    """``"a\\ud800b"`` in the same read as ``response.completed``: the client got ``start``, then nothing for 90 s."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await event_stream(request)
        await response.write(
            sse({"type": "response.created", "response": {"status": "in_progress"}}, "response.created")
            + sse({"type": "response.output_text.delta", "item_id": "m", "output_index": 0, "content_index": 0,
                   "delta": "a\ud800b"}, "response.output_text.delta")
            + completed())
        return response

    server = await wsagent(upstream_url=await model_server(handler), upstream_api="responses")
    events = await one_run(server, caplog)
    assert [e["type"] for e in events] == ["start", "token", "usage", "done"]
    assert events[1]["content"] == "a\ufffdb"
    no_tracebacks(caplog)


async def test_an_emoji_split_into_surrogate_halves_across_chunks_arrives_whole(
        codec: str, model_server: Callable[[Handler], Awaitable[str]],
        wsagent: Callable[..., Awaitable[WsAgentServer]], caplog: pytest.LogCaptureFixture) -> None:
    """A relay writing UTF-16 split 😀 into ``"\\ud83d"`` and ``"\\ude00"``, one per chunk: the answer died with
    ``internal_error`` (the standard library's decoder) or ``upstream_protocol`` (orjson)."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = await event_stream(request)
        for text in ("\ud83d", "\ude00", " lone:", "\udc00", " end\ud83d"):
            await response.write(delta(content=text))
        await response.write(finish() + b"data: [DONE]\n\n")
        return response

    server = await wsagent(upstream_url=await model_server(handler))
    events = await one_run(server, caplog)
    assert events[-1]["type"] == "done"
    assert "".join(e["content"] for e in events if e["type"] == "token") == "\U0001f600 lone:\ufffd end\ufffd"
    no_tracebacks(caplog)


def test_surrogate_halves_join_across_chunks_and_lone_ones_are_replaced(codec: str) -> None:
    out = interpret(chunk(content="\ud83d"), chunk(content="\ude00!"), chunk(reasoning_content="\ud83d"),
                    chunk(content="\udc00"), chunk(reasoning_content="\ude00"), chunk(content="x\ud800"),
                    chunk(content="y"), chunk(refusal="\ud83d"), SSEEvent("[DONE]"))
    assert out == [TextDelta("content", "\U0001f600!"), TextDelta("content", "\ufffd"),
                   TextDelta("reasoning", "\U0001f600"), TextDelta("content", "x"), TextDelta("content", "\ufffdy"),
                   TextDelta("refusal", "\ufffd")]


def test_a_half_held_back_is_replaced_before_the_finish(codec: str) -> None:
    events = [chunk(content="ok\ud83d"), SSEEvent(finish().decode()[len("data: "):].strip())]
    interpreter = ChunkInterpreter()
    out = [e for event in events for e in interpreter.feed(event)]
    assert out == [TextDelta("content", "ok"), TextDelta("content", "\ufffd"), Finish("stop")]
    assert interpreter.end([]) == []


def test_tool_calls_finish_reasons_and_errors_are_valid_text(codec: str) -> None:
    out = interpret(chunk(tool_calls=[{"index": 0, "id": "c\ud800", "function": {"name": "f\udc00",
                                                                                  "arguments": '{"e": "\ud83d'}}]),
                    chunk(tool_calls=[{"index": 0, "function": {"arguments": '\ude00", "l": "\ud800"}'}}]),
                    SSEEvent(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "odd\ud800"}]})))
    assert out == [ToolCall("c\ufffd", "f\ufffd", '{"e": "\U0001f600", "l": "\ufffd"}'), Finish("odd\ufffd")]
    with pytest.raises(UpstreamError) as caught:
        interpret(SSEEvent(json.dumps({"error": {"message": "bad \ud800", "code": "c\udc00"}})))
    assert caught.value.message == "bad \ufffd" and caught.value.upstream_code == "c\ufffd"


def test_the_responses_interpreter_mends_text_the_same_way() -> None:
    def responses(*events: dict[str, Any]) -> list[ModelEvent]:
        interpreter = ResponsesInterpreter()
        return [e for event in events for e in interpreter.feed(SSEEvent(json.dumps(event), event=event["type"]))]

    text = "response.output_text.delta"
    out = responses({"type": text, "delta": "a\ud800b"}, {"type": text, "delta": "\ud83d"},
                    {"type": text, "delta": "\ude00"}, {"type": "response.reasoning_text.delta", "delta": "\ud83d"},
                    {"type": "response.output_item.added", "item": {"type": "function_call", "id": "i",
                                                                     "call_id": "c", "name": "f"}},
                    {"type": "response.function_call_arguments.delta", "item_id": "i", "delta": '{"e": "\ud83d'},
                    {"type": "response.function_call_arguments.delta", "item_id": "i", "delta": '\ude00"}'},
                    {"type": "response.output_item.done", "item": {"type": "function_call", "id": "i"}},
                    {"type": "response.completed", "response": {"status": "completed"}})
    assert out == [TextDelta("content", "a\ufffdb"), TextDelta("content", "\U0001f600"),
                   ToolCall("c", "f", '{"e": "\U0001f600"}', 0), TextDelta("reasoning", "\ufffd"),
                   Finish("tool_calls")]
    parts = responses({"type": "response.reasoning_summary_text.delta", "delta": "one\ud83d"},
                      {"type": "response.reasoning_summary_part.added", "summary_index": 1},
                      {"type": "response.reasoning_summary_text.delta", "delta": "\ude00two"})
    assert "".join(e.text for e in parts if isinstance(e, TextDelta)) == "one\ufffd\n\n\ufffdtwo"  # in order


async def test_a_lone_surrogate_in_an_error_answer_is_replaced_too(
        model_server: Callable[[Handler], Awaitable[str]], wsagent: Callable[..., Awaitable[WsAgentServer]],
        caplog: pytest.LogCaptureFixture) -> None:
    """An HTTP error's JSON body is upstream text as well: its message reaches the client."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": {"message": "bad \ud800 request", "code": "c\udc00"}}, status=400)

    url = await model_server(handler)
    server = await wsagent(upstream_url=url)
    events = await one_run(server, caplog)
    assert events[-1]["code"] == "upstream_bad_request" and "bad \ufffd request" in events[-1]["message"]
    client = UpstreamClient(UpstreamConfig(base_url=url, max_retries=0))
    try:
        with pytest.raises(UpstreamError) as caught:
            async for _ in client.stream([{"role": "user", "content": "hi"}]):
                pass
    finally:
        await client.close()
    assert caught.value.upstream_code == "c\ufffd"
    no_tracebacks(caplog)


#: Pieces of text as a relay writing UTF-16 may cut them: whole characters and surrogate halves.
PIECES = st.lists(st.sampled_from(["a", "é", "\U0001f600", "\ud83d", "\ude00", "\ud800", "\udfff", " "]),
                  max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.lists(PIECES, min_size=1, max_size=6), st.sampled_from(["orjson", "json"]))
def test_any_cut_gives_the_text_utf16_means(deltas: list[list[str]], codec: str) -> None:
    """Whatever the cuts: the text of a UTF-16 decoder (pairs joined, lone halves as U+FFFD), every delta
    valid UTF-8, with either decoder."""
    saved = chunks.loads
    if codec == "json":
        chunks.loads = json.loads
    try:
        out = interpret(*[chunk(content="".join(d)) for d in deltas if d], SSEEvent("[DONE]"))
    finally:
        chunks.loads = saved
    whole = "".join("".join(d) for d in deltas)
    assert "".join(e.text for e in out if isinstance(e, TextDelta)) == whole.encode(
        "utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    for event in out:
        assert isinstance(event, TextDelta) and event.text and event.text.encode("utf-8")


# -- 3. JSON nested too deep --------------------------------------------------------------------------------------

@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_a_whole_answer_nested_200000_deep_is_a_clear_error(
        api: str, model_server: Callable[[Handler], Awaitable[str]],
        wsagent: Callable[..., Awaitable[WsAgentServer]], caplog: pytest.LogCaptureFixture) -> None:
    """A non-streamed 200 answer of JSON nested 200,000 deep: ``internal_error`` and a RecursionError traceback."""
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"[" * 200_000 + b"]" * 200_000, content_type="application/json")

    server = await wsagent(upstream_url=await model_server(handler), upstream_api=api)
    events = await one_run(server, caplog)
    assert events[-1]["type"] == "error" and events[-1]["code"] == "upstream_protocol", events[-1]
    assert "nested" in events[-1]["message"]
    no_tracebacks(caplog)


def test_an_error_event_nested_deep_is_still_the_upstream_s_error() -> None:
    """``event: error`` with data nested 200,000 deep raised RecursionError: ``internal_error``, a traceback."""
    with pytest.raises(UpstreamError) as caught:
        ChunkInterpreter().feed(SSEEvent("[" * 200_000 + "]" * 200_000, event="error"))
    assert caught.value.code == "upstream_stream_error"


def test_arguments_as_an_object_nested_deep_are_a_clear_error(codec: str) -> None:
    """orjson reads 1,024 levels, and the standard library then failed to write them again: ``internal_error``."""
    nested = "[" * 1000 + "]" * 1000
    data = '{"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ' \
        + nested + "}}]}}]}"
    with pytest.raises(UpstreamError) as caught:
        ChunkInterpreter().feed(SSEEvent(data))
    assert caught.value.code == "upstream_protocol"


async def test_escaped_lone_surrogates_in_tool_arguments_and_results_never_reach_a_frame() -> None:
    """Arguments are ASCII text, but ``"\\\\ud800"`` in them is a lone surrogate once parsed: a tool saw it,
    an observation carried it, and the AI SDK's tool input held it, where no frame could be written."""
    @tool
    async def echo(text: str) -> str:
        """Says it back, with a half of its own."""
        return text + "\udc00"

    observation, is_error = await ToolBox([echo]).call("echo", '{"text": "a\\ud800b"}')
    assert not is_error and observation == "a\ufffdb\ufffd"
    frames: list[str] = []
    renderer = UIChunks("q", "m")
    payload = encode(ToolCallEvent("c1", "echo", '{"text": "a\\ud800"}'), "r", 1)
    renderer.render(ToolCallEvent.kind, payload, frames, (None, None))
    assert frames and all(frame.encode() for frame in frames)
    assert any('"a\ufffd"' in frame for frame in frames)


@pytest.mark.usefixtures("codec")
def test_an_error_message_nested_a_thousand_deep_is_the_default_message() -> None:
    """With orjson, a chunk ``{"error": {"message": [[...1000 deep...]]}}`` decoded, and ``str()`` of the message
    raised ``RecursionError``: ``internal_error`` and a traceback."""
    deep = '{"error": {"message": ' + "[" * 1015 + "]" * 1015 + "}}"
    events: list[ModelEvent] = []
    with pytest.raises(UpstreamError) as info:
        interpreter = ChunkInterpreter()
        for event in [SSEEvent(data=deep)]:
            events += interpreter.feed(event)
    assert info.value.code in ("upstream_stream_error", "upstream_protocol")
    assert len(info.value.message) <= 600
