"""Bring your own agent: anything that yields wsagent events, run like the built-in agent.

An *agent factory* takes an :class:`AgentRequest` (the chat's messages, the
allowed parameters, and where the model server is) and returns an async
iterator of events, or of lists of events that arrived together. Register
factories under names in a dict and load it with ``--agents module:attribute``
(or ``path/to/file.py:attribute``); a client runs one with ``{"type": "run",
"agent": "<name>"}`` on ``/ws/chat``, ``?agent=<name>`` on
``/ws/agent-thoughts``, or ``body: {agent: "<name>"}`` from the AI SDK. The run
gets what every run gets: merging, backpressure, budgets, cancel, resume,
attach, exactly one terminal event, usage, metrics.

A framework that calls back synchronously from a thread of its own (swarms'
``streaming_callback``) hands its events over through a :class:`ThreadBridge`:
a bounded handoff. The callback blocks while the run's client is behind (the
same backpressure as every run) and raises :class:`Stopped` in the framework's
thread once the run is cancelled or has ended, so the thread is never blocked
for ever and memory never grows past the bridge's limit.

A person in the loop: before a consequential call, yield an
:class:`ApprovalRequest` (``call_id``, ``name``, ``arguments``), then ``decision
= await approval(call_id)`` (a :class:`Decision`: ``approved``, ``reason``);
the run waits meanwhile, and the person answers with ``approve``. At each step
boundary, ``steering()`` returns the messages a person sent meanwhile: send them
to the model, and yield a :class:`Steered` for each (those never taken are
reported as not delivered when the run ends). See docs/person-in-the-loop.md.

A factory that raises ends the run with an ``error`` (code ``agent_error``)
whose message names the agent and the exception's type and first line; the
traceback goes to the server log only. One that hangs is ended by the run's
budget (``--run-max-seconds``).
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...core.errors import WsAgentError
from ...core.events import ApprovalRequest, Event, Producer, Steered
from ...core.person import Decision, approval, steering

__all__ = ["AgentRequest", "AgentFactory", "AgentError", "AgentsSpecError", "ThreadBridge", "Stopped", "load_agents",
           "produce", "ApprovalRequest", "Steered", "Decision", "approval", "steering"]

log = logging.getLogger("wsagent.producers")


@dataclass(frozen=True, slots=True)
class AgentRequest:
    """What a client asked of a registered agent, and where the model server is (point the
    framework's client at ``base_url`` with ``api_key`` and ``model``)."""

    name: str
    messages: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    model: str = "wsagent-sim"
    base_url: str = ""
    api_key: str | None = None

    @property
    def prompt(self) -> str:
        """The last user message's text."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                content = message.get("content")
                if isinstance(content, str):
                    return content
                if isinstance(content, list):
                    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return ""


#: A registered agent: a request in, events (or lists of events that arrived together) out.
AgentFactory = Callable[[AgentRequest], AsyncIterator[Event | Sequence[Event]]]


class AgentError(WsAgentError):
    """A registered agent failed; the message is for a person, the traceback is in the server log."""

    code = "agent_error"


async def produce(factory: AgentFactory, request: AgentRequest) -> Producer:
    """The factory's events as a run's producer: batches, each event attributed to the agent."""
    name = request.name
    iterator = factory(request)
    try:
        async for item in iterator:
            batch = [item] if isinstance(item, Event) else list(item)
            for event in batch:
                if event.agent is None:
                    event.agent = name
                if isinstance(event, ApprovalRequest) and not isinstance(event.arguments, str):
                    event.arguments = json.dumps(event.arguments, default=str)  # the wire's form: a JSON string
            yield batch
    except WsAgentError:  # already a plain error (an upstream's, say)
        raise
    except Exception as exc:
        log.exception("agent %s failed", name)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise AgentError(f"agent {name!r} failed: {type(exc).__name__}" + (f": {first}" if first else "")) from None
    finally:
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


class AgentsSpecError(ValueError):
    """``--agents`` names something that cannot be served: said in one line at start, or on SIGHUP."""


def load_agents(specs: str) -> dict[str, AgentFactory]:
    """The agents named by ``--agents``: comma-separated ``module:attribute`` or ``file.py:attribute``,
    each attribute a dict of name → factory. A later spec's name replaces an earlier one's.

    The process's logging is the same afterwards: importing swarms replaces the root logger's
    handlers with its own at level ERROR, which silenced every wsagent log line after it (the
    server's "listening" line included).
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        return _load(specs)
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def _load(specs: str) -> dict[str, AgentFactory]:
    agents: dict[str, AgentFactory] = {}
    for spec in (s.strip() for s in specs.split(",")):
        if not spec:
            continue
        where, _, attribute = spec.rpartition(":")
        if not where or not attribute:
            raise AgentsSpecError(f"--agents {spec!r}: expected module:attribute or path/to/file.py:attribute")
        try:
            module = _module(where)
        except (OSError, ImportError, SyntaxError) as exc:  # the user's file or module: their error, in one line
            raise AgentsSpecError(f"--agents {spec!r}: cannot load {where}: {exc}") from None
        found = getattr(module, attribute, None)
        if not isinstance(found, dict) or not all(isinstance(k, str) and callable(v) for k, v in found.items()):
            raise AgentsSpecError(f"--agents {spec!r}: {attribute} must be a dict of agent name to factory")
        agents.update(found)
    return agents


def _module(where: str) -> Any:
    """Import ``where`` (a dotted module, or a ``.py`` file), afresh each time: a reload (SIGHUP)
    picks up an edited file."""
    if where.endswith(".py"):
        path = Path(where).resolve()
        name = f"wsagent_agents_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise AgentsSpecError(f"--agents: cannot load {where}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    if where in sys.modules:
        return importlib.reload(sys.modules[where])
    return importlib.import_module(where)


class Stopped(BaseException):
    """Raised in the framework's thread by :meth:`ThreadBridge.emit` once the run no longer wants events
    (cancelled, ended, or its client gone): the framework's own loop unwinds from there. A
    ``BaseException``, as ``GeneratorExit`` is, so that a framework's ``except Exception`` (which would
    log it, retry the model call or carry on with the next agent) lets it through."""


class ThreadBridge:
    """A bounded handoff of events from a framework's thread to the run.

    ``emit`` (any thread) appends; it blocks while ``limit`` events wait, until
    the run takes them or stops (then it raises :class:`Stopped`). The run's side
    (:meth:`stream`) takes everything waiting as one batch, so a fast framework's
    tokens merge like a model's, and wakes only when it waits: no call across
    threads per token while the run keeps up.
    """

    def __init__(self, limit: int = 1024) -> None:
        self.limit = limit
        self._items: deque[Event] = deque()
        self._lock = threading.Condition()
        self._stopped = False
        self._finished = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    def emit(self, *events: Event) -> None:
        """Hand events to the run (from the framework's thread). Raises :class:`Stopped` if the run is over."""
        with self._lock:
            while len(self._items) >= self.limit and not self._stopped:
                self._lock.wait()
            if self._stopped:
                raise Stopped("the run has stopped")
            self._items.extend(events)
            self._wake()

    def _wake(self) -> None:
        waiter, loop = self._waiter, self._loop
        if waiter is not None and loop is not None:
            self._waiter = None
            loop.call_soon_threadsafe(_resolve, waiter)

    def stop(self) -> None:
        """The run wants no more events: a blocked or later ``emit`` raises :class:`Stopped`."""
        with self._lock:
            self._stopped = True
            self._items.clear()
            self._lock.notify_all()

    async def stream(self, work: Callable[[], object]) -> Producer:
        """Run ``work`` (blocking code that calls :meth:`emit`) in a thread of its own, and yield what it
        emits. The run ends when ``work`` returns (its exception, if it raised, becomes the run's error);
        cancelling the run stops the bridge, so ``work``'s next ``emit`` raises :class:`Stopped`."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._work, args=(work,), name="wsagent-agent", daemon=True)
        thread.start()
        try:
            while True:
                with self._lock:
                    batch = list(self._items)
                    self._items.clear()
                    self._lock.notify_all()
                    done = self._finished
                    if not batch and not done:
                        self._waiter = self._loop.create_future()
                        waiter = self._waiter
                if batch:
                    yield batch
                elif done:
                    if self._error is not None:
                        raise self._error
                    return
                else:
                    await waiter
        finally:
            self.stop()

    def _work(self, work: Callable[[], object]) -> None:
        try:
            work()
        except Stopped:  # not kept: its traceback would keep the framework's frames, and the model stream they
            pass  # read, alive (swarms' connection to the model server stayed open after a cancel)
        except BaseException as exc:  # handed to the run's task, which raises it
            self._error = exc
        with self._lock:
            self._finished = True
            self._wake()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
