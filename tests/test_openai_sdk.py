"""The official openai SDK against the simulator: it validates every chunk and reply strictly, so the
simulator must be a faithful stand-in (tool_choice, response_format, reasoning), or the agents and
frameworks pointed at it fail in ways a real model would not make them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from openai import APIError, AsyncOpenAI, RateLimitError
from openai.types.chat import (
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
)
from openai.types.responses import FunctionToolParam
from pydantic import BaseModel

from wsagent.upstream.simulator import SimulatorServer

TOOLS: list[ChatCompletionFunctionToolParam] = [{"type": "function", "function": {
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
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is 17 * 23?"}]
    auto = await client.chat.completions.create(model="sim", messages=ask, tools=TOOLS)
    assert auto.choices[0].message.tool_calls
    none = await client.chat.completions.create(model="sim", messages=ask, tools=TOOLS, tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content
    chat: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a story"}]
    required = await client.chat.completions.create(model="sim", messages=chat, tools=TOOLS, tool_choice="required")
    assert required.choices[0].message.tool_calls and required.choices[0].finish_reason == "tool_calls"
    named = await client.chat.completions.create(
        model="sim", messages=chat, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "calculator"}})
    (call,) = named.choices[0].message.tool_calls or []
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
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


RESPONSES_TOOLS: list[FunctionToolParam] = [
    {"type": "function", "name": "calculator", "description": "Evaluate arithmetic.", "strict": True,
     "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                    "required": ["expression"], "additionalProperties": False}}]


async def test_responses_api_streamed_with_reasoning_and_function_call(client: AsyncOpenAI) -> None:
    """The simulator's ``/v1/responses`` in OpenAI's exact wire format: the SDK's typed events validate strictly."""
    stream = await client.responses.create(model="sim", input="stream me a story", stream=True)
    kinds: list[str] = []
    text, reasoning = [], []
    sequence = []
    async for event in stream:
        kinds.append(event.type)
        sequence.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            text.append(event.delta)
        elif event.type == "response.reasoning_summary_text.delta":
            reasoning.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert sequence == list(range(len(sequence)))
    assert completed.output_text == "".join(text) and "story" in completed.output_text
    assert completed.usage is not None and completed.usage.output_tokens == len(text) + len(reasoning)
    assert [item.type for item in completed.output] == ["reasoning", "message"]

    async with client.responses.stream(model="sim", input="What is 17 * 23?", tools=RESPONSES_TOOLS) as helper:
        arguments = [event.delta async for event in helper if event.type == "response.function_call_arguments.delta"]
        final = await helper.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert call.name == "calculator" and json.loads("".join(arguments)) == json.loads(call.arguments)
    assert json.loads(call.arguments) == {"expression": "17 * 23"}

    follow_up = await client.responses.create(model="sim", input=[
        {"role": "user", "content": "What is 17 * 23?"},
        {"type": "function_call", "call_id": call.call_id, "name": "calculator", "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id, "output": "391"}], tools=RESPONSES_TOOLS)
    assert "391" in follow_up.output_text and follow_up.status == "completed"


async def test_responses_api_whole_structured_incomplete_and_failed(client: AsyncOpenAI) -> None:
    class Verdict(BaseModel):
        answer: str
        confidence: float

    parsed = await client.responses.parse(model="sim", input="Judge this", text_format=Verdict)
    assert isinstance(parsed.output_parsed, Verdict) and parsed.output_parsed.answer
    whole = await client.responses.create(model="sim", input="think first")
    assert [item.type for item in whole.output] == ["reasoning", "message"]
    short = await client.responses.create(model="sim", input="a long one", max_output_tokens=3)
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    with pytest.raises(RateLimitError):
        await client.responses.create(model="sim", input="x sim:status=429")
    failed = await client.responses.create(model="sim", input="x sim:error_after=3", stream=True)
    last = [event async for event in failed][-1]
    assert last.type == "response.failed" and last.response.error is not None
    assert last.response.error.code == "server_error"
