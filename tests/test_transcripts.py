"""Recorded stream shapes of real servers, replayed byte for byte over HTTP and checked event by event."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wsagent import chunks
from wsagent.chunks import Finish, TextDelta, ToolCall, Usage
from wsagent.errors import UpstreamError
from wsagent.simulator import SimulatorServer

from .conftest import upstream_for

HERE = Path(__file__).parent / "transcripts"


def _words(text: str) -> list[str]:
    words = text.split(" ")
    return [words[0], *(" " + w for w in words[1:])]

EXPECTED: dict[str, list[Any]] = {
    "openai": [
        TextDelta("content", "Checking"),
        ToolCall("call_weather", "get_weather", '{"city":"Paris"}', 0),
        ToolCall("call_time", "get_time", '{"tz":"CET"}', 1),
        Finish("tool_calls"),
        Usage(82, 41, 123),
    ],
    "azure": [
        TextDelta("content", "Bursty content arrives in large"),
        TextDelta("content", " pieces, then is"),
        Finish("content_filter"),
    ],
    "vllm": [
        TextDelta("reasoning", "Two plus two"), TextDelta("reasoning", " is four."),
        TextDelta("content", "4"), TextDelta("content", "."), Finish("stop"), Usage(12, 6, 18),
    ],
    "llamacpp": [
        TextDelta("reasoning", "Let me think."), TextDelta("content", "Hello"), TextDelta("content", " there"),
        Finish("stop"), Usage(9, 4, 13),
    ],
    "ollama": [
        TextDelta("reasoning", "The user wants two lookups."),
        ToolCall("call_a1", "get_weather", '{"city":"Oslo"}', 0),
        ToolCall("call_b2", "get_weather", '{"city":"Rome"}', 0),
        Finish("tool_calls"),
        Usage(150, 40, 190),
    ],
    "litellm": [
        TextDelta("content", "Let me add."),
        ToolCall("toolu_01", "calculator", '{"expression": "2+2"}', 0),
        Finish("tool_calls"),
        Usage(300, 20, 320),
    ],
    # captured from LiteLLM 1.105.7's proxy forwarding to the simulator (tests/test_litellm.py checks it still
    # writes them so): a usage chunk whose choices are not empty, reasoning_tokens details, [DONE] at the end
    "litellm-tools": [
        *[TextDelta("reasoning", w)
          for w in _words("The request needs the calculator and get_time tool, so I will call it.")],
        ToolCall("call_bad99abeed69", "calculator", '{"expression": "2 + 2"}', 0),
        ToolCall("call_d99abeed6929", "get_time", '{"tz": "What is 2 + 2 and what time is it?"}', 1),
        Finish("tool_calls"),
        Usage(14, 15, 29),
    ],
    "deepseek": [
        TextDelta("reasoning", "Hmm, greeting."), TextDelta("content", "Hi!"), Finish("stop"), Usage(6, 9, 15),
    ],
}

ERRORS: dict[str, tuple[list[Any], str, str | int | None]] = {
    "vllm-error": ([TextDelta("content", "Partial")], "KV cache is exhausted", 500),
    "llamacpp-error": ([], "exceeds the available context size", 500),
    "litellm-error": ([TextDelta("content", "Hel")], "Overloaded", "429"),
    # captured from LiteLLM (above): an {"error": ...} event with no [DONE] after it
    "litellm-midstream-error": ([TextDelta("content", "here"), TextDelta("content", " is"), TextDelta("content", " a")],
                                "simulated mid-stream failure", "500"),
    "openrouter": ([TextDelta("content", "Sure")], "Provider disconnected", 502),
}


async def replay(sim: SimulatorServer, name: str, chunk: int) -> tuple[list[Any], UpstreamError | None]:
    raw = (HERE / f"{name}.sse").read_bytes().decode()
    client = upstream_for(sim)
    events: list[Any] = []
    try:
        async for event in client.stream([{"role": "user", "content": name}],
                                         params={"sim": {"raw": raw, "raw_chunk": chunk}}):
            events.append(event)
    except UpstreamError as exc:
        return events, exc
    finally:
        await client.close()
    return events, None


@pytest.fixture(params=["orjson", "json"])
def decoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Chunks decoded by orjson (the ``fast`` extra, when installed) and by the standard library: the same events."""
    if request.param == "json":
        monkeypatch.setattr(chunks, "loads", json.loads)
    elif chunks.loads is json.loads:
        pytest.skip("orjson is not installed")
    return str(request.param)


@pytest.mark.parametrize("chunk", [0, 1, 7, 100])
@pytest.mark.parametrize("name", sorted(EXPECTED))
async def test_transcript(sim: SimulatorServer, name: str, chunk: int, decoder: str) -> None:
    events, error = await replay(sim, name, chunk)
    assert error is None
    assert events == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(ERRORS))
async def test_error_transcript(sim: SimulatorServer, name: str) -> None:
    before, message, upstream_code = ERRORS[name]
    events, error = await replay(sim, name, 13)
    assert events == before
    assert error is not None and message in error.message
    assert error.code == "upstream_stream_error" and error.upstream_code == upstream_code
