"""What a handler may use: the application context, narrow and typed.

A route is driven by its messages (a :class:`MessageSession`: no task while the connection is
idle) or is a handler ``async def handler(app: App, conn: Connection)`` that reads them with
:meth:`App.incoming`. Either starts every stream it makes as a
run with :meth:`App.new_run` and :meth:`App.start` (so every route gets the
same budgets, limits, transcripts, metrics and ``run`` log lines), and writes
only through its connection's outbox. The server (:mod:`wsagent.wiring.server`) owns
the App and the sockets; handlers never see the server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from functools import partial
from typing import Any, Protocol

from websockets.exceptions import ConnectionClosed

from ..core.auth import (
    CLOSE_FORBIDDEN,
    CLOSE_INVALID_TOKEN,
    CLOSE_RATE_LIMIT,
    Authenticator,
    AuthError,
    TokenBucket,
    token_from_request,
)
from ..core.config import Settings
from ..core.errors import ClusterUnavailable, ProtocolViolation
from ..core.events import Cancelled, ErrorEvent, Start, encode_message, json_object
from ..core.logs import printable
from ..core.metrics import Metrics
from ..core.workflow_state import Controller, WorkflowState
from ..engine.broker import Broker, Handover, LocalBroker, mint_key, scope_of
from ..engine.pump import Producer, pump
from ..engine.run import Run
from ..engine.transcripts import Transcript
from ..transport.connections import CLOSE_INTERNAL_ERROR, Connection, ConnectionManager
from ..upstream.agents.builtin import AgentResume, WorkflowFactory, assistant
from ..upstream.agents.producers import AgentFactory, AgentRequest, produce
from ..upstream.completion import estimate_tokens, model_batches
from ..upstream.model import CONTINUE, Resume, UpstreamClient

__all__ = ["App", "MessageGate", "MessageSession", "Refusal", "PARAMS"]

#: Request parameters passed through to the model server; anything else is refused.
PARAMS = frozenset({
    "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "response_format", "tools", "tool_choice", "user", "reasoning_effort", "logit_bias",
    "parallel_tool_calls", "sim",
})

log = logging.getLogger("wsagent.app")

#: Why a run may not start: (code, message).
Refusal = tuple[str, str]


class Peers(Protocol):
    """The other worker processes of this server (``--workers``), for a scrape of the whole server."""

    async def snapshots(self) -> list[list[dict[str, Any]]]:
        """Each other worker's metrics (:func:`wsagent.handlers.status.snapshot`); those that do not answer are
        left out."""
        ...


class MessageGate:
    """One connection's standing with the message rate (:meth:`App.let_in`)."""

    __slots__ = ("bucket", "strikes")

    def __init__(self) -> None:
        self.bucket: TokenBucket | None = None
        self.strikes = 0


class MessageSession(MessageGate):
    """A message-driven route's session (:class:`~wsagent.transport.connections.Session`): what its messages
    share, the rate and token refresh (:meth:`App.let_in`), nothing handled once the connection is closing,
    and a failure that closes the connection with 1011. A route says what a message does
    (:meth:`handle`) and how a message over the rate is refused (:meth:`refuse`)."""

    __slots__ = ("app", "conn")

    def __init__(self, app: App, conn: Connection) -> None:
        super().__init__()
        self.app = app
        self.conn = conn

    async def on_message(self, message: str | bytes) -> None:
        conn = self.conn
        if conn.outbox.closing or not await self.app.let_in(conn, self, self.refuse, message):
            return
        try:
            await self.handle(message)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("handler for %s failed on %s", printable(conn.path), conn.id)
            conn.close_soon(CLOSE_INTERNAL_ERROR, "internal error")
        if conn.ws.leaving:  # (what it started after the client's close frame is released as if before it)
            self.app.release(conn)

    async def handle(self, message: str | bytes) -> None:
        raise NotImplementedError

    @staticmethod
    def refuse(code: str, text: str, refused: str | bytes) -> str:
        raise NotImplementedError

    def on_leave(self) -> None:
        self.app.release(self.conn)

    def on_close(self) -> None:
        """The connection is gone: a route's own clean-up first (an override's), then the server's."""
        self.app.connection_closed(self.conn)


class App:
    """The settings, the model server, the runs and the connections, for handlers."""

    def __init__(self, settings: Settings, upstream: UpstreamClient, metrics: Metrics,
                 workflows: dict[str, WorkflowFactory], agents: dict[str, AgentFactory] | None = None,
                 broker: Broker | None = None) -> None:
        self.settings = settings
        self.upstream = upstream
        self.metrics = metrics
        self.workflows = workflows
        self.agents: dict[str, AgentFactory] = agents or {}
        self.broker: Broker = broker if broker is not None else LocalBroker(settings.replay_budget_bytes,
                                                                    settings.replay_budget_per_user)
        self.manager = ConnectionManager(self.broker, settings.max_connections, settings.client_id_policy)
        self.auth = Authenticator(settings)
        self.started = time.monotonic()
        self.draining = False
        self.handing_over = False  # a rolling restart: its runs go on (their grace is the drain) for clients that move
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        # (dicts, not Counters: a Counter's missing key is a Python call, two a run)
        self._conn_runs: dict[str, int] = {}
        self._ip_runs: dict[str, int] = {}  # anonymous runs in flight by address
        self.waiting: Counter[str] = Counter()  # requests waiting for a conversation's answer to end, by conversation
        self.peers: Peers | None = None
        #: The server's end of a connection (its release, its ``close`` line), for a session's on_close.
        self.connection_closed: Callable[[Connection], None] = self.release

    # -- runs ------------------------------------------------------------

    async def admit(self, conn: Connection, per_connection: int, waiting: int = 0) -> Refusal | None:
        """Whether ``conn`` may start another run: the server is not draining, and the connection
        and its user (an anonymous client: its address, on this node) are under their limits. Every
        run counts, whatever its id, until it ends: one that outlives its socket (a resume grace,
        an AI SDK response) counts against the user or address that started it; ``waiting``, requests of the
        connection queued for their turn, count too."""
        if self.draining:
            return "server_shutting_down", "server is shutting down; try again shortly"
        if self._conn_runs.get(conn.id, 0) + waiting >= per_connection:
            counted = " (requests waiting for their turn count)" if waiting else ""
            return "too_many_runs", f"at most {per_connection} runs in flight per connection{counted}"
        if conn.user is None:
            per_ip = self.settings.max_runs_per_ip
            if per_ip and self._ip_runs.get(conn.ip, 0) >= per_ip:
                return "too_many_runs", f"at most {per_ip} runs in flight from your address without a token"
            return None
        per_user = self.settings.max_runs_per_user
        if await self.broker.runs_of(conn.user) >= per_user:
            return "too_many_runs", f"at most {per_user} runs in flight per user"
        return None

    async def existing_run(self, scope: str, run_id: str) -> Run | None:
        """The run ``run_id`` names in ``scope``, asked before a new run takes that id.

        A node whose cluster is out of reach answers for its own runs: it goes on starting runs on
        every route (an id is then unique on this node; two runs that share it on two nodes are
        still told apart by their keys), rather than refusing every authenticated client.
        """
        try:
            return await self.broker.run_by_id(scope, run_id)
        except ClusterUnavailable:
            return None

    async def new_run(self, conn: Connection, run_id: str, *, grace: float = 0.0, agent: str | None = None,
                workflow: str | None = None, controller: Controller | None = None,
                state: WorkflowState | None = None, scope: str | None = None, resumable: bool = False,
                resume_request: str | None = None) -> Run:
        """A run owned by ``conn``, registered under a fresh key, with the configured budgets.

        ``grace``: how long it goes on for a resume once its client is gone (0: cancelled at once),
        and how long it is kept for a resume once it has ended.
        ``scope``: where ``run_id`` is unique (default: the client's, see :func:`~wsagent.engine.broker.scope_of`).
        ``resumable``: another node may go on with it if this one dies (its producer gives checkpoints; with
        ``resume_request``, the request it sends again to continue the answer).
        Raises :class:`ProtocolViolation` if ``run_id`` is in use in that scope (another socket of the
        same user may have taken it while this request waited for the cluster).
        """
        s = self.settings
        key = mint_key()
        owner = scope_of(conn.user, conn.id)
        run = Run(run_id, key=key, user=conn.user, scope=scope or owner, owner=owner,
                  buffer_bytes=s.run_buffer_bytes, replay_bytes=s.replay_bytes, agent=agent, workflow=workflow,
                  latency=self.metrics.relay_latency, controller=controller, state=state, grace=grace)
        run.resumable = resumable
        run.resume_request = resume_request
        try:
            await self.broker.add_run(run, grace)
        except ValueError as exc:
            raise ProtocolViolation(str(exc)) from None
        run.on_finish.append(self._count)
        if s.transcripts_dir:  # opened once the run is registered: a refused run leaves no file open
            run.transcript = Transcript(s.transcripts_dir, run_id, conn.id, conn.user)
        run.budget(s.run_max_seconds, s.run_max_tokens)
        run.approval_timeout = s.approval_timeout
        return run

    @property
    def takes_over(self) -> bool:
        """Whether another node may go on with this node's model runs (``--takeover``, in a cluster)."""
        return self.settings.takeover != "off" and not isinstance(self.broker, LocalBroker)

    def take_over(self, run: Run, handover: Handover) -> None:
        """Go on with ``run``, which a node that died produced up to its last checkpoint (see
        :mod:`~wsagent.engine.cluster.takeover`): the rest of its model's answer, read where that node stopped
        (or asked for after the answer so far); the built-in agent from its last step; with no checkpoint
        (the node died before the model's first event), ``producer_lost``."""
        s = self.settings
        run.on_finish.append(self._count)
        run.budget(s.run_max_seconds, s.run_max_tokens)
        run.approval_timeout = s.approval_timeout
        checkpoint = handover.checkpoint
        make: Callable[[], Producer]
        if run.agent == "assistant" and handover.step is not None:  # from its last step, nothing run twice
            resume = AgentResume(handover.step, checkpoint, handover.step_text, handover.step_begun)
            run.steerable = True
            make = partial(assistant(self.upstream, resume.model).batches, [], checkpoints=True, resume=resume)
        elif run.resume_request is not None:  # continued after its answer so far, whatever its last entry
            make = partial(model_batches, self.upstream, [], resume=Resume(CONTINUE, run.resume_request,
                                                                           handover.answer))
        elif checkpoint is not None:
            make = partial(model_batches, self.upstream, [], resume=Resume(checkpoint))
            run.on_finish.append(partial(self._unread, checkpoint))
        else:
            run.end(ErrorEvent("producer_lost", "the node that produced this run stopped before the model's first "
                               "event; start the run again", True, agent=run.agent, workflow=run.workflow))
            return
        self.stream_started()
        ids = {"run": run.id}
        log.info("run %s taken over", printable(run.id), extra=ids)

        def finished(done: Run) -> None:
            self.stream_ended()
            code = done.terminal.code if isinstance(done.terminal, ErrorEvent) else "-"
            log.info("run %s end (taken over) outcome=%s code=%s deltas=%d", printable(done.id), done.outcome, code,
                     done.streamed, extra=ids)

        run.on_finish.append(finished)
        run.start(pump(run, make))

    def _unread(self, checkpoint: str, run: Run) -> None:
        """A run taken over on a background response ended: unless it is ``done``, the response is cancelled
        upstream (its producer may have ended before it read anything, and so never cancelled it)."""
        if run.outcome != "done":
            self.upstream.cancel_response(checkpoint)

    def _count(self, run: Run) -> None:
        terminal = run.terminal
        self.metrics.run_finished(run.outcome, run.streamed,
                                  terminal.reason if isinstance(terminal, Cancelled) else None)

    async def open_run(self, conn: Connection, run_id: str, messages: list[dict[str, Any]], *, model: object = None,
                 agent: object = None, workflow: object = None, params: object = None, grace: float = 0.0,
                 scope: str | None = None) -> tuple[Run, Producer, str]:
        """A run of a model, the built-in agent or a named workflow over ``messages``, as a client asked:
        the run, its producer (start it with :meth:`start`), and the model it uses. Raises
        :class:`ProtocolViolation` for a request that may not run (an unknown workflow or agent, a model
        the settings do not allow, a parameter not in :data:`PARAMS`)."""
        if model is not None and not isinstance(model, str):
            raise ProtocolViolation("'model' must be a string")
        if model is not None and not self.settings.model_allowed(model):
            raise ProtocolViolation(f"model {model!r} may not be chosen here; ask without 'model' for "
                                    f"{self.settings.model!r}, or see --allowed-models")
        params = params or {}
        if not isinstance(params, dict):
            raise ProtocolViolation("'params' must be an object")
        unknown = sorted(set(params) - PARAMS)
        if unknown:
            raise ProtocolViolation(f"unsupported params: {', '.join(unknown)}")
        producer: Producer
        if workflow is not None:
            factory = self.workflows.get(workflow) if isinstance(workflow, str) else None
            if factory is None:
                raise ProtocolViolation(f"unknown workflow {workflow!r}; known: {sorted(self.workflows)}")
            flow = factory()
            state = WorkflowState([a.name for a in flow.agents])
            run = await self.new_run(conn, run_id, grace=grace, workflow=flow.name, controller=flow, state=state,
                               scope=scope)
            producer = state.observe(flow.batches(_last_user_text(messages), params))
            run.steerable = True
        elif agent is not None:
            name = self.check_agent(agent)
            # the built-in agent goes on from its last step on another node (not while a person could be
            # asked: an approval's wait is this node's)
            resumable = self.takes_over and name == "assistant" and not self.settings.approval_tools
            producer = self.agent_producer(name, messages, params, model, checkpoints=resumable)
            run = await self.new_run(conn, run_id, grace=grace, agent=name, scope=scope, resumable=resumable)
            if resumable:  # (its first state leaves with its start)
                run.push(assistant(self.upstream, model).first_checkpoint(messages))
            run.steerable = True
        else:
            resumable = self.takes_over
            request = None
            if resumable and self.settings.takeover == "continue":  # kept in the cluster, to be sent again
                request = json.dumps(self.upstream.build_body(messages, model, None, params))
            run = await self.new_run(conn, run_id, grace=grace, scope=scope, resumable=resumable,
                                     resume_request=request)
            producer = model_batches(self.upstream, messages, model=model, params=params, checkpoints=resumable)
        run.prompt_estimate = estimate_tokens(messages)
        return run, producer, model or self.upstream.config.model

    def check_agent(self, name: object) -> str:
        """``name`` if it names an agent: the built-in ``assistant``, or one of ``--agents``; else
        :class:`ProtocolViolation`."""
        if name != "assistant" and not (isinstance(name, str) and name in self.agents):
            raise ProtocolViolation(f"unknown agent {name!r}; known: {['assistant', *sorted(self.agents)]}")
        assert isinstance(name, str)
        return name

    def agent_producer(self, name: object, messages: list[dict[str, Any]], params: dict[str, Any],
                       model: str | None = None, checkpoints: bool = False) -> Producer:
        """The producer of the agent called ``name`` (see :meth:`check_agent`); ``checkpoints``: the built-in
        agent's, for another node to go on from."""
        name = self.check_agent(name)
        if name == "assistant":
            return assistant(self.upstream, model, self.settings.approval_tools).batches(
                messages, params=params, checkpoints=checkpoints)
        factory = self.agents[name]
        config = self.upstream.config
        return produce(factory, AgentRequest(name, messages, params, model or config.model, config.base_url,
                                             config.api_key))

    def start(self, conn: Connection, run: Run, make: Callable[[], Producer], *, model: str | None = None,
              after: Run | None = None) -> None:
        """Send ``start`` (with the run's key), then stream ``make()`` into ``run`` (made once ``after``
        has ended, to answer a client's prompts in order)."""
        run.push(Start(model, run.key, agent=run.agent, workflow=run.workflow))
        run.wake()
        self.stream_started()
        conn_id = conn.id
        runs, ip_runs = self._conn_runs, self._ip_runs
        runs[conn_id] = runs.get(conn_id, 0) + 1
        ip = conn.ip if conn.user is None else None
        if ip is not None:
            ip_runs[ip] = ip_runs.get(ip, 0) + 1
        logged = log.isEnabledFor(logging.INFO)  # (at a run a millisecond: the records' makings are not free)
        if logged:
            log.info("run %s start on %s", printable(run.id), conn_id, extra={"conn": conn_id, "run": run.id})

        def finished(done: Run) -> None:
            self.stream_ended()
            runs[conn_id] -= 1
            if not runs[conn_id]:
                del runs[conn_id]
            if ip is not None:
                ip_runs[ip] -= 1
                if not ip_runs[ip]:
                    del ip_runs[ip]
            if logged:
                code = done.terminal.code if isinstance(done.terminal, ErrorEvent) else "-"
                log.info("run %s end on %s outcome=%s code=%s deltas=%d duration=%.3fs", printable(done.id), conn_id,
                         done.outcome, code, done.streamed, time.monotonic() - done.started,
                         extra={"conn": conn_id, "run": done.id})

        run.on_finish.append(finished)
        run.start(pump(run, make, after))

    def release(self, conn: Connection) -> None:
        """The client is gone: what it watched loses a watcher; a run it owned goes on for its resume
        grace, or is cancelled (at once while draining). While the node hands over (a rolling restart),
        its grace is the drain's, for its client to resume it on another node."""
        for sub in conn.outbox.subscriptions:
            sub.run.unsubscribe(sub, 0.0 if self.draining and not self.handing_over else sub.run.grace)

    def stream_started(self) -> None:
        self.inflight += 1
        self.idle.clear()

    def stream_ended(self) -> None:
        self.inflight -= 1
        if self.inflight == 0:
            self.idle.set()

    # -- messages --------------------------------------------------------

    async def incoming(self, conn: Connection, refuse: Callable[[str, str, str | bytes], str],
                       idle: float | None = None) -> AsyncGenerator[str | bytes | None, None]:
        """A connection's messages, as :meth:`let_in` lets them through, for a handler that reads in a loop.

        Yields ``None`` after ``idle`` seconds without a message. Ends once the client is closed for its rate.
        """
        ws = conn.ws
        gate = MessageGate()
        while True:
            if idle:
                try:
                    async with asyncio.timeout(idle):
                        message = await ws.recv()
                except TimeoutError:
                    yield None
                    continue
            else:
                message = await ws.recv()
            if await self.let_in(conn, gate, refuse, message):
                yield message
            elif conn.outbox.closing:
                await ws.wait_closed()
                return

    async def let_in(self, conn: Connection, gate: MessageGate, refuse: Callable[[str, str, str | bytes], str],
                    message: str | bytes) -> bool:
        """Whether a handler gets ``message``: not over the rate (refused with ``refuse(code, text,
        message)``; a client that keeps going past another burst's worth is closed with 4029), and no
        in-band token refresh (taken here)."""
        settings = self.settings
        bucket = gate.bucket
        if bucket is None:  # (made at the first message: an idle connection needs none)
            bucket = gate.bucket = TokenBucket(settings.messages_per_second, settings.message_burst)
        if not bucket.allow():
            gate.strikes += 1
            if gate.strikes > settings.message_burst:
                conn.close_soon(CLOSE_RATE_LIMIT, "Rate limit exceeded", flush=True)
                return False
            conn.put(refuse("rate_limited", f"over {settings.messages_per_second:g} messages per second", message))
            return False
        gate.strikes = 0
        if isinstance(message, str) and message[:1] == "{" and '"auth"' in message:
            request = json_object(message)
            if request is not None and request.get("type") == "auth":
                await self.refresh(conn, request.get("token"))
                return False
        return True

    # -- who the client is -----------------------------------------------

    async def authenticate(self, conn: Connection, route: str, required: bool) -> tuple[int, str] | None:
        """Who the client is; a (close code, reason) if it may not stay. A token is checked whenever one is
        sent, and needed where the route (or ``--require-auth``) says so."""
        assert conn.ws.request is not None
        token = token_from_request(conn.ws.request)
        if token is None and not required:
            return None
        try:
            identity = self.auth.verify(token)
            identity.may_use(route, conn.params)
        except AuthError as exc:
            log.info("refused %s %s: %s (%s)", conn.id, printable(conn.path), exc.reason, printable(exc.detail))
            return exc.code, exc.reason
        if await self.manager.set_user(conn, identity.user) > self.settings.max_connections_per_user:
            return CLOSE_RATE_LIMIT, "Too many connections for this user"
        self._expire_at(conn, identity.expires)
        return None

    def _expire_at(self, conn: Connection, expires: float) -> None:
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
            conn.expiry_timer = None
        conn.expires = expires
        if expires != math.inf:
            delay = max(0.0, expires - time.time())
            conn.expiry_timer = asyncio.get_running_loop().call_later(
                delay, conn.close_soon, CLOSE_INVALID_TOKEN, "Token expired")

    async def refresh(self, conn: Connection, token: object) -> None:
        """``{"type": "auth", "token": ...}`` in band: a new token for the same user moves the expiry.

        The token passes every check the handshake makes (its route and client-id claims, the
        per-user connection limit); a connection that authenticates in band over that limit is
        closed with 4029, as it would have been at the handshake.
        """
        try:
            identity = self.auth.verify(token if isinstance(token, str) else None)
            identity.may_use(conn.route, conn.params)
        except AuthError as exc:
            code = "forbidden" if exc.code == CLOSE_FORBIDDEN else "invalid_token"
            conn.put(encode_message("error", code=code, message=f"token refused: {exc.detail or exc.reason}"))
            return
        if conn.user is not None and identity.user != conn.user:
            conn.put(encode_message("error", code="forbidden", message="a refreshed token must be for the same user"))
            return
        limit = self.settings.max_connections_per_user
        if conn.user is None and await self.manager.set_user(conn, identity.user) > limit:
            conn.put(encode_message("error", code="too_many_connections",
                                    message=f"at most {limit} connections per user"))
            conn.close_soon(CLOSE_RATE_LIMIT, "Too many connections for this user", flush=True)
            return
        self._expire_at(conn, identity.expires)
        conn.put(encode_message("auth", status="ok", user=identity.user,
                                expires=None if identity.expires == math.inf else identity.expires))



def _last_user_text(messages: list[dict[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "user" and isinstance(message.get("content"), str):
            return str(message["content"])
    return ""
