"""``/ws/chat``: the tutorial's text mode and the multiplexed JSON protocol on one route.

A text frame that parses as a JSON object with a string ``type`` is a protocol
message; anything else is a text-mode prompt. README has the table of message
types. Each run is a :class:`~wsagent.relay.Run` driven by its own task; this
module only validates requests and wires runs to the connection's outbox.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from .agent import Agent, ConcurrentWorkflow, SequentialWorkflow
from .config import Settings
from .connections import Connection
from .errors import ProtocolViolation
from .events import AgentEnd, Answer, Event, Snapshot, encode, encode_message, json_object
from .relay import ReplayGap, Run, drive, stream_model
from .tools import BUILTIN_TOOLS
from .transcripts import Transcript

if TYPE_CHECKING:
    from .server import WsAgentServer

__all__ = ["chat", "ChatSession", "PARAMS"]

#: Request parameters passed through to the model server; anything else is refused.
PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "response_format", "tools", "tool_choice", "user", "reasoning_effort", "logit_bias",
    "parallel_tool_calls", "sim",
})
log = logging.getLogger("wsagent.chat")

_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_MAX_ID = 128


class WorkflowState:
    """Each agent's status and answer so far, for the snapshot an attaching client gets."""

    def __init__(self, agents: list[str]) -> None:
        self.status = {name: "running" for name in agents}
        self.text: dict[str, list[str]] = {name: [] for name in agents}

    async def observe(self, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        async with aclosing(events) as stream:  # closing this closes the workflow, which stops its agents
            async for event in stream:
                if isinstance(event, Answer) and event.agent in self.text:
                    self.text[event.agent].append(event.content)
                elif isinstance(event, AgentEnd) and event.agent in self.status:
                    self.status[event.agent] = event.outcome
                yield event

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        return tuple({"agent": name, "status": self.status[name], "content": "".join(self.text[name])}
                     for name in self.status)


class ChatSession:
    def __init__(self, server: WsAgentServer, conn: Connection) -> None:
        self.server = server
        self.conn = conn
        self.history: list[dict[str, str]] = []  # a list: an empty deque costs 760 bytes per connection
        self.text_runs = 0
        self._last_text_run: Run | None = None

    @property
    def settings(self) -> Settings:
        """Read on every request, so a SIGHUP reload applies to open connections too."""
        return self.server.settings

    async def serve(self) -> None:
        async for message in self.server.incoming(self.conn, self._refusal):
            if message is None:
                continue
            if isinstance(message, bytes):
                self.reply_error(None, "bad_request", "binary frames are not supported; send JSON or text")
                continue
            request = json_object(message)
            if request is not None and isinstance(request.get("type"), str):
                try:
                    self.handle(request)
                except ProtocolViolation as exc:
                    rid = request.get("id")
                    self.reply_error(rid if isinstance(rid, str) else None, exc.code, exc.message)
            else:
                self.text_prompt(message)

    # -- replies ---------------------------------------------------------

    def reply(self, frame: str) -> None:
        self.conn.outbox.put(frame)

    @staticmethod
    def _refusal(code: str, message: str) -> str:
        return encode_message("error", code=code, message=message, retryable=True)

    def reply_error(self, run_id: str | None, code: str, message: str, retryable: bool = False) -> None:
        """A refused request: an ``error`` with the run id it named but no ``seq`` (no run exists)."""
        self.reply(encode_message("error", id=run_id, code=code, message=message, retryable=retryable))

    # -- text mode -------------------------------------------------------

    def text_prompt(self, prompt: str) -> None:
        if self.server.draining:
            self.reply("[ERROR] server is shutting down")
            return
        if self._active_runs() >= self.settings.max_runs_per_connection:
            self.reply(f"[ERROR] too many prompts in flight (at most {self.settings.max_runs_per_connection})")
            return
        self.text_runs += 1
        run = self._new_run(f"text-{self.text_runs}")
        previous, self._last_text_run = self._last_text_run, run
        run.subscribe(self.conn.outbox, 0, text_mode=True)
        self._start(run, self._text_run(run, previous, prompt))

    async def _text_run(self, run: Run, previous: Run | None, prompt: str) -> None:
        if previous is not None:
            await previous.wait()
        assert self.server.upstream is not None
        messages = [*self.history, {"role": "user", "content": prompt}]
        reply: list[str] = []
        await stream_model(run, self.server.upstream, messages, collect=reply,
                           collect_chars=self.settings.history_chars)
        if run.outcome == "done":
            self._remember(prompt, "".join(reply))

    def _remember(self, prompt: str, reply: str) -> None:
        """Keep the exchange, trimming the oldest turns to the history's bounds. A reply longer than
        ``history_chars`` (collected only up to there) does not fit at all: the history is left empty."""
        history = self.history
        history.append({"role": "user", "content": prompt})
        history.append({"role": "assistant", "content": reply})
        del history[:max(0, len(history) - self.settings.history_messages)]
        while history and sum(len(m["content"]) for m in history) > self.settings.history_chars:
            del history[0]

    # -- JSON protocol ---------------------------------------------------

    def handle(self, request: dict[str, Any]) -> None:
        kind = request["type"]
        if kind == "ping":
            self.reply(encode_message("pong", id=request.get("id") if isinstance(request.get("id"), str) else None))
        elif kind == "run":
            self.start_run(request)
        elif kind == "cancel":
            self.cancel(request)
        elif kind == "resume":
            self.resume(request)
        elif kind == "attach":
            self.attach(request)
        else:
            raise ProtocolViolation(f"unknown message type {kind!r}")

    def start_run(self, request: dict[str, Any]) -> None:
        run_id = _run_id(request)
        if self.server.draining:
            self.reply_error(run_id, "server_shutting_down", "server is shutting down; try again shortly", True)
            return
        if self.server.runs.get(self.conn.user, run_id) is not None:
            raise ProtocolViolation(f"run id {run_id!r} is already in use")
        if self._active_runs() >= self.settings.max_runs_per_connection:
            self.reply_error(run_id, "too_many_runs",
                             f"at most {self.settings.max_runs_per_connection} runs in flight per connection", True)
            return
        user, per_user = self.conn.user, self.settings.max_runs_per_user
        if user is not None and sum(r.user == user for r in self.server.runs.active()) >= per_user:
            self.reply_error(run_id, "too_many_runs", f"at most {per_user} runs in flight per user", True)
            return
        messages = _messages(request)
        model = request.get("model")
        if model is not None and not isinstance(model, str):
            raise ProtocolViolation("'model' must be a string")
        params = request.get("params") or {}
        if not isinstance(params, dict):
            raise ProtocolViolation("'params' must be an object")
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ProtocolViolation(f"unsupported params: {', '.join(unknown)}")
        agent_name, workflow_name = request.get("agent"), request.get("workflow")
        assert self.server.upstream is not None
        if workflow_name is not None:
            factory = self.server.workflows.get(workflow_name) if isinstance(workflow_name, str) else None
            if factory is None:
                raise ProtocolViolation(f"unknown workflow {workflow_name!r}; known: {sorted(self.server.workflows)}")
            workflow: ConcurrentWorkflow | SequentialWorkflow = factory()
            run = self._new_run(run_id, workflow=workflow.name)
            state = WorkflowState([a.name for a in workflow.agents])
            run.state = state
            run.controller = workflow
            events: AsyncIterator[Event] = state.observe(workflow.stream(_last_user_text(messages), params))
            run.subscribe(self.conn.outbox, 0)
            self._start(run, drive(run, events))
        elif agent_name is not None:
            if agent_name != "assistant":
                raise ProtocolViolation(f"unknown agent {agent_name!r}; known: ['assistant']")
            agent = Agent("assistant", "You are a helpful assistant. Use a tool when it helps.", model,
                          BUILTIN_TOOLS, max_loops=4, client=self.server.upstream)
            run = self._new_run(run_id, agent=agent.name)
            run.subscribe(self.conn.outbox, 0)
            self._start(run, drive(run, agent.stream(messages, params=params)))
        else:
            run = self._new_run(run_id)
            run.subscribe(self.conn.outbox, 0)
            self._start(run, stream_model(run, self.server.upstream, messages, model=model, params=params))

    def cancel(self, request: dict[str, Any]) -> None:
        run_id = _run_id(request)
        run = self.server.runs.get(self.conn.user, run_id)
        if run is None or run.finished:
            self.reply_error(run_id, "unknown_run", f"no run {run_id!r} in flight")
            return
        agent = request.get("agent")
        if agent is not None:
            if run.controller is None or not run.controller.cancel(agent):
                self.reply_error(run_id, "unknown_agent", f"no agent {agent!r} running in run {run_id!r}")
            return
        run.cancel("cancelled by client")

    def resume(self, request: dict[str, Any]) -> None:
        run_id = _run_id(request)
        after = request.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or after < 0:
            raise ProtocolViolation("'after' must be a non-negative integer (the last seq you received)")
        run = self.server.runs.get(self.conn.user, run_id)
        if run is None:
            self.reply_error(run_id, "unknown_run", f"no run {run_id!r} to resume (never started, or forgotten)")
            return
        try:
            run.subscribe(self.conn.outbox, after)
        except ReplayGap as exc:
            self.reply_error(run_id, exc.code, exc.message)
            return
        if not run.finished:
            run.owner = self.conn

    def attach(self, request: dict[str, Any]) -> None:
        run_id = _run_id(request)
        run = self.server.runs.get(self.conn.user, run_id)
        if run is None:
            self.reply_error(run_id, "unknown_run", f"no run {run_id!r} to attach to")
            return
        if isinstance(run.state, WorkflowState):
            self.reply(encode(Snapshot(run.state.snapshot(), workflow=run.workflow), run.id, None))
        run.subscribe(self.conn.outbox, run.oldest_kept - 1)

    # -- runs ------------------------------------------------------------

    def _new_run(self, run_id: str, *, agent: str | None = None, workflow: str | None = None) -> Run:
        s = self.settings
        transcript = Transcript(s.transcripts_dir, run_id, self.conn.id, self.conn.user) if s.transcripts_dir else None
        run = Run(run_id, user=self.conn.user, buffer_bytes=s.run_buffer_bytes, replay_bytes=s.replay_bytes,
                  agent=agent, workflow=workflow, latency=self.server.metrics.relay_latency, transcript=transcript)
        run.owner = self.conn
        run.budget(s.run_max_seconds, s.run_max_tokens)
        self.server.runs.add(run, s.resume_grace)
        return run

    def _start(self, run: Run, producer: Any) -> None:
        self.server.stream_started()
        conn_id = self.conn.id
        ids = {"conn": conn_id, "run": run.id}
        log.info("run %s start on %s", run.id, conn_id, extra=ids)

        def finished(done: Run) -> None:
            self.server.stream_ended()
            log.info("run %s end on %s outcome=%s deltas=%d duration=%.3fs", done.id, conn_id, done.outcome,
                     done.streamed, time.monotonic() - done.started, extra=ids)

        run.on_finish.append(finished)
        run.task = asyncio.get_running_loop().create_task(producer)

    def _active_runs(self) -> int:
        return sum(1 for run in self.server.runs.active() if run.owner is self.conn)


def _run_id(request: dict[str, Any]) -> str:
    run_id = request.get("id")
    if not isinstance(run_id, str) or not 0 < len(run_id) <= _MAX_ID:
        raise ProtocolViolation(f"'id' must be a string of 1 to {_MAX_ID} characters")
    return run_id


def _messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    messages = request.get("messages")
    prompt = request.get("prompt")
    if messages is None:
        if not isinstance(prompt, str) or not prompt:
            raise ProtocolViolation("a run needs 'messages' (a list) or 'prompt' (a string)")
        return [{"role": "user", "content": prompt}]
    if not isinstance(messages, list) or not messages:
        raise ProtocolViolation("'messages' must be a non-empty list")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in _ROLES:
            raise ProtocolViolation(f"each message needs a role, one of {sorted(_ROLES)}")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise ProtocolViolation("a message's content must be a string or a list of parts")
    return messages


def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""


async def chat(server: WsAgentServer, conn: Connection) -> None:
    await ChatSession(server, conn).serve()
