"""The chunk interpreter on the edge cases real servers produce."""

from __future__ import annotations

import json
from typing import Any

import pytest

from wsagent.core.chunks import ChunkInterpreter, Finish, TextDelta, ToolCall, Usage, completion_to_events
from wsagent.core.errors import UpstreamError
from wsagent.core.sse import SSEEvent


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> SSEEvent:
    body: dict[str, Any] = {"object": "chat.completion.chunk",
                            "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}]}
    body.update(extra)
    return SSEEvent(json.dumps(body))


def feed_all(*events: SSEEvent) -> list[Any]:
    interpreter = ChunkInterpreter()
    out: list[Any] = []
    for event in events:
        out.extend(interpreter.feed(event))
    return out


def test_content_reasoning_refusal() -> None:
    out = feed_all(chunk({"reasoning_content": "hmm"}), chunk({"reasoning": "so"}), chunk({"content": "hi"}),
                   chunk({"refusal": "no"}))
    assert out == [TextDelta("reasoning", "hmm"), TextDelta("reasoning", "so"), TextDelta("content", "hi"),
                   TextDelta("refusal", "no")]


def test_tool_call_with_missing_index_appends_to_last_call() -> None:
    out = feed_all(
        chunk({"tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": "{\"a\""}}]}),
        chunk({"tool_calls": [{"function": {"arguments": ": 1}"}}]}),
        chunk(finish="tool_calls"),
    )
    assert out == [ToolCall("c1", "f", '{"a": 1}', 0, 0), Finish("tool_calls")]


def test_whole_calls_at_index_zero_without_ids_are_separate() -> None:
    out = feed_all(
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"x\": 1}"}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "{\"x\": 2}"}}]}),
        SSEEvent("[DONE]"),
    )
    assert [(c.name, c.arguments) for c in out] == [("f", '{"x": 1}'), ("f", '{"x": 2}')]


def test_arguments_as_object_are_encoded() -> None:
    out = feed_all(chunk({"tool_calls": [{"index": 0, "id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]},
                         "tool_calls"))
    assert out[0] == ToolCall("c", "f", '{"a": 1}')


def test_empty_choices_and_unknown_keys_skipped() -> None:
    out = feed_all(SSEEvent(json.dumps({"choices": [], "prompt_filter_results": []})),
                   chunk({"content": "x", "weird": 1}, something="else"))
    assert out == [TextDelta("content", "x")]


def test_usage_with_non_empty_choices_and_once_only() -> None:
    out = feed_all(chunk({}, "stop", usage={"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}),
                   chunk({}, usage={"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18}))
    assert out == [Finish("stop"), Usage(2, 3, 5)]


@pytest.mark.parametrize("error", [
    {"error": {"message": "boom", "code": 500}},
    {"error": {"message": "boom", "code": "server_error"}},
    {"error": "boom"},
])
def test_error_objects(error: dict[str, Any]) -> None:
    with pytest.raises(UpstreamError, match="boom") as info:
        feed_all(SSEEvent(json.dumps(error)))
    assert info.value.code == "upstream_stream_error"


def test_event_error_and_finish_reason_error() -> None:
    with pytest.raises(UpstreamError, match="overloaded"):
        feed_all(SSEEvent('{"message": "overloaded"}', event="error"))
    with pytest.raises(UpstreamError, match="Provider disconnected"):
        feed_all(chunk({}, "error", error={"code": 502, "message": "Provider disconnected"}))


def test_not_json_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamError) as info:
        feed_all(SSEEvent("{not json"))
    assert info.value.code == "upstream_protocol"


def test_end_rules() -> None:
    finished = ChunkInterpreter()
    finished.feed(chunk({"content": "a"}, "stop"))
    assert finished.end() == []
    truncated = ChunkInterpreter()
    truncated.feed(chunk({"content": "a"}))
    with pytest.raises(UpstreamError) as info:
        truncated.end()
    assert info.value.code == "upstream_truncated"
    tail = ChunkInterpreter()
    tail.feed(chunk({"content": "a"}))
    assert tail.end([SSEEvent("[DONE]", complete=False)]) == []
    cut = ChunkInterpreter()
    with pytest.raises(UpstreamError, match="middle of an event"):
        cut.end([SSEEvent('{"choices": [{"delta": {"content": "x', complete=False)])


def test_non_streamed_completion() -> None:
    body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": "ok",
        "tool_calls": [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
                       {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}
    assert completion_to_events(body) == [
        TextDelta("content", "ok"), ToolCall("a", "f", "{}", 0), ToolCall("b", "g", "{}", 1), Finish("tool_calls"),
        Usage(1, 2, 3)]
