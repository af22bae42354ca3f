"""Adapters from agent frameworks to wsagent's agent factories (:mod:`wsagent.upstream.agents.producers`).

Each adapter takes a function that builds the framework's own object for a
request (pointed at ``request.base_url``, ``request.api_key`` and
``request.model``) and returns an :data:`~wsagent.upstream.agents.producers.AgentFactory` to
register with ``--agents``. The frameworks are optional extras
(from a clone: ``pip install ".[swarms]"``, ``".[langgraph]"``,
``".[openai-agents]"``; see docs/agents.md) and are imported only when an adapter runs.

What maps to what, and how far a cancel reaches:

* **OpenAI Agents SDK** (:func:`openai_agents`): ``Runner.run_streamed``;
  reasoning summary deltas → ``thinking``, output text deltas → ``answer``,
  tool call items → ``action``, tool output items → ``observation``, the run's
  usage → ``usage``. A cancel calls ``RunResultStreaming.cancel()`` and closes
  the stream: the model request in flight is closed and no further turn starts.
* **LangGraph** (:func:`langgraph`): ``astream_events(version="v2")`` of a
  compiled graph over a ``messages`` state; chat model text → ``answer``,
  reasoning content blocks → ``thinking``, each tool call of a model turn →
  ``action``, each tool's end → ``observation``, models' ``usage_metadata`` →
  ``usage``. A cancel closes the event stream, which cancels the graph's task:
  the model request in flight is closed, and a tool running in a thread
  finishes but its result goes nowhere.
* **swarms** (:func:`swarms_agent`, :func:`swarms_workflow`): swarms calls its
  ``streaming_callback`` synchronously from its own thread, so the adapter runs
  it through a bounded :class:`~wsagent.upstream.agents.producers.ThreadBridge`: ``[thinking]``
  sections → ``thinking``, content → ``answer``; tools wrapped with the
  builder's ``run.observed`` report ``action`` and ``observation``; with
  ``detailed=True`` (swarms' ``stream``: a dict per token) the token kinds
  come from swarms itself and the usage of each model call is summed into
  ``usage``. A workflow's agents stream side by side, each
  event attributed to its agent, each agent's end an ``agent_end``. A cancel
  raises :class:`~wsagent.upstream.agents.producers.Stopped` (a ``BaseException``, so swarms'
  own ``except Exception`` handlers do not retry) from the next callback in
  swarms' thread, and closes the run's own HTTP client (``run.llm_args``): the
  model stream in flight is closed, and no further model call is made.
"""

from __future__ import annotations

import functools
import importlib
import json
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from ...core.events import Action, AgentEnd, Answer, Event, Observation, Thinking, UsageEvent
from .producers import AgentFactory, AgentRequest, ThreadBridge

__all__ = ["openai_agents", "langgraph", "swarms_agent", "swarms_workflow", "SwarmsRun", "Observe"]

#: Wraps a tool function so that its calls are reported as ``action`` and ``observation``.
Observe = Callable[[Callable[..., Any]], Callable[..., Any]]


def _chat(request: AgentRequest) -> list[dict[str, str]]:
    """The request's messages as plain role/text pairs (what every framework takes as input)."""
    out = []
    for message in request.messages:
        role, content = message.get("role"), message.get("content")
        if role in ("system", "user", "assistant") and isinstance(content, str) and content:
            out.append({"role": str(role), "content": content})
    return out


def openai_agents(make: Callable[[AgentRequest], Any]) -> AgentFactory:
    """An OpenAI Agents SDK agent: ``make(request)`` returns an ``agents.Agent``."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event]:
        runner = importlib.import_module("agents").Runner
        result = runner.run_streamed(make(request), input=_chat(request))
        tools: dict[str, str] = {}
        try:
            async with aclosing(result.stream_events()) as events:
                async for event in events:
                    if event.type == "raw_response_event":
                        kind, delta = event.data.type, getattr(event.data, "delta", "")
                        if kind == "response.output_text.delta" and delta:
                            yield Answer(delta)
                        elif kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta") \
                                and delta:
                            yield Thinking(delta)
                    elif event.type == "run_item_stream_event" and event.item.type == "tool_call_item":
                        raw = event.item.raw_item
                        name, arguments = getattr(raw, "name", "tool"), getattr(raw, "arguments", "") or ""
                        call_id = getattr(raw, "call_id", "") or ""
                        tools[call_id] = name
                        yield Action(f"{name}({arguments})", call_id=call_id, name=name, arguments=arguments)
                    elif event.type == "run_item_stream_event" and event.item.type == "tool_call_output_item":
                        raw = event.item.raw_item
                        call_id = str(raw.get("call_id", "") if isinstance(raw, dict) else getattr(raw, "call_id", ""))
                        yield Observation(str(event.item.output), call_id=call_id, name=tools.get(call_id, ""))
            usage = result.context_wrapper.usage
            if usage.total_tokens:
                yield UsageEvent(usage.input_tokens, usage.output_tokens, usage.total_tokens)
        finally:
            if not result.is_complete:
                result.cancel()

    return factory


def langgraph(make: Callable[[AgentRequest], Any]) -> AgentFactory:
    """A LangGraph graph: ``make(request)`` returns a compiled graph whose state has ``messages``."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event]:
        graph = make(request)
        state = {"messages": [(m["role"], m["content"]) for m in _chat(request)]}
        used = [0, 0, 0]
        async with aclosing(graph.astream_events(state, version="v2")) as events:
            async for event in events:
                kind, data = event["event"], event["data"]
                if kind == "on_chat_model_stream":
                    chunk = data["chunk"]
                    for block in getattr(chunk, "content_blocks", None) or ():
                        if isinstance(block, dict) and block.get("type") == "reasoning" and block.get("reasoning"):
                            yield Thinking(str(block["reasoning"]))
                    reasoning = (getattr(chunk, "additional_kwargs", None) or {}).get("reasoning_content")
                    if isinstance(reasoning, str) and reasoning:
                        yield Thinking(reasoning)
                    text = chunk.text if isinstance(getattr(chunk, "text", None), str) else ""
                    if text:
                        yield Answer(text)
                elif kind == "on_chat_model_end":
                    output = data.get("output")
                    for call in getattr(output, "tool_calls", None) or ():
                        arguments = json.dumps(call.get("args", {}))
                        yield Action(f"{call.get('name')}({arguments})", call_id=str(call.get("id") or ""),
                                     name=str(call.get("name") or ""), arguments=arguments)
                    usage = getattr(output, "usage_metadata", None) or {}
                    for n, key in enumerate(("input_tokens", "output_tokens", "total_tokens")):
                        used[n] += int(usage.get(key) or 0)
                elif kind == "on_tool_end":
                    message = data.get("output")
                    content = getattr(message, "content", message)
                    yield Observation(content if isinstance(content, str) else json.dumps(content, default=str),
                                      call_id=str(getattr(message, "tool_call_id", "") or ""),
                                      name=str(getattr(message, "name", "") or event.get("name", "")),
                                      is_error=getattr(message, "status", "") == "error")
        if used[2]:
            yield UsageEvent(used[0], used[1], used[2])

    return factory


class _Sections:
    """swarms' streamed text (reasoning under a ``[thinking]`` header, tool calls under ``[tool call]``,
    then content) as events."""

    __slots__ = ("mode", "agent", "workflow")

    def __init__(self, agent: str | None = None, workflow: str | None = None) -> None:
        self.mode = "answer"
        self.agent = agent
        self.workflow = workflow

    def event(self, text: str, kind: str | None = None) -> Event | None:
        header = text.lstrip("\n")
        if header == "[thinking] ":
            self.mode = "thinking"
            return None
        if header.startswith("[tool call] "):
            self.mode = "tool"
            return None
        if text == "\n" and (self.mode != "answer" or kind == "content"):
            self.mode = "answer"
            return None
        mode = {"reasoning": "thinking", "tool_call": "tool", "content": "answer"}.get(kind or "", self.mode)
        if mode == "thinking":
            return Thinking(text, agent=self.agent, workflow=self.workflow)
        if mode == "answer" and text:
            return Answer(text, agent=self.agent, workflow=self.workflow)
        return None


def _observer(bridge: ThreadBridge, agent: str | None = None, workflow: str | None = None) -> Observe:
    """Wrap a tool so that its calls report ``action`` and ``observation`` through ``bridge``."""
    count = [0]

    def observed(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            count[0] += 1
            call_id = f"call_{function.__name__}_{count[0]}"
            arguments = json.dumps(kwargs, default=str)
            bridge.emit(Action(f"{function.__name__}({arguments})", call_id=call_id, name=function.__name__,
                               arguments=arguments, agent=agent, workflow=workflow))
            try:
                result = function(*args, **kwargs)
            except Exception as exc:
                bridge.emit(Observation(f"{type(exc).__name__}: {exc}", call_id=call_id, name=function.__name__,
                                        is_error=True, agent=agent, workflow=workflow))
                raise
            bridge.emit(Observation(str(result), call_id=call_id, name=function.__name__, agent=agent,
                                    workflow=workflow))
            return result

        return wrapper

    return observed


def _usage(info: dict[str, Any], used: list[int]) -> None:
    usage = info.get("usage")
    if usage is not None:
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        used[0] += prompt
        used[1] += completion
        used[2] += int(getattr(usage, "total_tokens", 0) or prompt + completion)


class SwarmsRun:
    """What a swarms builder gets for one run: ``observed`` (or ``observed_as(agent)`` in a workflow) wraps
    a tool so that its calls report ``action`` and ``observation``; ``llm_args``, passed to every ``Agent``,
    sends the agents' model calls through an HTTP client of the run's own, which a cancel closes (an
    abandoned litellm stream otherwise kept its connection to the model server open: litellm's logging
    object holds it)."""

    def __init__(self, request: AgentRequest, bridge: ThreadBridge) -> None:
        self._bridge = bridge
        self._workflow = request.name
        self._http = importlib.import_module("httpx").Client(timeout=None)
        client = importlib.import_module("openai").OpenAI(base_url=request.base_url,
                                                          api_key=request.api_key or "unused", http_client=self._http)
        self.llm_args: dict[str, Any] = {"client": client}
        self.observed: Observe = _observer(bridge)

    def observed_as(self, agent: str) -> Observe:
        return _observer(self._bridge, agent, self._workflow)

    def close(self) -> None:
        self._http.close()


def swarms_agent(make: Callable[[AgentRequest, SwarmsRun], Any], *, detailed: bool = False) -> AgentFactory:
    """A swarms ``Agent``: ``make(request, run)`` returns it, built with ``llm_args=run.llm_args`` and its tools
    wrapped with ``run.observed``. With ``detailed``, swarms streams a dict per token (its ``stream`` mode),
    with kinds and usage."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event | Sequence[Event]]:
        bridge = ThreadBridge()
        run = SwarmsRun(request, bridge)
        agent = make(request, run)
        sections = _Sections()
        used = [0, 0, 0]

        def on_token(token: Any) -> None:
            if isinstance(token, dict):
                _usage(token, used)
                event = sections.event(str(token.get("token") or ""), str(token.get("type") or ""))
            else:
                event = sections.event(str(token))
            if event is not None:
                bridge.emit(event)

        def work() -> None:
            if detailed:
                agent.stream = True
            agent.run(request.prompt, streaming_callback=on_token)
            if used[2]:
                bridge.emit(UsageEvent(used[0], used[1], used[2]))

        try:
            async for batch in bridge.stream(work):
                yield batch
        finally:
            run.close()

    return factory


def swarms_workflow(make: Callable[[AgentRequest, SwarmsRun], Any]) -> AgentFactory:
    """A swarms ``ConcurrentWorkflow``: ``make(request, run)`` returns it, each agent built with
    ``llm_args=run.llm_args`` and its tools wrapped with ``run.observed_as(agent_name)``. Its agents stream
    side by side, each event attributed to its agent."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event | Sequence[Event]]:
        bridge = ThreadBridge()
        run = SwarmsRun(request, bridge)
        workflow = make(request, run)
        sections: dict[str, _Sections] = {}

        def on_chunk(agent: str, chunk: str, final: bool) -> None:
            if final:
                outcome = "error" if chunk.startswith("Error: ") else "done"
                bridge.emit(AgentEnd(outcome, message=chunk[7:] if outcome == "error" else None, agent=agent,
                                     workflow=request.name))
                return
            event = sections.setdefault(agent, _Sections(agent, request.name)).event(chunk)
            if event is not None:
                bridge.emit(event)

        try:
            async for batch in bridge.stream(lambda: workflow.run(request.prompt, streaming_callback=on_chunk)):
                yield batch
        finally:
            run.close()

    return factory
