"""The official openai SDK against the simulator: it validates every chunk and reply strictly, so the
simulator must be a faithful stand-in (tool_choice, response_format, reasoning), or the agents and
frameworks pointed at it fail in ways a real model would not make them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from openai import APIError, AsyncOpenAI, RateLimitError
from pydantic import BaseModel

from wsagent.simulator import SimulatorServer

TOOLS = [{"type": "function", "function": {
    "name": "calculator", "description": "Evaluate arithmetic.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}}]


@pytest.fixture
async def client(sim: SimulatorServer) -> AsyncIterator[AsyncOpenAI]:
    sdk = AsyncOpenAI(base_url=sim.base_url, api_key="unused", _strict_response_validation=True, max_retries=0)
    try:
        yield sdk
    finally:
        await sdk.close()


async def test_tool_choice_is_honoured(client: AsyncOpenAI) -> None:
    """``none`` still called a tool; ``required`` and a named function called nothing."""
    ask = [{"role": "user", "content": "What is 17 * 23?"}]
    auto = await client.chat.completions.create(model="sim", messages=ask, tools=TOOLS)
    assert auto.choices[0].message.tool_calls
    none = await client.chat.completions.create(model="sim", messages=ask, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    chat = [{"role": "user", "content": "Tell me a story"}]
    required = await client.chat.completions.create(model="sim", messages=chat, tools=TOOLS, tool_choice="required")
    assert required.choices[0].message.tool_calls and required.choices[0].finish_reason == "tool_calls"
    named = await client.chat.completions.create(
        model="sim", messages=chat, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}})
    (call,) = named.choices[0].message.tool_calls or []
    assert call.function.name == "calculator" and "expression" in json.loads(call.function.arguments)


async def test_structured_output_parses(client: AsyncOpenAI) -> None:
    """``response_format`` got prose, so ``parse()`` (and LangChain's and the Agents SDK's structured output) failed."""

    class Verdict(BaseModel):
        answer: str
        confidence: float
        tags: list[str]

    parsed = await client.chat.completions.parse(model="sim", messages=[{"role": "user", "content": "Judge this"}],
                                                 response_format=Verdict)
    verdict = parsed.choices[0].message.parsed
    assert isinstance(verdict, Verdict) and verdict.answer and verdict.tags
    plain = await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}],
                                                 response_format={"type": "json_object"})
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)


async def test_streamed_json_schema_and_reasoning_without_streaming(client: AsyncOpenAI) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    stream = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "count"}], stream=True,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}})
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    assert json.loads(text) == {"n": 42, "ok": True}
    whole = await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "think"}])
    assert whole.choices[0].message.model_extra is not None
    assert whole.choices[0].message.model_extra.get("reasoning_content")  # reasoning is no longer dropped


async def test_streams_helpers_usage_and_errors(client: AsyncOpenAI) -> None:
    async with client.chat.completions.stream(model="sim", messages=[{"role": "user", "content": "stream me"}],
                                              stream_options={"include_usage": True}) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.content and final.usage is not None and final.usage.completion_tokens > 0
    streamed_call = await client.chat.completions.create(
        model="sim", messages=[{"role": "user", "content": "What is 2 + 2?"}], tools=TOOLS, stream=True)
    arguments = "".join([c.choices[0].delta.tool_calls[0].function.arguments or "" async for c in streamed_call
                         if c.choices and c.choices[0].delta.tool_calls and c.choices[0].delta.tool_calls[0].function])
    assert json.loads(arguments) == {"expression": "2 + 2"}
    with pytest.raises(RateLimitError):
        await client.chat.completions.create(model="sim", messages=[{"role": "user", "content": "x sim:status=429"}])
    with pytest.raises(APIError):
        broken = await client.chat.completions.create(
            model="sim", messages=[{"role": "user", "content": "x sim:error_after=3"}], stream=True)
        async for _ in broken:
            pass
