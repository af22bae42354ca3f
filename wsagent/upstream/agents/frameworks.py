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
  Approvals: each of the run's ``interruptions`` (a ``ToolApprovalItem``, from a
  tool made with ``needs_approval``) → ``approval_request`` (the item's call id,
  tool name and arguments); the answers go to ``result.to_state()``
  (``approve``, or ``reject`` with the message the model is told) and the run
  resumes with ``Runner.run_streamed(agent, state)``, streamed the same way.
  The action of a call to a tool that may ask waits until it is known to run
  (approved, or its output came), so an approved call's ``action`` follows
  its ``approval``, and a denied call shows neither action nor observation.
* **LangGraph** (:func:`langgraph`): ``astream_events(version="v2")`` of a
  compiled graph over a ``messages`` state; chat model text → ``answer``,
  reasoning content blocks → ``thinking``, each tool call of a model turn →
  ``action``, each tool's end → ``observation``, models' ``usage_metadata`` →
  ``usage``. A cancel closes the event stream, which cancels the graph's task:
  the model request in flight is closed, and a tool running in a thread
  finishes but its result goes nowhere. Approvals: a node or tool calls
  ``langgraph.types.interrupt(value)``; the graph's ``__interrupt__`` output →
  ``approval_request``, named by ``value`` (see :func:`_asked`), and the graph
  resumes with ``Command(resume={interrupt id: {"approved": ..., "reason":
  ...}})``, which ``interrupt()`` returns; denied, the node or tool itself
  tells the model (its result is the observation). The adapter gives each run
  a thread id of its own; the graph is compiled with a checkpointer. A tool
  interrupts once it runs, after the model's call was shown: its ``action``
  comes before the ``approval_request``.
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
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from ...core.events import Action, AgentEnd, Answer, ApprovalRequest, Event, Observation, Thinking, UsageEvent
from ...core.person import approval
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
    """An OpenAI Agents SDK agent: ``make(request)`` returns an ``agents.Agent``. Its tools made with
    ``function_tool(needs_approval=...)`` ask a person first."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event | Sequence[Event]]:
        runner = importlib.import_module("agents").Runner
        agent = make(request)
        result = runner.run_streamed(agent, input=_chat(request))
        calls = _OpenAICalls()
        try:
            while True:
                async with aclosing(result.stream_events()) as events:
                    async for event in events:
                        found = calls.event(event)
                        if found is not None:
                            yield found
                if not result.interruptions:
                    break
                state = result.to_state()
                async for batch in calls.ask(result.interruptions, state):
                    yield batch
                result = runner.run_streamed(agent, state)
            usage = result.context_wrapper.usage  # the whole run's, resumed parts included
            if usage.total_tokens:
                yield UsageEvent(usage.input_tokens, usage.output_tokens, usage.total_tokens)
        finally:
            if not result.is_complete:
                result.cancel()

    return factory


class _OpenAICalls:
    """The tool calls of one OpenAI Agents SDK run, across its resumed parts. A call to a tool that may
    need approval is reported (``action``) once it is known to run: when its output comes, or when a
    person approved it; a denied call is not reported, and neither is the rejection the model is told."""

    __slots__ = ("names", "held", "denied")

    def __init__(self) -> None:
        self.names: dict[str, str] = {}
        self.held: dict[str, Action] = {}
        self.denied: set[str] = set()

    def event(self, event: Any) -> Event | list[Event] | None:
        if event.type == "raw_response_event":
            kind, delta = event.data.type, getattr(event.data, "delta", "")
            if kind == "response.output_text.delta" and delta:
                return Answer(delta)
            if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta") and delta:
                return Thinking(delta)
        elif event.type == "run_item_stream_event" and event.item.type == "tool_call_item":
            raw = event.item.raw_item
            name, arguments = getattr(raw, "name", "tool"), getattr(raw, "arguments", "") or ""
            call_id = getattr(raw, "call_id", "") or ""
            self.names[call_id] = name
            action = Action(f"{name}({arguments})", call_id=call_id, name=name, arguments=arguments)
            tool = next((t for t in getattr(event.item.agent, "tools", ()) if getattr(t, "name", None) == name), None)
            if tool is None or getattr(tool, "needs_approval", False) is False:
                return action
            self.held[call_id] = action
        elif event.type == "run_item_stream_event" and event.item.type == "tool_call_output_item":
            raw = event.item.raw_item
            call_id = str(raw.get("call_id", "") if isinstance(raw, dict) else getattr(raw, "call_id", ""))
            if call_id in self.denied:
                return None
            observation = Observation(str(event.item.output), call_id=call_id, name=self.names.get(call_id, ""))
            held = self.held.pop(call_id, None)
            return observation if held is None else [held, observation]
        return None

    async def ask(self, interruptions: Sequence[Any], state: Any) -> AsyncIterator[list[Event]]:
        """Ask a person about each pending call, together, and approve or reject each in ``state``;
        then report the approved ones."""
        yield [ApprovalRequest(str(item.call_id or ""), str(item.name or ""), str(item.arguments or ""))
               for item in interruptions]
        approved: list[Event] = []
        for item in interruptions:
            call_id = str(item.call_id or "")
            decision = await approval(call_id)
            action = self.held.pop(call_id, None)
            if decision.approved:
                state.approve(item)
                if action is not None:
                    approved.append(action)
            else:
                state.reject(item, rejection_message=decision.observation(str(item.name or "")))
                self.denied.add(call_id)
        if approved:
            yield approved


def langgraph(make: Callable[[AgentRequest], Any]) -> AgentFactory:
    """A LangGraph graph: ``make(request)`` returns a compiled graph whose state has ``messages``. A node or
    tool that calls ``langgraph.types.interrupt(value)`` asks a person (see :func:`_asked` for ``value``)
    and gets ``{"approved": bool, "reason": str | None}`` back from it; such a graph is compiled with a
    checkpointer (``InMemorySaver()`` will do: each run has a thread of its own)."""

    async def factory(request: AgentRequest) -> AsyncIterator[Event | Sequence[Event]]:
        graph = make(request)
        config = {"configurable": {"thread_id": f"wsagent-{uuid.uuid4().hex}"}}
        given: Any = {"messages": [(m["role"], m["content"]) for m in _chat(request)]}
        found = _GraphEvents()
        while True:
            async with aclosing(graph.astream_events(given, config, version="v2")) as events:
                async for event in events:
                    for mapped in found.event(event):
                        yield mapped
            interrupts, found.interrupts = found.interrupts, []
            if not interrupts:
                break
            if not getattr(graph, "checkpointer", None):
                raise ValueError("the graph called interrupt() but has no checkpointer to resume from: compile "
                                 "it with one, such as checkpointer=InMemorySaver()")
            asked = [_asked(interrupt) for interrupt in interrupts]
            yield asked
            answers: dict[str, dict[str, Any]] = {}
            for interrupt, request_event in zip(interrupts, asked, strict=True):
                decision = await approval(request_event.call_id)
                answers[interrupt.id] = {"approved": decision.approved, "reason": decision.reason}
            given = importlib.import_module("langgraph.types").Command(resume=answers)
        input_tokens, output_tokens, total_tokens = found.used
        if total_tokens:
            yield UsageEvent(input_tokens, output_tokens, total_tokens)

    return factory


class _GraphEvents:
    """A LangGraph run's ``astream_events`` (v2) as wsagent events, across its resumed parts: the usage
    summed, the interrupts of the part that just ended kept."""

    __slots__ = ("used", "observed", "interrupts")

    def __init__(self) -> None:
        self.used = [0, 0, 0]
        self.observed: set[str] = set()  # an interrupted node runs again when resumed: its tools too
        self.interrupts: list[Any] = []

    def event(self, event: Any) -> list[Event]:
        kind, data = event["event"], event["data"]
        if kind == "on_chat_model_stream":
            chunk = data["chunk"]
            out: list[Event] = [Thinking(str(block["reasoning"]))
                                for block in getattr(chunk, "content_blocks", None) or ()
                                if isinstance(block, dict) and block.get("type") == "reasoning"
                                and block.get("reasoning")]
            reasoning = (getattr(chunk, "additional_kwargs", None) or {}).get("reasoning_content")
            if isinstance(reasoning, str) and reasoning:
                out.append(Thinking(reasoning))
            text = chunk.text if isinstance(getattr(chunk, "text", None), str) else ""
            if text:
                out.append(Answer(text))
            return out
        if kind == "on_chat_model_end":
            output = data.get("output")
            usage = getattr(output, "usage_metadata", None) or {}
            for n, key in enumerate(("input_tokens", "output_tokens", "total_tokens")):
                self.used[n] += int(usage.get(key) or 0)
            actions: list[Event] = []
            for call in getattr(output, "tool_calls", None) or ():
                arguments = json.dumps(call.get("args", {}))
                actions.append(Action(f"{call.get('name')}({arguments})", call_id=str(call.get("id") or ""),
                                      name=str(call.get("name") or ""), arguments=arguments))
            return actions
        if kind == "on_tool_end":
            message = data.get("output")
            content = getattr(message, "content", message)
            call_id = str(getattr(message, "tool_call_id", "") or "")
            if call_id in self.observed:
                return []
            if call_id:
                self.observed.add(call_id)
            return [Observation(content if isinstance(content, str) else json.dumps(content, default=str),
                                call_id=call_id, name=str(getattr(message, "name", "") or event["name"]),
                                is_error=getattr(message, "status", "") == "error")]
        if kind == "on_chain_stream" and not event.get("parent_ids"):  # the graph's own output
            chunk = data.get("chunk")
            if isinstance(chunk, dict):
                self.interrupts.extend(chunk.get("__interrupt__", ()))
        return []


def _asked(interrupt: Any) -> ApprovalRequest:
    """What a LangGraph interrupt asks. Its value names the call: a dict with ``name``, ``arguments`` (a
    dict, or a JSON string) and optionally ``call_id`` (a tool's call id, from ``InjectedToolCallId``), or a
    LangChain tool call (``name``, ``args``, ``id``); without one, the interrupt's own id is the call's. Any
    other value is asked about as a call named ``interrupt`` with the value as its arguments."""
    value = interrupt.value
    if isinstance(value, dict) and isinstance(value.get("name"), str):
        arguments = value.get("arguments", value.get("args", {}))
        return ApprovalRequest(str(value.get("call_id") or value.get("id") or interrupt.id), value["name"],
                               arguments if isinstance(arguments, str) else json.dumps(arguments, default=str))
    return ApprovalRequest(str(interrupt.id), "interrupt", json.dumps(value, default=str))


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
