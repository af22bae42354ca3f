"""The asyncio server: handshake decisions, routing, shutdown.

Everything before the upgrade happens in :meth:`WsAgentServer.process_request`
(plain HTTP answers, 404, 405, 503); everything after it in
:meth:`WsAgentServer.handler`, which looks the path up in the route table
(:mod:`wsagent.wiring.routes`) and hands the connection to that route's handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Sequence
from contextlib import suppress
from functools import partial
from importlib import resources
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import SERVER, Request, Response
from websockets.protocol import State
from websockets.typing import Subprotocol

from ..core.auth import SUBPROTOCOL, Authenticator
from ..core.config import RELOADABLE, Settings
from ..core.logs import Redactor, printable
from ..core.metrics import Metrics
from ..core.tools import BUILTIN_TOOLS
from ..engine.broker import Broker, LocalBroker
from ..engine.transcripts import prepare_directory
from ..handlers.app import App
from ..transport.compression import lazy_deflate
from ..transport.connections import (
    CLOSE_SERVICE_RESTART,
    Connection,
    ConnectionManager,
    StreamConnection,
    close_or_abort,
    connection_id,
    forget_subprotocol_choice,
)
from ..transport.http_answers import http_response
from ..transport.keepalive import Keepalive
from ..transport.origin_policy import OriginPolicy
from ..upstream.agents.builtin import WorkflowFactory, build_workflows, load_workflows
from ..upstream.agents.producers import AgentFactory, load_agents
from ..upstream.model import DIALECTS, UpstreamClient, UpstreamConfig
from ..upstream.simulator import SimulatorServer, SimulatorSettings
from . import systemd
from .router import HttpHandler, Route, Router
from .routes import HTTP_ROUTES, ROUTES
from .workers import Worker, WorkerMesh

__all__ = ["WsAgentServer"]

log = logging.getLogger("wsagent.server")


class WsAgentServer:
    """wsagent's server. Use as ``async with WsAgentServer(settings) as server: ...``.

    Starting it patches nothing process-wide: the tuning that suits a process that is only this server (the
    collector's thresholds, malloc, the fix of Python 3.11's transport cycle) is :mod:`wsagent.serve`'s to apply,
    not a surprise for a program that embeds it. ``worker``: this server is one of a supervisor's ``--workers``.
    """

    def __init__(self, settings: Settings | None = None, upstream: UpstreamClient | None = None,
                 sock: socket.socket | None = None, routes: Sequence[Route] = ROUTES,
                 http_routes: dict[str, HttpHandler] | None = None, worker: Worker | None = None) -> None:
        self.settings = settings or Settings()
        self.router = Router(routes)
        self.http_routes = dict(HTTP_ROUTES if http_routes is None else http_routes)
        self.origin_policy = OriginPolicy(self.settings.allowed_origins)
        self.metrics = Metrics()
        self._upstream = upstream
        self.simulator: SimulatorServer | None = None
        self._app: App | None = None
        self._mesh: WorkerMesh | None = None
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._keepalive: Keepalive | None = None
        self._received: asyncio.Future[None] | None = None  # (see _forget_handshake)
        self._stopped = False
        self.sock = sock
        self.worker = worker
        self._id_prefix = f"{worker.tag}-" if worker is not None else ""
        self.worker_header = str(os.getpid())

    @property
    def app(self) -> App:
        """What the handlers see (made by :meth:`start`)."""
        assert self._app is not None, "start the server first"
        return self._app

    @property
    def upstream(self) -> UpstreamClient:
        return self.app.upstream

    @property
    def manager(self) -> ConnectionManager:
        return self.app.manager

    @property
    def broker(self) -> Broker:
        """Where the runs, client ids and per-user counts are (in cluster mode, shared through Redis)."""
        return self.app.broker

    @property
    def draining(self) -> bool:
        return self._app is not None and self._app.draining

    # -- lifecycle -------------------------------------------------------

    async def start(self) -> WsAgentServer:
        s = self.settings
        if s.transcripts_dir:
            prepare_directory(s.transcripts_dir)  # before anything starts: SystemExit if it cannot be used
        upstream = self._upstream
        if upstream is None:
            base_url = s.upstream_url
            if not base_url:
                self.simulator = await SimulatorServer(SimulatorSettings(**s.for_simulator())).start()
                base_url = self.simulator.base_url
                log.info("no upstream configured: streaming from the built-in simulator at %s", base_url)
            config = UpstreamConfig(base_url=base_url, **s.for_upstream())
            upstream = UpstreamClient(metrics=self.metrics, config=config)
        else:
            upstream.metrics = self.metrics
        log.info("model server: %s (%s), model %s unless a run names another", upstream.url,
                 DIALECTS[upstream.config.api], upstream.config.model)
        self._app = App(s, upstream, self.metrics, _load_workflows(s, upstream), load_agents(s.agents),
                        await _broker(s, self.worker))
        self._app.connection_closed = self._closed
        if self._app.takes_over:
            self._app.broker.on_takeover = self._app.take_over
            log.info("takeover: %s (another node goes on with this node's model runs if it dies)", s.takeover)
        if self._app.agents:
            log.info("agents: %s", ", ".join(sorted(self._app.agents)))
        if s.approval_tools:
            log.info("tools that ask a person first: %s (answers wait %gs)", ", ".join(s.approval_tools),
                     s.approval_timeout)
        if self.worker is not None:
            self._mesh = await WorkerMesh(self._app, self.worker).start()
            self._app.peers = self._mesh
        listen: dict[str, Any] = {"sock": self.sock} if self.sock is not None else {
            "host": s.host, "port": s.port, "reuse_port": self.worker is not None}
        self._server = await serve(
            self.handler,
            process_request=self.process_request,
            process_response=self.process_response,
            create_connection=StreamConnection,
            compression=None,
            extensions=lazy_deflate() if s.compression == "deflate" else None,
            open_timeout=s.open_timeout or None,
            ping_interval=None,  # (pings are self._keepalive's, for every connection)
            close_timeout=s.close_timeout,
            max_size=s.max_message_size,
            max_queue=16,
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            select_subprotocol=_select_subprotocol,
            logger=_library_logger(),
            **listen,
        )
        self._server.handler = self._connection  # (see _connection: no task for an idle connection)
        self._received = asyncio.get_running_loop().create_future()
        self._received.set_result(None)
        bound = [sock.getsockname()[0] for sock in self._server.sockets]
        self.origin_policy = OriginPolicy(s.allowed_origins, s.host, bound, self.port)
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
        if s.ping_interval:
            self._keepalive = Keepalive(s.ping_interval, s.ping_timeout or None)
        page_host = "localhost" if self.origin_policy.wildcard else _url_host(bound[0])
        log.info("wsagent listening on %s (the page: http://%s:%d/)", self.url, page_host, self.port)
        return self

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        assert self._server is not None
        host = self._server.sockets[0].getsockname()[0]
        return f"ws://{host}:{self.port}"

    def reload(self, new: Settings, agents: dict[str, AgentFactory] | None = None) -> list[str]:
        """Apply the settings that are safe to change live (SIGHUP); returns those that need a restart.

        The ``--agents`` files are imported again (``agents``: already imported, off the event loop, as
        ``serve`` does: a file that brings a framework in takes seconds to import)."""
        app = self.app
        old = self.settings
        changed = {f.name for f in dataclasses.fields(Settings) if getattr(new, f.name) != getattr(old, f.name)}
        later = sorted(changed - RELOADABLE)
        applied = {name: getattr(new, name) for name in changed & RELOADABLE}
        if applied.get("transcripts_dir"):
            prepare_directory(applied["transcripts_dir"])  # SystemExit: the reload fails, nothing changes
        settings = dataclasses.replace(old, **applied)
        workflows = _load_workflows(settings, app.upstream)
        if agents is None:
            agents = load_agents(settings.agents)
        app.auth = Authenticator(settings)
        self.settings = app.settings = settings
        self.origin_policy.allowed = frozenset(settings.allowed_origins)
        app.manager.max_connections = settings.max_connections
        app.manager.client_id_policy = settings.client_id_policy
        app.broker.budget, app.broker.budget_per_user = settings.replay_budget_bytes, settings.replay_budget_per_user
        app.workflows = workflows
        app.agents = agents
        logging.getLogger().setLevel(settings.log_level.upper())
        log.info("reloaded: %s changed%s", ", ".join(sorted(applied)) or "nothing",
                 f"; needs a restart: {', '.join(later)}" if later else "")
        return later

    async def __aenter__(self) -> WsAgentServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(drain=0)

    async def stop(self, drain: float | None = None) -> None:
        """Answer new connections 503 while in-flight streams finish for ``drain`` seconds, then stop
        listening, cancel the rest, close every client with 1001, and release the upstream.

        In a cluster (a rolling restart) the node hands its clients over instead: it stops listening at
        once, so new connections go to the other nodes, and closes every client with 1012 (service
        restart) so that it reconnects elsewhere and resumes its runs by key; the runs go on here,
        written to the cluster as ever, until they end or ``drain`` runs out.
        """
        if self._stopped:
            return
        self._stopped = True
        drain = self.settings.drain_timeout if drain is None else drain
        app = self._app
        if self._server is not None and app is not None:
            app.draining = True  # from here, a new connection is answered 503 with Retry-After
            cluster = app.broker.cluster_status()
            if drain > 0 and cluster is not None and cluster.get("redis") == "up":  # (else no node could go on)
                self._hand_over(app, drain)
            if drain > 0 and not app.idle.is_set():
                log.info("draining %d in-flight streams for up to %.1fs", app.inflight, drain)
                with suppress(TimeoutError):
                    async with asyncio.timeout(drain):
                        await app.idle.wait()
            self._server.server.close()
            handed = 0
            for run in app.broker.active_runs():  # (--takeover: another node goes on with those it can)
                if app.broker.hand_over(run):
                    handed += 1
                else:
                    run.cancel("server shutting down")
            if handed:
                log.info("left %d runs to the cluster's other nodes", handed)
            with suppress(TimeoutError):
                async with asyncio.timeout(self.settings.close_timeout):
                    await asyncio.gather(*(conn.outbox.flush() for conn in app.manager))
            self._server.close(close_connections=True)
            await _bounded("closing the connections", self._all_closed(app),
                           self.settings.close_timeout + STOP_STEP_LIMIT)
        if self._mesh is not None:
            await self._mesh.stop()
        if app is not None:
            await _bounded("leaving the cluster", app.broker.close(), STOP_STEP_LIMIT)
        if self._keepalive is not None:
            self._keepalive.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
        if app is not None:
            await _bounded("releasing the model server", app.upstream.close(), STOP_STEP_LIMIT)
        elif self._upstream is not None:
            await self._upstream.close()
        if self.simulator is not None:
            await self.simulator.stop()
        log.info("wsagent stopped")

    async def _all_closed(self, app: App) -> None:
        assert self._server is not None
        await self._server.wait_closed()
        await app.manager.wait_empty()  # (a message-driven connection has no task the library waits for)

    def _hand_over(self, app: App, drain: float) -> None:
        """A rolling restart: no new connection here, every client told to move (1012), and the runs
        they leave kept going (as in a resume grace) for the rest of ``drain``."""
        assert self._server is not None
        self._server.server.close()
        app.handing_over = True
        for run in app.broker.active_runs():  # wherever its client goes, and however often it moves again
            run.grace = max(run.grace, drain)
        log.info("handing %d connections and %d runs over to the cluster for up to %.1fs", len(app.manager),
                 app.inflight, drain)
        for conn in app.manager:
            conn.close_soon(CLOSE_SERVICE_RESTART, "service restart: reconnect and resume")

    async def _sweep(self) -> None:
        interval = max(0.05, min(1.0, self.settings.slow_client_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            self.app.manager.sweep(loop.time(), self.settings.slow_client_timeout)

    # -- HTTP, before the upgrade ----------------------------------------

    async def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        answer = self._answer(connection, request)
        response = await answer if inspect.isawaitable(answer) else answer
        if response is not None and response.status_code >= 400:
            log.info("refused %s %s: %d %s", _ip(connection.remote_address),
                     printable(request.path.partition("?")[0][:200]), response.status_code,
                     printable(response.body.decode(errors="replace").strip()[:300]))
        return response

    def _answer(self, connection: ServerConnection, request: Request) -> Response | Awaitable[Response] | None:
        """The plain HTTP answer to ``request``, or None to go on with the upgrade."""
        path = request.path.partition("?")[0]
        for name in _SINGLE_HEADERS:
            if len(request.headers.get_all(name)) > 1:
                return http_response(400, f"More than one {name} header.\n")
        if request.method != "GET":
            text = "" if request.method == "HEAD" else (
                f"{request.method} is not supported: wsagent answers GET only "
                "(a WebSocket upgrade, or GET /healthz).\n")
            return http_response(405, text, extra={"Allow": "GET"})
        http_handler = self.http_routes.get(path)
        if http_handler is not None:
            return http_handler(self.app, request)
        if self.router.match(path) is None:
            return http_response(404, f"No WebSocket route at {path}.\n")
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return http_response(426, f"{path} is a WebSocket endpoint: connect with a WebSocket client.\n",
                                 extra={"Upgrade": "websocket"})
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_policy.allows(origin):
            return http_response(403, f"The page at origin {origin} may not connect; see --allowed-origins.\n")
        app = self.app
        if app.draining:
            return http_response(503, "Server is shutting down.\n", extra={"Retry-After": "1"})
        if app.manager.full:
            return http_response(503, "Too many connections; try again later.\n", extra={"Retry-After": "1"})
        if app.manager.from_ip(_ip(connection.remote_address)) >= self.settings.max_connections_per_ip:
            return http_response(429, "Too many connections from your address.\n", extra={"Retry-After": "1"})
        return None

    def process_response(self, connection: ServerConnection, request: Request, response: Response) -> None:
        """Name the worker process that took the connection (``--workers``: which one drains it)."""
        response.headers["X-Wsagent-Worker"] = self.worker_header

    # -- WebSocket, after the upgrade ------------------------------------

    async def _connection(self, ws: ServerConnection) -> None:
        """A connection's task, in place of the library's: the opening handshake within ``open_timeout``,
        then :meth:`handler`. The library's keeps its task (and closes the connection) until the handler
        returns; a message-driven route's connection is left open when :meth:`handler` returns, and its
        task ends: an idle connection has none (at 10,000 of them, 2.9 KB of Python heap each)."""
        assert self._server is not None
        server = self._server
        try:
            try:
                async with asyncio.timeout(self.settings.open_timeout or None):
                    await ws.handshake(self.process_request, self.process_response, SERVER)
            except Exception:
                ws.transport.abort()
                return
            if ws.protocol.state is not State.OPEN:
                ws.transport.abort()
                return
            server.all_connections.add(ws)
            await self.handler(ws)
        finally:
            server.handler_tasks.discard(asyncio.current_task())

    async def handler(self, connection: ServerConnection) -> None:
        """Route an open connection: check who it is, then hand it to its route. A message-driven route's
        connection outlives this call; a handler's is closed when its handler returns."""
        assert isinstance(connection, StreamConnection)
        ws = connection
        app = self.app
        path = ws.request.path.partition("?")[0] if ws.request else "/"
        match = self.router.match(path)
        if match is None:  # process_request refused it already; defensive for custom routers
            await close_or_abort(ws, 1011, "no route", self.settings.close_timeout)
            self._server_forgets(ws)
            return
        route, params = match
        remote = ws.remote_address
        remote_text = f"{remote[0]}:{remote[1]}" if isinstance(remote, tuple) else str(remote)
        conn = Connection(ws, path, params, remote_text, self.settings.outbox_bytes, self.settings.close_timeout,
                          route=route.pattern, ip=_ip(remote), id=connection_id(self._id_prefix))
        if self.settings.socket_send_buffer:
            sock = ws.transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.settings.socket_send_buffer)
        app.manager.register(conn, route.pattern)
        if self._keepalive is not None:
            self._keepalive.add(ws)
        log.info("open %s %s from %s", conn.id, printable(path), remote_text, extra={"conn": conn.id})
        driven = False  # (a message-driven connection's end is the connection's own)
        try:
            refusal = await app.authenticate(conn, route.pattern, route.auth or self.settings.require_auth)
            if refusal is not None:
                code, reason = refusal
                await close_or_abort(ws, code, reason, self.settings.close_timeout)
                return
            if route.session is not None:
                session = route.session(app, conn)
                _forget_handshake(ws, self._received, request=True)
                ws.serve(session, app.broker.answers_at_once)  # (its session ends it: MessageSession.on_close)
                driven = True
                return
            ws.on_leave = partial(app.release, conn)
            _forget_handshake(ws, self._received)
            assert route.handler is not None
            await route.handler(app, conn)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("handler for %s failed on %s", printable(path), conn.id)
            await close_or_abort(ws, 1011, "internal error", self.settings.close_timeout)
        finally:
            if not driven:
                await close_or_abort(ws, 1000, "", self.settings.close_timeout)
                self._closed(conn)

    def _closed(self, conn: Connection) -> None:
        """A connection's end, whatever its route: what it watched is released, it is forgotten, and its
        ``close`` line logged."""
        ws = conn.ws
        if conn.expiry_timer is not None:
            conn.expiry_timer.cancel()
        ws.on_leave = None
        self.app.release(conn)
        conn.outbox.close()
        self.app.manager.unregister(conn)
        self._server_forgets(ws)
        sent = ws.protocol.close_sent
        log.info("close %s %s from %s code=%s duration=%.3fs", conn.id, printable(conn.path), conn.remote,
                 sent.code if sent is not None else ws.close_code, time.monotonic() - conn.opened,
                 extra={"conn": conn.id})

    def _server_forgets(self, ws: ServerConnection) -> None:
        if self._server is not None:
            self._server.all_connections.discard(ws)


#: Headers a handshake may carry once: two of them are a malformed request (HTTP 400), not a crash.
_SINGLE_HEADERS = ("Host", "Upgrade", "Origin", "Authorization", "Sec-WebSocket-Key", "Sec-WebSocket-Version")


#: Seconds a step of :meth:`WsAgentServer.stop` may take before the stop goes on without it: leaving the
#: cluster (a few Redis round trips), releasing the model server (cancels of background responses, each bounded
#: only by the connect and first-byte timeouts: 70 s by default, for a model server that does not answer).
STOP_STEP_LIMIT = 5.0


async def _bounded(step: str, done: Awaitable[None], limit: float) -> None:
    """Await ``done`` for at most ``limit`` seconds: a stop must end (systemd, the test harness and the
    operator are waiting). Past the limit, say what was still running then (each task's awaits), cancel it,
    and go on."""
    task = asyncio.ensure_future(done)
    try:
        finished, _ = await asyncio.wait((task,), timeout=limit)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if finished:
        task.result()
        return
    log.warning("stopping: %s took more than %gs; going on without it. Still running: %s", step, limit,
                "; ".join(_awaiting(t) for t in asyncio.all_tasks() if t is not asyncio.current_task()))
    task.cancel()
    await asyncio.wait((task,), timeout=1.0)  # (a task that ignores its cancellation is left behind)


def _awaiting(task: asyncio.Task[Any]) -> str:
    """``task``'s chain of awaits, outermost first: ``stop:212 > close:140 > execute:80``."""
    where: list[str] = []
    awaited: Any = task.get_coro()
    while awaited is not None and len(where) < 12:
        frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
        if frame is None:
            break
        where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
    return " > ".join(where) or task.get_name()


def _url_host(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def _load_workflows(settings: Settings, upstream: UpstreamClient) -> dict[str, WorkflowFactory]:
    if settings.workflows:
        return load_workflows(settings.workflows, upstream, BUILTIN_TOOLS, settings.approval_tools)
    spec = json.loads(resources.files("wsagent").joinpath("data/workflows.json").read_text(encoding="utf-8"))
    return build_workflows(spec, upstream, BUILTIN_TOOLS, settings.approval_tools)


def _forget_handshake(ws: ServerConnection, received: asyncio.Future[None] | None, request: bool = False) -> None:
    """Drop what the handshake left once the connection is checked and routed: the request's headers (with
    ``request``, its path too: a message-driven route has read its query when it opened), the response,
    the library's subprotocol closure, and its future for the request (``received``, done, is one for all).

    The library keeps them for the connection's life; nothing reads them after this (the path, the
    route's parameters, the user and the address are on :class:`Connection`, the query on the request),
    and at 10,000 idle connections the headers were a quarter of the server's memory: 16.6 KiB per
    connection with them, 12.4 without (RSS, measured with ``scripts/bench.py``'s idle scenario).
    """
    assert ws.request is not None
    ws.request.headers = Headers()  # (the object itself stays: the library's parser holds it as well)
    if request:
        ws.request.path = "/"
    ws.response = None
    forget_subprotocol_choice(ws.protocol)
    if received is not None:
        ws.request_rcvd = received


async def _broker(settings: Settings, worker: Worker | None) -> Broker:
    """Where runs, client ids and counts live: this process, or with ``--redis-url`` the cluster."""
    if not settings.redis_url:
        return LocalBroker(settings.replay_budget_bytes, settings.replay_budget_per_user)
    try:
        from ..engine.cluster import Link, RedisBroker, default_node_id
    except ImportError as exc:
        raise SystemExit(f"--redis-url needs redis-py: pip install \".[cluster]\" in your clone ({exc})") from None
    node = settings.node_id or default_node_id()
    if settings.node_id and worker is not None:  # each worker of --workers is a node of its own
        node = f"{settings.node_id}-{worker.tag}"
    broker = RedisBroker(settings.redis_url, node, settings.replay_budget_bytes, settings.replay_budget_per_user)

    def said(link: Link) -> None:  # what `systemctl status` shows
        systemd.notify(f"STATUS=cluster node {node}: Redis {link.value}")

    broker.on_link = said
    await broker.start()
    log.info("cluster: node %s, Redis at %s (%s)", node, broker.url, broker.link.state.value)
    return broker


def _library_logger() -> logging.Logger:
    logger = logging.getLogger("wsagent.websockets")
    if not any(isinstance(f, Redactor) for f in logger.filters):
        logger.addFilter(Redactor())
    return logger


def _ip(remote: Any) -> str:
    return str(remote[0]) if isinstance(remote, tuple) else str(remote)


def _select_subprotocol(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """Pick ``wsagent`` when offered; never echo a ``bearer.<token>`` entry back."""
    return Subprotocol(SUBPROTOCOL) if SUBPROTOCOL in offered else None
