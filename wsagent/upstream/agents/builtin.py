"""Agents and multi-agent workflows, as a Python API the server's handlers use too.

An :class:`Agent` calls the model in a loop with OpenAI function calling. Its
reasoning streams as ``thinking``, each tool call as ``action``, the tool's
result as ``observation``, and the reply token by token as ``answer``.

Two ways to consume it, as in the swarms framework's streaming guide::

    answer = await agent.run("What is 2 + 2?", streaming_callback=print_token)

    async for event in agent.stream("What is 2 + 2?"):
        ...

:class:`ConcurrentWorkflow` runs several agents on one task at once and
interleaves their events; :class:`SequentialWorkflow` feeds each agent's
answer to the next. Events carry ``agent`` and ``workflow`` names.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import secrets
from collections.abc import AsyncGenerator, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

from ...core.errors import UpstreamError
from ...core.events import (
    Action,
    AgentEnd,
    Answer,
    ApprovalRequest,
    Checkpoint,
    Done,
    ErrorEvent,
    Event,
    Observation,
    Refusal,
    Steered,
    Thinking,
    Token,
    ToolCallEvent,
    UsageEvent,
)
from ...core.person import Decision, approval, steering
from ...core.tools import BUILTIN_TOOLS, Tool, ToolBox, ToolFunction
from ..completion import estimate_tokens, model_batches
from ..model import CONTINUE, Resume, UpstreamClient, UpstreamConfig

__all__ = ["Agent", "AgentResume", "ConcurrentWorkflow", "SequentialWorkflow", "StreamingCallback", "Workflow",
           "WorkflowFactory", "assistant", "build_workflows", "load_workflows"]

log = logging.getLogger("wsagent.agent")

StreamingCallback = Callable[[Any], Any]


async def _flatten(batches: AsyncGenerator[list[Event], None]) -> AsyncGenerator[Event, None]:
    async with aclosing(batches) as stream:
        async for batch in stream:
            for event in batch:
                yield event


def _unique(call: ToolCallEvent, seen: set[str]) -> ToolCallEvent:
    """``call`` with an id no other call of the run has: a person's answer names a call by its id, and a model
    may number its calls per turn (``call_0_0`` each time; wsagent numbers them so when the model gives none)."""
    if call.call_id and call.call_id not in seen:
        seen.add(call.call_id)
        return call
    call_id = f"call_{secrets.token_hex(8)}"
    seen.add(call_id)
    return ToolCallEvent(call_id, call.name, call.arguments, agent=call.agent, workflow=call.workflow)


def default_client() -> UpstreamClient:
    url = os.environ.get("WSAGENT_UPSTREAM_URL")
    if not url:
        raise RuntimeError(
            "no model server: pass client=UpstreamClient(...), or set WSAGENT_UPSTREAM_URL "
            "(run `python -m wsagent.simulator` for an offline one)")
    return UpstreamClient(UpstreamConfig(base_url=url, api_key=os.environ.get("OPENAI_API_KEY"),
                                         api=os.environ.get("WSAGENT_UPSTREAM_API", "chat"),
                                         model=os.environ.get("WSAGENT_MODEL", "wsagent-sim")))


async def _deliver(callback: StreamingCallback, detailed: bool, event: Event, failures: list[int]) -> None:
    """Call the user's callback; an exception is logged once and never breaks the stream."""
    if detailed:
        payload: Any = {"type": event.type, "agent": event.agent, "workflow": event.workflow}
        if isinstance(event, UsageEvent):
            payload["usage"] = {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
                                "total_tokens": event.total_tokens}
        elif isinstance(event, (Done, AgentEnd)):
            payload["finish_reason"] = event.finish_reason
        elif hasattr(event, "content"):
            payload["content"] = event.content
    elif isinstance(event, Answer):
        payload = event.content
    else:
        return
    try:
        result = callback(payload)
        if inspect.isawaitable(result):
            await result
    except Exception:
        if not failures:
            log.warning("streaming callback raised; the stream goes on", exc_info=True)
        failures.append(1)


class Agent:
    """A tool-using agent over an OpenAI-compatible streaming model.

    ``needs_approval`` names tools (``"*"``: all) whose calls wait for a person's approval, besides tools
    made with ``needs_approval=True``. A person in the loop (:mod:`wsagent.core.person`) approves or
    denies each call, and may steer the agent: messages sent meanwhile join it before its next model call.
    """

    def __init__(
        self,
        name: str = "agent",
        system_prompt: str = "",
        model: str | None = None,
        tools: Iterable[Tool | ToolFunction] = (),
        max_loops: int = 3,
        *,
        client: UpstreamClient | None = None,
        params: dict[str, Any] | None = None,
        needs_approval: Iterable[str] = (),
    ) -> None:
        if max_loops < 1:
            raise ValueError("max_loops must be at least 1")
        self.name = name
        self.system_prompt = system_prompt
        self.model = model
        self.toolbox = ToolBox(tools, needs_approval=needs_approval)
        self.max_loops = max_loops
        self.params = dict(params or {})
        self._client = client

    @property
    def client(self) -> UpstreamClient:
        if self._client is None:
            self._client = default_client()
        return self._client

    def messages_for(self, task: str | Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        if isinstance(task, str):
            messages.append({"role": "user", "content": task})
        else:
            messages.extend(task)
        return messages

    async def stream(self, task: str | Sequence[dict[str, Any]], *, workflow: str | None = None,
                     params: dict[str, Any] | None = None) -> AsyncGenerator[Event, None]:
        """Yield the agent's events, ending with exactly one ``done`` or ``error``."""
        async with aclosing(_flatten(self.batches(task, workflow=workflow, params=params))) as events:
            async for event in events:
                yield event

    def first_checkpoint(self, task: str | Sequence[dict[str, Any]]) -> Checkpoint:
        """The state :meth:`batches` with ``checkpoints`` begins with: a run may hold it before its producer
        starts, so that a node dying at once leaves it (its run registered and its ``start`` sent)."""
        return _Steps(self.messages_for(task), self.model).checkpoint()

    async def batches(self, task: str | Sequence[dict[str, Any]], *, workflow: str | None = None,
                      params: dict[str, Any] | None = None, checkpoints: bool = False,
                      resume: AgentResume | None = None) -> AsyncGenerator[list[Event], None]:
        """Like :meth:`stream`, the events of each upstream read together: a run merges what
        arrives together into one frame, as it does for a plain model stream.

        With ``checkpoints`` (``--takeover``), the agent gives its state at each step boundary (before each
        model call, and after each tool call's ``action``, before the tool runs) and its model calls their
        positions; with ``resume``, it goes on from such a state on another node (see :class:`AgentResume`)."""
        name = self.name
        schemas = self.toolbox.schemas() or None
        merged_params = {**self.params, **(params or {})}
        state = _Steps.load(resume.step) if resume is not None else _Steps(self.messages_for(task), self.model)
        messages = state.messages
        prompt_estimate = estimate_tokens(messages)
        finish_reason = "stop"
        call_ids = state.calls
        if state.pending:  # the node that died had begun these calls: each tool runs here, its action sent once
            begun = [ToolCallEvent(c[0], c[1], c[2], agent=name, workflow=workflow) for c in state.pending]
            async for tool_batch in self._call_tools(begun, messages, workflow, state if checkpoints else None,
                                                     acted=state.acted):
                yield tool_batch
            state.step += 1
        first = resume if resume is not None and not resume.pending else None
        for step in range(state.step, self.max_loops):
            state.step = step
            if checkpoints and first is None:  # (a step resumed mid-call began on the node that died: its start,
                yield [state.checkpoint()]     # before the text it streamed, is the one a later takeover needs)
            calls: list[ToolCallEvent] = []
            content: list[str] = [first.text] if first is not None and first.text else []
            source = model_batches(self.client, messages, model=self.model, tools=schemas, params=merged_params,
                                   checkpoints=checkpoints,
                                   resume=first.model_resume(self.client, messages, self.model, schemas,
                                                             merged_params) if first is not None else None)
            first = None
            usage, streamed = state.usage, 0
            try:
                async with aclosing(source) as reads:
                    async for read in reads:
                        batch: list[Event] = []
                        for event in read:
                            if isinstance(event, Checkpoint):
                                batch.append(event)
                            elif isinstance(event, Thinking):
                                streamed += 1
                                batch.append(Thinking(event.content, agent=name, workflow=workflow))
                            elif isinstance(event, (Token, Refusal)):
                                streamed += 1
                                content.append(event.content)
                                batch.append(Answer(event.content, agent=name, workflow=workflow))
                            elif isinstance(event, ToolCallEvent):
                                calls.append(_unique(event, call_ids))
                            elif isinstance(event, Done):
                                finish_reason = event.finish_reason
                            elif isinstance(event, UsageEvent):
                                usage[0] += event.prompt_tokens
                                usage[1] += event.completion_tokens
                                state.reported = True
                        if batch:
                            yield batch
            except UpstreamError as exc:
                state.streamed += streamed
                yield [self._usage(usage, state.reported, prompt_estimate, state.streamed, workflow),
                       ErrorEvent(exc.code, exc.message, exc.retryable, agent=name, workflow=workflow)]
                return
            state.streamed += streamed
            if not calls:
                heard = steering()  # a message sent while the answer streamed: one more step, as AI SDK 7 does
                if not heard:
                    yield [self._usage(usage, state.reported, prompt_estimate, state.streamed, workflow),
                           Done(finish_reason, agent=name, workflow=workflow)]
                    return
                messages.append({"role": "assistant", "content": "".join(content)})
            else:
                messages.append({
                    "role": "assistant",
                    "content": "".join(content) or None,
                    "tool_calls": [{"id": c.call_id, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for c in calls],
                })
                async for batch in self._call_tools(calls, messages, workflow, state if checkpoints else None):
                    yield batch
                heard = steering()
            if heard:
                yield [Steered(text, agent=name, workflow=workflow) for text in heard]
                messages.extend({"role": "user", "content": text} for text in heard)
        yield [self._usage(state.usage, state.reported, prompt_estimate, state.streamed, workflow),
               Done("max_loops", agent=name, workflow=workflow)]

    async def _call_tools(self, calls: list[ToolCallEvent], messages: list[dict[str, Any]],
                          workflow: str | None, state: _Steps | None = None,
                          acted: bool = False) -> AsyncGenerator[list[Event], None]:
        """Run one model turn's calls in order; those that need approval are all asked first, together,
        and each waits for its answer (nothing is open upstream meanwhile). A denied call is not run:
        the model is told it was denied. With ``state`` (checkpoints), each call's ``action`` goes out with
        the agent's state (the calls left, this one acted on); ``acted``: the first call's went out already
        (on a node that died while its tool ran: the tool runs again here, its action is not sent twice)."""
        name = self.name
        asking = [c for c in calls if self.toolbox.needs_approval(c.name)]
        decisions: dict[str, Decision] = {}
        if asking:
            yield [ApprovalRequest(c.call_id, c.name, c.arguments, agent=name, workflow=workflow) for c in asking]
            for c in asking:
                decisions[c.call_id] = await approval(c.call_id)
        for n, call in enumerate(calls):
            decision = decisions.get(call.call_id)
            if decision is not None and not decision.approved:
                messages.append({"role": "tool", "tool_call_id": call.call_id,
                                 "content": decision.observation(call.name)})
                continue
            if not (acted and n == 0):
                action: list[Event] = [Action(f"{call.name}({call.arguments})", call.call_id, call.name,
                                              call.arguments, agent=name, workflow=workflow)]
                if state is not None:
                    state.pending, state.acted = [[c.call_id, c.name, c.arguments] for c in calls[n:]], True
                    action.append(state.checkpoint())
                yield action
            result, is_error = await self.toolbox.call(call.name, call.arguments)
            messages.append({"role": "tool", "tool_call_id": call.call_id, "content": result})
            observed: list[Event] = [Observation(result, call.call_id, call.name, is_error, agent=name,
                                                 workflow=workflow)]
            if state is not None:  # with it, the state that follows it (no kill can fall between them)
                state.pending, state.acted = [[c.call_id, c.name, c.arguments] for c in calls[n + 1:]], False
                observed.append(state.checkpoint(next_step=not state.pending))
            yield observed

    def _usage(self, usage: list[int], reported: bool, prompt_estimate: int, streamed: int,
               workflow: str | None) -> UsageEvent:
        if reported:
            return UsageEvent(usage[0], usage[1], usage[0] + usage[1], agent=self.name, workflow=workflow)
        return UsageEvent(prompt_estimate, streamed, prompt_estimate + streamed, estimated=True,
                          agent=self.name, workflow=workflow)

    async def run(self, task: str | Sequence[dict[str, Any]], streaming_callback: StreamingCallback | None = None,
                  *, detailed: bool = False) -> str:
        """Run to the end and return the answer.

        ``streaming_callback`` gets each answer token (a ``str``), or with
        ``detailed=True`` a dict for every event (``content``, ``usage``,
        ``finish_reason``). It may be sync or async; if it raises, the stream
        goes on. An upstream failure raises :class:`UpstreamError`.
        """
        return (await _collect(self.stream(task), streaming_callback, detailed)).get(self.name, "")


class _Steps:
    """An agent's state at a step boundary, as a :class:`~wsagent.core.events.Checkpoint` carries it (JSON):
    its messages (the tool results observed included), its step, its usage so far, its call ids, and the
    calls of the step left to run (``acted``: the first one's action went out)."""

    def __init__(self, messages: list[dict[str, Any]], model: str | None = None) -> None:
        self.messages = messages
        self.model = model
        self.step = 0
        self.usage = [0, 0]
        self.reported = False
        self.streamed = 0
        self.calls: set[str] = set()
        self.pending: list[list[str]] = []
        self.acted = False

    def checkpoint(self, next_step: bool = False) -> Checkpoint:
        """The state now (``next_step``: the step's calls are all done, so the next step's)."""
        return Checkpoint(json.dumps({"messages": self.messages, "model": self.model,
                                      "step": self.step + next_step,
                                      "usage": self.usage,
                                      "reported": self.reported, "streamed": self.streamed,
                                      "calls": sorted(self.calls), "pending": self.pending, "acted": self.acted}),
                          step=True)

    @classmethod
    def load(cls, text: str) -> _Steps:
        data = json.loads(text)
        state = cls(list(data["messages"]), data["model"])
        state.step, state.usage, state.reported = int(data["step"]), list(data["usage"]), bool(data["reported"])
        state.streamed, state.calls = int(data["streamed"]), set(data["calls"])
        state.pending, state.acted = list(data["pending"]), bool(data["acted"])
        return state


class AgentResume:
    """Where an agent goes on, on the node that took its run over: its last step checkpoint (``step``), and
    for the model call in progress then, its position (a background response's) or the answer text it had
    streamed (``text``, continued by the model server; ``begun``: it had streamed something, if only its
    reasoning, which a continued answer does not stream again)."""

    def __init__(self, step: str, position: str | None = None, text: str = "", begun: bool = False) -> None:
        self.step = step
        self.position = position
        self.text = text
        self.begun = begun or bool(text)  # the model call in progress had streamed something
        data = json.loads(step)
        self.pending = bool(data["pending"])
        self.model: str | None = data["model"]

    def model_resume(self, client: UpstreamClient, messages: list[dict[str, Any]], model: str | None,
                     tools: list[dict[str, Any]] | None, params: dict[str, Any]) -> Resume | None:
        """How the step's model call goes on: re-attached after its position, or asked to continue its text
        (chat completions), or (nothing of it known) asked again."""
        if self.position is not None:
            return Resume(self.position)
        if client.config.api == "chat" and self.begun:
            return Resume(CONTINUE, json.dumps(client.build_body(messages, model, tools, params)), self.text)
        return None


def assistant(client: UpstreamClient, model: str | None = None, needs_approval: Iterable[str] = ()) -> Agent:
    """The built-in tool-using agent (``"agent": "assistant"``, ``/ws/agent-thoughts``); ``needs_approval``:
    the tools it asks a person about first (``--approval-tools``)."""
    return Agent("assistant", "You are a helpful assistant. Use a tool when it helps.", model, BUILTIN_TOOLS,
                 max_loops=4, client=client, needs_approval=needs_approval)


async def _collect(events: AsyncGenerator[Event, None], callback: StreamingCallback | None,
                   detailed: bool) -> dict[str, str]:
    answers: dict[str, list[str]] = {}
    failures: list[int] = []
    async with aclosing(events) as stream:
        async for event in stream:
            if isinstance(event, Answer) and event.agent is not None:
                answers.setdefault(event.agent, []).append(event.content)
            if callback is not None:
                await _deliver(callback, detailed, event, failures)
            if isinstance(event, ErrorEvent):
                raise UpstreamError(event.message, code=event.code, retryable=event.retryable)
    return {name: "".join(parts) for name, parts in answers.items()}


def _ending(event: Event) -> AgentEnd | None:
    """An agent's terminal event, as the non-terminal ``agent_end`` of a workflow."""
    if isinstance(event, Done):
        return AgentEnd("done", event.finish_reason, agent=event.agent, workflow=event.workflow)
    if isinstance(event, ErrorEvent):
        return AgentEnd("error", None, event.message, agent=event.agent, workflow=event.workflow)
    return None


class ConcurrentWorkflow:
    """Several agents on one task at once; their events interleave as they come.

    Each agent ends with an ``agent_end``; the workflow ends with one ``done``.
    :meth:`cancel` stops one agent and leaves the others running.
    """

    def __init__(self, name: str, agents: Sequence[Agent], max_pending: int = 256) -> None:
        if len({a.name for a in agents}) != len(agents):
            raise ValueError("agent names in a workflow must be unique")
        self.name = name
        self.agents = list(agents)
        self.max_pending = max_pending
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def cancel(self, agent_name: str) -> bool:
        task = self._tasks.get(agent_name)
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def stream(self, task: str, params: dict[str, Any] | None = None) -> AsyncGenerator[Event, None]:
        return _flatten(self.batches(task, params))

    async def batches(self, task: str, params: dict[str, Any] | None = None) -> AsyncGenerator[list[Event], None]:
        """The agents' batches as they come; those that arrived meanwhile leave as one batch."""
        queue: asyncio.Queue[list[Event] | None] = asyncio.Queue(self.max_pending)

        async def drive(agent: Agent) -> None:
            try:
                async with aclosing(agent.batches(task, workflow=self.name, params=params)) as batches:
                    async for batch in batches:
                        await queue.put([_ending(event) or event for event in batch])
            except asyncio.CancelledError:
                await queue.put([AgentEnd("cancelled", None, "cancelled", agent=agent.name, workflow=self.name)])
            except Exception as exc:
                log.exception("agent %s failed", agent.name)
                await queue.put([AgentEnd("error", None, f"internal error: {type(exc).__name__}",
                                          agent=agent.name, workflow=self.name)])
            finally:
                await queue.put(None)

        self._tasks = {a.name: asyncio.get_running_loop().create_task(drive(a)) for a in self.agents}
        remaining = len(self._tasks)
        try:
            while remaining:
                item = await queue.get()
                merged: list[Event] = []
                while True:
                    if item is None:
                        remaining -= 1
                    else:
                        merged.extend(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if merged:
                    yield merged
            yield [Done("stop", workflow=self.name)]
        finally:
            for t in self._tasks.values():
                t.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def run(self, task: str, streaming_callback: StreamingCallback | None = None, *,
                  detailed: bool = False) -> dict[str, str]:
        """Every agent's answer, by agent name."""
        return await _collect(self.stream(task), streaming_callback, detailed)


class SequentialWorkflow:
    """Agents in a chain: each one's answer is the next one's task."""

    def __init__(self, name: str, agents: Sequence[Agent]) -> None:
        self.name = name
        self.agents = list(agents)

    def cancel(self, agent_name: str) -> bool:
        return False

    def stream(self, task: str, params: dict[str, Any] | None = None) -> AsyncGenerator[Event, None]:
        return _flatten(self.batches(task, params))

    async def batches(self, task: str, params: dict[str, Any] | None = None) -> AsyncGenerator[list[Event], None]:
        current = task
        for agent in self.agents:
            answer: list[str] = []
            failed: ErrorEvent | None = None
            async with aclosing(agent.batches(current, workflow=self.name, params=params)) as batches:
                async for batch in batches:
                    for event in batch:
                        if isinstance(event, Answer):
                            answer.append(event.content)
                        elif isinstance(event, ErrorEvent):
                            failed = event
                    yield [_ending(event) or event for event in batch]
            if failed is not None:
                yield [ErrorEvent(failed.code, f"{agent.name}: {failed.message}", failed.retryable,
                                  workflow=self.name)]
                return
            current = "".join(answer)
        yield [Done("stop", workflow=self.name)]

    async def run(self, task: str, streaming_callback: StreamingCallback | None = None, *,
                  detailed: bool = False) -> str:
        """The last agent's answer."""
        answers = await _collect(self.stream(task), streaming_callback, detailed)
        return answers.get(self.agents[-1].name, "") if self.agents else ""


Workflow = ConcurrentWorkflow | SequentialWorkflow
WorkflowFactory = Callable[[], Workflow]


def load_workflows(path: str, client: UpstreamClient, tools: Sequence[Tool],
                   needs_approval: Sequence[str] = ()) -> dict[str, WorkflowFactory]:
    """Workflow definitions from a JSON file (see docs/agents.md, "Workflows")."""
    with open(path, encoding="utf-8") as handle:
        spec = json.load(handle)
    return build_workflows(spec, client, tools, needs_approval)


def build_workflows(spec: dict[str, Any], client: UpstreamClient, tools: Sequence[Tool],
                    needs_approval: Sequence[str] = ()) -> dict[str, WorkflowFactory]:
    """``{"name": {"mode": "concurrent"|"sequential", "agents": [{"name", "system_prompt", ...}]}}``.

    An agent's ``"needs_approval"`` (a list of its tools, or ``true`` for all) adds to ``needs_approval``
    (``--approval-tools``), which applies to every agent.

    Returns factories: each run gets fresh workflow objects, so one run's
    cancellations never touch another's.
    """
    by_name = {t.name: t for t in tools}
    factories: dict[str, WorkflowFactory] = {}
    for wf_name, wf in (spec.get("workflows") or spec).items():
        mode = wf.get("mode", "concurrent")
        if mode not in ("concurrent", "sequential"):
            raise ValueError(f"workflow {wf_name}: mode must be concurrent or sequential")
        agent_specs = wf.get("agents") or []
        if not agent_specs:
            raise ValueError(f"workflow {wf_name}: no agents")
        for a in agent_specs:
            unknown = [t for t in a.get("tools", []) if t not in by_name]
            if unknown:
                raise ValueError(f"workflow {wf_name}: unknown tools {unknown}")
            asked = a.get("needs_approval", [])
            if asked is True:
                a["needs_approval"] = asked = ["*"]
            if not isinstance(asked, list) or not all(isinstance(t, str) for t in asked):
                raise ValueError(f"workflow {wf_name}: an agent's needs_approval is a list of its tools, or true")
            unknown = [t for t in asked if t != "*" and t not in a.get("tools", [])]
            if unknown:
                raise ValueError(f"workflow {wf_name}: needs_approval names tools the agent lacks: {unknown}")

        def factory(wf_name: str = wf_name, mode: str = mode,
                    agent_specs: list[dict[str, Any]] = agent_specs) -> Workflow:
            agents = [Agent(a["name"], a.get("system_prompt", ""), a.get("model"),
                            [by_name[t] for t in a.get("tools", [])], int(a.get("max_loops", 3)), client=client,
                            needs_approval=[*needs_approval, *a.get("needs_approval", [])])
                      for a in agent_specs]
            if mode == "concurrent":
                return ConcurrentWorkflow(wf_name, agents)
            return SequentialWorkflow(wf_name, agents)

        factories[wf_name] = factory
    return factories

